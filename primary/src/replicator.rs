//! The replicator: the one task that owns the primary's mode ([`Core`]).
//!
//! It finds a secondary (dials `--peer`, or takes a joiner), runs the
//! session (epochs out, acks and heartbeats in), and feeds every event to
//! the core: what to release, what the engine does next, and how control
//! commands are answered all come from there.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proto::{Channel, Message, RefuseCode};
use common::state::VmShape;
use runtime::admission::Admitted;
use runtime::control::{ControlRequest, Refused};
use runtime::join::Joiner;
use runtime::status::NodeStatus;
use tokio::sync::{mpsc, watch};

use crate::engine::{EngineError, EngineShared, EpochPacket, Packet};
use crate::mode::{Answer, Ask, Command, Core, EngineCommand, Event, Loss, Mode, Refusal, Resync, WitnessView};
use crate::node::{PrimaryConfig, PrimaryExit};
use crate::router::Router;
use crate::sender::{Offer, SenderError, Session, SessionReader, SessionWriter};

/// How long a joining secondary has for its handshake.
const JOIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Joiner handshakes that may run at once; more wait their turn, fairly
/// across their sources (`runtime::admission`).
const MAX_JOIN_HANDSHAKES: usize = 16;

/// A joiner's finished handshake.
type Handshaken = Result<(Session, Channel), SenderError>;

/// The witness worker: asks go in, answers (tag, answer, ms) come out, in order.
pub(crate) struct WitnessLink {
    asks: mpsc::UnboundedSender<(Ask, String)>,
    answers: mpsc::UnboundedReceiver<(u64, Answer, f64)>,
    _task: runtime::Tasks,
}

impl WitnessLink {
    /// One task asks the witness, one question at a time, so answers come
    /// back in the order asked (and requests land in that order, see
    /// `witness::Witness::record_sync`).
    fn spawn(w: witness::Witness, term: u64) -> WitnessLink {
        let (asks, mut rx) = mpsc::unbounded_channel::<(Ask, String)>();
        let (tx, answers) = mpsc::unbounded_channel();
        let mut task = runtime::Tasks::default();
        task.spawn(async move {
            while let Some((ask, peer)) = rx.recv().await {
                let (tag, (r, ms)) = match ask {
                    Ask::RecordSync { tag } => (tag, witness::timed(w.record_sync(term, &peer)).await),
                    Ask::RunAlone { tag } => (tag, witness::timed(w.run_alone(term)).await),
                };
                let answer = match r {
                    Ok(witness::Decision::Granted) => Answer::Granted,
                    Ok(witness::Decision::Superseded) => Answer::Superseded,
                    Ok(witness::Decision::Refused { term, why }) => {
                        tracing::error!(term, %why, "the witness refused us");
                        Answer::Refused { term }
                    }
                    Err(e) => Answer::Unreachable(e.to_string()),
                };
                if tx.send((tag, answer, ms)).is_err() {
                    return;
                }
            }
        });
        WitnessLink { asks, answers, _task: task }
    }
}

/// The next witness answer; never yields without a witness.
async fn next_answer(w: &mut Option<WitnessLink>) -> (u64, Answer, f64) {
    if let Some(l) = w {
        if let Some(a) = l.answers.recv().await {
            return a;
        }
    }
    std::future::pending().await
}

/// How a session ended.
enum SessionEnd {
    Lost(Loss),
    Fenced(u64),
    Stopped,
    GuestFailed(EngineError),
    /// The secondary accepted the handover after this epoch (from the
    /// reader: its echo; from the session: applied, this node handed over).
    HandedOver(u64),
}

/// What the session's reader tasks report.
enum Heard {
    Ack(u64),
    ResyncRequest(String),
    /// The secondary cannot take the handover (why).
    HandoverRefused(String),
}

/// What the session's writer ships.
enum Ship {
    /// Live-sync pages; `first`: the first batch of a sync.
    Sync {
        first: bool,
        pages: Vec<common::proto::Page>,
        /// Their share of the engine's byte budget, given back once written.
        _queued: crate::engine::Queued,
    },
    Epoch(Box<EpochPacket>),
    /// The handover after this (acknowledged) epoch.
    Handover(u64),
}

/// The ack deadline follows the bytes ahead: the oldest unacknowledged
/// epoch must be acknowledged within a base (4 x the peer timeout) plus the
/// time for every byte ahead of that ack (queued for the writer, or written
/// and not yet acknowledged) at [`DEADLINE_LINK_RATE`]. A fixed deadline
/// counted from when an epoch is queued failed large epochs, epochs behind a
/// large live sync, and a flooding guest's epochs on a link that was merely
/// slow. The rate the acks measure (ack-clocked, [`LinkPace::rate`]) is not
/// used to shorten it: a link can slow down at once (the console-flood test
/// throttles it to 2 MiB/s), and a dead secondary is found by the heartbeats,
/// not by this deadline. Past the deadline the session is lost only if the
/// link has stopped moving too: no heartbeat reply for [`DATA_STALL`] (or
/// the base, if longer) counted more bytes read by the secondary (a link slower than the assumed
/// rate, where an epoch's ack takes seconds, keeps its session; a secondary
/// that reads nothing, or has read everything and acknowledges nothing, loses
/// it).
#[derive(Debug, Default)]
pub(crate) struct LinkPace {
    /// Written epochs not yet acknowledged: (epoch, bytes).
    unacked: std::collections::VecDeque<(u64, u64)>,
    /// Ack-clocked rate, bytes/s (EWMA over windows of 256 KiB or more).
    rate: f64,
    window: u64,
    window_start: Option<Instant>,
}

