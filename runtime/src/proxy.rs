//! A fault-injecting TCP proxy: pass, drop (reset every connection),
//! blackhole (accept, swallow, never answer), delay, throttle, and holding
//! one direction. The failover tests put it between nodes, and `castor demo`
//! cuts its partition with it ([`Fault::Blackhole`]): one implementation of
//! every fault for both.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    Pass,
    /// Close every connection, refuse new ones.
    Drop,
    /// Swallow everything in both directions.
    Blackhole,
    /// Forward, but hold back the upstream-to-downstream direction (responses).
    HoldReplies,
    /// Forward, but hold back the downstream-to-upstream direction (requests).
    HoldRequests,
    /// Add this much latency to every chunk.
    Delay(Duration),
    /// Limit each direction to this many bytes per second.
    Throttle(u64),
    /// Flip one bit in every chunk forwarded downstream-to-upstream.
    Corrupt,
    /// Hold the downstream-to-upstream direction of every connection that
    /// has carried more than 1 MiB that way: a replication data connection
    /// stands still while its heartbeat connection (a few KiB) flows.
    StallBulk,
}

/// Bytes a connection carries upstream before [`Fault::StallBulk`] holds it.
const BULK: u64 = 1 << 20;

/// A running proxy: clients connect to `addr`, traffic goes to `upstream`.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    epoch: Arc<std::sync::atomic::AtomicU64>,
    upstream: Arc<Mutex<SocketAddr>>,
    /// Every byte forwarded towards the upstream, when recording.
    recorded: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port in the current tokio runtime
    /// (it runs as long as the runtime does).
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let p = Proxy {
            addr: l.local_addr()?,
            fault: Arc::new(Mutex::new(Fault::Pass)),
            epoch: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            upstream: Arc::new(Mutex::new(upstream)),
            recorded: Arc::new(Mutex::new(None)),
        };
        let me = p.clone();
        tokio::spawn(async move {
            loop {
                let Ok((down, _)) = l.accept().await else {
                    // (out of descriptors: wait instead of spinning)
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let me = me.clone();
                let upstream = *common::sync::lock(&me.upstream);
                tokio::spawn(async move { me.handle(down, upstream).await });
            }
        });
        Ok(p)
    }

    /// Sets the fault; `Drop` also cuts existing connections.
    pub fn set(&self, f: Fault) {
        *common::sync::lock(&self.fault) = f;
        if f == Fault::Drop {
            self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Starts keeping every byte forwarded towards the upstream.
    pub fn record(&self) {
        *common::sync::lock(&self.recorded) = Some(Vec::new());
    }

    /// What was recorded so far.
    pub fn recording(&self) -> Vec<u8> {
        common::sync::lock(&self.recorded).clone().unwrap_or_default()
    }

    /// New connections go to `to` (a restarted node's new port).
    pub fn set_upstream(&self, to: SocketAddr) {
        *common::sync::lock(&self.upstream) = to;
    }

    fn fault(&self) -> Fault {
        *common::sync::lock(&self.fault)
    }

    async fn handle(&self, down: TcpStream, upstream: SocketAddr) {
        if self.fault() == Fault::Drop {
            return;
        }
        let Ok(up) = TcpStream::connect(upstream).await else { return };
        let _ = down.set_nodelay(true);
        let _ = up.set_nodelay(true);
        let (dr, dw) = down.into_split();
        let (ur, uw) = up.into_split();
        let born = self.epoch.load(std::sync::atomic::Ordering::SeqCst);
        let a = self.clone().pump(dr, uw, true, born);
        let b = self.clone().pump(ur, dw, false, born);
        tokio::select! { _ = a => {}, _ = b => {} }
    }

    async fn pump(
        self,
        mut r: tokio::net::tcp::OwnedReadHalf,
        mut w: tokio::net::tcp::OwnedWriteHalf,
        to_upstream: bool,
        born: u64,
    ) {
        let mut buf = vec![0u8; 64 << 10];
        let mut held: Vec<u8> = Vec::new();
        let mut carried = 0u64;
        loop {
            if self.epoch.load(std::sync::atomic::Ordering::SeqCst) != born {
                return;
            }
            let n = match tokio::time::timeout(Duration::from_millis(20), r.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => n,
                Err(_) => 0, // periodic wake-up: re-check faults and held data
            };
            let fault = self.fault();
            let hold = match fault {
                Fault::HoldReplies => !to_upstream,
                Fault::HoldRequests => to_upstream,
                Fault::StallBulk => to_upstream && carried > BULK,
                Fault::Blackhole => true,
                Fault::Drop => return,
                _ => false,
            };
            if fault == Fault::Blackhole {
                continue; // swallowed for good
            }
            held.extend_from_slice(&buf[..n]);
            if hold || held.is_empty() {
                continue;
            }
            match fault {
                Fault::Delay(d) => tokio::time::sleep(d).await,
                Fault::Throttle(bps) => {
                    tokio::time::sleep(Duration::from_secs_f64(held.len() as f64 / bps.max(1) as f64)).await
                }
                Fault::Corrupt if to_upstream => {
                    let i = held.len() / 2;
                    held[i] ^= 0x10;
                }
                _ => {}
            }
            if to_upstream {
                if let Some(r) = common::sync::lock(&self.recorded).as_mut() {
                    r.extend_from_slice(&held);
                }
            }
            if w.write_all(&held).await.is_err() {
                return;
            }
            carried += held.len() as u64;
            held.clear();
        }
    }
}
