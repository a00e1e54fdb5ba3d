//! What the engine is doing ([`EngineState`]) and how it changes: one value,
//! changed only by [`EngineState::step`] with the [`EngineEvent`] that caused
//! the change (a command from the core, or the engine's own progress: a live
//! sync that started or ended, a boundary taken or not shipped). No I/O here:
//! the epoch loop asks the state what to do and carries out the
//! [`Effects`] a step returns.
//!
//! ```text
//!              Protect                 Finish, then the last boundary
//!   Alone   ────────────►  Protecting  ───────────────────────────►  HandingOver
//!   Holding ────────────►  (its live   ◄───────────────────────────  (guest paused)
//!     ▲                     sync's        Resume (handover refused)       │
//!     │      Hold / Alone   stage)                                        │
//!     ├──────────────────────┘                                            │
//!     └────────────── Hold (handover accepted, session lost, fenced) ─────┘
//! ```
//!
//! Inside [`Protecting`] a live sync goes `Due` (starts at the next
//! boundary) -> `Running` (copying while the guest runs) -> `Copied` (the
//! next boundary's epoch ends it), or `FullDue` when every attempt lost its
//! dirty tracking (the next epoch is a full-memory one); a resync asked
//! meanwhile starts it again (`Due`).

use crate::mode::EngineCommand;

/// What the engine is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EngineState {
    /// No secondary: the guest runs by the unprotected policy.
    Alone,
    /// The guest is kept paused, nothing is shipped (the secondary was lost,
    /// this node was fenced, or it handed over).
    Holding,
    /// Epochs (and live syncs) are shipped to a secondary.
    Protecting(Protecting),
    /// The last epoch before a handover was shipped: the guest stays paused
    /// until the secondary takes over (the core says [`EngineCommand::Hold`])
    /// or refuses ([`EngineCommand::Resume`]: protecting again, from the
    /// state kept here).
    HandingOver(Protecting),
}

/// The engine's state while it protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Protecting {
    /// Where the live sync stands.
    pub sync: LiveSync,
    /// The epoch that ended the last live sync, until it is acknowledged:
    /// the pauses until then count for the sync's longest pause (the
    /// secondary is still applying it).
    pub sync_final_unacked: Option<u64>,
    /// A switchover: end the current epoch now; it is the last one and the
    /// guest stays paused after it.
    pub finishing: bool,
    /// A refused handover: the guest resumes once the epoch's wait ends.
    pub resuming: bool,
}

/// Where a live sync stands (while protecting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LiveSync {
    /// No sync under way: delta epochs.
    Idle,
    /// A live sync starts at the next boundary. `by_loss`: a lost
    /// collection started it (that boundary's pause already counts for the
    /// sync's longest pause); `full`: the epoch after it is a full-memory
    /// one whatever the sync does (every attempt of an earlier sync lost
    /// its tracking, and that full epoch was not taken yet).
    Due { by_loss: bool, full: bool },
    /// A live sync is copying memory while the guest runs (`full` as in
    /// `Due`).
    Running { full: bool },
    /// The sync copied memory: the next boundary's epoch ends it (a
    /// full-memory one if `full`).
    Copied { full: bool },
    /// Every live attempt lost its dirty tracking: the next epoch is a
    /// full-memory one.
    FullDue,
}

/// What changes the engine's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EngineEvent {
    /// A command from the core, applied in order.
    Command(EngineCommand),
    /// The epoch's wait ended (the boundary checks come next).
    WaitEnded,
    /// The live sync that was due starts.
    SyncStarted,
    /// The live sync copied every round.
    SyncCopied,
    /// The live sync stopped: the session changed, or the link is gone.
    SyncAbandoned,
    /// Every attempt of the live sync lost its dirty tracking.
    SyncLostEveryAttempt,
    /// A boundary's collection was incomplete: nothing of it is shipped and
    /// a live resync follows.
    CollectionLost,
    /// A boundary made `epoch` (`last`: the last before a handover);
    /// `acked`: the highest acknowledged epoch.
    Boundary { epoch: u64, last: bool, acked: Option<u64> },
}

/// What the engine does because of a step (besides what it reads from the
/// state).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Effects {
    /// Resume the guest (paused for a handover that was refused).
    pub resume_guest: bool,
    /// A new live sync: the sync's longest pause starts from zero.
    pub reset_sync_pauses: bool,
    /// This boundary's pause counts for the sync's longest pause.
    pub sync_pause: bool,
}

impl Protecting {
    /// Protecting from the start of a session: a live sync is due.
    fn new() -> Protecting {
        Protecting {
            sync: LiveSync::Due { by_loss: false, full: false },
            sync_final_unacked: None,
            finishing: false,
            resuming: false,
        }
    }

    /// The next epoch is a full-memory one.
    fn full_due(&self) -> bool {
        matches!(
            self.sync,
            LiveSync::Due { full: true, .. }
                | LiveSync::Running { full: true }
                | LiveSync::Copied { full: true }
                | LiveSync::FullDue
        )
    }
}

impl EngineState {
    /// Ships epochs (not handing over).
    pub fn protecting(&self) -> bool {
        matches!(self, EngineState::Protecting(_))
    }

    /// Runs by the unprotected policy, with no secondary.
    pub fn alone(&self) -> bool {
        *self == EngineState::Alone
    }

    /// The guest stays paused whatever the unprotected policy says.
    pub fn keeps_guest_paused(&self) -> bool {
        matches!(self, EngineState::Holding | EngineState::HandingOver(_))
    }

    /// A switchover asked to end the current epoch now, as the last one.
    pub fn finishing(&self) -> bool {
        matches!(self, EngineState::Protecting(p) if p.finishing)
    }

