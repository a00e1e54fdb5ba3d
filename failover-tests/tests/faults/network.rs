//! Network faults between the nodes of the failover suite: partitions,
//! slow, stalled and throttled links, and the primary's memory under them.

use std::time::{Duration, Instant};

use failover_tests::cluster::{Cluster, NodeOpts, NodeProc};
use failover_tests::load::Load;
use failover_tests::proxy::Fault;

use super::{carry_on_and_check, expect_takeover, protected, proxied_pair, proxied_pair_with, rt, take_over, Row, T};

/// Network faults between the nodes, through a proxy. `expect_takeover`:
/// the fault must make the secondary take over and the old primary be fenced
/// once the link heals.
pub(super) fn network(row: &mut Row, name: &str, fault: Fault, hold_for: Duration, expect_takeover: bool) {
    let c = Cluster::new(name);
    network_with(row, name, fault, hold_for, expect_takeover, NodeOpts::default(), &c);
}

/// [`network`] with these node options in this cluster (a witness: the
/// takeover is to term 2, the primary's own being 1).
pub(super) fn network_with(
    row: &mut Row,
    name: &str,
    fault: Fault,
    hold_for: Duration,
    expect_takeover: bool,
    o: NodeOpts,
    c: &Cluster,
) {
    let o = NodeOpts { verify_digest: true, ..o };
    let gen = if o.witness.is_some() { 2 } else { 1 };
    let rt = rt();
    let Some((mut s, proxy, mut p)) = proxied_pair(c, &o, &rt, row, name) else {
        return;
    };
    let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
    load.wait_more(50, T);
    let rss0 = rss_kib(&p);
    eprintln!("{name}: injecting {fault:?} for {hold_for:?}");
    proxy.set(fault);
    let t = Instant::now();
    let mut rss_max = rss0;
    while t.elapsed() < hold_for {
        std::thread::sleep(Duration::from_millis(100));
        rss_max = rss_max.max(rss_kib(&p));
    }
    proxy.set(Fault::Pass);
    let took_over = s.status().is_some_and(|v| v["role"] == "primary");
    let survivor = if took_over {
        match take_over(&s, gen) {
            Some(st) => row.failover(&st),
            None => row.fail(format!("{name}: odd takeover state")),
        }
        match p.wait_exit(T) {
            Some(7) => eprintln!("  the old primary learned of the new generation and exited fenced"),
            other => row.fail(format!(
                "{name}: old primary not fenced after healing ({}):\n{}",
                runtime::harness::waited_text(other),
                p.log_tail()
            )),
        }
        s.service
    } else {
        if expect_takeover {
            row.fail(format!("{name}: expected the secondary to take over"));
        }
        if !protected(&p) {
            row.fail(format!("{name}: the primary did not get protection back:\n{}", p.log_tail()));
        }
        eprintln!(
            "  no takeover; the primary is protected again; primary RSS {} MiB -> max {} MiB",
            rss0 >> 10,
            rss_max >> 10
        );
        if rss_max > rss0 + (256 << 10) {
            row.fail(format!("{name}: primary memory grew from {} to {} MiB", rss0 >> 10, rss_max >> 10));
        }
        let st = s.status().expect("secondary");
        if st["protection"] == "diverged" {
            row.fail(format!("{name}: G2: replica diverged"));
        }
        p.service
    };
    carry_on_and_check(row, load, 30, &rt, survivor, c, name);
    let _ = &mut s;
}

