//! The networked guest (issue 30): an unmodified-client shaped TCP load
//! (client::resp: one connection per client for the whole run, INCR on a
//! counter of its own) against the guest's Redis-protocol server, through
//! real TAP devices on a bridge in a network namespace of the test's own;
//! the nodes' own sockets stay on loopback. Each scenario checks: no
//! connection reset, no acknowledged INCR lost or applied twice (every
//! reply checked, counters read back), and reports the longest stall a
//! client saw.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use client::resp::{RespLoad, RespReport};
use failover_tests::cluster::{Cluster, NodeOpts, NodeProc};
use failover_tests::proxy::{Fault, Proxy};
use runtime::netns::TestNet;

use super::{protected, rt, take_over, Row, T};

use runtime::netns::GUEST_IP;
const MAC: [u8; 6] = runtime::netns::guest_mac(3);
/// Client connections (the 64).
pub(super) const CLIENTS: usize = 64;

struct NetPair {
    net: TestNet,
    s: NodeProc,
    p: NodeProc,
    proxy: Option<Proxy>,
}

/// Options for the node whose TAP is `tap` (the primary's with the guest's
/// address), with the witness at `witness` if given.
fn opts(net: &TestNet, tap: &str, primary: bool, witness: Option<&str>) -> NodeOpts {
    NodeOpts {
        guest: "redis",
        vcpus: 1,
        extra: vec!["--net".into(), net.net_arg(tap, MAC, primary.then_some(GUEST_IP))],
        witness: witness.map(str::to_string),
        ..NodeOpts::default()
    }
}

/// How a pair is set up.
#[derive(Clone, Copy, Default)]
struct Setup<'a> {
    /// Through a fault proxy.
    proxied: bool,
    /// With the witness at these URLs.
    witness: Option<&'a str>,
}

/// A namespace, a secondary and a networked primary (through a proxy when
/// `proxied`), protected; None when the namespace cannot be made (not
/// root: the failure is recorded) or the pair never protects.
fn net_pair(c: &Cluster, row: &mut Row, name: &str, how: Setup, rt: &tokio::runtime::Runtime) -> Option<NetPair> {
    let net = match TestNet::create("ft") {
        Ok(n) => n,
        Err(e) => {
            row.fail(format!("{name}: {e}"));
            return None;
        }
    };
    let tag = std::process::id() % 10_000;
    let s = c.secondary("s", &opts(&net, &format!("cs{tag}"), false, how.witness), None);
    let (proxy, to) = if how.proxied {
        let proxy = rt.block_on(Proxy::start(s.listen.expect("listen"))).expect("start the proxy");
        let a = proxy.addr;
        (Some(proxy), a)
    } else {
        (None, s.listen.expect("listen"))
    };
    let p = c.primary("p", &opts(&net, &format!("cp{tag}"), true, how.witness), to);
    row.trials += 1;
    if !protected(&p) {
        row.fail(format!("{name}: never protected:\n{}", p.log_tail()));
        return None;
    }
    Some(NetPair { net, s, p, proxy })
}

fn load(net: &TestNet, tag: &str) -> RespLoad {
    let ns = net.name.clone();
    RespLoad::start(SocketAddr::from((GUEST_IP, 6379)), CLIENTS, tag, move || {
        runtime::netns::enter(&ns).map_err(|e| e.to_string())
    })
}

