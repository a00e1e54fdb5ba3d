//! Failover suite scenarios about the secondary's replica: a tiny dirty
//! ring with tracking lost, and a torn apply.

use std::time::Duration;

use failover_tests::cluster::{Cluster, NodeOpts};
use failover_tests::load::Load;

use super::{expect_takeover, pair, protected, rt, Row, T};

/// A tiny ring (ring-full exits every epoch) and forced "tracking lost"
/// epochs (sent as full-memory resyncs), then a failover: nothing lost.
pub(super) fn tiny_ring_and_tracking_lost(row: &mut Row) {
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

/// A panic in the secondary's apply thread halfway through writing a
/// verified epoch (crash point `secondary.mid_apply` set to panic). The
/// replica is then neither the committed epoch nor the next one.
/// Once (`:30:panic`): the secondary counts it, refuses to be failed over to
/// while torn, asks for a resync, and the primary's full epoch repairs it;
/// a kill -9 of the primary after that fails over with nothing lost.
/// Every apply from the 30th on (`:30+:panic`): the replica stays torn, so a
/// forced failover is refused and a kill -9 of the primary is not followed
/// by a takeover: no guest runs from a wrong replica.
pub(super) fn torn_apply(row: &mut Row) {
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