fn rss_kib(p: &NodeProc) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", p.child.id()))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Epochs stretched to about a second at a high request rate (issue 13):
/// 256 clients, and the data link throttled to 64 KiB/s for 5 s (the
/// heartbeat channel is throttled too, but its frames are small), so each
/// epoch waits long for its ack and the engine stretches the next one (at
/// least 0.5 s, 50 epoch lengths, must be seen: since sub-page deltas an
/// epoch of this load is a few KB, and 128 KiB/s stretched them to 0.5 s
/// only; 32 KiB/s starved the link past the 2 s no-read limit). The session
/// must live through it: no hold, no resync (a lost session would end in
/// one), protection back once the link heals;
/// then a kill -9 of the primary loses no acknowledged write.
pub(super) fn stretched_epochs(row: &mut Row) {
    const RATE: u64 = 64 << 10;
    let c = Cluster::new("stretched");
    let o = NodeOpts { verify_digest: true, ..NodeOpts::default() };
    let rt = rt();
    let Some((s, proxy, mut p)) = proxied_pair(&c, &o, &rt, row, "") else {
        return;
    };
    let load = Load::start(&rt, vec![p.service, s.service], 256, 4, 1);
    load.wait_more(2000, T);
    let st0 = p.status().expect("status");
    let (syncs0, acked0) = (st0["syncs"].as_u64(), load.acked());
    let len0 = st0["epoch_len_us_max"].as_f64().unwrap_or(0.0);
    proxy.set(Fault::Throttle(RATE));
    let t = Instant::now();
    let (mut len_max, mut lag_max, mut held_max) = (0f64, 0u64, 0u64);
    let mut holds = Vec::new();
    let mut during = 0;
    // the stretched epochs end (and show in status) after the link heals
    while t.elapsed() < Duration::from_secs(8) {
        if t.elapsed() > Duration::from_secs(5) && during == 0 {
            during = load.acked() - acked0;
            proxy.set(Fault::Pass);
        }
        std::thread::sleep(Duration::from_millis(50));
        let Some(st) = p.status() else { continue };
        len_max = len_max.max(st["epoch_len_us_max"].as_f64().unwrap_or(0.0));
        lag_max = lag_max.max(st["lag_epochs"].as_u64().unwrap_or(0));
        held_max = held_max.max(st["held_outputs"].as_u64().unwrap_or(0));
        if !st["hold"].is_null() {
            holds.push(st["hold"].to_string());
        }
    }
    let back = protected(&p);
    load.wait_more(500, T);
    let st = p.status().expect("status");
    eprintln!(
        "stretched: longest epoch seen {:.2} s, lag up to {lag_max} epochs, up to {held_max} outputs held, {during} writes acked in the 5 s; syncs {:?} -> {:?}",
        len_max / 1e6,
        syncs0,
        st["syncs"].as_u64()
    );
    if len0 >= 5e5 {
        row.fail(format!("an epoch of {:.0} ms before the fault: the scenario proves nothing", len0 / 1e3));
    } else if len_max < 5e5 {
        row.fail(format!(
            "no epoch was stretched to 0.5 s (longest {:.0} ms): the scenario did not happen",
            len_max / 1e3
        ));
    }
    if !holds.is_empty() || st["syncs"].as_u64() != syncs0 || !back {
        row.fail(format!(
            "the session did not live through stretched epochs: holds {holds:?}, syncs {syncs0:?} -> {:?}, protected again {back}:\n{}",
            st["syncs"].as_u64(),
            p.log_tail()
        ));
    }
    if s.status().expect("s")["protection"] == "diverged" {
        row.fail("G2: replica diverged".into());
    }
    p.kill9();
    if !expect_takeover(row, &s, 1, "no takeover") {
        return;
    }
    load.wait_more(100, T);
    let v = load.finish(&rt, s.service);
    row.check(&v, &c);
}

