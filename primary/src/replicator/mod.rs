//! The replicator: the one task that owns the primary's mode ([`PrimaryState`]).
//!
//! It finds a secondary (dials `--peer`, or takes a joiner), runs the
//! session (epochs out, acks and heartbeats in), and feeds every event to
//! the core: what to release, what the engine does next, and how control
//! commands are answered all come from there.

mod dial;
mod pace;
mod session;
mod session_io;
mod witness_link;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::state::VmShape;
use runtime::control::{ControlRequest, Refused};
use runtime::join::Joiner;
use runtime::status::NodeStatus;
use tokio::sync::{mpsc, watch};

use crate::engine::{EngineError, EngineShared, Packet};
use crate::mode::{Answer, Command, EngineCommand, Event, Mode, PrimaryState, Refusal, Resync, WitnessView};
use crate::node::{PrimaryConfig, PrimaryExit};
use crate::router::Router;
use crate::sender::{SenderError, Session};
use dial::{fenced_by, Handshaken, MAX_JOIN_HANDSHAKES};
use session::SessionExit;
use witness_link::{next_answer, WitnessLink};

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
    pub state: PrimaryState,
    pub witness: Option<WitnessLink>,
    /// The witness name of the session's secondary.
    pub session_peer: String,
    /// The operator's switchover, answered once it completes or fails (a
    /// reply owed while the core is handing over; not a decision: the
    /// core's `Mode::HandingOver` is).
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

impl Replicator {
    /// Feeds one event to the core and carries out its actions; returns the
    /// epoch after which the handover is to be sent, if this event made it
    /// due (only an ack in a session does: the session sends it).
    fn apply(&mut self, event: Event) -> Result<Option<u64>, Refusal> {
        let before = self.state.mode().protection();
        let session_up = matches!(event, Event::SessionUp { .. });
        let name = event.name();
        let actions = self.state.on(event, Instant::now())?;
        // read at once after the decision (before any syscall below): the
        // release log shows when each release was decided
        let decided_us = crate::router::wall_us();
        if !actions.release.is_empty() {
            tracing::trace!(event = name, outputs = actions.release.len(), mode = ?self.state.mode().protection(), "released");
        }
        if let Some(c) = actions.engine {
            // the engine thread ends only after this task: a send cannot fail
            // while it matters
            let _ = self.engine.send(c);
        }
        if let (Some(ask), Some(w)) = (actions.ask, &self.witness) {
            let _ = w.asks.send((ask, self.session_peer.clone()));
        }
        self.router.release(actions.release, decided_us);
        let (mode, held) = (self.state.mode().protection(), self.state.held_count());
        let (view, recorded) = (self.state.witness().clone(), self.state.sync_recorded());
        let hold = match self.state.mode() {
            Mode::Holding { why, .. } if self.witness.is_some() => {
                Some(format!("lost the secondary ({why}); the witness decides whether this node runs alone"))
            }
            Mode::Holding { why, peer, .. } => Some(format!(
                "lost the secondary {peer} ({why}); without a witness only it coming back, or `castor unprotect` \
                 once you know it is dead, ends the hold"
            )),
            _ => None,
        };
        // the sync that made this mode counts in the same update: the
        // periodic refresh of the engine's counters may come later, and a
        // reader that saw "protected" with the old count took a sync that
        // had ended for one made after
        let (live_syncs, tracking_lost) = (
            self.shared.live_syncs.load(std::sync::atomic::Ordering::Relaxed),
            self.shared.tracking_lost.load(std::sync::atomic::Ordering::Relaxed),
        );
        self.status.update(|s| {
            s.protection = mode;
            s.held_outputs = held;
            s.syncs += u64::from(session_up);
            s.live_syncs = live_syncs;
            s.tracking_lost = tracking_lost;
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
            match self.state.mode() {
                Mode::HandingOver { .. } => self.switchover = Some(c),
                Mode::HandedOver { .. } => c.answer(Ok("handed over: the secondary runs the guest now")),
                m => {
                    c.answer(Err(Refused(format!("the switchover did not complete: this node is {}", m.protection()))))
                }
            }
        }
        if mode != before {
            match self.state.mode() {
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
        Ok(actions.handover)
    }

    fn witness_answered(&mut self, (tag, answer, ms): (u64, Answer, f64)) {
        if let Answer::Unreachable(why) = &answer {
            if !matches!(self.state.witness(), WitnessView::Unreachable(_)) {
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
        let r = self.apply(Event::Command(c.command)).map(|_| "done").map_err(|e| Refused(e.to_string()));
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

    fn fenced(&self) -> Option<u64> {
        match self.state.mode() {
            Mode::Fenced { by } => Some(*by),
            _ => None,
        }
    }

    /// Finds a secondary, protects, and survives its loss (see [`PrimaryState`]).
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
        // a joiner's data or heartbeat channel, waiting for its other one
        let mut half_paired = crate::joiners::Pairs::<Session>::default();
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
            let holding = matches!(self.state.mode(), Mode::Holding { .. });
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
                            session = half_paired.add(&node, channel, s);
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
                            if let Some(by) = fenced_by(&e, self.cfg.generation) {
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
            // a live sync either way: into an empty replica, or staged
            // beside the older epoch of ours it holds (it stays at that
            // committed epoch until the sync's final epoch verifies)
            let resync = if data.ack.committed_epoch.is_some() { Resync::BesideCommitted } else { Resync::IntoEmpty };
            self.session_peer = data.ack.node.clone();
            self.status.update(|s| s.pair_error = None);
            let next_epoch = self.shared.next_epoch.load(std::sync::atomic::Ordering::SeqCst);
            self.shared.next_unacked.store(next_epoch, std::sync::atomic::Ordering::SeqCst);
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
                SessionExit::Stopped => return Ok(PrimaryExit::Shutdown),
                SessionExit::HandedOver(epoch) => return Ok(PrimaryExit::HandedOver { epoch }),
                SessionExit::GuestFailed(e) => return Err(e.into()),
                SessionExit::Fenced(by) => {
                    let _ = self.apply(Event::Fenced { by });
                }
                SessionExit::Lost(why) => {
                    let _ = self.apply(Event::SessionLost(why));
                    next_dial = Instant::now();
                }
            }
        }
    }
}
