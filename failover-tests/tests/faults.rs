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
//! `FAILOVER_SEED=S` their schedule, `FAILOVER_SCENARIOS=a,b` a subset,
//! `FAILOVER_NET_HEARTBEAT_MS=T` the net scenarios' heartbeat timeout.

use std::time::{Duration, Instant};

use failover_tests::cluster::{Cluster, NodeOpts, NodeProc};
use failover_tests::load::{split_brain, Load, Verdict};
use failover_tests::proxy::{Fault, Proxy};
use failover_tests::serial;

#[path = "faults/kills.rs"]
mod kills;
#[path = "faults/net.rs"]
mod net;
#[path = "faults/network.rs"]
mod network;
#[path = "faults/replica.rs"]
mod replica;
#[path = "faults/strangers.rs"]
mod strangers;
#[path = "faults/witness.rs"]
mod witness;

use kills::{
    kill_trials, primary_crash_points, secondary_crash_points, secondary_killed_then_reprotected, two_node_double_fault,
};
use network::{network, network_with, slow_link_budget, stalled_data_path, stretched_epochs};
use replica::{tiny_ring_and_tracking_lost, torn_apply};
use strangers::{strangers, strangers_cut, strangers_join_cut, strangers_on_the_join_port};

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
    let proxy = rt.block_on(Proxy::start(s.listen.expect("listen"))).expect("start the proxy");
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
    run("net-kill9", &mut net::net_kill9);
    run("net-kill9-random", &mut |r| net::net_kill_trials(r, trials, seed));
    run("net-unwritten-frames", &mut net::net_unwritten_frames);
    run("net-partition", &mut net::net_partition);
    run("net-switchover", &mut net::net_switchover);
    run("net-standby-freeze", &mut net::net_standby_freeze);

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
