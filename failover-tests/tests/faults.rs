//! The failover suite (issue 5): real castor processes on loopback, a kv
//! client load that records every acknowledged write, one fault per
//! scenario, and four guarantees checked after each:
//!
//! * G1: no acknowledged write lost, none applied twice (table read back);
//! * G2: the replica is page-exact (verification mode: the secondary checks
//!   its replica's digest against the primary's after every epoch);
//! * G3: no split brain (each generation's output released by one node only);
//! * G4: the guest keeps serving (longest stretch without an ack, reported).
//!
//! One test runs every scenario in turn and ends with a summary table.
//! `FAILOVER_TRIALS=N` sets the random kill trials (default 30),
//! `FAILOVER_SEED=S` their schedule, `FAILOVER_SCENARIOS=a,b` a subset.

use std::time::{Duration, Instant};

use failover_tests::cluster::{Cluster, NodeOpts, NodeProc};
use failover_tests::load::{split_brain, Load, Verdict};
use failover_tests::proxy::{Fault, Proxy};
use failover_tests::serial;

#[path = "faults/witness.rs"]
mod witness;

const T: Duration = Duration::from_secs(30);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

#[derive(Debug, Default, Clone)]
struct Row {
    scenario: String,
    trials: u64,
    failovers: u64,
    lost: u64,
    duplicated: u64,
    split_brain: u64,
    max_failover_ms: f64,
    max_gap_ms: f64,
    failures: Vec<String>,
}