/// How long no byte of the data connection may be read by the secondary
/// (at least; the base deadline if longer) before a missing ack ends the
/// session. A slow link forwards in bursts (a retransmission alone can
/// stall it for a second); the heartbeats find a dead secondary sooner.
const DATA_STALL: Duration = Duration::from_secs(2);

/// The rate the deadline assumes for the bytes ahead, bytes/s.
const DEADLINE_LINK_RATE: f64 = 1048576.0;
/// At most this much is added to the base deadline.
const MAX_LINK_WAIT: Duration = Duration::from_secs(60);

impl LinkPace {
    pub(crate) fn written(&mut self, epoch: u64, bytes: u64) {
        self.unacked.push_back((epoch, bytes));
    }

    pub(crate) fn acked(&mut self, epoch: u64, now: Instant) {
        while let Some(&(e, b)) = self.unacked.front() {
            if e > epoch {
                break;
            }
            self.window += b;
            self.unacked.pop_front();
        }
        let start = *self.window_start.get_or_insert(now);
        if self.window >= 256 << 10 && now > start {
            let sample = self.window as f64 / (now - start).as_secs_f64();
            self.rate = if self.rate > 0.0 { 0.8 * self.rate + 0.2 * sample } else { sample };
            self.window = 0;
            self.window_start = Some(now);
        }
    }

    /// What the acks say the link carries, bytes/s (0 until measured).
    pub(crate) fn rate(&self) -> f64 {
        self.rate
    }

    /// The deadline for the oldest unacknowledged epoch, with `queued` bytes
    /// still waiting for the writer.
    pub(crate) fn deadline(&self, base: Duration, queued: u64) -> Duration {
        let ahead = queued + self.unacked.iter().map(|&(_, b)| b).sum::<u64>();
        base + Duration::from_secs_f64(ahead as f64 / DEADLINE_LINK_RATE).min(MAX_LINK_WAIT)
    }

    /// The oldest unacknowledged epoch has `waited` for its ack, and the
    /// secondary has read no byte of the data connection for `still`: is
    /// the session lost? Only past the deadline *and* with the link still.
    pub(crate) fn overdue(&self, base: Duration, queued: u64, waited: Duration, still: Duration) -> bool {
        waited > self.deadline(base, queued) && still > base.max(DATA_STALL)
    }
}

