//! A load of unmodified-client shape against the networked guest's Redis
//! protocol server: each of N clients keeps ONE TCP connection for the
//! whole run (no reconnect, as redis-benchmark) and sends `INCR` on a
//! counter of its own, one request at a time, checking every reply.
//!
//! Since each INCR returns the counter's new value, a client sees at once
//! an acknowledged increment the guest lost (the value repeats) or one it
//! applied twice (the value skips); after the run a fresh connection reads
//! every counter back and compares it with what its client saw
//! acknowledged. A connection that breaks is counted as reset (the client
//! stops: an unmodified client would have failed there).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A reply that takes longer than this counts as a broken connection.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// What one client saw.
#[derive(Debug, Clone, Default)]
pub struct ClientOutcome {
    pub acked: u64,
    /// Acknowledged increments the guest had lost (a value repeated).
    pub lost: u64,
    /// Increments applied twice (a value skipped).
    pub duplicated: u64,
    /// Why the connection ended early (reset, timeout, bad reply).
    pub broken: Option<String>,
    /// Longest wait for one reply.
    pub longest_stall: Duration,
}

/// What the whole load saw, with the read-back.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RespReport {
    pub connections: u64,
    pub connections_reset: u64,
    /// Always 0: this load never reconnects (kept for the report's shape).
    pub reconnects: u64,
    pub acked_ops: u64,
    pub lost_acked_ops: u64,
    pub duplicate_ops: u64,
    pub longest_stall_ms: f64,
    /// Each client's longest stall, sorted (ms).
    pub stalls_ms: Vec<f64>,
    /// Why connections broke (first few).
    pub resets: Vec<String>,
}

/// A running load; [`RespLoad::finish`] stops it and verifies.
#[derive(Debug)]
pub struct RespLoad {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Result<Vec<ClientOutcome>, String>>,
    addr: SocketAddr,
    tag: String,
    clients: usize,
}

fn incr(key: &str) -> Vec<u8> {
    format!("*2\r\n$4\r\nINCR\r\n${}\r\n{key}\r\n", key.len()).into_bytes()
}

fn key(tag: &str, i: usize) -> String {
    format!("castor:{tag}:{i}")
}

/// Reads one integer (`:n`) or bulk (`$n` + data, `$-1`) reply.
async fn reply(r: &mut BufReader<TcpStream>) -> Result<Option<i64>, String> {
    let mut line = String::new();
    let n = tokio::time::timeout(REPLY_TIMEOUT, r.read_line(&mut line))
        .await
        .map_err(|_| format!("no reply within {REPLY_TIMEOUT:?}"))?
        .map_err(|e| format!("read: {e}"))?;
    if n == 0 {
        return Err("closed by the server".into());
    }
    let t = line.trim_end();
    if let Some(v) = t.strip_prefix(':') {
        return v.parse().map(Some).map_err(|_| format!("bad integer reply {t:?}"));
    }
    if t == "$-1" {
        return Ok(None);
    }
    if t.starts_with('$') {
        let mut data = String::new();
        r.read_line(&mut data).await.map_err(|e| format!("read: {e}"))?;
        return data.trim_end().parse().map(Some).map_err(|_| format!("bad value {data:?}"));
    }
    Err(format!("unexpected reply {t:?}"))
}

async fn client(addr: SocketAddr, key: String, stop: Arc<AtomicBool>, acked_all: Arc<AtomicU64>) -> ClientOutcome {
    let mut o = ClientOutcome::default();
    // the first connection may wait for the guest to come up; after that,
    // a broken connection is a reset
    let start = Instant::now();
    let stream = loop {
        match TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                o.broken = Some(format!("connect: {e}"));
                return o;
            }
        }
    };
    let _ = stream.set_nodelay(true);
    let mut r = BufReader::new(stream);
    let req = incr(&key);
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        if let Err(e) = r.get_mut().write_all(&req).await {
            o.broken = Some(format!("write: {e}"));
            break;
        }
        match reply(&mut r).await {
            Ok(Some(v)) => {
                let want = o.acked as i64 + 1;
                if v < want {
                    o.lost += (want - v) as u64;
                } else if v > want {
                    o.duplicated += (v - want) as u64;
                }
                o.acked = v.max(0) as u64;
                acked_all.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => {
                o.broken = Some("INCR answered nil".into());
                break;
            }
            Err(e) => {
                o.broken = Some(e);
                break;
            }
        }
        o.longest_stall = o.longest_stall.max(t.elapsed());
    }
    o
}

