//! The primary's protection state machine, without I/O.
//!
//! One [`Mode`], changed only by [`Core::on`] with the [`Event`] that caused
//! the change; the held output lives here too, so the two rules the product
//! rests on are decided in one place and tested as such:
//!
//! 1. while a secondary exists (a session is up, or was lost and may be taking
//!    over), output is released only for acknowledged epochs;
//! 2. nothing is released while holding or fenced.
//!
//! With a witness ([`Core::with_witness`]) two more: a session releases
//! nothing until the witness has recorded its secondary as caught up
//! ([`Ask::RecordSync`], asked at the session's first ack; it also proves
//! our term is still in force), and
//! a hold ends in running alone only when the witness grants it
//! ([`Ask::RunAlone`]); a refused port or the fence grace decide nothing.
//!
//! The engine learns what it must do from the [`EngineCommand`] a step
//! returns (one value, applied in order), never by reading flags.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::state::Output;
pub use runtime::control::Command;
use runtime::status::Protection;

/// Why the session with the secondary ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Loss {
    #[error("sending failed: {0}")]
    Send(String),
    #[error("the secondary refused us: {0}")]
    Refused(String),
    #[error("unexpected {0} from the secondary")]
    Unexpected(String),
    #[error("the secondary closed the {0} channel")]
    Closed(&'static str),
    #[error("{channel} channel: {err}")]
    Channel { channel: &'static str, err: String },
    #[error("no heartbeat reply for {0:?}")]
    HeartbeatTimeout(Duration),
    #[error("no ack for {waited:?}, and no byte of the data connection read for {no_progress:?}")]
    AckTimeout { waited: Duration, no_progress: Duration },
    #[error("the secondary acknowledged epoch {epoch}, which this session never sent (last sent: {last_sent:?})")]
    AckBeyondSent { epoch: u64, last_sent: Option<u64> },
}

/// The protection mode of a primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// No secondary: output leaves at once (or the guest stays paused, by policy).
    Unprotected,
    /// A secondary session is up; no epoch of it acknowledged yet.
    Syncing,
    /// The secondary acknowledged an epoch of this session.
    Protected,
    /// The secondary was lost and may be taking over: nothing is released,
    /// the guest is paused.
    Holding {
        since: Instant,
        why: Loss,
        /// The secondary (its witness name or durable node id) we hold for:
        /// without a witness only it coming back ends the hold (it shows
        /// its generation), or the operator's `unprotect`.
        peer: String,
    },
    /// A newer generation exists: this node must never release output again.
    Fenced { by: u64 },
    /// A planned switchover: the engine ends its last epoch (`last`, once
    /// known) and keeps the guest paused; acked output is released as when
    /// protected; once `last` is acknowledged the handover is sent (`sent`).
    HandingOver { last: Option<u64>, sent: bool },
    /// The secondary accepted the handover after `epoch`: this node never
    /// releases output again (the secondary runs the guest now).
    HandedOver { epoch: u64 },
}

impl Mode {
    pub fn protection(&self) -> Protection {
        match self {
            Mode::Unprotected => Protection::Unprotected,
            Mode::Syncing => Protection::Syncing,
            Mode::Protected => Protection::Protected,
            Mode::Holding { .. } => Protection::Holding,
            Mode::Fenced { .. } => Protection::Fenced,
            Mode::HandingOver { .. } => Protection::HandingOver,
            Mode::HandedOver { .. } => Protection::HandedOver,
        }
    }

    /// A secondary session is up.
    pub fn in_session(&self) -> bool {
        matches!(self, Mode::Syncing | Mode::Protected | Mode::HandingOver { .. })
    }
}

/// How a new secondary is brought up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resync {
    /// Its replica is empty: copy memory while the guest runs.
    Live,
    /// It holds an older epoch of ours: one full-memory epoch.
    Full,
}