/// What the writer saw: bytes queued and not yet written, and the epochs it
/// wrote (for the session loop's [`LinkPace`]).
#[derive(Debug, Default)]
struct LinkMeter {
    queued: std::sync::atomic::AtomicU64,
    written: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl LinkMeter {
    fn sent(&self, bytes: u64) {
        let q = &self.queued;
        let _ = q.fetch_update(std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed, |v| {
            Some(v.saturating_sub(bytes))
        });
    }
}

fn page_bytes(pages: &[common::proto::Page]) -> u64 {
    pages.iter().filter(|p| p.data.is_some()).count() as u64 * 4096
}

/// What an epoch puts on the link, estimated before it is encoded: its
/// pages, and its state, whose size is mostly the undrained output (a
/// flooding guest's console lines).
fn epoch_bytes(e: &EpochPacket) -> u64 {
    page_bytes(&e.pages) + e.state.devices.outbox.len() as u64 * 64 + (16 << 10)
}

/// How long a switchover started by SIGTERM may take before the primary
/// stops anyway (its secondary then fails over by the heartbeat timeout).
const STOP_SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a run ended in error.
#[derive(Debug, thiserror::Error)]
pub enum ReplicatorError {
    #[error("the guest failed: {0}")]
    Guest(#[from] EngineError),
}

pub(crate) struct Replicator {
    pub cfg: PrimaryConfig,
    pub shape: VmShape,
    /// The CPU the guest was given.
    pub cpu: common::state::CpuModel,
    pub shared: Arc<EngineShared>,
    pub engine: std::sync::mpsc::Sender<EngineCommand>,
    pub router: Arc<Router>,
    pub status: Arc<NodeStatus>,
    pub packets: mpsc::Receiver<Packet>,
    pub joiners: Option<mpsc::Receiver<Joiner>>,
    pub commands: Option<mpsc::Receiver<ControlRequest>>,
    pub stop: watch::Receiver<bool>,
    pub core: Core,
    pub witness: Option<WitnessLink>,
    /// The witness name of the session's secondary.
    pub session_peer: String,
    /// A step asked to send the handover after this epoch.
    pub handover_due: Option<u64>,
    /// The operator's switchover, answered once it completes or fails.
    pub switchover: Option<ControlRequest>,
    /// Dial failures and refusals, logged once per kind every 10 s.
    pub refusals: runtime::lograte::LogLimiter,
}

/// The next item of an optional channel; a closed or absent channel never
/// yields (so a select over it does not spin).
async fn next_of<T>(c: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    if let Some(rx) = c {
        if let Some(v) = rx.recv().await {
            return Some(v);
        }
        *c = None;
    }
    std::future::pending().await
}

fn fenced_by(e: &SenderError) -> Option<u64> {
    match e {
        SenderError::Refused { code: RefuseCode::StaleGeneration, .. } => Some(u64::MAX),
        _ => None,
    }
}

impl Replicator {
    /// Feeds one event to the core and carries out its step.
    fn apply(&mut self, event: Event) -> Result<(), Refusal> {
        let before = self.core.mode().protection();
        let session_up = matches!(event, Event::SessionUp { .. });
        let name = event.name();
        let step = self.core.on(event, Instant::now())?;
        // read at once after the decision (before any syscall below): the
        // release log shows when each release was decided
        let decided_us = crate::router::wall_us();
        if !step.release.is_empty() {
            tracing::trace!(event = name, outputs = step.release.len(), mode = ?self.core.mode().protection(), "released");
        }
        if let Some(c) = step.engine {
            // the engine thread ends only after this task: a send cannot fail
            // while it matters
            let _ = self.engine.send(c);
        }
        if let (Some(ask), Some(w)) = (step.ask, &self.witness) {
            let _ = w.asks.send((ask, self.session_peer.clone()));
        }
        self.router.release(step.release, decided_us);
        if step.handover.is_some() {
            self.handover_due = step.handover;
        }
        let (mode, held) = (self.core.mode().protection(), self.core.held_count());
        let (view, recorded) = (self.core.witness().clone(), self.core.sync_recorded());
        let hold = match self.core.mode() {
            Mode::Holding { why, .. } if self.witness.is_some() => {
                Some(format!("lost the secondary ({why}); the witness decides whether this node runs alone"))
            }
            Mode::Holding { why, peer, .. } => Some(format!(
                "lost the secondary {peer} ({why}); without a witness only it coming back, or `castor unprotect` \
                 once you know it is dead, ends the hold"
            )),
            _ => None,
        };
        self.status.update(|s| {
            s.protection = mode;
            s.held_outputs = held;
            s.syncs += u64::from(session_up);
            s.hold = hold;
            if let Some(w) = &mut s.witness {
                w.sync_recorded = recorded;
                (w.state, w.reason) = match view {
                    WitnessView::Unreachable(why) => ("unreachable".into(), Some(why)),
                    _ => ("ok".into(), None),
                };
            }
        });
        if let Some(c) = self.switchover.take() {
            match self.core.mode() {
                Mode::HandingOver { .. } => self.switchover = Some(c),
                Mode::HandedOver { .. } => c.answer(Ok("handed over: the secondary runs the guest now")),
                m => {
                    c.answer(Err(Refused(format!("the switchover did not complete: this node is {}", m.protection()))))
                }
            }
        }
        if mode != before {
            match self.core.mode() {
                Mode::Holding { why, .. } if self.witness.is_some() => {
                    tracing::warn!(%why, "lost the secondary: holding output (guest paused) until the witness decides")
                }
                Mode::Holding { why, .. } => {
                    tracing::warn!(%why, "lost the secondary: holding output (guest paused) until we know more")
                }
                Mode::Unprotected => tracing::warn!("running unprotected"),
                Mode::Fenced { by } => {
                    tracing::error!(by, "fenced by a newer generation: output of unacknowledged epochs is discarded")
                }
                m => tracing::info!(mode = ?m.protection(), "protection changed"),
            }
        }
        Ok(())
    }

    fn witness_answered(&mut self, (tag, answer, ms): (u64, Answer, f64)) {
        if let Answer::Unreachable(why) = &answer {
            if !matches!(self.core.witness(), WitnessView::Unreachable(_)) {
                tracing::warn!(%why, "the witness is unreachable: holding what it must decide");
            }
        }
        self.status.update(|s| {
            if let Some(w) = &mut s.witness {
                w.last_txn_ms = ms;
                w.txns += 1;
            }
        });
        let _ = self.apply(Event::Witness { tag, answer });
    }

    fn answer(&mut self, c: ControlRequest) {
        let r = self.apply(Event::Command(c.command)).map(|()| "done").map_err(|e| Refused(e.to_string()));
        if r.is_ok() {
            tracing::warn!(command = c.command.name(), "operator command applied");
            if c.command == Command::Switchover {
                // answered when the secondary accepts the handover (or the
                // switchover fails)
                self.switchover = Some(c);
                return;
            }
        }
        c.answer(r);
    }

    /// Logs a secondary that could not be reached or refused us, at most
    /// once per kind of failure every 10 s (the first dial failure at info,
    /// later ones at debug); settings that do not fit the secondary's are
    /// an error and go into the status (`pair_error`). Returns whether it
    /// was a settings mismatch.
    fn refused(&self, peer: Option<SocketAddr>, e: &SenderError) -> bool {
        let pair = matches!(
            e,
            SenderError::PairMismatch(_) | SenderError::Refused { code: RefuseCode::Pair | RefuseCode::Cpu, .. }
        );
        if pair {
            self.status.update(|s| s.pair_error = Some(e.to_string()));
        }
        let kind = match e {
            _ if pair => "pair",
            SenderError::Connect { .. } | SenderError::TimedOut(_) | SenderError::Closed(_) => "unreachable",
            _ => "refused",
        };
        let peer = peer.map_or_else(|| "joiner".to_string(), |p| p.to_string());
        let Some(skipped) = self.refusals.allow(kind) else {
            tracing::debug!(%peer, error = %e, "secondary not reachable");
            return pair;
        };
        match kind {
            "pair" => {
                tracing::error!(%peer, skipped, error = %e, "the secondary cannot protect this guest (settings that differ, or a host that cannot run its CPU): this pair does not protect until that is fixed")
            }
            "unreachable" => tracing::info!(%peer, skipped, error = %e, "secondary not reachable yet (dialing again)"),
            _ => tracing::warn!(%peer, skipped, error = %e, "a secondary failed the handshake"),
        }
        pair
    }