    /// A live sync starts at the next boundary.
    pub fn sync_due(&self) -> bool {
        matches!(self, EngineState::Protecting(Protecting { sync: LiveSync::Due { .. }, .. }))
    }

    /// A running live sync must stop: the session changed (or a new sync
    /// is due).
    pub fn sync_interrupted(&self) -> bool {
        !self.protecting() || self.sync_due()
    }

    /// The next epoch is a full-memory one.
    pub fn full_due(&self) -> bool {
        matches!(self, EngineState::Protecting(p) if p.full_due())
    }

    /// Applies one event; returns what the engine must do besides.
    pub fn step(&mut self, event: EngineEvent) -> Effects {
        let mut fx = Effects::default();
        *self = match (*self, event) {
            (s, EngineEvent::Command(c)) => s.command(c),
            (EngineState::Protecting(mut p), EngineEvent::WaitEnded) => {
                fx.resume_guest = std::mem::take(&mut p.resuming);
                EngineState::Protecting(p)
            }
            // (a resume asked before the last boundary is spent here)
            (EngineState::HandingOver(mut p), EngineEvent::WaitEnded) => {
                p.resuming = false;
                EngineState::HandingOver(p)
            }
            (EngineState::Protecting(mut p), EngineEvent::SyncStarted) => {
                if let LiveSync::Due { by_loss, full } = p.sync {
                    fx.reset_sync_pauses = !by_loss;
                    p.sync = LiveSync::Running { full };
                }
                EngineState::Protecting(p)
            }
            // (a sync outlives a Hold and a Resume taken in one poll: it
            // goes on, and what it did counts)
            (EngineState::Protecting(mut p), EngineEvent::SyncCopied) => {
                match p.sync {
                    LiveSync::Running { full } => p.sync = LiveSync::Copied { full },
                    LiveSync::Idle => p.sync = LiveSync::Copied { full: false },
                    _ => {}
                }
                EngineState::Protecting(p)
            }
            (EngineState::Protecting(mut p), EngineEvent::SyncAbandoned) => {
                if let LiveSync::Running { full } = p.sync {
                    p.sync = if full { LiveSync::FullDue } else { LiveSync::Idle };
                }
                EngineState::Protecting(p)
            }
            (EngineState::Protecting(mut p), EngineEvent::SyncLostEveryAttempt) => {
                if let LiveSync::Running { .. } | LiveSync::Idle = p.sync {
                    p.sync = LiveSync::FullDue;
                }
                EngineState::Protecting(p)
            }
            (EngineState::Protecting(mut p), EngineEvent::CollectionLost) => {
                p.sync = LiveSync::Due { by_loss: true, full: false };
                EngineState::Protecting(p)
            }
            (EngineState::Protecting(mut p), EngineEvent::Boundary { epoch, last, acked }) => {
                // the boundary took the full epoch that was due
                p.sync = match p.sync {
                    LiveSync::Due { by_loss, .. } => LiveSync::Due { by_loss, full: false },
                    LiveSync::Copied { .. } => {
                        // the epoch that ends a live sync: the sync lasts
                        // until its ack
                        p.sync_final_unacked = Some(epoch);
                        LiveSync::Idle
                    }
                    LiveSync::Idle | LiveSync::Running { .. } | LiveSync::FullDue => LiveSync::Idle,
                };
                if let Some(e) = p.sync_final_unacked {
                    if acked.is_some_and(|a| a >= e) && epoch > e {
                        p.sync_final_unacked = None;
                    } else {
                        fx.sync_pause = true;
                    }
                }
                p.finishing = false;
                if last {
                    EngineState::HandingOver(p)
                } else {
                    EngineState::Protecting(p)
                }
            }
            // the engine's own progress means nothing once it no longer
            // protects
            (s, _) => s,
        };
        fx
    }

    fn command(self, c: EngineCommand) -> EngineState {
        match (self, c) {
            (EngineState::Protecting(mut p) | EngineState::HandingOver(mut p), EngineCommand::Protect(_)) => {
                // a replica with a committed epoch (Resync::BesideCommitted) keeps it
                // usable for failover until the sync's final epoch commits:
                // the secondary stages the sync either way
                let by_loss = matches!(p.sync, LiveSync::Due { by_loss: true, .. });
                p.sync = LiveSync::Due { by_loss, full: false };
                EngineState::Protecting(p)
            }
            (_, EngineCommand::Protect(_)) => EngineState::Protecting(Protecting::new()),
            (_, EngineCommand::Hold) => EngineState::Holding,
            (_, EngineCommand::Alone) => EngineState::Alone,
            (EngineState::Protecting(mut p), EngineCommand::Finish) => {
                p.finishing = true;
                EngineState::Protecting(p)
            }
            (s, EngineCommand::Finish) => s,
            (EngineState::Protecting(mut p) | EngineState::HandingOver(mut p), EngineCommand::Resume) => {
                p.finishing = false;
                p.resuming = true;
                EngineState::Protecting(p)
            }
            (_, EngineCommand::Resume) => {
                EngineState::Protecting(Protecting { sync: LiveSync::Idle, resuming: true, ..Protecting::new() })
            }
            (EngineState::Protecting(mut p), EngineCommand::LiveResync) => {
                p.sync = match p.sync {
                    due @ LiveSync::Due { .. } => due,
                    LiveSync::Idle => LiveSync::Due { by_loss: false, full: false },
                    LiveSync::Running { full } | LiveSync::Copied { full } => LiveSync::Due { by_loss: false, full },
                    LiveSync::FullDue => LiveSync::Due { by_loss: false, full: true },
                };
                EngineState::Protecting(p)
            }
            (s, EngineCommand::LiveResync) => s,
        }
    }
}

#[cfg(test)]
mod tests;
