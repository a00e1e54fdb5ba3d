//! The primary's protection state machine, without I/O.
//!
//! One [`Mode`], changed only by [`PrimaryState::on`] with the [`Event`] that caused
//! the change; the held output lives here too, so the two rules the product
//! rests on are decided in one place and tested as such:
//!
//! 1. while a secondary exists (a session is up, or was lost and may be taking
//!    over), output is released only for acknowledged epochs;
//! 2. nothing is released while holding or fenced.
//!
//! With a witness ([`PrimaryState::with_witness`]) two more: a session releases
//! nothing until the witness has recorded its secondary as caught up
//! ([`Ask::RecordSync`], asked at the session's first ack; it also proves
//! our term is still in force), and
//! a hold ends in running alone only when the witness grants it
//! ([`Ask::RunAlone`]); a refused port or the fence grace decide nothing.
//!
//! The engine learns what it must do from the [`EngineCommand`] in the
//! [`Actions`] of each event (one value, applied in order), never by
//! reading flags.

mod held;
mod types;
mod witness;

use std::time::Instant;

use common::state::Output;
pub use runtime::control::Command;

pub use held::HeldOutputs;
pub use types::{Actions, EngineCommand, Event, Loss, Mode, Refusal, Resync};
pub use witness::{Answer, Ask, WitnessView, WITNESS_RETRY};
use witness::{OpenQuestion, Question};

/// The primary's decisions: mode plus held output.
#[derive(Debug)]
pub struct PrimaryState {
    mode: Mode,
    held: HeldOutputs,
    /// Output produced while holding: it goes out with the first ack of the
    /// next session.
    for_next_session: Vec<Output>,
    /// The epoch key under which `for_next_session` is held once a session
    /// is up.
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
    asking: Option<OpenQuestion>,
    next_tag: u64,
}

impl Default for PrimaryState {
    /// The two-node rule, as [`PrimaryState::new`].
    fn default() -> PrimaryState {
        PrimaryState::new()
    }
}

impl PrimaryState {
    /// A core that decides by the two-node rule: a lost secondary means a
    /// hold that only that secondary (showing its generation) or the
    /// operator ends; a refused port or silence proves nothing.
    pub fn new() -> PrimaryState {
        PrimaryState {
            mode: Mode::Unprotected,
            held: HeldOutputs::default(),
            for_next_session: Vec::new(),
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
    pub fn with_witness() -> PrimaryState {
        PrimaryState { witness: true, witness_view: WitnessView::Ok, ..PrimaryState::new() }
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
        self.held.count() + self.for_next_session.len() as u64
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
    fn lose_session(&mut self, why: Loss, now: Instant, actions: &mut Actions) {
        if self.mode.in_session() {
            self.mode = Mode::Holding { since: now, why, peer: self.peer.clone() };
            actions.engine = Some(EngineCommand::Hold);
            self.acked_unrecorded = None;
            if self.witness {
                self.sync_recorded = false;
                self.ask(Question::RunAlone, actions);
            }
        }
    }

    fn fence(&mut self, by: u64) -> Actions {
        let mut actions = Actions::default();
        if !matches!(self.mode, Mode::Fenced { .. }) {
            self.held.take_all();
            self.for_next_session.clear();
            self.asking = None;
            self.sync_recorded = false;
            self.mode = Mode::Fenced { by };
            actions.engine = Some(EngineCommand::Hold);
        }
        actions
    }

    /// Applies one event at time `now`. A refused event changes nothing.
    pub fn on(&mut self, event: Event, now: Instant) -> Result<Actions, Refusal> {
        let mut actions = Actions::default();
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
                let waited = std::mem::take(&mut self.for_next_session);
                self.held.insert(self.session_base, waited, now);
                self.mode = Mode::Syncing;
                actions.engine = Some(EngineCommand::Protect(resync));
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
                Mode::Holding { .. } => self.for_next_session.extend(outputs),
                Mode::Unprotected => actions.release = outputs,
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
                Mode::Holding { .. } => self.for_next_session.extend(outputs),
                Mode::Unprotected => actions.release = outputs,
                Mode::Fenced { .. } | Mode::HandedOver { .. } => {}
            },
            Event::Ack { epoch } => {
                if let Some(why) = self.ack_violation(epoch) {
                    // releases nothing: ends the session as a loss does
                    self.lose_session(why, now, &mut actions);
                } else if self.mode.in_session() {
                    if self.witness && !self.sync_recorded {
                        // acked, but released only once the witness knows
                        // this secondary may take over
                        self.acked_unrecorded = self.acked_unrecorded.max(Some(epoch));
                        if !self.asking.is_some_and(|p| p.question == Question::RecordSync) {
                            self.ask(Question::RecordSync, &mut actions);
                        }
                    } else {
                        actions.release = self.held.take_through(epoch);
                        match self.mode {
                            Mode::HandingOver { last: Some(last), sent: false } if epoch >= last => {
                                // everything up to the last epoch is in the
                                // secondary's replica and released: hand over
                                self.mode = Mode::HandingOver { last: Some(last), sent: true };
                                actions.handover = Some(last);
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
                    self.for_next_session.clear();
                    self.asking = None;
                    actions.engine = Some(EngineCommand::Hold);
                }
            }
            Event::HandoverRefused => {
                if let Mode::HandingOver { sent: true, .. } = self.mode {
                    // the secondary holds every epoch up to the last one
                    // (acknowledged): back to protected operation from there
                    self.mode = Mode::Protected;
                    actions.engine = Some(EngineCommand::Resume);
                }
            }
            Event::Witness { tag, answer } => self.on_witness(tag, answer, now, &mut actions),
            Event::ResyncRequested => {
                if self.mode.in_session() {
                    actions.engine = Some(EngineCommand::LiveResync);
                }
            }
            Event::SessionLost(why) => self.lose_session(why, now, &mut actions),
            Event::Fenced { by } => actions = self.fence(by),
            Event::Tick => {
                if let Some(p) = self.asking {
                    if p.retry_at.is_some_and(|t| now >= t) {
                        self.ask(p.question, &mut actions);
                    }
                }
            }
            Event::Command(Command::Failover) => return Err(Refusal::IsPrimary),
            Event::Command(Command::Switchover) => match &self.mode {
                Mode::Protected if !self.witness || self.sync_recorded => {
                    self.mode = Mode::HandingOver { last: None, sent: false };
                    actions.engine = Some(EngineCommand::Finish);
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
                Mode::Holding { .. } => actions = self.go_unprotected(),
                Mode::Fenced { by } => return Err(Refusal::Fenced(*by)),
                Mode::HandedOver { .. } => return Err(Refusal::HandedOver),
                other => return Err(Refusal::NotHolding(other.protection())),
            },
        }
        Ok(actions)
    }

    fn go_unprotected(&mut self) -> Actions {
        self.mode = Mode::Unprotected;
        let mut release = self.held.take_all();
        release.append(&mut self.for_next_session);
        Actions { engine: Some(EngineCommand::Alone), release, ..Actions::default() }
    }
}

#[cfg(test)]
mod tests;
