//! The secondary's runtime: receive epochs into the replica, watch the
//! primary's heartbeats, and fail over: raise the generation, build the VM
//! from the committed replica (its memory as it is, no copy) and hand it
//! back as a [`Promotion`], which the caller runs as a primary.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::auth::Secret;
use common::sync::lock;
use runtime::control::{serve_control, ControlRequest, Refused};
use runtime::join::{read_preamble, Joiner, JOIN_DATA, JOIN_HEARTBEAT};
use runtime::listen::Listeners;
use runtime::metrics::serve_metrics;
use runtime::status::{NodeStatus, Role};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use vmm::{Machine, TrackerKind};

use crate::liveness::Silence;
use crate::mode::{Ask, SecondaryEvent, SecondaryMode, WitnessAnswer};
use crate::receiver::{log_refusal, serve_connection, ReceiverConfig, ReceiverEvent};
use crate::replica::Replica;
use crate::takeover::TakeoverAsk;

/// Secondary settings.
#[derive(Debug, Clone)]
pub struct SecondaryConfig {
    pub node: String,
    pub secret: Secret,
    /// Dial this primary to protect it (re-protection after a failover).
    pub join: Option<SocketAddr>,
    pub heartbeat_timeout: Duration,
    /// Tracker of the VM built at failover.
    pub tracker: TrackerKind,
    /// Hot-page retention for that VM.
    pub hot_pages: bool,
    /// The witness that must grant a takeover, if any.
    pub witness: Option<witness::Witness>,
    /// This node's name to its primary and the witness: durable with a
    /// state dir, unique to the process without one.
    pub node_id: String,
    /// `--state-dir`: the generation, stored before it is acted on.
    pub state: Option<Arc<runtime::state_dir::StateDir>>,
    /// What this node and its primary must agree on (the handshake
    /// refuses a primary whose settings differ).
    pub pair: common::proto::PairSettings,
}

