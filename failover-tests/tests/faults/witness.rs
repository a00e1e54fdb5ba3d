//! Scenarios with the etcd witness (issue 11): real castor processes, a
//! real etcd on loopback, frozen processes (SIGSTOP: a host that neither
//! answers nor refuses), double faults and partitions.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use failover_tests::cluster::{Cluster, NodeOpts, NodeProc};
use failover_tests::load::{split_brain, Load};
use failover_tests::proxy::{Fault, Proxy};

use super::{carry_on_and_check, expect_takeover, pair, protected, proxied_pair, rt, Row, T};

#[path = "witness_config.rs"]
mod config;

pub use config::{one_sided, planned_refused, trial_restore_fails};

fn opts(urls: &str) -> NodeOpts {
    NodeOpts { witness: Some(urls.into()), ..NodeOpts::default() }
}

/// Responses `node` has released so far (its lines in the release log).
pub(super) fn released_by(c: &Cluster, node: &str) -> usize {
    std::fs::read_to_string(c.release_log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(node))
        .count()
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().expect("etcd address")
}

fn txn_ms(n: &NodeProc) -> f64 {
    n.status().and_then(|v| v["witness"]["last_txn_ms"].as_f64()).unwrap_or(f64::NAN)
}

fn wall_us() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros())
}

/// SIGSTOPs `p`; returns the wall clock (us) read once the signal was sent.
pub(super) fn freeze(p: &NodeProc) -> u128 {
    p.freeze();
    wall_us()
}

/// How long after `kill(SIGSTOP)` returned a decision still counts as made
/// before the stop (the signal takes effect within microseconds).
const STOP_MARGIN_US: u128 = 1000;

/// The old primary `p`, frozen at `frozen_at` and thawed after a takeover,
/// must decide no release after the freeze and exit fenced (7).
fn old_primary_fenced(row: &mut Row, c: &Cluster, p: &mut NodeProc, frozen_at: u128, what: &str) {
    let written_frozen = released_by(c, "p");
    p.thaw();
    match p.wait_exit(T) {
        Some(7) => eprintln!("  {what}: the old primary woke, the witness refused it, it exited fenced (7)"),
        other => row.fail(format!(
            "{what}: old primary not fenced ({}):\n{}",
            runtime::harness::waited_text(other),
            p.log_tail()
        )),
    }
    nothing_decided_after(row, c, p, frozen_at, written_frozen, what);
}

/// Node "p" (the old primary, frozen at `frozen_at`, with `written_frozen`
/// lines in the release log when it was thawed) decided no release after
/// the freeze.
///
/// A process stopped between deciding a release and writing it finishes the
/// write when it resumes; nothing in any process can prevent that. The
/// release log carries when each release was decided, so the check is on
/// decisions: one made after the freeze fails; writes decided before it
/// (output of epochs the secondary acknowledged, so also in the promoted
/// state) are counted and shown.
pub(super) fn nothing_decided_after(
    row: &mut Row,
    c: &Cluster,
    p: &NodeProc,
    frozen_at: u128,
    written_frozen: usize,
    what: &str,
) {
    let lines: Vec<(String, u128)> = std::fs::read_to_string(c.release_log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().next() == Some("p"))
        .map(|l| (l.to_string(), l.split_whitespace().nth(4).and_then(|t| t.parse().ok()).unwrap_or(u128::MAX)))
        .collect();
    let late: Vec<&String> = lines.iter().filter(|(_, t)| *t > frozen_at + STOP_MARGIN_US).map(|(l, _)| l).collect();
    let finished = lines.len().saturating_sub(written_frozen);
    if !late.is_empty() {
        row.fail(format!(
            "{what}: the old primary decided {} releases after it was frozen (at {frozen_at} us), e.g. {:?}:\n{}",
            late.len(),
            &late[..late.len().min(3)],
            p.log_tail()
        ));
    } else if finished > 0 {
        eprintln!(
            "  {what}: it decided nothing after the freeze; {finished} responses decided before it (acknowledged \
             epochs) were written when it resumed"
        );
    } else {
        eprintln!("  {what}: it released nothing after waking");
    }
}