impl RespLoad {
    /// Starts `clients` connections to `addr` on a thread of its own;
    /// `enter` runs first on that thread (to move it into a network
    /// namespace). `tag` makes the keys this run's own.
    pub fn start(
        addr: SocketAddr,
        clients: usize,
        tag: &str,
        enter: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> RespLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let (st, ac, tg) = (Arc::clone(&stop), Arc::clone(&acked), tag.to_string());
        let thread = std::thread::spawn(move || {
            enter()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let tasks: Vec<_> = (0..clients)
                    .map(|i| tokio::spawn(client(addr, key(&tg, i), Arc::clone(&st), Arc::clone(&ac))))
                    .collect();
                let mut out = Vec::new();
                for t in tasks {
                    out.push(t.await.map_err(|e| e.to_string())?);
                }
                Ok(out)
            })
        });
        RespLoad { stop, acked, thread, addr, tag: tag.into(), clients }
    }

    /// Increments acknowledged so far, all clients together.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Stops the clients (each finishes its request in flight), then reads
    /// every counter back over a new connection (made by `enter`'s
    /// thread-mate: `enter` again) and reports.
    pub fn finish(self, enter: impl FnOnce() -> Result<(), String> + Send + 'static) -> Result<RespReport, String> {
        self.stop.store(true, Ordering::Relaxed);
        let outcomes = self.thread.join().map_err(|_| "the load thread panicked".to_string())??;
        let (addr, tag, n) = (self.addr, self.tag.clone(), self.clients);
        let values = std::thread::spawn(move || -> Result<Vec<Option<i64>>, String> {
            enter()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let s = TcpStream::connect(addr).await.map_err(|e| format!("read-back connect: {e}"))?;
                let mut r = BufReader::new(s);
                let mut v = Vec::new();
                for i in 0..n {
                    let k = key(&tag, i);
                    let get = format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len());
                    r.get_mut().write_all(get.as_bytes()).await.map_err(|e| format!("read-back: {e}"))?;
                    v.push(reply(&mut r).await?);
                }
                Ok(v)
            })
        })
        .join()
        .map_err(|_| "the read-back thread panicked".to_string())??;
        let mut rep = RespReport { connections: n as u64, ..Default::default() };
        for (o, v) in outcomes.iter().zip(values) {
            rep.acked_ops += o.acked;
            rep.lost_acked_ops += o.lost;
            rep.duplicate_ops += o.duplicated;
            // the guest holds what it applied: at least every acked
            // increment, at most one more (a request whose reply was cut)
            let have = v.unwrap_or(0).max(0) as u64;
            if have < o.acked {
                rep.lost_acked_ops += o.acked - have;
            } else if have > o.acked + u64::from(o.broken.is_some()) {
                rep.duplicate_ops += have - o.acked - u64::from(o.broken.is_some());
            }
            if let Some(why) = &o.broken {
                rep.connections_reset += 1;
                if rep.resets.len() < 5 {
                    rep.resets.push(why.clone());
                }
            }
            rep.stalls_ms.push(o.longest_stall.as_secs_f64() * 1e3);
        }
        rep.stalls_ms.sort_by(f64::total_cmp);
        rep.longest_stall_ms = rep.stalls_ms.last().copied().unwrap_or(0.0);
        Ok(rep)
    }
}
