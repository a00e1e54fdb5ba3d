//! The secondary's runtime: receive epochs into the replica, watch the
//! primary's heartbeats, and fail over: raise the generation, build the VM
//! from the committed replica (its memory as it is, no copy) and run it as the
//! primary, unprotected until a new secondary joins.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::auth::Secret;
use common::proto::Channel;
use primary::engine::EngineOptions;
use primary::node::{
    bind, run_primary_with, serve_control, serve_metrics, Joiner, NodeError, PrimaryConfig, PrimaryExit,
};
use primary::status::NodeStatus;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use vmm::{Machine, TrackerKind};

use crate::receiver::{serve_connection, ReceiverConfig, ReceiverEvent};
use crate::replica::Replica;

/// Preamble byte a joining secondary sends before the handshake.
pub const JOIN_DATA: u8 = b'D';
/// Preamble byte of a joining secondary's heartbeat connection.
pub const JOIN_HEARTBEAT: u8 = b'H';

/// Secondary settings.
#[derive(Debug, Clone)]
pub struct SecondaryConfig {
    pub node: String,
    pub secret: Secret,
    /// Replication listen address (primaries dial it; after a failover,
    /// new secondaries join here).
    pub listen: SocketAddr,
    /// Dial this primary to protect it (re-protection after a failover).
    pub join: Option<SocketAddr>,
    pub service_listen: SocketAddr,
    pub control_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub heartbeat_timeout: Duration,
    /// Tracker of the VM built at failover.
    pub tracker: TrackerKind,
    /// Hot-page retention for that VM (bitmap tracker).
    pub hot_pages: bool,
    /// Settings of the primary this node becomes.
    pub heartbeat_interval: Duration,
    pub fence_grace: Duration,
    pub engine: EngineOptions,
    pub release_log: Option<std::path::PathBuf>,
    pub print_console: bool,
}

/// Errors of the secondary runtime.
#[derive(Debug, thiserror::Error)]
pub enum SecondaryError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("failover failed: {0}")]
    Failover(String),
    #[error("replica: {0}")]
    Replica(#[from] crate::replica::ReplicaError),
}