/// The secondary freezes for good: the witness lets the primary run alone
/// within about the heartbeat timeout; the standby, thawed, stays a standby.
pub fn standby_freeze(row: &mut Row) {
    let c = Cluster::new("w-standby-freeze");
    let etcd = c.etcd();
    let o = opts(&etcd.url);
    let Some((s, p)) = pair(&c, &o, row) else { return };
    let rt = rt();
    let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
    load.wait_more(50, T);
    s.freeze();
    let t = Instant::now();
    eprintln!("froze the secondary (SIGSTOP)");
    match p.wait_status(T, |v| v["protection"] == "unprotected") {
        Some(_) => eprintln!(
            "  the witness granted running alone {:.0} ms after the freeze (heartbeat timeout {} ms; txn {:.1} ms)",
            t.elapsed().as_secs_f64() * 1e3,
            o.heartbeat_timeout_ms,
            txn_ms(&p)
        ),
        None => row.fail(format!("the primary did not run alone:\n{}", p.log_tail())),
    }
    if !load.wait_more(100, T) {
        row.fail("clients stalled".into());
    }
    s.thaw();
    std::thread::sleep(Duration::from_millis(1500));
    match s.status() {
        Some(v) if v["role"] == "secondary" => eprintln!("  the thawed standby asked, was refused, stays a standby"),
        other => row.fail(format!("the thawed standby is {other:?}:\n{}", s.log_tail())),
    }
    let v = load.finish(&rt, p.service);
    row.check(&v, &c);
    eprintln!(
        "  standby-freeze gap {:.0} ms (goal: heartbeat timeout {} ms + 100 ms)",
        v.max_gap.as_secs_f64() * 1e3,
        o.heartbeat_timeout_ms
    );
}

/// The primary freezes past the timeout: the secondary takes over by the
/// witness's transaction; the primary, thawed, releases nothing, exits 7.
pub fn primary_freeze(row: &mut Row) {
    let c = Cluster::new("w-primary-freeze");
    let etcd = c.etcd();
    let o = opts(&etcd.url);
    let Some((s, mut p)) = pair(&c, &o, row) else { return };
    let rt = rt();
    let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
    load.wait_more(50, T);
    let frozen_at = freeze(&p);
    eprintln!("froze the primary (SIGSTOP)");
    if !expect_takeover(row, &s, 2, "no takeover") {
        return;
    }
    eprintln!("  promote txn {:.1} ms", txn_ms(&s));
    if !load.wait_more(50, T) {
        row.fail("clients did not carry on".into());
    }
    old_primary_fenced(row, &c, &mut p, frozen_at, "primary-freeze");
    let v = load.finish(&rt, s.service);
    row.check(&v, &c);
}

/// Primary frozen, secondary takes over and serves, the promoted node is
/// killed, the old primary wakes: it must not serve.
pub fn double_fault(row: &mut Row) {
    let c = Cluster::new("w-double-fault");
    let etcd = c.etcd();
    let o = opts(&etcd.url);
    let Some((mut s, mut p)) = pair(&c, &o, row) else { return };
    let rt = rt();
    let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
    load.wait_more(50, T);
    let frozen_at = freeze(&p);
    if !expect_takeover(row, &s, 2, "no takeover") {
        return;
    }
    load.wait_more(30, T);
    s.kill9();
    eprintln!("froze the primary, the secondary took over and served, then was killed; thawing the old primary");
    old_primary_fenced(row, &c, &mut p, frozen_at, "double-fault");
    let sb = split_brain(&c.release_log());
    if !sb.is_empty() {
        row.split_brain += sb.len() as u64;
        row.fail(format!("G3: generations released by two nodes: {sb:?}"));
    }
    if row.failures.is_empty() {
        eprintln!("  nobody serves now (both hosts failed): correct, nothing stale was released");
    }
    drop(load);
}

/// After a takeover the promoted node is restarted as `castor secondary`;
/// the old primary wakes and reaches it: refused as stale, fenced.
pub fn restart_as_secondary(row: &mut Row) {
    let c = Cluster::new("w-restart");
    let etcd = c.etcd();
    let o = opts(&etcd.url);
    let rt = rt();
    let Some((mut s, proxy, mut p)) = proxied_pair(&c, &o, &rt, row, "") else {
        return;
    };
    let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
    load.wait_more(50, T);
    let frozen_at = freeze(&p);
    if !expect_takeover(row, &s, 2, "no takeover") {
        return;
    }
    load.wait_more(30, T);
    s.kill9();
    let s2 = c.secondary("s-again", &o, None);
    proxy.set_upstream(s2.listen.expect("listen"));
    eprintln!("restarted the promoted node as a secondary; the old primary's link now reaches it");
    old_primary_fenced(row, &c, &mut p, frozen_at, "restart-as-secondary");
    match s2.status() {
        Some(v) if v["committed_epoch"].is_null() && v["generation"] == 2 => {
            eprintln!("  the restarted secondary holds term 2 and took nothing from the stale primary")
        }
        other => row.fail(format!("restarted secondary: {other:?}:\n{}", s2.log_tail())),
    }
    drop(load);
}