/// The data connection stands still while heartbeats flow (a wedged
/// receiver, or a middlebox stalling one flow): the proxy holds every
/// connection that has carried more than 1 MiB to the secondary. The acks
/// stop and so do the bytes the secondary reports read, so the primary must
/// end the session for the missing ack (its hold says the link stood still)
/// instead of waiting on a link that only looks slow. Whatever follows (the
/// secondary takes over once the heartbeats stop, or the primary syncs
/// again after the link heals), nothing acknowledged is lost.
pub(super) fn stalled_data_path(row: &mut Row) {
    let c = Cluster::new("stalled");
    let o = NodeOpts { verify_digest: true, ..NodeOpts::default() };
    let rt = rt();
    let Some((mut s, proxy, mut p)) = proxied_pair(&c, &o, &rt, row, "") else {
        return;
    };
    let load = Load::start(&rt, vec![p.service, s.service], 16, 16, 1);
    load.wait_more(200, T);
    proxy.set(Fault::StallBulk);
    let t = Instant::now();
    // the hold that follows can be short (the secondary answers again at
    // once and ends it): the primary's log says why the session ended
    let said = |p: &NodeProc| {
        std::fs::read_to_string(&p.log)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("no byte of the data connection read"))
            .map(str::to_string)
    };
    let mut line = None;
    while line.is_none() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
        line = said(&p);
    }
    let found = t.elapsed();
    proxy.set(Fault::Pass);
    match line {
        Some(l) => eprintln!("stalled: the primary ended the session within {:.1} s: {l}", found.as_secs_f64()),
        None => row.fail(format!("the primary never ended a session whose link stood still:\n{}", p.log_tail())),
    }
    let survivor = if s.wait_status(Duration::from_secs(3), |v| v["role"] == "primary").is_some() {
        match take_over(&s, 1) {
            Some(st) => row.failover(&st),
            None => row.fail("odd takeover state".into()),
        }
        match p.wait_exit(T) {
            Some(7) => eprintln!("  the secondary took over; the old primary exited fenced"),
            other => row.fail(format!(
                "old primary not fenced after healing ({}):\n{}",
                runtime::harness::waited_text(other),
                p.log_tail()
            )),
        }
        s.service
    } else {
        if !protected(&p) {
            row.fail(format!("no takeover, and the primary did not get protection back:\n{}", p.log_tail()));
        }
        eprintln!("  no takeover; the primary is protected again");
        p.service
    };
    carry_on_and_check(row, load, 30, &rt, survivor, &c, "");
    let _ = &mut s;
}

/// A write-heavy guest behind a slow but moving link (issue 28, item 4):
/// the proxy passes 2 MiB/s while the guest rewrites 64 MiB flat out. The
/// primary may hold `--max-queued-mib 32` of page copies for the link; past
/// that the guest pauses. Its RSS must stay under its start + the budget +
/// one epoch (the 64 MiB working set, `--max-epoch-pages` 16384) + 64 MiB;
/// before, every stretched epoch (one each 5 s) queued another full copy
/// (up to ~26 of them), and ring-full exits grew without bound. The replica
/// is checked against the primary's memory digest every epoch; healed, the
/// pair is protected again.
pub(super) fn slow_link_budget(row: &mut Row) {
    const BUDGET_MIB: u64 = 32;
    const EPOCH_MIB: u64 = 64;
    let c = Cluster::new("slow-budget");
    let so = NodeOpts {
        mem: "256M",
        verify_digest: true,
        heartbeat_timeout_ms: 1000,
        extra: vec!["--max-queued-mib".into(), BUDGET_MIB.to_string()],
        ..NodeOpts::default()
    };
    let mut po = NodeOpts { guest: "dirty", ..so.clone() };
    po.extra.extend(["--ws-pages", "16384", "--rate", "0"].map(String::from));
    let rt = rt();
    let Some((s, proxy, p)) = proxied_pair_with(&c, &so, &po, &rt, row, "slow-budget") else { return };
    std::thread::sleep(Duration::from_millis(500));
    let rss0 = rss_kib(&p);
    proxy.set(Fault::Throttle(2 << 20));
    let t = Instant::now();
    let mut rss_max = rss0;
    while t.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(100));
        rss_max = rss_max.max(rss_kib(&p));
    }
    proxy.set(Fault::Pass);
    let st = p.status().unwrap_or_default();
    let limit = rss0 + ((BUDGET_MIB + EPOCH_MIB + 64) << 10);
    eprintln!(
        "  12 s at 2 MiB/s: primary RSS {} MiB -> max {} MiB (limit {} MiB); queued max {} MiB, budget pauses {}",
        rss0 >> 10,
        rss_max >> 10,
        limit >> 10,
        st["queued_bytes_max"].as_u64().unwrap_or(0) >> 20,
        st["budget_pauses"]
    );
    if rss_max > limit {
        row.fail(format!(
            "the primary grew from {} to {} MiB (limit {} MiB):\n{}",
            rss0 >> 10,
            rss_max >> 10,
            limit >> 10,
            p.log_tail()
        ));
    }
    if !protected(&p) {
        row.fail(format!("not protected again after the link healed:\n{}", p.log_tail()));
    }
    if s.status().is_none_or(|v| v["protection"] == "diverged" || v["role"] != "secondary") {
        row.fail(format!("the secondary diverged or took over:\n{}", s.log_tail()));
    }
}
