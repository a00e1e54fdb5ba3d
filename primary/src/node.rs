//! The primary's runtime, wired: the epoch engine on its own thread, the
//! replicator task that owns the mode, the client service, the control API
//! and metrics.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::auth::Secret;
use runtime::control::{serve_control, ControlRequest};
use runtime::join::Joiner;
use runtime::metrics::serve_metrics;
use runtime::status::{NodeStatus, Protection, Role};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use vmm::Machine;

use crate::engine::{Engine, EngineOptions, EngineShared};
use crate::mode::PrimaryState;
use crate::replicator::{Replicator, ReplicatorError};
use crate::router::{serve_clients, Router};

/// Errors of the node runtime.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Listen(#[from] runtime::listen::ListenError),
    #[error(transparent)]
    Replicator(#[from] ReplicatorError),
    #[error("the guest failed: {0}")]
    Machine(#[from] vmm::MachineError),
    #[error("cannot start the epoch engine: {0}")]
    Thread(std::io::Error),
    #[error("network card: {0}")]
    Net(#[from] vmm::net::NetError),
}

/// How a primary's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryExit {
    /// Asked to stop.
    Shutdown,
    /// A node of a higher generation exists: this one must not release
    /// output. `by` as in [`Mode::Fenced`](crate::mode::Mode::Fenced): that
    /// generation, or at least this one's + 1 when the peer did not name it.
    Fenced { by: u64 },
    /// A planned switchover completed: the secondary took over after `epoch`.
    HandedOver { epoch: u64 },
}

/// Primary settings.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    pub node: String,
    pub secret: Secret,
    pub generation: u64,
    /// Dial this secondary (and keep re-dialing it).
    pub peer: Option<SocketAddr>,
    pub heartbeat_interval: Duration,
    /// No heartbeat reply or ack for this long: the secondary is lost.
    pub peer_timeout: Duration,
    pub engine: EngineOptions,
    /// First epoch number (after a failover: the committed epoch + 1).
    pub first_epoch: u64,
    /// Append every released kv response here: `node generation client seq`.
    pub release_log: Option<std::path::PathBuf>,
    /// Print released console lines on stdout.
    pub print_console: bool,
    /// The witness that decides holds and promotions (our term is
    /// `generation`), if any.
    pub witness: Option<witness::Witness>,
    /// What this node and its secondary must agree on (a secondary whose
    /// settings differ is refused, and refuses us).
    pub pair: common::proto::PairSettings,
    /// The TAP device of the guest's network card (`--net`): released
    /// frames go out on it, received frames go into the card.
    pub net: Option<Arc<vmm::net::tap::Tap>>,
    /// Announce the guest's MAC when this node starts serving (a node that
    /// took the guest over: the bridge learns its new port).
    pub announce: bool,
}

/// What a primary serves on, already bound.
#[derive(Debug)]
pub struct PrimaryIo {
    /// The client service.
    pub service: Arc<TcpListener>,
    /// Control API, unless another task serves it and forwards `commands`.
    pub control: Option<runtime::control::ControlListener>,
    pub metrics: Option<TcpListener>,
    /// Secondaries that dial us (after a failover, or with `--listen`).
    pub joiners: Option<mpsc::Receiver<Joiner>>,
    /// Control commands served elsewhere (a promoted secondary keeps its
    /// control server and hands its command channel over).
    pub commands: Option<mpsc::Receiver<ControlRequest>>,
}