/// What the epoch engine is told to do. The engine applies them in order;
/// its behaviour is a function of the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineCommand {
    /// Ship epochs to the secondary, starting with this resync.
    Protect(Resync),
    /// Keep the guest paused: no new output.
    Hold,
    /// No secondary: run by the unprotected policy, output released at once.
    Alone,
    /// Send the next epoch as a full-memory epoch (the secondary asked).
    FullEpoch,
    /// End the current epoch now, ship it as the last one, and keep the
    /// guest paused (a planned switchover).
    Finish,
    /// A switchover was refused after the last epoch: run the guest on,
    /// protected (the secondary holds exactly the epoch it stopped at).
    Resume,
}

/// Why a command or event was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this node is the primary: a forced failover is asked of its secondary")]
    IsPrimary,
    #[error("not holding but {0}: unprotect only ends a hold")]
    NotHolding(Protection),
    #[error("fenced by generation {0}: this node takes no commands")]
    Fenced(u64),
    #[error("a secondary session is already up")]
    SessionUp,
    #[error("with a witness, the witness decides when a hold ends (it grants running alone)")]
    WitnessDecides,
    #[error(
        "holding for secondary {0}: without a witness only it can show it did not take over; \
         `castor unprotect` if you know it is dead"
    )]
    HoldingFor(String),
    #[error("not protected but {0}: a switchover needs a secondary that acknowledges epochs")]
    NotProtected(Protection),
    #[error("the witness has not recorded the secondary as caught up yet: try again in a moment")]
    NotRecorded,
    #[error("a switchover is already under way")]
    SwitchingOver,
    #[error("handed over: the secondary runs the guest now; this node takes no commands")]
    HandedOver,
}

/// A question for the witness; its answer comes back as [`Event::Witness`]
/// with the same tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Record this session's secondary as caught up (compares our term).
    RecordSync { tag: u64 },
    /// Delete the sync record so we may release and run alone.
    RunAlone { tag: u64 },
}

/// The witness's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Granted,
    /// A later request of ours landed first: ask again if still needed.
    Superseded,
    /// The term moved on to `term`: we are fenced.
    Refused {
        term: u64,
    },
    Unreachable(String),
}

/// What this node knows of its witness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessView {
    /// No witness configured.
    None,
    /// Its last answer was definite.
    Ok,
    Unreachable(String),
}

/// How often an unanswered question is asked again.
pub const WITNESS_RETRY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Sync,
    Alone,
}

/// The question the core waits on.
#[derive(Debug, Clone, Copy)]
struct Pending {
    want: Want,
    tag: u64,
    /// `None` while in flight; else when to ask again.
    retry_at: Option<Instant>,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A secondary session is up. `next_epoch`: the engine's next epoch.
    SessionUp {
        next_epoch: u64,
        resync: Resync,
        /// The secondary's name (its HelloAck node).
        peer: String,
    },
    /// The engine finished `epoch` (sent to the secondary in a session).
    Epoch {
        epoch: u64,
        outputs: Vec<Output>,
    },
    /// Output of an unprotected engine epoch.
    Released(Vec<Output>),
    /// The secondary acknowledged `epoch` (and every one before it).
    Ack {
        epoch: u64,
    },
    /// The secondary asks for a full resync.
    ResyncRequested,
    /// The witness answered the ask with this tag.
    Witness {
        tag: u64,
        answer: Answer,
    },
    SessionLost(Loss),
    /// A node of generation `by` exists.
    Fenced {
        by: u64,
    },
    /// Time passes.
    Tick,
    Command(Command),
    /// The epoch the engine ended last before a handover (after its
    /// [`Event::Epoch`]).
    LastEpoch {
        epoch: u64,
    },
    /// The secondary accepted the handover after `epoch`.
    HandoverAccepted {
        epoch: u64,
    },
    /// The secondary cannot take the handover (its machine does not build
    /// there, the witness refused it): the session goes on and this node
    /// resumes the guest, protected.
    HandoverRefused,
}

