//! `castor demo` with the networked guest (the default): the guest owns its
//! TCP/IP stack (smoltcp) behind a virtio-net card and serves the Redis
//! protocol; the clients are unmodified TCP clients in a network namespace
//! of the demo's own (etcd, the nodes and the relay run in it too):
//! Debian's `redis-benchmark` (looping until the end; a single dropped
//! connection ends it early) and castor's checking load
//! (client::resp: one connection per client, INCR on a counter of its own,
//! every reply checked, counters read back at the end). Halfway the fault;
//! the summary says whether every connection survived, the longest stall
//! a client saw, and whether anything acknowledged was lost.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use runtime::netns::TestNet;
use serde_json::Value;

use super::{f, serving, start_node, DemoArgs, DemoError};

use runtime::netns::GUEST_IP;
const MAC: [u8; 6] = runtime::netns::guest_mac(1);

fn benchmark(net: &TestNet, dir: &std::path::Path) -> Result<Child, DemoError> {
    let log = std::fs::File::create(dir.join("redis-benchmark.log")).map_err(|e| DemoError::Setup(e.to_string()))?;
    net.command("redis-benchmark")
        .args(["-h", &GUEST_IP.to_string(), "-c", "16", "-t", "set,get,incr", "-l", "-q", "-r", "10000"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| DemoError::Setup(e.to_string()))?)
        .stderr(log)
        .spawn()
        .map_err(|e| {
            DemoError::Setup(format!("cannot start redis-benchmark (scripts/deps.sh installs redis-tools): {e}"))
        })
}