/// Waits until the load has `more` acknowledged INCRs beyond now.
fn wait_more(l: &RespLoad, more: u64) -> bool {
    let (start, end) = (l.acked(), Instant::now() + T);
    while Instant::now() < end {
        if l.acked() >= start + more {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn finish(row: &mut Row, name: &str, net: &TestNet, l: RespLoad) -> Option<RespReport> {
    let ns = net.name.clone();
    let rep = match l.finish(move || runtime::netns::enter(&ns).map_err(|e| e.to_string())) {
        Ok(r) => r,
        Err(e) => {
            row.fail(format!("{name}: the load could not be read back: {e}"));
            return None;
        }
    };
    let pct = |q: f64| rep.stalls_ms.get(((rep.stalls_ms.len() as f64 - 1.0) * q) as usize).copied().unwrap_or(0.0);
    eprintln!(
        "  {} connections: {} reset, {} reconnects; {} INCRs acknowledged, {} lost, {} applied twice; \
         longest stall per client p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms",
        rep.connections,
        rep.connections_reset,
        rep.reconnects,
        rep.acked_ops,
        rep.lost_acked_ops,
        rep.duplicate_ops,
        pct(0.5),
        pct(0.9),
        rep.longest_stall_ms
    );
    row.lost += rep.lost_acked_ops;
    row.duplicated += rep.duplicate_ops;
    row.max_gap_ms = row.max_gap_ms.max(rep.longest_stall_ms);
    if rep.connections_reset > 0 {
        row.fail(format!("{name}: {} connections reset: {:?}", rep.connections_reset, rep.resets));
    }
    if rep.lost_acked_ops > 0 || rep.duplicate_ops > 0 {
        row.fail(format!(
            "{name}: {} acknowledged INCRs lost, {} applied twice",
            rep.lost_acked_ops, rep.duplicate_ops
        ));
    }
    if rep.acked_ops == 0 {
        row.fail(format!("{name}: no INCR was acknowledged"));
    }
    Some(rep)
}

fn released_frames(p: &NodeProc) -> Option<u64> {
    p.status().and_then(|v| v["released_frames"].as_u64())
}

/// kill -9 of the primary under 64 persistent connections.
pub(super) fn net_kill9(row: &mut Row) {
    let name = "net-kill9";
    let c = Cluster::new(name);
    let rt = rt();
    let Some(NetPair { net, mut s, mut p, .. }) = net_pair(&c, row, name, Setup::default(), &rt) else { return };
    let l = load(&net, "k9");
    if !wait_more(&l, 300) {
        row.fail(format!("{name}: the clients got no answers before the fault:\n{}", p.log_tail()));
    }
    eprintln!("{name}: kill -9 of the primary under {CLIENTS} connections ({} INCRs acknowledged)", l.acked());
    p.kill9();
    match take_over(&s, 1) {
        Some(st) => row.failover(&st),
        None => row.fail(format!("{name}: no takeover:\n{}", s.log_tail())),
    }
    if !wait_more(&l, 300) {
        row.fail(format!("{name}: the clients did not carry on after the takeover:\n{}", s.log_tail()));
    }
    finish(row, name, &net, l);
    s.terminate();
    let _ = s.wait_exit(T);
}

/// A partition between the nodes: the secondary takes over, the held
/// primary releases no frame from the moment its acks stop (output
/// commit), and is fenced once the link heals; the clients keep their
/// connections across it.
pub(super) fn net_partition(row: &mut Row) {
    let name = "net-partition";
    let c = Cluster::new(name);
    let rt = rt();
    let Some(NetPair { net, mut s, mut p, proxy }) =
        net_pair(&c, row, name, Setup { proxied: true, ..Setup::default() }, &rt)
    else {
        return;
    };
    let proxy = proxy.expect("proxied");
    let l = load(&net, "pt");
    if !wait_more(&l, 300) {
        row.fail(format!("{name}: the clients got no answers before the fault:\n{}", p.log_tail()));
    }
    proxy.set(Fault::Drop);
    // what was acknowledged before the cut may still be released: read after a beat
    std::thread::sleep(Duration::from_millis(50));
    let before = released_frames(&p);
    eprintln!("{name}: link cut; the primary had released {before:?} frames");
    match take_over(&s, 1) {
        Some(st) => row.failover(&st),
        None => row.fail(format!("{name}: no takeover:\n{}", s.log_tail())),
    }
    let during = released_frames(&p);
    if during != before {
        row.fail(format!("{name}: the cut-off primary released frames without acks: {before:?} -> {during:?}"));
    }
    if !wait_more(&l, 300) {
        row.fail(format!("{name}: the clients did not carry on after the takeover:\n{}", s.log_tail()));
    }
    proxy.set(Fault::Pass);
    match p.wait_exit(T) {
        Some(7) => eprintln!("  the old primary was fenced once the link healed; it released no frame after the cut"),
        other => row.fail(format!(
            "{name}: old primary not fenced after healing ({}):\n{}",
            runtime::harness::waited_text(other),
            p.log_tail()
        )),
    }
    finish(row, name, &net, l);
    s.terminate();
    let _ = s.wait_exit(T);
}

/// kill -9 of the primary at a random point of protected operation under
/// 64 connections, `trials` times (seeded).
pub(super) fn net_kill_trials(row: &mut Row, trials: u64, seed: u64) {
    let mut x = seed | 1;
    let rt = rt();
    let mut stalls = Vec::new();
    for t in 0..trials {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay = Duration::from_millis(x % 1500);
        let name = format!("net-trial{t}");
        let c = Cluster::new(&name);
        let Some(NetPair { net, mut s, mut p, .. }) = net_pair(&c, row, &name, Setup::default(), &rt) else { continue };
        let l = load(&net, &format!("t{t}"));
        if !wait_more(&l, 64) {
            row.fail(format!("{name}: no answers before the fault:\n{}", p.log_tail()));
        }
        std::thread::sleep(delay);
        p.kill9();
        match take_over(&s, 1) {
            Some(st) => row.failover(&st),
            None => row.fail(format!("{name}: no takeover:\n{}", s.log_tail())),
        }
        if !wait_more(&l, 128) {
            row.fail(format!("{name}: the clients did not carry on:\n{}", s.log_tail()));
        }
        eprintln!("trial {t}: kill -9 of the primary {} ms into the load", delay.as_millis());
        if let Some(rep) = finish(row, &name, &net, l) {
            stalls.push(rep.longest_stall_ms);
        }
        s.terminate();
        let _ = s.wait_exit(T);
    }
    stalls.sort_by(f64::total_cmp);
    let q = |f: f64| stalls.get(((stalls.len().max(1) - 1) as f64 * f) as usize).copied().unwrap_or(0.0);
    eprintln!(
        "  over {} trials, the longest client stall of each: p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms",
        stalls.len(),
        q(0.5),
        q(0.9),
        q(1.0)
    );
}

/// A planned switchover with the witness: the clients' connections move
/// to the other node with the guest.
pub(super) fn net_switchover(row: &mut Row) {
    let name = "net-switchover";
    let c = Cluster::new(name);
    let etcd = c.etcd();
    let rt = rt();
    let how = Setup { witness: Some(&etcd.url), ..Setup::default() };
    let Some(NetPair { net, mut s, mut p, .. }) = net_pair(&c, row, name, how, &rt) else { return };
    let l = load(&net, "sw");
    if !wait_more(&l, 300) || p.wait_status(T, |v| v["witness"]["sync_recorded"] == true).is_none() {
        row.fail(format!("{name}: no answers, or the witness never recorded the secondary:\n{}", p.log_tail()));
    }
    let reply = p.command("switchover").unwrap_or_default();
    eprintln!("{name}: castor switchover -> {}", reply.trim());
    match take_over(&s, 2) {
        Some(st) => row.failover(&st),
        None => row.fail(format!("{name}: no takeover:\n{}", s.log_tail())),
    }
    match p.wait_exit(T) {
        Some(0) => {}
        other => row.fail(format!("{name}: the old primary did not exit 0 ({})", runtime::harness::waited_text(other))),
    }
    if !wait_more(&l, 300) {
        row.fail(format!("{name}: the clients did not carry on after the switchover:\n{}", s.log_tail()));
    }
    finish(row, name, &net, l);
    s.terminate();
    let _ = s.wait_exit(T);
}

/// The standby frozen for good with the witness: the witness lets the
/// primary run alone and the clients carry on over the same connections.
pub(super) fn net_standby_freeze(row: &mut Row) {
    let name = "net-standby-freeze";
    let c = Cluster::new(name);
    let etcd = c.etcd();
    let rt = rt();
    let how = Setup { witness: Some(&etcd.url), ..Setup::default() };
    let Some(NetPair { net, s, mut p, .. }) = net_pair(&c, row, name, how, &rt) else { return };
    let l = load(&net, "fz");
    if !wait_more(&l, 300) {
        row.fail(format!("{name}: no answers before the fault:\n{}", p.log_tail()));
    }
    s.freeze();
    eprintln!("{name}: froze the secondary (SIGSTOP)");
    if p.wait_status(T, |v| v["protection"] == "unprotected").is_none() {
        row.fail(format!("{name}: the witness never let the primary run alone:\n{}", p.log_tail()));
    }
    if !wait_more(&l, 300) {
        row.fail(format!("{name}: the clients did not carry on:\n{}", p.log_tail()));
    }
    finish(row, name, &net, l);
    s.thaw();
    p.terminate();
    let _ = p.wait_exit(T);
}