/// Runs `machine` as the primary until stopped or fenced.
pub async fn run_primary(
    mut machine: Machine,
    cfg: PrimaryConfig,
    io: PrimaryIo,
    status: Arc<NodeStatus>,
    stop: watch::Receiver<bool>,
) -> Result<PrimaryExit, NodeError> {
    status.update(|s| {
        s.role = Role::Primary;
        s.generation = cfg.generation;
        // a promoted secondary keeps its witness counters (its promote txn)
        let kept = s.witness.take();
        s.witness = cfg.witness.as_ref().map(|w| {
            kept.unwrap_or_else(|| {
                runtime::status::WitnessStatus::new(&w.config().endpoints, &w.config().vm_id, &w.config().node)
            })
        });
        s.protection = Protection::Unprotected;
        s.peer = cfg.peer.map(|p| p.to_string());
        // a promoted secondary's restored outbox goes out again first
        s.resent_frames = machine.devices().outbox_frames();
    });
    // background tasks, aborted when the set drops
    let mut tasks = tokio::task::JoinSet::new();
    let commands = match (io.commands, io.control) {
        (Some(rx), _) => Some(rx),
        (None, Some(l)) => {
            let (tx, rx) = mpsc::channel::<ControlRequest>(4);
            tasks.spawn(serve_control(l, status.clone(), Some(tx)));
            Some(rx)
        }
        (None, None) => None,
    };
    if let Some(l) = io.metrics {
        tasks.spawn(serve_metrics(l, status.clone()));
    }
    let router =
        Arc::new(Router::new(&cfg.node, cfg.generation, cfg.release_log.as_deref(), cfg.print_console, status.clone()));
    tasks.spawn(serve_clients(io.service, machine.devices().clone(), router.clone()));
    let _net_pump = attach_net(&cfg, machine.devices(), &router, &mut tasks)?;
    let shape = machine.shape().clone();
    let cpu = machine.cpu_model().clone();
    let shared = Arc::new(EngineShared { frames_released: router.frames_written(), ..EngineShared::default() });
    shared.next_epoch.store(cfg.first_epoch.max(1), Ordering::SeqCst);
    let (ptx, prx) = mpsc::channel(cfg.engine.max_in_flight as usize + 8);
    let (ctx, crx) = std::sync::mpsc::channel();
    // under `--unprotected pause` the guest does not run until a secondary
    // is in sync (the engine starts it then); otherwise it runs now
    if cfg.engine.unprotected == crate::engine::UnprotectedPolicy::Continue {
        machine.resume()?;
    }
    let devices = machine.devices().clone();
    let engine = Engine::new(machine, cfg.engine, shared.clone(), ptx, crx);
    let engine_thread = std::thread::Builder::new()
        .name("epoch-engine".into())
        .spawn(move || engine.run())
        .map_err(NodeError::Thread)?;
    {
        let (status, shared, devices) = (status.clone(), shared.clone(), devices.clone());
        tasks.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let next = shared.next_epoch.load(Ordering::SeqCst);
                let acked = shared.acked_epoch();
                status.update(|s| {
                    s.epoch = next.saturating_sub(1);
                    // epochs in flight only mean something while a secondary
                    // takes them (no secondary: nothing is in flight)
                    let in_session = matches!(
                        s.protection,
                        runtime::status::Protection::Syncing
                            | runtime::status::Protection::Protected
                            | runtime::status::Protection::HandingOver
                    );
                    s.epochs_in_flight =
                        if in_session { next.saturating_sub(shared.next_unacked.load(Ordering::SeqCst)) } else { 0 };
                    s.lag_epochs = s.epochs_in_flight;
                    s.acked_epoch = acked;
                    s.tracking_lost = shared.tracking_lost.load(Ordering::Relaxed);
                    s.ring_full_exits = shared.ring_full_exits.load(Ordering::Relaxed);
                    s.pause_us_max = shared.pause_us_max.load(Ordering::Relaxed) as f64;
                    s.sync_max_pause_us = shared.sync_max_pause_us.load(Ordering::Relaxed) as f64;
                    s.last_sync_gib_per_s = f64::from_bits(shared.last_sync_gib_per_s.load(Ordering::Relaxed));
                    s.live_syncs = shared.live_syncs.load(Ordering::Relaxed);
                    s.queued_bytes = shared.queued_bytes.load(Ordering::Relaxed);
                    s.queued_bytes_max = shared.queued_bytes_max.load(Ordering::Relaxed);
                    s.budget_pauses = shared.budget_pauses.load(Ordering::Relaxed);
                    s.precopy_rounds = shared.precopy_rounds.load(Ordering::Relaxed);
                    s.precopied_pages = shared.precopied_pages.load(Ordering::Relaxed);
                    (s.console_dropped, s.marks_dropped) = devices.dropped_counts();
                    if let Some(c) = devices.net().map(|n| n.counts()) {
                        (s.net_rx_frames, s.net_rx_dropped, s.net_tx_frames, s.net_interrupts) =
                            (c.rx_frames, c.rx_dropped, c.tx_frames, c.interrupts);
                    }
                });
            }
        });
    }
    let rep = Replicator {
        state: if cfg.witness.is_some() { PrimaryState::with_witness() } else { PrimaryState::new() },
        witness: None,
        session_peer: String::new(),
        switchover: None,
        refusals: runtime::lograte::LogLimiter::new(Duration::from_secs(10)),
        cfg,
        shape,
        cpu,
        shared: shared.clone(),
        engine: ctx,
        router: router.clone(),
        status: status.clone(),
        packets: prx,
        joiners: io.joiners,
        commands,
        stop,
    };
    let exit = rep.run().await;
    // this node serves no more: its clients move on now, not after the VM
    // is torn down
    router.close();
    shared.stop.store(true, Ordering::SeqCst);
    let machine = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    if let Ok(Ok(mut m)) = machine {
        m.shutdown();
    }
    drop(tasks);
    status.update(|s| {
        s.role = match &exit {
            Ok(PrimaryExit::Fenced { .. }) => Role::Fenced,
            _ => Role::Stopped,
        }
    });
    Ok(exit?)
}

/// Connects the guest's network card to the node's TAP: received frames go
/// into the card, released frames out on the TAP, and a node that took the
/// guest over announces its MAC (RARP, QEMU's rounds). Returns the receive
/// pump (it stops when dropped, with the node).
fn attach_net(
    cfg: &PrimaryConfig,
    devices: &Arc<vmm::devices::Devices>,
    router: &Arc<Router>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<Option<vmm::net::tap::RxPump>, NodeError> {
    use vmm::net::tap::{RxPump, RxSink};
    match (&cfg.net, devices.net()) {
        (Some(tap), Some(card)) => {
            router.attach_tap(Arc::clone(tap));
            let pump = RxPump::start(Arc::clone(tap), RxSink::Card(Arc::clone(card)))?;
            if cfg.announce {
                let (tap, frame) = (Arc::clone(tap), vmm::net::rarp_announce(card.config().mac));
                tasks.spawn(async move {
                    let start = tokio::time::Instant::now();
                    for ms in vmm::net::ANNOUNCE_ROUNDS_MS {
                        tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
                        tap.send(&frame);
                    }
                    tracing::info!(tap = tap.name(), "announced the guest's MAC");
                });
            }
            Ok(Some(pump))
        }
        (Some(tap), None) => {
            tracing::warn!(tap = tap.name(), "--net is given but the guest has no network card: the TAP stays unused");
            Ok(None)
        }
        (None, Some(_)) => {
            tracing::warn!("the guest has a network card and this node has no --net: its frames go nowhere");
            Ok(None)
        }
        (None, None) => Ok(None),
    }
}