/// The primary is cut off from the secondary and from etcd: it holds
/// (witness unreachable); the secondary takes over; healed, the old
/// primary is fenced.
pub fn primary_isolated(row: &mut Row) {
    let c = Cluster::new("w-isolated");
    let etcd = c.etcd();
    let rt = rt();
    let to_etcd = rt.block_on(Proxy::start(addr_of(&etcd.url))).expect("start the proxy");
    let o = opts(&etcd.url);
    let po = opts(&format!("http://{}", to_etcd.addr));
    let s = c.secondary("s", &o, None);
    let to_s = rt.block_on(Proxy::start(s.listen.expect("listen"))).expect("start the proxy");
    let mut p = c.primary("p", &po, to_s.addr);
    row.trials += 1;
    if !protected(&p) {
        row.fail(format!("never protected:\n{}", p.log_tail()));
        return;
    }
    let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
    load.wait_more(50, T);
    to_etcd.set(Fault::Drop);
    to_s.set(Fault::Drop);
    eprintln!("isolated the primary from the secondary and from etcd");
    if !expect_takeover(row, &s, 2, "no takeover") {
        return;
    }
    match p.wait_status(T, |v| v["witness"]["state"] == "unreachable") {
        Some(v) if v["protection"] == "holding" => {
            eprintln!("  the isolated primary holds: witness {}", v["witness"]["reason"])
        }
        other => row.fail(format!("isolated primary: {other:?}")),
    }
    if !load.wait_more(50, T) {
        row.fail("clients did not carry on".into());
    }
    let before = released_by(&c, "p");
    to_etcd.set(Fault::Pass);
    to_s.set(Fault::Pass);
    match p.wait_exit(T) {
        Some(7) => eprintln!("  healed: the old primary learned the new term and exited fenced"),
        other => {
            row.fail(format!("old primary not fenced ({}):\n{}", runtime::harness::waited_text(other), p.log_tail()))
        }
    }
    if released_by(&c, "p") != before {
        row.fail("the isolated primary released output".into());
    }
    let v = load.finish(&rt, s.service);
    row.check(&v, &c);
}

/// etcd frozen: protected operation goes on; a primary kill fails over
/// only once etcd answers again.
pub fn etcd_down(row: &mut Row) {
    let c = Cluster::new("w-etcd-down");
    let etcd = c.etcd();
    let o = opts(&etcd.url);
    let Some((s, mut p)) = pair(&c, &o, row) else { return };
    let rt = rt();
    let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
    load.wait_more(30, T);
    etcd.signal(libc::SIGSTOP);
    eprintln!("froze etcd");
    if !load.wait_more(100, T) || p.status().is_none_or(|v| v["protection"] != "protected") {
        row.fail(format!("protected operation stopped without etcd:\n{}", p.log_tail()));
    }
    p.kill9();
    eprintln!("  protected operation went on; killed the primary");
    std::thread::sleep(Duration::from_millis(1500));
    match s.status() {
        Some(v) if v["role"] == "secondary" && v["protection"] == "claiming" => {
            eprintln!("  without etcd the secondary claims and waits: {}", v["witness"]["reason"])
        }
        other => row.fail(format!("secondary without etcd: {other:?}")),
    }
    etcd.signal(libc::SIGCONT);
    if !expect_takeover(row, &s, 2, "no takeover after etcd came back") {
        return;
    }
    eprintln!("  etcd back: took over");
    carry_on_and_check(row, load, 30, &rt, s.service, &c, "");
}

/// One member of a 3-member etcd cluster killed: nothing changes; a later
/// primary kill fails over.
pub fn etcd_member_killed(row: &mut Row) {
    let c = Cluster::new("w-etcd3");
    let mut members = c.etcd_cluster();
    let urls: Vec<String> = members.iter().map(|m| m.url.clone()).collect();
    let o = opts(&urls.join(","));
    let Some((s, mut p)) = pair(&c, &o, row) else { return };
    let rt = rt();
    let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
    load.wait_more(30, T);
    members[0].kill();
    eprintln!("killed etcd member m0 of 3");
    if !load.wait_more(100, T) || p.status().is_none_or(|v| v["protection"] != "protected") {
        row.fail(format!("protection changed after losing one etcd member:\n{}", p.log_tail()));
    }
    p.kill9();
    if !expect_takeover(row, &s, 2, "no takeover with 2 of 3 members") {
        return;
    }
    carry_on_and_check(row, load, 30, &rt, s.service, &c, "");
}

