//! Strangers on the replication and join ports (failover suite): connection
//! storms, a slow stranger, and storms during a link cut.

use std::time::{Duration, Instant};

use failover_tests::cluster::{Cluster, NodeOpts, NodeProc};
use failover_tests::load::Load;
use failover_tests::proxy::{Fault, Proxy};

use super::{carry_on_and_check, expect_takeover, pair, protected, proxied_pair, rt, Row, T};

/// Strangers on the secondary's replication port: 100 plain connections a
/// second for 5 s that close at once, plus one that sends a byte a second
/// and never authenticates. Protection must never drop (no hold, no
/// resync), acks keep flowing, and the slow one is cut at the handshake
/// deadline.
pub(super) fn strangers(row: &mut Row) {
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
pub(super) fn strangers_on_the_join_port(row: &mut Row) {
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
pub(super) fn strangers_cut(row: &mut Row) {
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
pub(super) fn strangers_join_cut(row: &mut Row) {
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
    let proxy = rt.block_on(Proxy::start(join)).expect("start the proxy");
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