struct Liveness {
    last_heard: Instant,
    heard: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs until stopped; after a failover, until the new primary ends.
pub async fn run_secondary(
    cfg: SecondaryConfig,
    status: Arc<NodeStatus>,
    mut stop: watch::Receiver<bool>,
) -> Result<PrimaryExit, SecondaryError> {
    status.update(|s| {
        s.role = "secondary".into();
        s.protection = "waiting".into();
    });
    let replica = Arc::new(Mutex::new(Replica::unshaped()?));
    let rcfg = ReceiverConfig::new(cfg.secret.clone(), 0);
    let live = Arc::new(Mutex::new(Liveness { last_heard: Instant::now(), heard: false }));
    let promoted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (join_tx, join_rx) = mpsc::channel::<Joiner>(8);
    let (force_tx, mut force_rx) = mpsc::channel::<String>(4);
    let listener = bind(cfg.listen).await?;
    let mut tasks = Vec::new();
    if let Some(a) = cfg.control_listen {
        tasks.push(tokio::spawn(serve_control(bind(a).await?, status.clone(), Some(force_tx.clone()))));
    }
    if let Some(a) = cfg.metrics_listen {
        tasks.push(tokio::spawn(serve_metrics(bind(a).await?, status.clone())));
    }

    let on_event = {
        let (live, status, replica) = (live.clone(), status.clone(), replica.clone());
        move |e: ReceiverEvent| {
            let mut l = lock(&live);
            l.last_heard = Instant::now();
            l.heard = true;
            if let ReceiverEvent::Committed { epoch } = e {
                let needs = lock(&replica).needs_resync();
                status.update(|s| {
                    s.epoch = epoch;
                    s.committed_epoch = Some(epoch);
                    s.epochs += 1;
                    s.protection = if needs { "diverged".into() } else { "replicating".into() };
                });
            }
        }
    };

    // Replication listener: as secondary, serve primaries; once promoted,
    // hand joining secondaries to the primary runtime, refuse old primaries.
    {
        let (replica, rcfg, promoted, on_event) = (replica.clone(), rcfg.clone(), promoted.clone(), on_event.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else { continue };
                let (replica, rcfg, promoted, on_event, join_tx) =
                    (replica.clone(), rcfg.clone(), promoted.clone(), on_event.clone(), join_tx.clone());
                tokio::spawn(async move {
                    if promoted.load(std::sync::atomic::Ordering::SeqCst) {
                        let mut b = [0u8; 1];
                        match stream.peek(&mut b).await {
                            Ok(1) if b[0] == JOIN_DATA || b[0] == JOIN_HEARTBEAT => {
                                let mut stream = stream;
                                let mut one = [0u8; 1];
                                let _ = tokio::io::AsyncReadExt::read_exact(&mut stream, &mut one).await;
                                let ch = if one[0] == JOIN_DATA { Channel::Data } else { Channel::Heartbeat };
                                let _ = join_tx.send((stream, ch)).await;
                                return;
                            }
                            _ => {} // a primary: the receiver refuses its stale generation
                        }
                    }
                    match serve_connection(stream, &rcfg, &replica, on_event).await {
                        Ok(end) => tracing::info!(%peer, ?end, "replication session ended"),
                        Err(e) => tracing::warn!(%peer, code = e.code(), error = %e, "replication session refused"),
                    }
                });
            }
        }));
    }

    // Re-protection: dial the primary we protect.
    if let Some(primary_addr) = cfg.join {
        let (replica, rcfg, promoted, on_event) = (replica.clone(), rcfg.clone(), promoted.clone(), on_event.clone());
        tasks.push(tokio::spawn(async move {
            while !promoted.load(std::sync::atomic::Ordering::SeqCst) {
                let dial = |tag: u8| async move {
                    let mut s = TcpStream::connect(primary_addr).await?;
                    s.write_all(&[tag]).await?;
                    Ok::<TcpStream, std::io::Error>(s)
                };
                match (dial(JOIN_DATA).await, dial(JOIN_HEARTBEAT).await) {
                    (Ok(d), Ok(h)) => {
                        let (r2, c2, e2) = (replica.clone(), rcfg.clone(), on_event.clone());
                        let hb = tokio::spawn(async move { serve_connection(h, &c2, &r2, e2).await });
                        let res = serve_connection(d, &rcfg, &replica, on_event.clone()).await;
                        hb.abort();
                        tracing::warn!(?res, "joined replication session ended");
                    }
                    _ => tracing::debug!(%primary_addr, "primary not reachable yet"),
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }

    // Heartbeat monitor.
    let forced = loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            f = force_rx.recv() => if f.as_deref() == Some("failover") {
                if lock(&replica).committed_epoch().is_some() {
                    tracing::warn!("forced failover requested");
                    break true;
                }
                tracing::warn!("forced failover refused: no committed epoch yet");
            },
            _ = stop.changed() => {
                for t in tasks { t.abort(); }
                return Ok(PrimaryExit::Shutdown);
            }
        }
        let (heard, since) = {
            let l = lock(&live);
            (l.heard, l.last_heard.elapsed())
        };
        if heard && since > cfg.heartbeat_timeout && lock(&replica).committed_epoch().is_some() {
            tracing::warn!(silent_ms = since.as_millis() as u64, "primary silent: failing over");
            break false;
        }
    };

    // Failover.
    let last_heard = lock(&live).last_heard;
    let generation = rcfg.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    promoted.store(true, std::sync::atomic::Ordering::SeqCst);
    let (state, mem, epoch) = {
        let mut r = lock(&replica);
        let c = r.committed().cloned().ok_or_else(|| SecondaryError::Failover("no committed epoch".into()))?;
        if r.needs_resync() {
            tracing::error!("the replica diverged from its primary at its last check; failing over to it anyway, it is the only copy");
        }
        r.retire();
        (c.state, r.memory().clone(), c.epoch)
    };
    let mut machine =
        Machine::restore_with_memory(cfg.tracker, &state, mem).map_err(|e| SecondaryError::Failover(e.to_string()))?;
    machine.set_hot_pages(cfg.hot_pages);
    machine.start().map_err(|e| SecondaryError::Failover(e.to_string()))?;
    let failover_ms = last_heard.elapsed().as_secs_f64() * 1e3;
    tracing::warn!(generation, epoch, failover_ms, forced, "failover complete: the guest runs here now");
    status.update(|s| {
        s.failovers += 1;
        s.last_failover_ms = Some(failover_ms);
        s.generation = generation;
    });
    let pcfg = PrimaryConfig {
        node: cfg.node.clone(),
        secret: cfg.secret.clone(),
        generation,
        peer: None,
        service_listen: cfg.service_listen,
        control_listen: None,
        metrics_listen: None,
        heartbeat_interval: cfg.heartbeat_interval,
        peer_timeout: cfg.heartbeat_timeout,
        fence_grace: cfg.fence_grace,
        engine: cfg.engine,
        first_epoch: epoch + 1,
        release_log: cfg.release_log.clone(),
        print_console: cfg.print_console,
    };
    let exit = run_primary_with(machine, pcfg, Some(join_rx), Some(force_rx), status.clone(), stop).await;
    for t in tasks {
        t.abort();
    }
    Ok(exit?)
}