/// A forced failover with the witness: the secondary is told to take over
/// while the primary is healthy; the witness's term fences the primary.
pub fn forced_failover(row: &mut Row) {
    let c = Cluster::new("w-forced-failover");
    let etcd = c.etcd();
    let o = opts(&etcd.url);
    let Some((s, mut p)) = pair(&c, &o, row) else { return };
    let rt = rt();
    let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
    load.wait_more(50, T);
    let reply = s.command("failover").unwrap_or_default();
    eprintln!("asked the secondary to take over: {}", reply.trim());
    if !reply.contains("\"ok\":true") {
        row.fail(format!("forced failover refused: {reply}"));
        return;
    }
    if !expect_takeover(row, &s, 2, "no takeover") {
        return;
    }
    match p.wait_exit(T) {
        Some(7) => eprintln!("  the old primary was fenced (exit 7)"),
        other => {
            row.fail(format!("old primary not fenced ({}):\n{}", runtime::harness::waited_text(other), p.log_tail()))
        }
    }
    carry_on_and_check(row, load, 30, &rt, s.service, &c, "");
}

/// How a planned switchover is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planned {
    /// `castor switchover` (the control command) to the primary.
    Command,
    /// SIGTERM to the primary.
    Sigterm,
}

/// The secondary `s` took over by a handover (to generation 2 with a
/// witness, 1 without; `what` leads the failure otherwise) and the old
/// primary `p` exited 0; false if there was no takeover.
pub(super) fn handed_over(row: &mut Row, s: &NodeProc, p: &mut NodeProc, witness: bool, what: &str) -> bool {
    let gen = if witness { 2 } else { 1 };
    if !expect_takeover(row, s, gen, what) {
        return false;
    }
    match p.wait_exit(T) {
        Some(0) => eprintln!("  the old primary handed over and exited 0"),
        other => row.fail(format!(
            "the old primary did not exit 0 ({}):\n{}",
            runtime::harness::waited_text(other),
            p.log_tail()
        )),
    }
    true
}

/// A planned switchover (issue 11): the primary ends its epoch, waits for
/// the ack and hands over; the secondary takes over at once (no heartbeat
/// timeout), the old primary exits 0, no acknowledged write is lost.
pub fn planned(row: &mut Row, name: &str, witness: bool, how: Planned) {
    let c = Cluster::new(name);
    let etcd = witness.then(|| c.etcd());
    let o = match &etcd {
        Some(e) => opts(&e.url),
        None => NodeOpts::default(),
    };
    let Some((s, mut p)) = pair(&c, &o, row) else { return };
    let rt = rt();
    let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
    load.wait_more(50, T);
    if witness && p.wait_status(T, |v| v["witness"]["sync_recorded"] == true).is_none() {
        row.fail(format!("the witness never recorded the secondary:\n{}", p.log_tail()));
        return;
    }
    let t = Instant::now();
    match how {
        Planned::Command => {
            let reply = p.command("switchover").unwrap_or_default();
            eprintln!("asked the primary to switch over: {} ({:.0} ms)", reply.trim(), t.elapsed().as_secs_f64() * 1e3);
            if !reply.contains("\"ok\":true") {
                row.fail(format!("switchover refused: {reply}\n{}", p.log_tail()));
                return;
            }
        }
        Planned::Sigterm => {
            p.terminate();
            eprintln!("sent SIGTERM to the primary");
        }
    }
    if !handed_over(row, &s, &mut p, witness, "no takeover") {
        return;
    }
    // a handover, not a heartbeat timeout
    let log = std::fs::read_to_string(&s.log).unwrap_or_default();
    if !log.contains("the primary handed over") || log.contains("primary silent") {
        row.fail(format!("the secondary did not take over by the handover:\n{}", s.log_tail()));
    }
    let v = carry_on_and_check(row, load, 30, &rt, s.service, &c, "");
    eprintln!(
        "  switchover: longest client gap {:.0} ms (epoch {} ms, heartbeat timeout {} ms)",
        v.max_gap.as_secs_f64() * 1e3,
        o.epoch_ms,
        o.heartbeat_timeout_ms
    );
}

/// Partition between the nodes, both reaching etcd: exactly one serves.
pub fn partition(row: &mut Row) {
    let c = Cluster::new("w-partition");
    let etcd = c.etcd();
    super::network_with(row, "w-partition", Fault::Drop, Duration::from_millis(1500), false, opts(&etcd.url), &c);
}