/// Errors of the secondary runtime.
#[derive(Debug, thiserror::Error)]
pub enum SecondaryError {
    #[error("the secondary needs a replication listener")]
    NoListener,
    #[error("failover: {0}")]
    Failover(#[from] vmm::MachineError),
    #[error("this host's KVM: {0}")]
    Host(vmm::MachineError),
    #[error("failover: no committed epoch")]
    NothingCommitted,
    #[error("failover refused: {0}")]
    Unusable(String),
    #[error("replica: {0}")]
    Replica(#[from] crate::replica::ReplicaError),
    #[error(transparent)]
    StateDir(#[from] runtime::state_dir::StateDirError),
}

/// How long a planned handover waits for the witness to decide before
/// it is refused (the primary's guest is paused meanwhile).
const HANDOVER_DECISION: Duration = Duration::from_secs(5);

/// How often an unanswered takeover claim is asked again.
const CLAIM_RETRY: Duration = Duration::from_millis(200);

/// A claim's answer: the term claimed from, (granted lease | refusal
/// reason | unreachable), ms.
type ClaimResult = (u64, Result<(witness::Decision, Option<i64>), witness::WitnessError>, f64);

/// A secondary that took over: everything the primary it becomes needs.
#[derive(Debug)]
pub struct Promotion {
    /// The VM, running, built from the committed replica.
    pub machine: Machine,
    pub generation: u64,
    /// The committed epoch + 1.
    pub first_epoch: u64,
    pub service: Arc<TcpListener>,
    /// Secondaries that join the new primary (on the replication listener).
    pub joiners: mpsc::Receiver<Joiner>,
    /// Commands from the control API, which keeps being served.
    pub commands: mpsc::Receiver<ControlRequest>,
    /// The listener and control tasks: keep them while the primary runs.
    pub tasks: tokio::task::JoinSet<()>,
}

/// How a secondary's run ended.
#[derive(Debug)]
pub enum SecondaryExit {
    Shutdown,
    Promoted(Box<Promotion>),
}

/// Connections that may be on their way to authenticating at once; more
/// wait their turn, fairly across their sources (`runtime::admission`).
pub const MAX_UNAUTHENTICATED: usize = 16;

/// Runs until stopped or promoted.
pub async fn run_secondary(
    cfg: SecondaryConfig,
    listeners: Listeners,
    status: Arc<NodeStatus>,
    mut stop: watch::Receiver<bool>,
) -> Result<SecondaryExit, SecondaryError> {
    let mut mode = SecondaryMode::Waiting;
    status.update(|s| {
        s.role = Role::Secondary;
        s.protection = mode.protection();
    });
    let listener = listeners.replication.ok_or(SecondaryError::NoListener)?;
    let replica = Arc::new(Mutex::new(Replica::unshaped()?));
    let stored = match &cfg.state {
        Some(sd) => sd.generation()?,
        None => 0,
    };
    let mut rcfg = ReceiverConfig::new(cfg.secret.clone(), stored, cfg.pair.clone());
    status.update(|s| s.generation = stored);
    rcfg.node = cfg.node_id.clone();
    rcfg.state = cfg.state.clone();
    // planned handovers come to this loop, which answers once the guest
    // runs here (or cannot)
    let (takeover_tx, mut takeover_rx) = mpsc::unbounded_channel::<TakeoverAsk>();
    rcfg.takeover = Some(takeover_tx);
    // a primary whose guest this host cannot run is refused when the pair
    // forms, and the replica is built into a machine (not run) before the
    // first ack of every session: a failover that could not run is found
    // before it is needed
    rcfg.host_cpu = Some(vmm::cpu::host_model().map_err(SecondaryError::Host)?);
    rcfg.trial = Some(crate::receiver::TrialRestore::new(cfg.tracker, status.clone()));
    if let Some(w) = &cfg.witness {
        status.update(|s| {
            s.witness =
                Some(runtime::status::WitnessStatus::new(&w.config().endpoints, &w.config().vm_id, &w.config().node))
        });
        // a primary older than the term in force is refused at once (a
        // stale primary dialing a restarted node); unreachable: the
        // handshake's generation check and the primary's own sync record
        // (which compares its term) still fence it
        match w.read().await {
            Ok((term, _)) => {
                let g = rcfg.generation.fetch_max(term, std::sync::atomic::Ordering::SeqCst).max(term);
                status.update(|s| s.generation = g);
            }
            Err(e) => tracing::warn!(error = %e, "could not read the term from the witness at start"),
        }
    }
    // the term a claim starts from, when a witness decides takeovers
    let witness_term = || cfg.witness.as_ref().map(|_| rcfg.generation.load(std::sync::atomic::Ordering::SeqCst));
    let (claim_tx, mut claim_rx) = mpsc::unbounded_channel::<ClaimResult>();
    // the operator's failover, answered when the witness decides
    let mut claim_cmd: Option<ControlRequest> = None;
    // when a claim the witness did not answer is asked again
    let mut claim_retry: Option<Instant> = None;
    let mut lease: Option<i64> = None;
    let mut unreachable_said = false;
    let mut silent_said = false;
    let mut granted_torn_said = false;
    // a planned handover: the machine built for it, and the answer owed to
    // the primary (with the time by which the witness must have decided)
    let mut prebuilt: Option<(u64, Machine)> = None;
    let mut handover_reply: Option<(oneshot::Sender<Result<(), String>>, Instant)> = None;
    // (shared with the heartbeat thread, which marks every heartbeat)
    let live = rcfg.liveness.clone();
    // the last silence check found this process stalled (the next judges)
    let mut stalled_last = false;
    let promoted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (join_tx, join_rx) = mpsc::channel::<Joiner>(8);
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<ControlRequest>(4);
    let (commit_tx, mut commit_rx) = mpsc::unbounded_channel::<SecondaryEvent>();
    let service = Arc::new(listeners.service);
    // background tasks, aborted when the set drops
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(l) = listeners.control {
        tasks.spawn(serve_control(l, status.clone(), Some(cmd_tx.clone())));
    }
    if let Some(l) = listeners.metrics {
        tasks.spawn(serve_metrics(l, status.clone()));
    }
    // until it takes over, the service port sends clients to the primary
    let mut standby = tokio::task::JoinSet::new();
    standby.spawn(runtime::service::serve_unavailable(service.clone(), "standby secondary"));

    let on_event = {
        let (live, replica, status) = (live.clone(), replica.clone(), status.clone());
        move |e: ReceiverEvent| {
            lock(&live).heard_now();
            if let ReceiverEvent::Authenticated { generation, .. } = e {
                status.update(|s| {
                    s.generation = s.generation.max(generation);
                    s.pair_error = None;
                });
            }
            if let ReceiverEvent::Committed { epoch } = e {
                let diverged = lock(&replica).needs_resync();
                let _ = commit_tx.send(SecondaryEvent::Committed { epoch, diverged });
            }
            if let ReceiverEvent::ApplyFailed { .. } = e {
                let _ = commit_tx.send(SecondaryEvent::ApplyFailed);
            }
        }
    };

    // Replication listener: as secondary, serve primaries; once promoted,
    // hand joining secondaries to the primary runtime, refuse old primaries.
    // Connections on their way to authenticating are admitted fairly across
    // their sources (runtime::admission): at most MAX_UNAUTHENTICATED at a
    // time, Limits::DEFAULT.per_source of one source; the rest wait their
    // turn (bounded per source, in sources, and to the handshake deadline).
    {
        let (replica, rcfg, promoted, on_event) = (replica.clone(), rcfg.clone(), promoted.clone(), on_event.clone());
        let limits = runtime::admission::Limits { total: MAX_UNAUTHENTICATED, ..runtime::admission::Limits::DEFAULT };
        let mut admitted = runtime::admission::admit(runtime::admission::accepted(listener), "replication", limits);
        // a refused peer may redial every 100 ms: one line per kind of
        // refusal and peer address every 10 s
        let refusals = Arc::new(runtime::lograte::LogLimiter::new(Duration::from_secs(10)));
        let status = status.clone();
        tasks.spawn(async move {
            while let Some(runtime::admission::Admitted { conn: stream, peer, permit }) = admitted.recv().await {
                let (replica, rcfg, promoted, join_tx, refusals, status) = (
                    replica.clone(),
                    rcfg.clone(),
                    promoted.clone(),
                    join_tx.clone(),
                    refusals.clone(),
                    status.clone(),
                );
                let mut permit = Some(permit);
                let inner = on_event.clone();
                let on_event = move |e: ReceiverEvent| {
                    if matches!(e, ReceiverEvent::Authenticated { .. }) {
                        permit.take();
                    }
                    inner(e)
                };
                tokio::spawn(async move {
                    if promoted.load(std::sync::atomic::Ordering::SeqCst) {
                        let mut b = [0u8; 1];
                        let peeked = tokio::time::timeout(Duration::from_secs(2), stream.peek(&mut b)).await;
                        if let Ok(Ok(1)) = peeked {
                            if b[0] == JOIN_DATA || b[0] == JOIN_HEARTBEAT {
                                if let Some(j) = read_preamble(stream).await {
                                    let _ = join_tx.send(j).await;
                                }
                                return;
                            }
                        }
                        // a primary: the receiver refuses its stale generation
                    }
                    match serve_connection(stream, &rcfg, &replica, on_event).await {
                        Ok(end) => tracing::info!(%peer, ?end, "replication session ended"),
                        Err(e) => log_refusal(&refusals, &status, peer, &e),
                    }
                });
            }
        });
    }

    // Re-protection: dial the primary we protect.
    if let Some(primary_addr) = cfg.join {
        let (replica, rcfg, promoted, on_event) = (replica.clone(), rcfg.clone(), promoted.clone(), on_event.clone());
        tasks.spawn(crate::rejoin::redial(primary_addr, rcfg, replica, promoted, on_event, status.clone()));
    }

    // Heartbeat monitor and commands: every change of mode goes through
    // SecondaryMode::on.
    let set = |m: SecondaryMode, mode: &mut SecondaryMode| {
        *mode = m;
        let unusable = lock(&replica).unusable();
        status.update(|s| {
            s.replica_unusable = unusable;
            s.protection = m.protection();
            if let Some(e) = m.committed() {
                s.epoch = e;
                s.committed_epoch = Some(e);
            }
        });
    };
    let on_replica_event = |e: SecondaryEvent, mode: &mut SecondaryMode| match mode.step(e, witness_term()) {
        Ok(m) => {
            match e {
                SecondaryEvent::ApplyFailed => status.update(|s| s.apply_failures += 1),
                _ => status.update(|s| s.epochs += 1),
            }
            set(m, mode);
        }
        Err(e) => tracing::warn!(error = %e, "event refused"),
    };
    while !matches!(mode, SecondaryMode::Promoting { .. }) {
        // a claim to send, or to ask again: its state is the mode's
        if mode.claim().is_none_or(|c| c.ask != Ask::Backoff) {
            claim_retry = None;
        }
        if let (Some(c), Some(w)) = (mode.claim(), &cfg.witness) {
            match c.ask {
                Ask::Due => {
                    let term = c.term;
                    let (w, tx) = (w.clone(), claim_tx.clone());
                    tokio::spawn(async move {
                        let (r, ms) = witness::timed(w.promote(term)).await;
                        let _ = tx.send((term, r, ms));
                    });
                    let m = mode.step(SecondaryEvent::ClaimSent { term }, witness_term()).unwrap_or(mode);
                    set(m, &mut mode);
                }
                Ask::Backoff if claim_retry.is_none_or(|t| Instant::now() >= t) => {
                    if claim_retry.take().is_some() {
                        let m = mode.step(SecondaryEvent::ClaimRetry, witness_term()).unwrap_or(mode);
                        set(m, &mut mode);
                        continue;
                    }
                    claim_retry = Some(Instant::now() + CLAIM_RETRY);
                }
                Ask::Granted if !std::mem::replace(&mut granted_torn_said, true) => {
                    tracing::error!(term = c.term, "the witness granted the takeover while the replica is torn: this node takes over from the first epoch that repairs it (the primary, fenced at its next witness transaction, may still send it)");
                }
                _ => {}
            }
        }
        // when the silence check below was armed
        let armed = Instant::now();
        tokio::select! {
            r = claim_rx.recv() => if let Some((term, r, ms)) = r {
                status.update(|s| if let Some(w) = &mut s.witness {
                    w.last_txn_ms = ms;
                    w.txns += 1;
                    (w.state, w.reason) = match &r {
                        Err(e) => ("unreachable".into(), Some(e.to_string())),
                        Ok(_) => ("ok".into(), None),
                    };
                });
                let answer = match &r {
                    Ok((witness::Decision::Granted, l)) => {
                        unreachable_said = false;
                        tracing::warn!(term, txn_ms = ms, "the witness granted the takeover");
                        lease = lease.or(*l);
                        if let Some(c) = claim_cmd.take() {
                            c.answer(Ok("failover started"));
                        }
                        WitnessAnswer::Granted
                    }
                    Ok((witness::Decision::Refused { why, .. }, _)) => {
                        tracing::warn!(%why, "the witness refused the takeover: this node stays a secondary");
                        // claim again only after hearing the primary again
                        lock(&live).heard = false;
                        if let Some(c) = claim_cmd.take() {
                            c.answer(Err(Refused(format!("the witness refused the takeover: {why}"))));
                        }
                        WitnessAnswer::Refused
                    }
                    Ok((witness::Decision::Superseded, _)) => WitnessAnswer::Superseded,
                    Err(e) => {
                        if !std::mem::replace(&mut unreachable_said, true) {
                            tracing::warn!(error = %e, "the witness is unreachable: not taking over until it answers");
                        }
                        WitnessAnswer::Unreachable
                    }
                };
                let m = mode.step(SecondaryEvent::Witness { term, answer }, witness_term()).unwrap_or(mode);
                set(m, &mut mode);
            },
            _ = tokio::time::sleep(Duration::from_millis(5)) => {
                let (judged, since) = lock(&live).judge(armed.elapsed(), stalled_last, cfg.heartbeat_timeout);
                stalled_last = judged == Silence::Stalled;
                if stalled_last {
                    // the readers run before the silence is judged, at the
                    // next check
                    continue;
                }
                if judged == Silence::Silent {
                    if let Ok(m) = mode.step(SecondaryEvent::PrimarySilent, witness_term()) {
                        if m != mode {
                            tracing::warn!(silent_ms = since.as_millis() as u64, "primary silent: failing over");
                        } else if matches!(mode, SecondaryMode::Unusable { .. }) && !std::mem::replace(&mut silent_said, true) {
                            tracing::error!(silent_ms = since.as_millis() as u64, "primary silent, but the replica is torn: not taking over (nothing correct to run)");
                        }
                        set(m, &mut mode);
                    }
                } else {
                    silent_said = false;
                }
            }
            t = takeover_rx.recv() => if let Some(ask) = t {
                // the commits the receiver reported before it asked come
                // first (two channels: the ask can overtake them)
                while let Ok(e) = commit_rx.try_recv() {
                    on_replica_event(e, &mut mode);
                }
                let epoch = ask.epoch;
                let answer = match mode.step(SecondaryEvent::Handover { epoch }, witness_term()) {
                    Err(e) => Err(e.to_string()),
                    Ok(m) => match crate::takeover::build_paused(&replica, cfg.tracker, "secondary.restore") {
                        Err(e) => Err(format!("this node cannot run the guest: {e}")),
                        Ok((_, built)) if built != epoch => Err(format!("the replica moved to epoch {built}")),
                        Ok((machine, _)) => {
                            prebuilt = Some((epoch, machine));
                            set(m, &mut mode);
                            Ok(())
                        }
                    },
                };
                match answer {
                    Ok(()) => {
                        tracing::warn!(epoch, "planned switchover: the machine is built; taking over");
                        handover_reply = Some((ask.reply, Instant::now() + HANDOVER_DECISION));
                    }
                    Err(why) => {
                        tracing::warn!(epoch, %why, "planned switchover refused: the primary keeps the guest");
                        let _ = ask.reply.send(Err(why));
                    }
                }
            },
            e = commit_rx.recv() => if let Some(e) = e {
                on_replica_event(e, &mut mode);
            },
            c = cmd_rx.recv() => if let Some(c) = c {
                match mode.step(SecondaryEvent::Command(c.command), witness_term()) {
                    Ok(m) => {
                        tracing::warn!("forced failover requested");
                        set(m, &mut mode);
                        if matches!(m, SecondaryMode::Claiming { .. }) {
                            // answered when the witness decides
                            claim_cmd = Some(c);
                        } else {
                            c.answer(Ok("failover started"));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, command = c.command.name(), "command refused");
                        c.answer(Err(Refused(e.to_string())));
                    }
                }
            },
            _ = stop.changed() => return Ok(SecondaryExit::Shutdown),
        }
        // a handover whose claim the witness refused, or did not decide in
        // time: the primary keeps the guest (a claim left unanswered goes
        // on; a later grant fences that primary at its next transaction,
        // and every output it released is in this replica)
        if let Some((_, by)) = &handover_reply {
            let why = match mode {
                SecondaryMode::Promoting { .. } => None,
                SecondaryMode::Claiming { .. } if Instant::now() < *by => None,
                SecondaryMode::Claiming { .. } => {
                    Some(format!("the witness did not decide within {HANDOVER_DECISION:?}"))
                }
                _ => Some("the witness refused the takeover".to_string()),
            };
            if let Some(why) = why {
                tracing::warn!(%why, "planned switchover abandoned: the primary keeps the guest");
                if let Some((reply, _)) = handover_reply.take() {
                    let _ = reply.send(Err(why));
                }
                prebuilt = None;
            }
        }
    }

    // Failover.
    let SecondaryMode::Promoting { forced, term, .. } = mode else { unreachable!("the loop ends promoting") };
    if let Some(why) = lock(&replica).unusable() {
        // the mode refuses this; a takeover that raced a failed apply stops
        // here, before anything changed: a torn replica is never run
        return Err(SecondaryError::Unusable(why));
    }
    let last_heard = lock(&live).last_heard;
    let generation = match term {
        // the witness moved the term to the one we claimed + 1
        Some(term) => {
            rcfg.generation.fetch_max(term + 1, std::sync::atomic::Ordering::SeqCst);
            term + 1
        }
        None => rcfg.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1,
    };
    // stored before the guest runs here: restarted, this node still
    // refuses the primary it replaced
    if let Some(sd) = &cfg.state {
        sd.raise_generation(generation)?;
    }
    if let (Some(w), Some(l)) = (&cfg.witness, lease) {
        tasks.spawn(w.clone().keep_alive(l));
    }
    promoted.store(true, std::sync::atomic::Ordering::SeqCst);
    let (state, mem, epoch) = {
        let mut r = lock(&replica);
        let c = r.committed().cloned().ok_or(SecondaryError::NothingCommitted)?;
        if let Some(why) = r.unusable() {
            // an apply that failed after the check above (under the same
            // lock as the retire: nothing changes the replica after this)
            return Err(SecondaryError::Unusable(why));
        }

        if r.needs_resync() {
            tracing::error!("the replica failed its last check (a digest or a delta's base); failing over to it anyway, it is the only copy");
        }
        r.retire();
        (c.state, r.memory().clone(), c.epoch)
    };
    // a handover's machine was built before it was accepted; a failover's
    // is built now
    let built = match prebuilt.take() {
        Some((e, m)) if e == epoch => Ok(m),
        _ => Machine::restore_with_memory(cfg.tracker, &state, mem),
    };
    let started = built.and_then(|mut m| {
        m.set_hot_pages(cfg.hot_pages);
        m.start().map(|()| m)
    });
    let machine = match started {
        Ok(m) => m,
        Err(e) => {
            if let Some((reply, _)) = handover_reply.take() {
                let _ = reply.send(Err(format!("the machine did not start here: {e}")));
            }
            return Err(e.into());
        }
    };
    if let Some((reply, _)) = handover_reply.take() {
        // the guest runs here: the primary may stop
        let _ = reply.send(Ok(()));
    }
    let failover_ms = last_heard.elapsed().as_secs_f64() * 1e3;
    tracing::warn!(generation, epoch, failover_ms, forced, "failover complete: the guest runs here now");
    status.update(|s| {
        s.failovers += 1;
        s.last_failover_ms = Some(failover_ms);
        s.generation = generation;
    });
    drop((standby, cmd_tx));
    Ok(SecondaryExit::Promoted(Box::new(Promotion {
        machine,
        generation,
        first_epoch: epoch + 1,
        service,
        joiners: join_rx,
        commands: cmd_rx,
        tasks,
    })))
}