impl Event {
    /// The event's name (for logs).
    pub fn name(&self) -> &'static str {
        match self {
            Event::SessionUp { .. } => "session-up",
            Event::Epoch { .. } => "epoch",
            Event::Released(_) => "released",
            Event::Ack { .. } => "ack",
            Event::ResyncRequested => "resync-requested",
            Event::Witness { .. } => "witness",
            Event::SessionLost(_) => "session-lost",
            Event::Fenced { .. } => "fenced",
            Event::Tick => "tick",
            Event::Command(_) => "command",
            Event::LastEpoch { .. } => "last-epoch",
            Event::HandoverAccepted { .. } => "handover-accepted",
            Event::HandoverRefused => "handover-refused",
        }
    }
}

/// The effect of one event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub engine: Option<EngineCommand>,
    /// Output that leaves castor now.
    pub release: Vec<Output>,
    /// Ask the witness this.
    pub ask: Option<Ask>,
    /// Send the secondary the handover after this epoch (acknowledged).
    pub handover: Option<u64>,
}

/// Output waiting for its epoch's ack: epoch -> (outputs, sent at).
#[derive(Debug, Default)]
pub struct HeldOutputs {
    by_epoch: BTreeMap<u64, (Vec<Output>, Instant)>,
}

impl HeldOutputs {
    pub fn insert(&mut self, epoch: u64, outputs: Vec<Output>, at: Instant) {
        self.by_epoch.entry(epoch).or_insert_with(|| (Vec::new(), at)).0.extend(outputs);
    }

    /// Removes and returns everything of epochs `<= epoch`, oldest first.
    pub fn take_through(&mut self, epoch: u64) -> Vec<Output> {
        let Some(after) = epoch.checked_add(1) else {
            // every key is <= u64::MAX
            return self.take_all();
        };
        let later = self.by_epoch.split_off(&after);
        let ready = std::mem::replace(&mut self.by_epoch, later);
        ready.into_values().flat_map(|v| v.0).collect()
    }

    pub fn take_all(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.by_epoch).into_values().flat_map(|v| v.0).collect()
    }

    /// Outputs waiting.
    pub fn count(&self) -> u64 {
        self.by_epoch.values().map(|v| v.0.len() as u64).sum()
    }

    /// When `epoch` was handed to the secondary, if it waits.
    pub fn sent_at(&self, epoch: u64) -> Option<Instant> {
        self.by_epoch.get(&epoch).map(|v| v.1)
    }

    /// When the oldest waiting epoch in `lo..=hi` was sent.
    pub fn oldest_in(&self, lo: u64, hi: u64) -> Option<Instant> {
        if lo > hi {
            return None;
        }
        self.by_epoch.range(lo..=hi).next().map(|v| v.1 .1)
    }
}

/// The primary's decisions: mode plus held output.
#[derive(Debug)]
pub struct Core {
    mode: Mode,
    held: HeldOutputs,
    /// Output produced while holding or before the session's first epoch:
    /// it goes out with the first ack of the next session.
    pending: Vec<Output>,
    /// The epoch key under which `pending` is held once a session is up.
    session_base: u64,
    /// The last epoch of this session handed to the secondary.
    last_sent: Option<u64>,
    /// The session's secondary.
    peer: String,
    /// A witness decides (see the module's rules).
    witness: bool,
    witness_view: WitnessView,
    /// The witness recorded this session's secondary as caught up.
    sync_recorded: bool,
    /// Acked in this session while the sync record was not yet granted.
    acked_unrecorded: Option<u64>,
    asking: Option<Pending>,
    next_tag: u64,
}

impl Default for Core {
    /// The two-node rule, as [`Core::new`].
    fn default() -> Core {
        Core::new()
    }
}