    fn fenced(&self) -> Option<u64> {
        match self.core.mode() {
            Mode::Fenced { by } => Some(*by),
            _ => None,
        }
    }

    /// Runs a joiner's handshake on its own task (a joiner that stalls
    /// cannot hold up this loop); the result comes back on `done`. The
    /// joiner holds its admission slot until the handshake ends.
    fn handshake_joiner(&self, joiner: Admitted<Joiner>, done: mpsc::Sender<Handshaken>) {
        let Admitted { conn: (stream, channel), permit: slot, .. } = joiner;
        let (secret, offer) = (self.cfg.secret.clone(), self.offer());
        tokio::spawn(async move {
            let _slot = slot;
            let v = common::frame::PROTOCOL_VERSION;
            let hs = Session::handshake(stream, &secret, &offer, channel, v, v);
            let r = match tokio::time::timeout(JOIN_HANDSHAKE_TIMEOUT, hs).await {
                Ok(Ok(s)) => Ok((s, channel)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(SenderError::TimedOut("handshake")),
            };
            let _ = done.send(r).await;
        });
    }

    /// What this primary's Hello offers.
    fn offer(&self) -> Offer {
        Offer {
            shape: self.shape.clone(),
            cpu: self.cpu.clone(),
            generation: self.cfg.generation,
            pair: self.cfg.pair.clone(),
        }
    }

    /// Dials the peer on its own task: a peer that accepts and then stalls
    /// (a frozen host) cannot hold up this loop, nor the witness's answers.
    fn dial(&self, peer: SocketAddr) -> tokio::task::JoinHandle<Result<(Session, Session), SenderError>> {
        let (secret, offer) = (self.cfg.secret.clone(), self.offer());
        tokio::spawn(async move {
            let t = Duration::from_secs(2);
            let offer = &offer;
            let one = |ch| {
                let c = Session::connect_channel(peer, &secret, offer, ch);
                async move { tokio::time::timeout(t, c).await.map_err(|_| SenderError::TimedOut("connect"))? }
            };
            Ok((one(Channel::Data).await?, one(Channel::Heartbeat).await?))
        })
    }

    /// Finds a secondary, protects, and survives its loss (see [`Core`]).
    ///
    /// Losing the secondary cannot tell a dead secondary from a partitioned
    /// one that is taking over. So the primary *holds*. With a witness, the
    /// witness decides at once (run alone, or fenced). Without one it keeps
    /// dialing the peer: a higher generation there fences it; the same
    /// secondary coming back (its generation shows it did not take over)
    /// re-protects it and releases what it held with the first ack; a
    /// refused port or a different secondary proves nothing, so only the
    /// operator's `unprotect` ends the hold otherwise.
    pub async fn run(mut self) -> Result<PrimaryExit, ReplicatorError> {
        let mut next_dial = Instant::now();
        let mut refused_said = false;
        let mut dialing: Option<tokio::task::JoinHandle<Result<(Session, Session), SenderError>>> = None;
        let mut pending = crate::joiners::Pairs::<Session>::default();
        let (hs_tx, mut hs_rx) = mpsc::channel::<Handshaken>(8);
        let mut joiners =
            self.joiners.take().map(|rx| runtime::join::admit_joiners(rx, "join handshake", MAX_JOIN_HANDSHAKES));
        let _ = self.engine.send(EngineCommand::Alone);
        if let Some(w) = self.cfg.witness.clone() {
            self.witness = Some(WitnessLink::spawn(w, self.cfg.generation));
        }
        loop {
            if *self.stop.borrow() {
                return Ok(PrimaryExit::Shutdown);
            }
            let _ = self.apply(Event::Tick);
            if let Some(by) = self.fenced() {
                return Ok(PrimaryExit::Fenced { by });
            }
            let dial_at = tokio::time::Instant::from_std(next_dial);
            let holding = matches!(self.core.mode(), Mode::Holding { .. });
            let mut session: Option<(Session, Session)> = None;
            tokio::select! {
                p = self.packets.recv() => match p {
                    Some(Packet::Epoch(e)) => { let _ = self.apply(Event::Epoch { epoch: e.epoch, outputs: e.outputs }); }
                    Some(Packet::Release(o)) => { let _ = self.apply(Event::Released(o)); }
                    Some(Packet::Sync { .. }) => {}
                    Some(Packet::Failed(e)) => return Err(e.into()),
                    None => return Ok(PrimaryExit::Shutdown),
                },
                j = next_of(&mut joiners) => if let Some(j) = j { self.handshake_joiner(j, hs_tx.clone()) },
                h = hs_rx.recv() => {
                    match h {
                        Some(Ok((s, channel))) => {
                            let node = s.ack.node.clone();
                            session = pending.add(&node, channel, s);
                        }
                        Some(Err(e)) => {
                            self.refused(None, &e);
                        }
                        None => {}
                    }
                },
                c = next_of(&mut self.commands) => if let Some(c) = c { self.answer(c) },
                a = next_answer(&mut self.witness) => self.witness_answered(a),
                _ = tokio::time::sleep_until(dial_at), if self.cfg.peer.is_some() && dialing.is_none() => {
                    dialing = Some(self.dial(self.cfg.peer.expect("peer")));
                }
                r = async { dialing.as_mut().expect("dialing").await }, if dialing.is_some() => {
                    dialing = None;
                    let peer = self.cfg.peer.expect("peer");
                    let r = r.unwrap_or(Err(SenderError::Closed("dial task ended")));
                    match r {
                        Ok(pair) => session = Some(pair),
                        Err(e) => {
                            if let Some(by) = fenced_by(&e) {
                                tracing::error!(%peer, "the peer has a higher generation: this primary is fenced");
                                let _ = self.apply(Event::Fenced { by });
                                continue;
                            }
                            // a refused port proves nothing (a promoted
                            // node that crashed refuses too): keep dialing
                            let pair = self.refused(Some(peer), &e);
                            // a secondary that refused our settings refuses
                            // them again until an operator changes them
                            let wait = if pair { 1000 } else { 100 };
                            next_dial = Instant::now() + Duration::from_millis(wait);
                        }
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(50)), if holding => {}
                _ = self.stop.changed() => {}
            }
            let Some((data, hb)) = session else { continue };
            if let Some(d) = dialing.take() {
                d.abort();
            }
            // an empty replica gets a live sync; one that holds an older
            // epoch of ours gets a full-memory epoch (it stays at its
            // committed epoch until that one verifies)
            let resync = if data.ack.committed_epoch.is_some() { Resync::Full } else { Resync::Live };
            self.session_peer = data.ack.node.clone();
            self.status.update(|s| s.pair_error = None);
            let next_epoch = self.shared.next_epoch.load(std::sync::atomic::Ordering::SeqCst);
            self.shared.acked.store(next_epoch, std::sync::atomic::Ordering::SeqCst);
            let peer = self.session_peer.clone();
            if let Err(e) = self.apply(Event::SessionUp { next_epoch, resync, peer }) {
                if !matches!(e, Refusal::HoldingFor(_)) || !std::mem::replace(&mut refused_said, true) {
                    tracing::warn!(error = %e, "secondary session not started");
                }
                continue;
            }
            refused_said = false;
            tracing::info!(?resync, "secondary connected: sync starts");
            match self.run_session(data, hb).await {
                SessionEnd::Stopped => return Ok(PrimaryExit::Shutdown),
                SessionEnd::HandedOver(epoch) => return Ok(PrimaryExit::HandedOver { epoch }),
                SessionEnd::GuestFailed(e) => return Err(e.into()),
                SessionEnd::Fenced(by) => {
                    let _ = self.apply(Event::Fenced { by });
                }
                SessionEnd::Lost(why) => {
                    let _ = self.apply(Event::SessionLost(why));
                    next_dial = Instant::now();
                }
            }
        }
    }

    /// One session: this task applies every event; the link's I/O runs
    /// beside it (writer, ack reader, heartbeats) and reports here.
    async fn run_session(&mut self, data: Session, hb: Session) -> SessionEnd {
        let (dr, dw) = data.into_halves();
        let (hr, hw) = hb.into_halves();
        let (ship_tx, ship_rx) = mpsc::unbounded_channel::<Ship>();
        // packets handed to the writer and not yet sent: past the bound this
        // task stops taking packets, so a slow link holds the engine back
        // (its packet channel fills) as it did when the writer read them
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ship_max = self.cfg.engine.max_in_flight as usize + 8;
        let (heard_tx, mut heard_rx) = mpsc::unbounded_channel::<Heard>();
        let (gen, interval, timeout) = (self.cfg.generation, self.cfg.heartbeat_interval, self.cfg.peer_timeout);
        let queued_w = queued.clone();
        let meter = Arc::new(LinkMeter::default());
        let meter_w = meter.clone();
        let mut pace = LinkPace::default();
        // epochs of this session with output: when their oldest output was
        // sent (how long output waits is measured to its release)
        let mut output_since = std::collections::BTreeMap::<u64, Instant>::new();
        let mut sync_begun = false;
        // when the last heartbeat the secondary answered was sent: an ack
        // is applied only while that is recent (the secondary cannot have
        // taken over yet: it heard us then, and waits a timeout). A primary that was frozen past the
        // timeout finds acks in its socket when it thaws; the secondary may
        // have taken over meanwhile, so it releases nothing more and treats
        // the session as lost (the witness or the two-node rule decides).
        let last_reply = Arc::new(std::sync::Mutex::new(Instant::now()));
        let last_reply_hb = last_reply.clone();
        // when the secondary last said it had read more of the data
        // connection (its heartbeat replies count the bytes): on a slow
        // link an epoch's ack takes seconds, and the session is lost for a
        // missing ack only once these bytes have stopped growing too
        let data_progress = Arc::new(std::sync::Mutex::new(Instant::now()));
        let data_progress_hb = data_progress.clone();
        let handing_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // each on its own task: a writer busy sealing megabytes of a sync
        // must not delay a heartbeat (the secondary counts a primary that
        // sends none for its timeout as dead), nor the reading of replies.
        // Aborted when the session ends (the guards drop with `io`).
        let writer = AbortOnDrop(tokio::spawn(write_loop(dw, ship_rx, queued_w, meter_w)));
        let acks = AbortOnDrop(tokio::spawn(read_acks(dr, heard_tx, gen)));
        let beats = AbortOnDrop(tokio::spawn(heartbeats(
            hr,
            hw,
            gen,
            interval,
            timeout,
            Liveness { heard: last_reply_hb, data_progress: data_progress_hb, handing_over: handing_over.clone() },
        )));
        let io = async move {
            let (w, a, b) = (writer, acks, beats);
            tokio::select! {
                e = w.join() => e,
                e = a.join() => e,
                e = b.join() => e,
            }
        };
        let mut io = std::pin::pin!(io);
        let ack_timeout = self.cfg.peer_timeout * 4;
        let mut tick = tokio::time::interval(self.cfg.heartbeat_interval);
        let mut stop = self.stop.clone();
        // SIGTERM with a caught-up secondary: hand over, then stop
        let mut stopping: Option<Instant> = None;
        loop {
            if let Some(epoch) = self.handover_due.take() {
                tracing::info!(epoch, "the last epoch is acknowledged: handing over");
                // counted like an epoch: the writer counts every ship it
                // takes (a refused handover goes on with this session)
                queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                handing_over.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = ship_tx.send(Ship::Handover(epoch));
            }
            tokio::select! {
                end = &mut io => {
                    let SessionEnd::HandedOver(epoch) = end else { return end };
                    let _ = self.apply(Event::HandoverAccepted { epoch });
                    if let Mode::HandedOver { epoch } = self.core.mode() {
                        tracing::warn!(epoch = *epoch, peer = %self.session_peer, "handed over: the secondary runs the guest now");
                        return SessionEnd::HandedOver(*epoch);
                    }
                    return SessionEnd::Lost(Loss::Unexpected(format!("a handover acceptance for epoch {epoch}")));
                }
                h = heard_rx.recv() => match h {
                    Some(Heard::Ack(epoch)) => {
                        if let Some(why) = self.core.ack_violation(epoch) {
                            // an ack of an epoch never sent: recorded
                            // nowhere; the core ends the session, releasing
                            // nothing
                            tracing::error!(epoch, error = %why, "protocol error from the secondary: ending the session");
                            let _ = self.apply(Event::Ack { epoch });
                            return SessionEnd::Lost(why);
                        }
                        let silent = common::sync::lock(&last_reply).elapsed();
                        if silent > self.cfg.peer_timeout {
                            return SessionEnd::Lost(Loss::HeartbeatTimeout(silent));
                        }
                        self.shared.record_ack(epoch);
                        pace.acked(epoch, Instant::now());
                        let mib_s = pace.rate() / 1048576.0;
                        self.status.update(|s| s.link_mib_s = mib_s);
                        common::crashpoint::hit("primary.after_ack");
                        if let Some(sent) = self.core.sent_at(epoch) {
                            self.status.record_ack_latency(sent.elapsed().as_secs_f64() * 1e6);
                        }
                        if self.apply(Event::Ack { epoch }).is_ok() {
                            let later = output_since.split_off(&epoch.saturating_add(1));
                            for since in std::mem::replace(&mut output_since, later).into_values() {
                                self.status.record_output_hold(since.elapsed().as_secs_f64() * 1e6);
                            }
                        }
                        common::crashpoint::hit("primary.after_release");
                        self.status.update(|s| s.acked_epoch = Some(epoch));
                    }
                    Some(Heard::ResyncRequest(reason)) => {
                        tracing::error!(%reason, "secondary asks for a full resync");
                        let _ = self.apply(Event::ResyncRequested);
                    }
                    Some(Heard::HandoverRefused(reason)) => {
                        handing_over.store(false, std::sync::atomic::Ordering::SeqCst);
                        tracing::error!(%reason, "the secondary cannot take the handover: this node keeps the guest, protected");
                        if let Some(c) = self.switchover.take() {
                            c.answer(Err(Refused(format!("the switchover was abandoned, this node keeps the guest: {reason}"))));
                        }
                        let _ = self.apply(Event::HandoverRefused);
                        if stopping.is_some() {
                            tracing::error!("asked to stop, but the secondary cannot take the guest: stopping without a handover");
                            return SessionEnd::Stopped;
                        }
                    }
                    None => {}
                },
                p = self.packets.recv(), if queued.load(std::sync::atomic::Ordering::SeqCst) < ship_max => match p {
                    None => return SessionEnd::Stopped,
                    Some(Packet::Failed(e)) => return SessionEnd::GuestFailed(e),
                    Some(Packet::Release(o)) => { let _ = self.apply(Event::Released(o)); }
                    // a sync begun in an earlier session: its pages would
                    // arrive here without their SyncBegin (the engine starts
                    // the sync again for this session)
                    Some(Packet::Sync { first: false, .. }) if !sync_begun => {}
                    Some(Packet::Sync { first, pages, queued: q, .. }) => {
                        sync_begun |= first;
                        queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        meter.queued.fetch_add(page_bytes(&pages), std::sync::atomic::Ordering::Relaxed);
                        let _ = ship_tx.send(Ship::Sync { first, pages, _queued: q });
                    }
                    Some(Packet::Epoch(mut e)) => {
                        self.record_epoch(&e);
                        let outputs = std::mem::take(&mut e.outputs);
                        if let (false, Some(since)) = (outputs.is_empty(), e.outputs_since) {
                            output_since.insert(e.epoch, since);
                        }
                        let _ = self.apply(Event::Epoch { epoch: e.epoch, outputs });
                        if e.last {
                            let _ = self.apply(Event::LastEpoch { epoch: e.epoch });
                        }
                        queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        meter.queued.fetch_add(epoch_bytes(&e), std::sync::atomic::Ordering::Relaxed);
                        let _ = ship_tx.send(Ship::Epoch(e));
                    }
                },
                c = next_of(&mut self.commands) => if let Some(c) = c { self.answer(c) },
                a = next_answer(&mut self.witness) => {
                    self.witness_answered(a);
                    if let Some(by) = self.fenced() {
                        return SessionEnd::Fenced(by);
                    }
                }
                _ = tick.tick() => {
                    if stopping.is_some_and(|t| t.elapsed() > STOP_SWITCHOVER_TIMEOUT) {
                        tracing::warn!("the switchover did not complete in time: stopping");
                        return SessionEnd::Stopped;
                    }
                    let _ = self.apply(Event::Tick);
                    for (epoch, bytes) in std::mem::take(&mut *common::sync::lock(&meter.written)) {
                        pace.written(epoch, bytes);
                    }
                    if let Some(t) = self.core.oldest_unacked() {
                        let queued_bytes = meter.queued.load(std::sync::atomic::Ordering::Relaxed);
                        let still = common::sync::lock(&data_progress).elapsed();
                        if pace.overdue(ack_timeout, queued_bytes, t.elapsed(), still) {
                            return SessionEnd::Lost(Loss::AckTimeout { waited: t.elapsed(), no_progress: still });
                        }
                    }
                }
                _ = stop.changed(), if stopping.is_none() => {
                    if !*stop.borrow() {
                        continue;
                    }
                    match self.apply(Event::Command(Command::Switchover)) {
                        Ok(()) => {
                            tracing::warn!("asked to stop: handing over to the secondary first");
                            stopping = Some(Instant::now());
                        }
                        Err(e) => {
                            tracing::info!(reason = %e, "asked to stop: no switchover");
                            return SessionEnd::Stopped;
                        }
                    }
                }
            }
        }
    }

    fn record_epoch(&self, e: &EpochPacket) {
        let bytes = page_bytes(&e.pages);
        self.status.update(|s| {
            s.epoch = e.epoch;
            s.last_epoch = e.phases;
            s.epoch_len_us_max = s.epoch_len_us_max.max(e.phases.len_us);
            s.pages_total += e.pages.len() as u64;
            s.pages_unchanged_total += e.phases.unchanged;
            s.bytes_total += bytes;
            s.epochs += 1;
        });
        self.status.record_boundary(&e.phases);
    }
}

/// A session I/O task, aborted when its guard drops (the session ended).
struct AbortOnDrop(tokio::task::JoinHandle<SessionEnd>);

impl AbortOnDrop {
    async fn join(mut self) -> SessionEnd {
        match (&mut self.0).await {
            Ok(end) => end,
            Err(e) => SessionEnd::Lost(Loss::Unexpected(format!("a session task ended: {e}"))),
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn write_loop(
    mut dw: SessionWriter,
    mut ship: mpsc::UnboundedReceiver<Ship>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    meter: Arc<LinkMeter>,
) -> SessionEnd {
    while let Some(s) = ship.recv().await {
        let res = match s {
            Ship::Sync { first, pages, .. } => {
                let bytes = page_bytes(&pages);
                let r = dw.send_sync(first, pages).await;
                meter.sent(bytes);
                r
            }
            Ship::Epoch(e) => {
                let e = *e;
                let (epoch, bytes) = (e.epoch, epoch_bytes(&e));
                let r = dw.send_epoch(e.epoch, e.full, e.pages, e.state, e.digest).await;
                meter.sent(bytes);
                common::sync::lock(&meter.written).push((epoch, bytes));
                r
            }
            Ship::Handover(epoch) => dw.send(&Message::Handover { epoch }).await,
        };
        queued.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = res {
            return SessionEnd::Lost(Loss::Send(e.to_string()));
        }
    }
    std::future::pending().await
}

async fn read_acks(mut dr: SessionReader, heard: mpsc::UnboundedSender<Heard>, gen: u64) -> SessionEnd {
    loop {
        let h = match dr.recv().await {
            Ok(Some(Message::EpochAck { epoch })) => Heard::Ack(epoch),
            Ok(Some(Message::ResyncRequest { reason })) => Heard::ResyncRequest(reason),
            // the secondary accepted and closes the session: the end of the
            // I/O carries it (ahead of the close that follows)
            Ok(Some(Message::Handover { epoch })) => return SessionEnd::HandedOver(epoch),
            Ok(Some(Message::Fence { generation, .. })) => return SessionEnd::Fenced(generation),
            Ok(Some(Message::Refused { code: RefuseCode::StaleGeneration, .. })) => {
                return SessionEnd::Fenced(gen.saturating_add(1))
            }
            Ok(Some(Message::Refused { code: RefuseCode::Takeover, reason })) => Heard::HandoverRefused(reason),
            Ok(Some(Message::Refused { reason, .. })) => return SessionEnd::Lost(Loss::Refused(reason)),
            Ok(Some(other)) => return SessionEnd::Lost(Loss::Unexpected(format!("{:?}", other.kind()))),
            Ok(None) => return SessionEnd::Lost(Loss::Closed("data")),
            Err(e) => return SessionEnd::Lost(Loss::Channel { channel: "data", err: e.to_string() }),
        };
        if heard.send(h).is_err() {
            return SessionEnd::Stopped;
        }
    }
}

/// What the heartbeat task learns from the secondary's replies.
struct Liveness {
    /// When the last heartbeat the secondary answered was sent.
    heard: Arc<std::sync::Mutex<Instant>>,
    /// When the last heartbeat was sent whose reply counted more bytes read
    /// from the data connection than the one before.
    data_progress: Arc<std::sync::Mutex<Instant>>,
    /// Set while a handover is out: the secondary raises its generation as
    /// it takes over, and its heartbeat replies may show it before the data
    /// connection brings its acceptance; the data connection decides then
    /// (acceptance, refusal, or its loss).
    handing_over: Arc<std::sync::atomic::AtomicBool>,
}

async fn heartbeats(
    mut hr: SessionReader,
    mut hw: SessionWriter,
    gen: u64,
    interval: Duration,
    timeout: Duration,
    live: Liveness,
) -> SessionEnd {
    let mut received_max = 0u64;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut last_reply = Instant::now();
    let start = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let time_us = start.elapsed().as_micros() as u64;
                if hw.send(&Message::Heartbeat { generation: gen, seq, time_us, received: 0 }).await.is_err() {
                    return SessionEnd::Lost(Loss::Closed("heartbeat"));
                }
                seq += 1;
                if last_reply.elapsed() > timeout {
                    return SessionEnd::Lost(Loss::HeartbeatTimeout(last_reply.elapsed()));
                }
            }
            m = hr.recv() => match m {
                Ok(Some(Message::Heartbeat { generation, time_us, received, .. })) => {
                    if generation > gen && !live.handing_over.load(std::sync::atomic::Ordering::SeqCst) {
                        return SessionEnd::Fenced(generation);
                    }
                    // liveness is when the answered heartbeat was *sent*
                    // (its echoed time): replies that waited in our socket
                    // while this process was frozen say the secondary was
                    // alive back then, not now
                    let sent = start + Duration::from_micros(time_us);
                    if sent > last_reply && sent <= Instant::now() {
                        last_reply = sent;
                        *common::sync::lock(&live.heard) = sent;
                        if received > received_max {
                            received_max = received;
                            *common::sync::lock(&live.data_progress) = sent;
                        }
                    }
                }
                Ok(Some(other)) => return SessionEnd::Lost(Loss::Unexpected(format!("{:?} on the heartbeat channel", other.kind()))),
                Ok(None) => return SessionEnd::Lost(Loss::Closed("heartbeat")),
                Err(e) => return SessionEnd::Lost(Loss::Channel { channel: "heartbeat", err: e.to_string() }),
            }
        }
    }
}

#[cfg(test)]
mod pace_tests {
    use super::*;

    #[test]
    fn a_missing_ack_ends_the_session_only_once_the_link_stands_still() {
        let base = Duration::from_millis(400);
        let mut p = LinkPace::default();
        p.written(1, 1 << 20);
        let deadline = p.deadline(base, 0);
        let (late, moving) = (deadline + Duration::from_secs(10), Duration::from_millis(300));
        assert!(!p.overdue(base, 0, late, moving), "a slow link that moves keeps its session");
        assert!(!p.overdue(base, 0, deadline / 2, DATA_STALL * 10), "before the deadline: kept");
        assert!(p.overdue(base, 0, late, DATA_STALL + Duration::from_millis(1)), "late and still: lost");
        assert!(!p.overdue(base, 0, late, DATA_STALL), "still for exactly the stall window: kept");
        let long = Duration::from_secs(5);
        assert!(!p.overdue(long, 0, p.deadline(long, 0) + base, long), "a base longer than the window rules");
        assert!(p.overdue(long, 0, p.deadline(long, 0) + base, long + base));
    }

    #[test]
    fn the_ack_deadline_grows_with_the_bytes_ahead() {
        let base = Duration::from_millis(400);
        let mib = 1048576u64;
        let mut p = LinkPace::default();
        assert_eq!(p.deadline(base, 0), base, "nothing ahead: the base");
        assert_eq!(p.deadline(base, 3 * mib), base + Duration::from_secs(3), "queued bytes at 1 MiB/s");
        // written epochs count until acknowledged
        p.written(5, 2 * mib);
        p.written(6, mib);
        assert_eq!(p.deadline(base, 0), base + Duration::from_secs(3));
        let t0 = Instant::now();
        p.acked(5, t0);
        assert_eq!(p.deadline(base, 0), base + Duration::from_secs(1));
        p.acked(9, t0 + Duration::from_millis(500));
        assert_eq!(p.deadline(base, 0), base);
        // a stuck link is not waited for forever
        assert_eq!(p.deadline(base, u64::MAX / 2), base + MAX_LINK_WAIT);
    }

    #[test]
    fn acks_measure_the_link_rate() {
        let mib = 1048576u64;
        let mut p = LinkPace::default();
        let t0 = Instant::now();
        p.acked(0, t0); // opens the window
        p.written(1, 4 * mib);
        p.acked(1, t0 + Duration::from_secs(2));
        assert!((p.rate() - 2.0 * mib as f64).abs() < 1.0, "{}", p.rate());
        let m = LinkMeter::default();
        m.queued.store(10, std::sync::atomic::Ordering::Relaxed);
        m.sent(25);
        assert_eq!(m.queued.load(std::sync::atomic::Ordering::Relaxed), 0, "never below zero");
    }
}
