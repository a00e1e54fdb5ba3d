//! Kill and crash scenarios of the failover suite: random kill -9 trials,
//! named crash points, and the two-node double fault.

use std::time::Duration;

use failover_tests::cluster::{Cluster, NodeOpts};
use failover_tests::load::Load;

use super::{carry_on_and_check, expect_takeover, protected, proxied_pair, proxied_pair_with, rt, witness, Row, T};

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

/// Random kill -9 of the primary: during the initial sync, or at a random
/// moment of protected operation (between epochs, while one is sent, after
/// its end before its ack: whatever the clock hits).
pub(super) fn kill_trials(row: &mut Row, trials: u64, seed: u64) {
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
            let was = p.status().and_then(|v| v["protection"].as_str().map(str::to_string));
            p.kill9();
            eprintln!(
                "trial {t}: killed the primary {delay} ms into the sync (it was {})",
                was.as_deref().unwrap_or("unknown")
            );
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
pub(super) fn primary_crash_points(row: &mut Row) {
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
pub(super) fn secondary_crash_points(row: &mut Row) {
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
pub(super) fn secondary_killed_then_reprotected(row: &mut Row) {
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
pub(super) fn two_node_double_fault(row: &mut Row) {
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
        other => {
            row.fail(format!("old primary not fenced ({}):\n{}", runtime::harness::waited_text(other), p.log_tail()))
        }
    }
    witness::nothing_decided_after(row, &c, &p, frozen_at, frozen, "2n-double-fault");
    match s2.status() {
        Some(v) if v["generation"] == 1 => {}
        other => row.fail(format!("the restarted node forgot its generation: {other:?}")),
    }
    drop(load);
}