impl Core {
    /// A core that decides by the two-node rule: a lost secondary means a
    /// hold that only that secondary (showing its generation) or the
    /// operator ends; a refused port or silence proves nothing.
    pub fn new() -> Core {
        Core {
            mode: Mode::Unprotected,
            held: HeldOutputs::default(),
            pending: Vec::new(),
            session_base: 0,
            last_sent: None,
            peer: String::new(),
            witness: false,
            witness_view: WitnessView::None,
            sync_recorded: false,
            acked_unrecorded: None,
            asking: None,
            next_tag: 0,
        }
    }

    /// A core whose holds and sessions are decided with a witness.
    pub fn with_witness() -> Core {
        Core { witness: true, witness_view: WitnessView::Ok, ..Core::new() }
    }

    pub fn witness(&self) -> &WitnessView {
        &self.witness_view
    }

    /// The witness holds our secondary as the one that may be promoted.
    pub fn sync_recorded(&self) -> bool {
        self.sync_recorded
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Outputs not yet released.
    pub fn held_count(&self) -> u64 {
        self.held.count() + self.pending.len() as u64
    }

    /// When `epoch` of this session was sent, while it waits for its ack.
    pub fn sent_at(&self, epoch: u64) -> Option<Instant> {
        self.held.sent_at(epoch).filter(|_| self.mode.in_session())
    }

    /// When the oldest unacknowledged epoch was sent (in a session).
    ///
    /// Only epochs this session sent count: output that waited from before
    /// (a hold, the lost session, a live sync still running) goes out with
    /// the first ack, whose deadline is the first epoch's. (Counting it made
    /// every new session time out at once after a long hold: each resync
    /// after the first lost session died within a millisecond.)
    pub fn oldest_unacked(&self) -> Option<Instant> {
        let hi = self.last_sent.filter(|_| self.mode.in_session())?;
        let lo = self.session_base.saturating_add(1).max(self.acked_unrecorded.map_or(0, |e| e.saturating_add(1)));
        self.held.oldest_in(lo, hi)
    }

    fn ask(&mut self, want: Want, step: &mut Step) {
        self.next_tag += 1;
        let tag = self.next_tag;
        self.asking = Some(Pending { want, tag, retry_at: None });
        step.ask = Some(match want {
            Want::Sync => Ask::RecordSync { tag },
            Want::Alone => Ask::RunAlone { tag },
        });
    }

    fn on_witness(&mut self, tag: u64, answer: Answer, now: Instant, step: &mut Step) {
        if let Answer::Refused { term } = answer {
            // definite, whichever question it answers
            self.witness_view = WitnessView::Ok;
            *step = self.fence(term);
            return;
        }
        let Some(p) = self.asking.filter(|p| p.tag == tag) else { return };
        match answer {
            Answer::Granted => {
                self.witness_view = WitnessView::Ok;
                self.asking = None;
                match p.want {
                    Want::Sync if self.mode.in_session() => {
                        self.sync_recorded = true;
                        if let Some(e) = self.acked_unrecorded.take() {
                            if matches!(self.mode, Mode::Syncing | Mode::Protected) {
                                self.mode = Mode::Protected;
                            }
                            step.release = self.held.take_through(e);
                        }
                    }
                    Want::Alone if matches!(self.mode, Mode::Holding { .. }) => *step = self.go_unprotected(),
                    _ => {}
                }
            }
            Answer::Superseded => self.asking = Some(Pending { retry_at: Some(now), ..p }),
            Answer::Unreachable(why) => {
                self.witness_view = WitnessView::Unreachable(why);
                self.asking = Some(Pending { retry_at: Some(now + WITNESS_RETRY), ..p });
            }
            Answer::Refused { .. } => unreachable!("handled above"),
        }
    }

    /// Why an ack of `epoch` ends the session, if it does: in a session,
    /// the secondary can only acknowledge an epoch this session sent (it
    /// acks an epoch once it committed it), so an ack beyond the last one
    /// sent, or before any was sent, is a protocol error. (The replicator
    /// asks this before it records the ack anywhere else.)
    pub fn ack_violation(&self, epoch: u64) -> Option<Loss> {
        let sent = self.last_sent.is_some_and(|last| epoch <= last);
        (self.mode.in_session() && !sent).then_some(Loss::AckBeyondSent { epoch, last_sent: self.last_sent })
    }

    /// The session ended (`why`): hold; with a witness, ask to run alone.
    fn lose_session(&mut self, why: Loss, now: Instant, step: &mut Step) {
        if self.mode.in_session() {
            self.mode = Mode::Holding { since: now, why, peer: self.peer.clone() };
            step.engine = Some(EngineCommand::Hold);
            self.acked_unrecorded = None;
            if self.witness {
                self.sync_recorded = false;
                self.ask(Want::Alone, step);
            }
        }
    }

    fn fence(&mut self, by: u64) -> Step {
        let mut step = Step::default();
        if !matches!(self.mode, Mode::Fenced { .. }) {
            self.held.take_all();
            self.pending.clear();
            self.asking = None;
            self.sync_recorded = false;
            self.mode = Mode::Fenced { by };
            step.engine = Some(EngineCommand::Hold);
        }
        step
    }

    /// Applies one event at time `now`. A refused event changes nothing.
    pub fn on(&mut self, event: Event, now: Instant) -> Result<Step, Refusal> {
        let mut step = Step::default();
        match event {
            Event::SessionUp { next_epoch, resync, peer } => {
                match &self.mode {
                    Mode::Fenced { by } => return Err(Refusal::Fenced(*by)),
                    Mode::HandedOver { .. } => return Err(Refusal::HandedOver),
                    m if m.in_session() => return Err(Refusal::SessionUp),
                    Mode::Holding { peer: lost, .. } if !self.witness && *lost != peer => {
                        return Err(Refusal::HoldingFor(lost.clone()))
                    }
                    _ => {}
                }
                self.peer = peer;
                // what waited (held while holding, unacked epochs of the
                // lost session) goes out with this session's first ack: its
                // first epoch is next_epoch or later
                self.session_base = next_epoch.saturating_sub(1);
                self.last_sent = None;
                let pending = std::mem::take(&mut self.pending);
                self.held.insert(self.session_base, pending, now);
                self.mode = Mode::Syncing;
                step.engine = Some(EngineCommand::Protect(resync));
                if self.witness {
                    // the secondary is recorded once it has committed an
                    // epoch of this session (its first ack); a run-alone
                    // still in flight is answered before that record
                    self.sync_recorded = false;
                    self.acked_unrecorded = None;
                    self.asking = None;
                }
            }
            Event::Epoch { epoch, outputs } => match &self.mode {
                Mode::Syncing | Mode::Protected | Mode::HandingOver { .. } => {
                    self.last_sent = Some(epoch);
                    self.held.insert(epoch, outputs, now);
                }
                Mode::Holding { .. } => self.pending.extend(outputs),
                Mode::Unprotected => step.release = outputs,
                Mode::Fenced { .. } | Mode::HandedOver { .. } => {}
            },
            Event::Released(outputs) => match &self.mode {
                // an engine epoch that ran before the engine saw Protect:
                // a secondary exists now, so it waits for an ack of an epoch
                // after it
                Mode::Syncing | Mode::Protected | Mode::HandingOver { .. } => {
                    let key = self.last_sent.map_or(self.session_base, |e| e.saturating_add(1));
                    self.held.insert(key, outputs, now);
                }
                Mode::Holding { .. } => self.pending.extend(outputs),
                Mode::Unprotected => step.release = outputs,
                Mode::Fenced { .. } | Mode::HandedOver { .. } => {}
            },
            Event::Ack { epoch } => {
                if let Some(why) = self.ack_violation(epoch) {
                    // releases nothing: ends the session as a loss does
                    self.lose_session(why, now, &mut step);
                } else if self.mode.in_session() {
                    if self.witness && !self.sync_recorded {
                        // acked, but released only once the witness knows
                        // this secondary may take over
                        self.acked_unrecorded = self.acked_unrecorded.max(Some(epoch));
                        if !self.asking.is_some_and(|p| p.want == Want::Sync) {
                            self.ask(Want::Sync, &mut step);
                        }
                    } else {
                        step.release = self.held.take_through(epoch);
                        match self.mode {
                            Mode::HandingOver { last: Some(last), sent: false } if epoch >= last => {
                                // everything up to the last epoch is in the
                                // secondary's replica and released: hand over
                                self.mode = Mode::HandingOver { last: Some(last), sent: true };
                                step.handover = Some(last);
                            }
                            Mode::HandingOver { .. } => {}
                            _ => self.mode = Mode::Protected,
                        }
                    }
                }
            }
            Event::LastEpoch { epoch } => {
                if let Mode::HandingOver { last: None, sent } = self.mode {
                    self.mode = Mode::HandingOver { last: Some(epoch), sent };
                }
            }
            Event::HandoverAccepted { epoch } => {
                if self.mode == (Mode::HandingOver { last: Some(epoch), sent: true }) {
                    self.mode = Mode::HandedOver { epoch };
                    // nothing can be left (the guest stopped at the last
                    // boundary); whatever is, the secondary's state has
                    self.held.take_all();
                    self.pending.clear();
                    self.asking = None;
                    step.engine = Some(EngineCommand::Hold);
                }
            }
            Event::HandoverRefused => {
                if let Mode::HandingOver { sent: true, .. } = self.mode {
                    // the secondary holds every epoch up to the last one
                    // (acknowledged): back to protected operation from there
                    self.mode = Mode::Protected;
                    step.engine = Some(EngineCommand::Resume);
                }
            }
            Event::Witness { tag, answer } => self.on_witness(tag, answer, now, &mut step),
            Event::ResyncRequested => {
                if self.mode.in_session() {
                    step.engine = Some(EngineCommand::FullEpoch);
                }
            }
            Event::SessionLost(why) => self.lose_session(why, now, &mut step),
            Event::Fenced { by } => step = self.fence(by),
            Event::Tick => {
                if let Some(p) = self.asking {
                    if p.retry_at.is_some_and(|t| now >= t) {
                        self.ask(p.want, &mut step);
                    }
                }
            }
            Event::Command(Command::Failover) => return Err(Refusal::IsPrimary),
            Event::Command(Command::Switchover) => match &self.mode {
                Mode::Protected if !self.witness || self.sync_recorded => {
                    self.mode = Mode::HandingOver { last: None, sent: false };
                    step.engine = Some(EngineCommand::Finish);
                }
                Mode::Protected => return Err(Refusal::NotRecorded),
                Mode::Syncing if self.acked_unrecorded.is_some() => return Err(Refusal::NotRecorded),
                Mode::HandingOver { .. } => return Err(Refusal::SwitchingOver),
                Mode::HandedOver { .. } => return Err(Refusal::HandedOver),
                Mode::Fenced { by } => return Err(Refusal::Fenced(*by)),
                other => return Err(Refusal::NotProtected(other.protection())),
            },
            Event::Command(Command::Unprotect) => match &self.mode {
                Mode::Holding { .. } if self.witness => return Err(Refusal::WitnessDecides),
                Mode::Holding { .. } => step = self.go_unprotected(),
                Mode::Fenced { by } => return Err(Refusal::Fenced(*by)),
                Mode::HandedOver { .. } => return Err(Refusal::HandedOver),
                other => return Err(Refusal::NotHolding(other.protection())),
            },
        }
        Ok(step)
    }

    fn go_unprotected(&mut self) -> Step {
        self.mode = Mode::Unprotected;
        let mut release = self.held.take_all();
        release.append(&mut self.pending);
        Step { engine: Some(EngineCommand::Alone), release, ..Step::default() }
    }
}

#[cfg(test)]
#[path = "mode_tests.rs"]
mod tests;