impl Row {
    fn new(s: &str) -> Row {
        Row { scenario: s.into(), ..Row::default() }
    }
    fn fail(&mut self, msg: String) {
        eprintln!("  FAILED: {msg}");
        self.failures.push(msg);
    }
    fn check(&mut self, v: &Verdict, c: &Cluster) {
        self.lost += v.lost;
        self.duplicated += v.duplicated;
        self.max_gap_ms = self.max_gap_ms.max(v.max_gap.as_secs_f64() * 1e3);
        if v.lost > 0 || v.duplicated > 0 {
            self.fail(format!("G1: {} lost, {} duplicated of {} acked", v.lost, v.duplicated, v.acked));
        }
        if v.max_gap > Duration::from_secs(10) {
            self.fail(format!("G4: no acknowledged write for {:?}", v.max_gap));
        }
        let sb = split_brain(&c.release_log());
        if !sb.is_empty() {
            self.split_brain += sb.len() as u64;
            self.fail(format!("G3: generations released by two nodes: {sb:?}"));
        }
        eprintln!(
            "  found: acked {} writes, {} keys checked, lost {}, duplicated {}, uncertain {}, longest gap {:.0} ms",
            v.acked,
            v.keys_checked,
            v.lost,
            v.duplicated,
            v.uncertain,
            v.max_gap.as_secs_f64() * 1e3
        );
    }
    fn failover(&mut self, s: &serde_json::Value) {
        self.failovers += 1;
        let ms = s["last_failover_ms"].as_f64().unwrap_or(0.0);
        self.max_failover_ms = self.max_failover_ms.max(ms);
        eprintln!("  failover to {} (generation {}) in {ms:.0} ms", s["node"], s["generation"]);
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn protected(p: &NodeProc) -> bool {
    p.wait_status(T, |v| v["protection"] == "protected").is_some()
}

/// Counts a trial and waits for `p` to be protected; if it is not, records
/// that (led by `what`, when given) with the primary's log.
fn trial_protected(row: &mut Row, p: &NodeProc, what: &str) -> bool {
    row.trials += 1;
    if protected(p) {
        return true;
    }
    let lead = if what.is_empty() { String::new() } else { format!("{what}: ") };
    row.fail(format!("{lead}never protected:\n{}", p.log_tail()));
    false
}

/// A secondary and a primary joined to it directly, counted as a trial;
/// None (the failure recorded) if the pair never reaches protection.
fn pair(c: &Cluster, o: &NodeOpts, row: &mut Row) -> Option<(NodeProc, NodeProc)> {
    let s = c.secondary("s", o, None);
    let p = c.primary("p", o, s.listen.expect("listen"));
    trial_protected(row, &p, "").then_some((s, p))
}

/// As [`pair`], with a fault-injecting proxy between the primary and the
/// secondary's listen address, the secondary started with `so` and the
/// primary with `po`.
fn proxied_pair_with(
    c: &Cluster,
    so: &NodeOpts,
    po: &NodeOpts,
    rt: &tokio::runtime::Runtime,
    row: &mut Row,
    what: &str,
) -> Option<(NodeProc, Proxy, NodeProc)> {
    let s = c.secondary("s", so, None);
    let proxy = rt.block_on(Proxy::start(s.listen.expect("listen")));
    let p = c.primary("p", po, proxy.addr);
    trial_protected(row, &p, what).then_some((s, proxy, p))
}

/// [`proxied_pair_with`] with the same options for both nodes.
fn proxied_pair(
    c: &Cluster,
    o: &NodeOpts,
    rt: &tokio::runtime::Runtime,
    row: &mut Row,
    what: &str,
) -> Option<(NodeProc, Proxy, NodeProc)> {
    proxied_pair_with(c, o, o, rt, row, what)
}

/// The clients must get `acks` more writes acknowledged (a failure led by
/// `what`, when given); then the load ends, read back from `survivor`, and
/// its verdict is checked and returned.
fn carry_on_and_check(
    row: &mut Row,
    load: Load,
    acks: u64,
    rt: &tokio::runtime::Runtime,
    survivor: std::net::SocketAddr,
    c: &Cluster,
    what: &str,
) -> Verdict {
    if !load.wait_more(acks, T) {
        let lead = if what.is_empty() { String::new() } else { format!("{what}: ") };
        row.fail(format!("{lead}clients did not carry on"));
    }
    let v = load.finish(rt, survivor);
    row.check(&v, c);
    v
}

fn take_over(s: &NodeProc, gen: u64) -> Option<serde_json::Value> {
    s.wait_status(T, |v| v["role"] == "primary" && v["generation"].as_u64() == Some(gen))
}

/// Waits for `s` to take over as generation `gen` and counts the failover;
/// if it does not, records `what` with the node's log and returns false.
fn expect_takeover(row: &mut Row, s: &NodeProc, gen: u64, what: &str) -> bool {
    match take_over(s, gen) {
        Some(st) => {
            row.failover(&st);
            true
        }
        None => {
            row.fail(format!("{what}:\n{}", s.log_tail()));
            false
        }
    }
}

/// Random kill -9 of the primary: during the initial sync, or at a random
/// moment of protected operation (between epochs, while one is sent, after
/// its end before its ack: whatever the clock hits).
fn kill_trials(row: &mut Row, trials: u64, seed: u64) {
    let mut rng = Rng(seed | 1);
    for t in 0..trials {
        let during_sync = t % 6 == 0;
        let c = Cluster::new(&format!("kill{t}"));
        let o = NodeOpts { verify_digest: t % 3 == 0, ..NodeOpts::default() };
        let s = c.secondary("s", &o, None);
        let mut p = c.primary("p", &o, s.listen.expect("listen"));
        row.trials += 1;
        if during_sync {
            let delay = rng.below(60);
            if p.wait_status(T, |v| v["protection"] == "syncing" || v["protection"] == "protected").is_none() {
                row.fail(format!("trial {t}: primary never started syncing"));
                continue;
            }
            std::thread::sleep(Duration::from_millis(delay));
            let was = p.status().map(|v| v["protection"].clone());
            p.kill9();
            eprintln!("trial {t}: killed the primary {delay} ms into the sync (it was {was:?})");
            std::thread::sleep(Duration::from_millis(600));
            let st = s.status().expect("secondary alive");
            if st["role"] == "primary" {
                // the sync had completed an epoch: a committed replica took over
                if st["committed_epoch"].is_null() {
                    row.fail(format!("trial {t}: took over without a committed epoch"));
                }
                row.failover(&st);
            } else {
                eprintln!("  found: no committed epoch yet, the secondary stays a secondary (correct)");
            }
            continue;
        }
        if !protected(&p) {
            row.fail(format!("trial {t}: never protected:\n{}", p.log_tail()));
            continue;
        }
        let rt = rt();
        let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
        load.wait_more(20, T);
        let delay = rng.below(400);
        std::thread::sleep(Duration::from_millis(delay));
        p.kill9();
        eprintln!(
            "trial {t}: kill -9 of the primary {delay} ms into protected operation (verify digests: {})",
            o.verify_digest
        );
        if !expect_takeover(row, &s, 1, &format!("trial {t}: no takeover")) {
            continue;
        }
        carry_on_and_check(row, load, 30, &rt, s.service, &c, &format!("trial {t}"));
        if o.verify_digest {
            let st = s.status().expect("status");
            if st["protection"] == "diverged" {
                row.fail(format!("trial {t}: G2: replica diverged"));
            }
        }
    }
}

/// A named crash point in the primary: the secondary takes over.
fn primary_crash_points(row: &mut Row) {
    for point in common::crashpoint::POINTS.iter().filter(|p| p.starts_with("primary.")) {
        let c = Cluster::new(&format!("cp-{point}"));
        let s = c.secondary("s", &NodeOpts::default(), None);
        let po = NodeOpts { env: vec![("CASTOR_CRASH_AT".into(), format!("{point}:60"))], ..NodeOpts::default() };
        let mut p = c.primary("p", &po, s.listen.expect("listen"));
        row.trials += 1;
        if !protected(&p) {
            row.fail(format!("{point}: never protected:\n{}", p.log_tail()));
            continue;
        }
        let rt = rt();
        let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
        let code = p.wait_exit(T);
        eprintln!("{point}: the primary aborted there (exit {code:?})");
        if code.is_none() {
            row.fail(format!("{point}: crash point never reached"));
            continue;
        }
        if !expect_takeover(row, &s, 1, &format!("{point}: no takeover")) {
            continue;
        }
        carry_on_and_check(row, load, 30, &rt, s.service, &c, point);
    }
}

/// A named crash point in the secondary: the primary notices and holds (a
/// refused port proves nothing without a witness); the secondary restarts
/// with its state dir (same node id, same generation), the primary takes it
/// back, releases what it held; nothing is lost.
fn secondary_crash_points(row: &mut Row) {
    for point in common::crashpoint::POINTS.iter().filter(|p| p.starts_with("secondary.")) {
        let c = Cluster::new(&format!("cs-{point}"));
        let plain = NodeOpts { state_dir: true, ..NodeOpts::default() };
        let so = NodeOpts { env: vec![("CASTOR_CRASH_AT".into(), format!("{point}:40"))], ..plain.clone() };
        let rt = rt();
        let Some((mut s, proxy, p)) = proxied_pair_with(&c, &so, &NodeOpts::default(), &rt, row, point) else {
            continue;
        };
        let load = Load::start(&rt, vec![p.service], 4, 16, 1);
        let code = s.wait_exit(T);
        eprintln!("{point}: the secondary aborted there (exit {code:?})");
        match p.wait_status(T, |v| v["protection"] == "holding") {
            Some(v) => eprintln!("  the primary holds: {}", v["hold"]),
            None => row.fail(format!("{point}: primary did not hold:\n{}", p.log_tail())),
        }
        drop(s);
        let s2 = c.secondary("s", &plain, None);
        proxy.set_upstream(s2.listen.expect("listen"));
        if !protected(&p) {
            row.fail(format!("{point}: the restarted secondary did not protect it again:\n{}", p.log_tail()));
            continue;
        }
        eprintln!("  the secondary restarted with its state dir; the primary took it back");
        if !load.wait_more(50, T) {
            row.fail(format!("{point}: clients stalled"));
        }
        let v = load.finish(&rt, p.service);
        row.check(&v, &c);
    }
}

/// The secondary is killed; the primary holds until the operator says
/// `unprotect`; a new secondary joins it and re-protects it; a later
/// primary kill fails over to it.
fn secondary_killed_then_reprotected(row: &mut Row) {
    let c = Cluster::new("reprotect");
    let o = NodeOpts::default();
    let mut s = c.secondary("s", &o, None);
    let mut p = c.primary_with("p", &o, s.listen, true);
    row.trials += 1;
    if !protected(&p) {
        row.fail("never protected".into());
        return;
    }
    let rt = rt();
    let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
    load.wait_more(50, T);
    s.kill9();
    eprintln!("killed the secondary");
    if p.wait_status(T, |v| v["protection"] == "holding").is_none() {
        row.fail(format!("primary did not hold:\n{}", p.log_tail()));
    }
    let r = p.command("unprotect").unwrap_or_default();
    eprintln!("  the primary holds; the operator says unprotect: {}", r.trim());
    if p.wait_status(T, |v| v["protection"] == "unprotected").is_none() {
        row.fail(format!("primary did not go unprotected:\n{}", p.log_tail()));
    }
    if !load.wait_more(100, T) {
        row.fail("clients stalled while unprotected".into());
    }
    let s2 = c.secondary("s2", &o, p.listen);
    load.add_node(s2.service);
    if !protected(&p) {
        row.fail(format!("no re-protection:\n{}", p.log_tail()));
        return;
    }
    eprintln!("re-protected by a new secondary");
    load.wait_more(100, T);
    p.kill9();
    if !expect_takeover(row, &s2, 1, "no takeover by the new secondary") {
        return;
    }
    carry_on_and_check(row, load, 50, &rt, s2.service, &c, "");
}

/// Without a witness, the double fault of issue 11: primary frozen, the
/// secondary takes over and serves, the promoted node dies, the old primary
/// wakes. It must hold (a refused port proves nothing), and when the
/// promoted node is restarted as a secondary with its state dir, that node
/// refuses the old primary as stale and fences it.
fn two_node_double_fault(row: &mut Row) {
    let c = Cluster::new("2n-double-fault");
    let o = NodeOpts { state_dir: true, ..NodeOpts::default() };
    let rt = rt();
    let Some((mut s, proxy, mut p)) = proxied_pair(&c, &o, &rt, row, "") else {
        return;
    };
    let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
    load.wait_more(50, T);
    let frozen_at = witness::freeze(&p);
    if !expect_takeover(row, &s, 1, "no takeover") {
        return;
    }
    load.wait_more(30, T);
    s.kill9();
    let frozen = witness::released_by(&c, "p");
    p.thaw();
    eprintln!("froze the primary, the secondary took over, then was killed; thawed the old primary");
    std::thread::sleep(Duration::from_millis(2000));
    match p.status() {
        Some(v) if v["protection"] == "holding" => eprintln!("  the old primary holds: {}", v["hold"]),
        other => row.fail(format!("the old primary after the double fault: {other:?}")),
    }
    let s2 = c.secondary("s", &o, None);
    proxy.set_upstream(s2.listen.expect("listen"));
    eprintln!("  restarted the promoted node as a secondary with its state dir");
    match p.wait_exit(T) {
        Some(7) => eprintln!("  it refused the old primary as stale; the old primary exited fenced (7)"),
        other => row.fail(format!("old primary not fenced (exit {other:?}):\n{}", p.log_tail())),
    }
    witness::nothing_decided_after(row, &c, &p, frozen_at, frozen, "2n-double-fault");
    match s2.status() {
        Some(v) if v["generation"] == 1 => {}
        other => row.fail(format!("the restarted node forgot its generation: {other:?}")),
    }
    drop(load);
}

/// Network faults between the nodes, through a proxy. `expect_takeover`:
/// the fault must make the secondary take over and the old primary be fenced
/// once the link heals.
fn network(row: &mut Row, name: &str, fault: Fault, hold_for: Duration, expect_takeover: bool) {
    let c = Cluster::new(name);
    network_with(row, name, fault, hold_for, expect_takeover, NodeOpts::default(), &c);
}

/// [`network`] with these node options in this cluster (a witness: the
/// takeover is to term 2, the primary's own being 1).
fn network_with(
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
            other => {
                row.fail(format!("{name}: old primary not fenced after healing (exit {other:?}):\n{}", p.log_tail()))
            }
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

/// A tiny ring (ring-full exits every epoch) and forced "tracking lost"
/// epochs (sent as full-memory resyncs), then a failover: nothing lost.
fn tiny_ring_and_tracking_lost(row: &mut Row) {
    let c = Cluster::new("ring");
    let o = NodeOpts {
        ring_entries: 256,
        epoch_ms: 50,
        verify_digest: true,
        env: vec![("CASTOR_FORCE_TRACKING_LOST_EVERY".into(), "7".into())],
        ..NodeOpts::default()
    };
    let Some((s, mut p)) = pair(&c, &o, row) else {
        return;
    };
    let rt = rt();
    let load = Load::start(&rt, vec![p.service, s.service], 12, 256, 1);
    load.wait_more(800, T);
    let st = p.status().expect("status");
    let lost = st["tracking_lost"].as_u64().unwrap_or(0);
    let full_exits = st["ring_full_exits"].as_u64().unwrap_or(0);
    eprintln!(
        "tiny ring: {full_exits} ring-full exits, {lost} collections lost so far (each followed by a live resync); replica: {}",
        s.status().expect("s")["protection"]
    );
    if lost == 0 {
        row.fail("no tracking-lost epoch happened".into());
    }
    if full_exits == 0 {
        row.fail("the tiny ring never filled: no ring-full exit".into());
    }
    if s.status().expect("s")["protection"] == "diverged" {
        row.fail("G2: replica diverged".into());
    }
    p.kill9();
    if !expect_takeover(row, &s, 1, "no takeover") {
        return;
    }
    load.wait_more(30, T);
    let v = load.finish(&rt, s.service);
    row.check(&v, &c);
}

/// Epochs stretched to seconds at a high request rate (issue 13): 256
/// clients, and the data link throttled to 128 KiB/s for 5 s (the heartbeat
/// channel is throttled too, but its frames are small), so each epoch waits
/// seconds for its ack and the engine stretches the next one. The session
/// must live through it: no hold, no resync (a lost session would end in
/// one), protection back once the link heals;
/// then a kill -9 of the primary loses no acknowledged write.
fn stretched_epochs(row: &mut Row) {
    const RATE: u64 = 128 << 10;
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
    if len0 >= 1e6 {
        row.fail(format!("an epoch of {:.0} ms before the fault: the scenario proves nothing", len0 / 1e3));
    } else if len_max < 1e6 {
        row.fail(format!(
            "no epoch was stretched to a second (longest {:.0} ms): the scenario did not happen",
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
fn stalled_data_path(row: &mut Row) {
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
            other => row.fail(format!("old primary not fenced after healing (exit {other:?}):\n{}", p.log_tail())),
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

/// A panic in the secondary's apply thread halfway through writing a
/// verified epoch (crash point `secondary.mid_apply` set to panic). The
/// replica is then neither the committed epoch nor the next one.
/// Once (`:30:panic`): the secondary counts it, refuses to be failed over to
/// while torn, asks for a resync, and the primary's full epoch repairs it;
/// a kill -9 of the primary after that fails over with nothing lost.
/// Every apply from the 30th on (`:30+:panic`): the replica stays torn, so a
/// forced failover is refused and a kill -9 of the primary is not followed
/// by a takeover: no guest runs from a wrong replica.
fn torn_apply(row: &mut Row) {
    for always in [false, true] {
        let name = if always { "torn-always" } else { "torn-once" };
        let c = Cluster::new(name);
        let o = NodeOpts { verify_digest: true, ..NodeOpts::default() };
        let spec = if always { "secondary.mid_apply:30+:panic" } else { "secondary.mid_apply:30:panic" };
        let so = NodeOpts { env: vec![("CASTOR_CRASH_AT".into(), spec.into())], ..o.clone() };
        let s = c.secondary("s", &so, None);
        let mut p = c.primary("p", &o, s.listen.expect("listen"));
        row.trials += 1;
        let rt = rt();
        let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
        let Some(st) = s.wait_status(T, |v| v["apply_failures"].as_u64() >= Some(1)) else {
            row.fail(format!("{name}: no apply failure counted:\n{}", s.log_tail()));
            continue;
        };
        eprintln!("{name}: apply panicked at epoch {}; replica: {}", st["committed_epoch"], st["replica_unusable"]);
        if always {
            let Some(st) = s.wait_status(T, |v| v["protection"] == "unusable") else {
                row.fail(format!("{name}: the secondary never said its replica is unusable:\n{}", s.log_tail()));
                continue;
            };
            let fo = s.command("failover").unwrap_or_default();
            eprintln!("  secondary {} ({}); failover asked: {}", st["protection"], st["replica_unusable"], fo.trim());
            if !fo.contains("unusable") || fo.contains("\"ok\":true") {
                row.fail(format!("{name}: a forced failover to a torn replica was not refused: {fo}"));
            }
            p.kill9();
            std::thread::sleep(Duration::from_millis(3 * o.heartbeat_timeout_ms + 500));
            match s.status() {
                Some(v) if v["role"] == "secondary" && v["protection"] == "unusable" => {
                    eprintln!(
                        "  primary killed: no takeover after {} ms (status {})",
                        3 * o.heartbeat_timeout_ms + 500,
                        v["protection"]
                    )
                }
                other => row.fail(format!(
                    "{name}: the torn replica was taken over or the node died: {other:?}\n{}",
                    s.log_tail()
                )),
            }
            drop(load);
            continue;
        }
        match s.wait_status(T, |v| v["protection"] == "replicating" && v["replica_unusable"].is_null()) {
            Some(v) => eprintln!(
                "  repaired by a full resync: committed epoch {}, apply failures {}",
                v["committed_epoch"], v["apply_failures"]
            ),
            None => {
                row.fail(format!("{name}: the replica was not repaired:\n{}", s.log_tail()));
                continue;
            }
        }
        if !protected(&p) || !load.wait_more(50, T) {
            row.fail(format!("{name}: not protected again, or clients stalled:\n{}", p.log_tail()));
            continue;
        }
        p.kill9();
        if !expect_takeover(row, &s, 1, "no takeover after the repair") {
            continue;
        }
        load.wait_more(30, T);
        let v = load.finish(&rt, s.service);
        row.check(&v, &c);
    }
}

/// Strangers on the secondary's replication port: 100 plain connections a
/// second for 5 s that close at once, plus one that sends a byte a second
/// and never authenticates. Protection must never drop (no hold, no
/// resync), acks keep flowing, and the slow one is cut at the handshake
/// deadline.
fn strangers(row: &mut Row) {
    let c = Cluster::new("strangers");
    let o = NodeOpts::default();
    let Some((s, p)) = pair(&c, &o, row) else {
        return;
    };
    stranger_storm(row, &c, &p, s.listen.expect("listen"), vec![p.service, s.service]);
}

/// Strangers on a promoted node's join port: after a failover a new
/// secondary joins the promoted node; the same storm on the port it joined
/// through must not drop that protection either.
fn strangers_on_the_join_port(row: &mut Row) {
    let c = Cluster::new("strangers-join");
    let o = NodeOpts::default();
    let Some((mut s, mut p)) = pair(&c, &o, row) else {
        return;
    };
    p.kill9();
    if !expect_takeover(row, &s, 1, "no takeover") {
        return;
    }
    let join = s.listen.expect("listen");
    let s2 = c.secondary("s2", &o, Some(join));
    if !protected(&s) {
        row.fail(format!("the promoted node was never protected by the joiner:\n{}", s.log_tail()));
        return;
    }
    eprintln!("  the promoted node is protected by a secondary that joined it; strangers on its join port");
    stranger_storm(row, &c, &s, join, vec![s.service, s2.service]);
    drop(s2);
    s.kill9();
}

/// 100 connect/close a second for 5 s on `target` plus one slow stranger,
/// while clients load `primary`: its protection must not drop.
fn stranger_storm(
    row: &mut Row,
    c: &Cluster,
    p: &NodeProc,
    target: std::net::SocketAddr,
    services: Vec<std::net::SocketAddr>,
) {
    let rt = rt();
    // enough clients that epochs span several reads on the secondary
    let load = Load::start(&rt, services, 32, 64, 1);
    load.wait_more(50, T);
    let before = p.status().expect("p");
    let slow = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(target).expect("slow connect");
        let start = Instant::now();
        conn.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        // a valid handshake length prefix (32 bytes follow), then zeros, a
        // byte at a time: a handshake message that never completes, cut
        // only by the handshake deadline
        let bytes = [0u8, 32].into_iter().chain(std::iter::repeat(0u8));
        for b in bytes {
            if start.elapsed() > Duration::from_secs(8) {
                break;
            }
            if conn.write_all(&[b]).is_err() {
                return Some(start.elapsed());
            }
            let mut b = [0u8; 64];
            match conn.read(&mut b) {
                Ok(0) => return Some(start.elapsed()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return Some(start.elapsed()),
            }
            std::thread::sleep(Duration::from_millis(800));
        }
        None
    });
    let start = Instant::now();
    let mut opened = 0u64;
    let mut worst = String::new();
    while start.elapsed() < Duration::from_secs(5) {
        for _ in 0..10 {
            if std::net::TcpStream::connect(target).is_ok() {
                opened += 1;
            }
        }
        if let Some(st) = p.status() {
            if st["protection"] != "protected" && worst.is_empty() {
                worst = format!("{} at {:?}", st["protection"], start.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = p.status().expect("p");
    eprintln!(
        "  {opened} stranger connections in {:?}; acked epoch {} -> {}, syncs {} -> {}",
        start.elapsed(),
        before["acked_epoch"],
        after["acked_epoch"],
        before["syncs"],
        after["syncs"]
    );
    if !worst.is_empty() {
        row.fail(format!("protection dropped: {worst}\n{}", p.log_tail()));
    }
    if after["syncs"] != before["syncs"] {
        row.fail(format!("the strangers caused a resync: syncs {} -> {}", before["syncs"], after["syncs"]));
    }
    if after["acked_epoch"].as_u64() <= before["acked_epoch"].as_u64().map(|e| e + 100) {
        row.fail(format!("acks did not keep flowing: {} -> {}", before["acked_epoch"], after["acked_epoch"]));
    }
    match slow.join().expect("slow thread") {
        Some(t) if t < Duration::from_secs(4) => {
            eprintln!("  the slow stranger was cut after {t:?} (handshake deadline 2 s)")
        }
        other => row.fail(format!("the slow stranger was not cut at the handshake deadline: {other:?}")),
    }
    let v = load.finish(&rt, p.service);
    row.check(&v, c);
}

/// Where the idle strangers connect from: another loopback address than
/// the nodes' (127.0.0.1), so they are another source to the listener.
const STRANGER_SOURCE: &str = "127.0.0.2:0";

/// Idle strangers a second during a cut. At 25 a second every slot of a
/// drop-when-full listener is busy, but the slots, taken together, also
/// come free together every 2 s, and a peer that redials every 100 ms
/// often gets in then; at 200 a second those windows are a few ms wide.
const STORM_PER_SEC: u32 = 200;

/// A sustained storm of idle connections to `target` from
/// [`STRANGER_SOURCE`]: `per_sec` a second, each held open for 5 s and
/// never sent a byte (with `preamble`, every other one sends that one byte
/// and then idles: a joiner that never handshakes). Ends when dropped.
struct IdleStorm {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    opened: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl IdleStorm {
    fn start(
        rt: &tokio::runtime::Runtime,
        target: std::net::SocketAddr,
        per_sec: u32,
        preamble: Option<u8>,
    ) -> IdleStorm {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        let (st, op) = (stop.clone(), opened.clone());
        let task = rt.spawn(async move {
            let every = Duration::from_secs_f64(1.0 / f64::from(per_sec.max(1)));
            let mut tick = tokio::time::interval(every);
            let mut n = 0u64;
            while !st.load(Ordering::SeqCst) {
                tick.tick().await;
                n += 1;
                let (st, op) = (st.clone(), op.clone());
                let byte = preamble.filter(|_| n.is_multiple_of(2));
                // each on its own task: a connect the listener's backlog
                // holds up does not slow the storm
                tokio::spawn(async move {
                    let Ok(sock) = tokio::net::TcpSocket::new_v4() else { return };
                    if sock.bind(STRANGER_SOURCE.parse().expect("addr")).is_err() {
                        return;
                    }
                    let conn = tokio::time::timeout(Duration::from_secs(2), sock.connect(target)).await;
                    let Ok(Ok(mut conn)) = conn else { return };
                    op.fetch_add(1, Ordering::SeqCst);
                    if let Some(b) = byte {
                        let _ = tokio::io::AsyncWriteExt::write_all(&mut conn, &[b]).await;
                    }
                    let held = Instant::now();
                    while held.elapsed() < Duration::from_secs(5) && !st.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                });
            }
        });
        IdleStorm { stop, opened, task }
    }

    fn opened(&self) -> u64 {
        self.opened.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for IdleStorm {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.abort();
    }
}

/// Cuts the link through `proxy` (every connection reset, new ones
/// refused) for `cut`, after `p` saw its session end; heals it and
/// returns how long `p` then took to be protected again (None: not within
/// `limit`).
fn cut_and_heal(proxy: &Proxy, p: &NodeProc, cut: Duration, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    proxy.set(Fault::Drop);
    if p.wait_status(Duration::from_secs(5), |v| v["protection"] != "protected").is_none() {
        eprintln!("  (the primary did not see the cut end its session)");
    }
    std::thread::sleep(cut.saturating_sub(start.elapsed()));
    proxy.set(Fault::Pass);
    let healed = Instant::now();
    p.wait_status(limit, |v| v["protection"] == "protected").map(|_| healed.elapsed())
}

/// How the pair's protection came back after a cut: the same cut once
/// quiet (the baseline), once under a sustained storm of idle strangers on
/// `target`; under the storm it must be back within max(3 x baseline, 3 s).
/// `p` is the primary, `s` its secondary (which must not take over: the
/// heartbeat timeout is longer than the cut).
#[allow(clippy::too_many_arguments)]
fn cut_under_storm(
    row: &mut Row,
    rt: &tokio::runtime::Runtime,
    proxy: &Proxy,
    p: &NodeProc,
    s: &NodeProc,
    target: std::net::SocketAddr,
    preamble: Option<u8>,
) -> bool {
    let cut = Duration::from_secs(1);
    row.trials += 1;
    let Some(baseline) = cut_and_heal(proxy, p, cut, T) else {
        row.fail(format!("no protection after a quiet {cut:?} cut:\n{}", p.log_tail()));
        return false;
    };
    eprintln!(
        "  quiet: the link cut for {cut:?}, protected again {:.0} ms after it healed",
        baseline.as_secs_f64() * 1e3
    );
    let storm = IdleStorm::start(rt, target, STORM_PER_SEC, preamble);
    // every slot a stranger can take is taken before the cut
    std::thread::sleep(Duration::from_secs(3));
    let limit = (baseline * 3).max(Duration::from_secs(3));
    row.trials += 1;
    let stormy = cut_and_heal(proxy, p, cut, limit);
    let opened = storm.opened();
    let took_over = s.status().is_some_and(|v| v["role"] == "primary");
    match stormy {
        Some(t) => eprintln!(
            "  storm of idle strangers from 127.0.0.2 ({opened} connections so far): protected again {:.0} ms after the cut healed (limit {limit:?})",
            t.as_secs_f64() * 1e3
        ),
        None => {
            row.fail(format!(
                "under a storm of idle strangers ({opened} connections) the primary was not protected within {limit:?} of the cut healing (quiet: {baseline:?}); the secondary {}:\n{}",
                if took_over { "took over" } else { "did not take over" },
                p.log_tail()
            ));
            return false;
        }
    }
    // still stormy: protection must hold
    std::thread::sleep(Duration::from_secs(1));
    drop(storm);
    if took_over || s.status().is_some_and(|v| v["role"] == "primary") {
        row.fail("the secondary took over during a cut shorter than its heartbeat timeout".into());
        return false;
    }
    true
}

/// Strangers during a link cut (issue 28, item 6): a proxied pair with a
/// heartbeat timeout (5 s) longer than the cut (1 s), so the primary loses
/// its session and redials while the secondary does not take over. A
/// sustained storm of idle connections from another loopback address on
/// the secondary's replication port must not keep the primary out.
fn strangers_cut(row: &mut Row) {
    let name = "strangers-cut";
    let c = Cluster::new(name);
    let o = NodeOpts { heartbeat_timeout_ms: 5000, ..NodeOpts::default() };
    let rt = rt();
    let Some((s, proxy, p)) = proxied_pair(&c, &o, &rt, row, name) else {
        return;
    };
    let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
    load.wait_more(50, T);
    if cut_under_storm(row, &rt, &proxy, &p, &s, s.listen.expect("listen"), None) {
        carry_on_and_check(row, load, 30, &rt, p.service, &c, name);
    }
}

/// As [`strangers_cut`] on a promoted node's join port: the secondary that
/// joined it (through a proxy) must get back in under the storm, half of
/// whose strangers send a join preamble and then never handshake.
fn strangers_join_cut(row: &mut Row) {
    let name = "strangers-join-cut";
    let c = Cluster::new(name);
    let o = NodeOpts { heartbeat_timeout_ms: 5000, ..NodeOpts::default() };
    let Some((mut s, mut p)) = pair(&c, &o, row) else {
        return;
    };
    p.kill9();
    if !expect_takeover(row, &s, 1, "no takeover") {
        return;
    }
    let rt = rt();
    let join = s.listen.expect("listen");
    let proxy = rt.block_on(Proxy::start(join));
    let s2 = c.secondary("s2", &o, Some(proxy.addr));
    if !protected(&s) {
        row.fail(format!("the promoted node was never protected by the joiner:\n{}", s.log_tail()));
        return;
    }
    let load = Load::start(&rt, vec![s.service, s2.service], 4, 16, 1);
    load.wait_more(50, T);
    if cut_under_storm(row, &rt, &proxy, &s, &s2, join, Some(runtime::join::JOIN_DATA)) {
        carry_on_and_check(row, load, 30, &rt, s.service, &c, name);
    }
    drop(s2);
    s.kill9();
}

#[test]
fn failover_suite() {
    let _g = serial();
    let trials: u64 = std::env::var("FAILOVER_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let seed: u64 = std::env::var("FAILOVER_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_cafe);
    let only: Option<Vec<String>> =
        std::env::var("FAILOVER_SCENARIOS").ok().map(|v| v.split(',').map(str::to_string).collect());
    let want = |n: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == n));
    let mut rows = Vec::new();
    let started = Instant::now();
    let mut run = |name: &str, f: &mut dyn FnMut(&mut Row)| {
        if !want(name) {
            return;
        }
        eprintln!("=== scenario {name}");
        let mut row = Row::new(name);
        f(&mut row);
        rows.push(row);
    };
    run("kill9-random", &mut |r| kill_trials(r, trials, seed));
    run("crash-primary", &mut primary_crash_points);
    run("crash-secondary", &mut secondary_crash_points);
    run("secondary-killed", &mut secondary_killed_then_reprotected);
    run("2n-double-fault", &mut two_node_double_fault);
    run("partition", &mut |r| network(r, "partition", Fault::Drop, Duration::from_millis(1500), true));
    run("oneway-p2s", &mut |r| network(r, "oneway-p2s", Fault::HoldRequests, Duration::from_millis(1500), true));
    run("oneway-s2p", &mut |r| network(r, "oneway-s2p", Fault::HoldReplies, Duration::from_millis(1500), true));
    run("slow-link", &mut |r| {
        network(r, "slow-link", Fault::Delay(Duration::from_millis(20)), Duration::from_millis(2000), false)
    });
    run("slow-secondary", &mut |r| {
        network(r, "slow-secondary", Fault::Throttle(2 << 20), Duration::from_millis(2000), false)
    });
    run("slow-budget", &mut slow_link_budget);
    run("stretched", &mut stretched_epochs);
    run("stalled-data", &mut stalled_data_path);
    run("corrupt-frames", &mut |r| network(r, "corrupt-frames", Fault::Corrupt, Duration::from_millis(400), false));
    run("truncated-frames", &mut |r| network(r, "truncated-frames", Fault::Drop, Duration::from_millis(60), false));
    run("tiny-ring", &mut tiny_ring_and_tracking_lost);
    run("torn-apply", &mut torn_apply);
    run("strangers", &mut strangers);
    run("strangers-join", &mut strangers_on_the_join_port);
    run("strangers-cut", &mut strangers_cut);
    run("strangers-join-cut", &mut strangers_join_cut);
    run("w-standby-freeze", &mut witness::standby_freeze);
    run("w-primary-freeze", &mut witness::primary_freeze);
    run("w-double-fault", &mut witness::double_fault);
    run("w-restart-as-sec", &mut witness::restart_as_secondary);
    run("w-partition", &mut witness::partition);
    run("w-one-sided", &mut witness::one_sided);
    run("w-primary-isolated", &mut witness::primary_isolated);
    run("w-etcd-down", &mut witness::etcd_down);
    run("w-etcd-member-kill", &mut witness::etcd_member_killed);
    run("w-forced-failover", &mut witness::forced_failover);
    run("w-switchover", &mut |r| witness::planned(r, "w-switchover", true, witness::Planned::Command));
    run("w-sigterm", &mut |r| witness::planned(r, "w-sigterm", true, witness::Planned::Sigterm));
    run("2n-switchover", &mut |r| witness::planned(r, "2n-switchover", false, witness::Planned::Command));
    run("trial-restore", &mut witness::trial_restore_fails);
    run("w-switchover-fails", &mut |r| witness::planned_refused(r, "w-switchover-fails", true));
    run("2n-switchover-fails", &mut |r| witness::planned_refused(r, "2n-switchover-fails", false));

    eprintln!(
        "\nfailover suite summary (host: {}; {:.0} s)",
        runtime::host::Host::detect().describe(),
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "{:<18} {:>6} {:>9} {:>5} {:>10} {:>11} {:>15} {:>11}",
        "scenario", "trials", "failovers", "lost", "duplicated", "split-brain", "max failover ms", "max gap ms"
    );
    let mut failures = Vec::new();
    for r in &rows {
        eprintln!(
            "{:<18} {:>6} {:>9} {:>5} {:>10} {:>11} {:>15.0} {:>11.0}",
            r.scenario, r.trials, r.failovers, r.lost, r.duplicated, r.split_brain, r.max_failover_ms, r.max_gap_ms
        );
        failures.extend(r.failures.iter().map(|f| format!("{}: {f}", r.scenario)));
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
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
fn slow_link_budget(row: &mut Row) {
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