pub(super) fn demo(a: &DemoArgs, dir: &std::path::Path, live: &dyn Fn(String)) -> Result<Value, DemoError> {
    let net = TestNet::create("demo").map_err(|e| {
        DemoError::Setup(format!("{e}; the networked demo makes a network namespace of its own: run it as root, or run `castor demo --guest kv`"))
    })?;
    // etcd, both nodes, the fault relay and the clients all run inside it:
    // their loopback sockets are the namespace's, not the host's
    let _inside = net.scope().map_err(|e| DemoError::Setup(e.to_string()))?;
    let tag = std::process::id() % 10_000;
    let net_arg = |tap: String, ip: Option<Ipv4Addr>| vec!["--net".to_string(), net.net_arg(&tap, MAC, ip)];
    let (setup, secondary, repl) = super::Setup::start(a, dir, live, net_arg(format!("cdb{tag}"), None))?;
    let etcd = &setup.etcd;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let relay = super::relay_for(a, &rt, repl)?;
    let peer = relay.as_ref().map_or(repl, |r| r.addr);
    let mut pargs: Vec<String> = vec![
        "primary".into(),
        "--peer".into(),
        peer.to_string(),
        "--guest".into(),
        "redis".into(),
        "--mem".into(),
        a.mem.to_string(),
        "--vcpus".into(),
        "1".into(),
        "--name".into(),
        "node-a".into(),
    ];
    pargs.extend(setup.common(a));
    pargs.extend(net_arg(format!("cda{tag}"), Some(GUEST_IP)));
    let mut primary = Some(start_node("primary", &pargs, dir)?);
    live(format!(
        "castor demo (guest redis): primary node-a, secondary node-b; the guest is {GUEST_IP}:6379 on a bridge in network namespace {}; logs in {}",
        net.name,
        dir.display()
    ));
    super::await_protection(primary.as_mut(), a, etcd.is_some(), dir, live)?;
    let ns = net.name.clone();
    let load = client::resp::RespLoad::start(SocketAddr::from((GUEST_IP, 6379)), a.connections, "demo", move || {
        runtime::netns::enter(&ns).map_err(|e| e.to_string())
    });
    let mut bench = benchmark(&net, dir)?;
    let start = Instant::now();
    let fault_at = Duration::from_secs_f64(a.kill_primary_at.unwrap_or(a.seconds / 2.0).max(0.0));
    let (mut faulted, mut next_tick, mut prev) = (false, Duration::from_secs(1), 0u64);
    let mut bench_ended: Option<String> = None;
    let mut frozen = false;
    let mut unprotect_at: Option<Instant> = None;
    while start.elapsed() < Duration::from_secs_f64(a.seconds) {
        std::thread::sleep(Duration::from_millis(20));
        if !faulted && start.elapsed() >= fault_at {
            faulted = true;
            let at = start.elapsed().as_secs_f64();
            let f = super::inject(a.scenario, at, &mut primary, &secondary, relay.as_ref(), etcd.is_none(), live);
            (frozen, unprotect_at) = (f.frozen, f.unprotect_at);
        }
        super::unprotect_when_due(&mut unprotect_at, primary.as_ref(), start, live);
        if bench_ended.is_none() {
            if let Ok(Some(st)) = bench.try_wait() {
                bench_ended = Some(format!(
                    "redis-benchmark ended early ({st}) at t={:.1}s: a connection failed",
                    start.elapsed().as_secs_f64()
                ));
                live(bench_ended.clone().unwrap_or_default());
            }
        }
        if start.elapsed() >= next_tick {
            next_tick += Duration::from_secs(1);
            let Some(st) = serving(primary.as_ref(), Some(&secondary).filter(|_| !frozen)) else { continue };
            let acked = load.acked();
            live(format!(
                "t={:>2.0}s {} ({}, gen {}): INCRs acknowledged={} (+{}), frames released={}, held outputs={}",
                start.elapsed().as_secs_f64(),
                st["node"].as_str().unwrap_or("?"),
                st["protection"].as_str().unwrap_or("?"),
                st["generation"],
                acked,
                acked - prev,
                st["released_frames"],
                st["held_outputs"],
            ));
            prev = acked;
        }
    }
    let bench_survived = bench_ended.is_none() && matches!(bench.try_wait(), Ok(None));
    let _ = bench.kill();
    let _ = bench.wait();
    let ns = net.name.clone();
    let rep = load.finish(move || runtime::netns::enter(&ns).map_err(|e| e.to_string())).map_err(DemoError::Node)?;
    let survivor = serving(primary.as_ref(), Some(&secondary).filter(|_| !frozen)).unwrap_or(Value::Null);
    let failover = survivor["node"] == "node-b";
    let failover_ms = failover.then(|| f(&survivor, "last_failover_ms"));
    let pct =
        |q: f64| rep.stalls_ms.get(((rep.stalls_ms.len().max(1) - 1) as f64 * q) as usize).copied().unwrap_or(0.0);
    let r1 = |x: f64| (x * 10.0).round() / 10.0;
    live(format!(
        "summary: {}: {} serves{}; {} of {} connections survived ({} reset, {} reconnects), redis-benchmark's 16 connections {}; {} INCRs acknowledged, {} lost, {} applied twice; longest client stall {:.0} ms (per-client longest: p50 {:.0} ms, p90 {:.0} ms)",
        a.scenario.name(),
        survivor["node"].as_str().unwrap_or("no node"),
        failover_ms.map(|ms| format!(" after a failover in {ms:.0} ms")).unwrap_or_default(),
        rep.connections - rep.connections_reset,
        rep.connections,
        rep.connections_reset,
        rep.reconnects,
        if bench_survived { "all survived" } else { "did NOT all survive" },
        rep.acked_ops,
        rep.lost_acked_ops,
        rep.duplicate_ops,
        rep.longest_stall_ms,
        pct(0.5),
        pct(0.9),
    ));
    drop(secondary);
    drop(primary);
    drop(relay);
    drop(setup);
    Ok(serde_json::json!({
        "guest": "redis",
        "scenario": a.scenario.name(),
        "serving": survivor["node"],
        "failover": failover,
        "failover_ms": failover_ms.map(r1),
        "connections": rep.connections,
        "connections_reset": rep.connections_reset,
        "reconnects": rep.reconnects,
        "redis_benchmark_survived": bench_survived,
        "longest_stall_ms": r1(rep.longest_stall_ms),
        "stall_ms_p50": r1(pct(0.5)),
        "stall_ms_p90": r1(pct(0.9)),
        "acked_ops": rep.acked_ops,
        "lost_acked_ops": rep.lost_acked_ops,
        "duplicate_ops": rep.duplicate_ops,
        "witness": !a.no_witness,
        "host": runtime::host::Host::detect().describe(),
    }))
}
