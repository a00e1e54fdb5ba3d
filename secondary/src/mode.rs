//! The secondary's mode, without I/O: one value, changed only by
//! [`SecondaryMode::on`] with the event that caused it.

use runtime::control::Command;
use runtime::status::Protection;

/// The secondary's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondaryMode {
    /// No epoch committed yet.
    Waiting,
    /// Epochs commit into the replica.
    Replicating { committed: u64 },
    /// The replica failed a check at `committed`; a resync was asked for.
    Diverged { committed: u64 },
    /// Applying the epoch after `committed` failed halfway: the replica is
    /// torn, a full resync was asked for, and no takeover runs from it.
    Unusable { committed: u64 },
    /// With a witness: asking it to let us take over (its answer decides).
    Claiming { committed: u64, forced: bool },
    /// Taking over (forced, or the primary went silent).
    Promoting { committed: u64, forced: bool },
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondaryEvent {
    /// An epoch committed; `diverged`: the replica failed its last check.
    Committed {
        epoch: u64,
        diverged: bool,
    },
    /// The primary has been silent past the heartbeat timeout.
    PrimarySilent,
    Command(Command),
    /// The witness granted the takeover.
    WitnessGranted,
    /// The witness refused it (the primary ran alone, or the term moved on).
    WitnessRefused,
    /// The primary handed over after `epoch` (a planned switchover; the
    /// receiver checked that it is the epoch committed here).
    Handover {
        epoch: u64,
    },
    /// Applying the epoch after the committed one failed halfway (the
    /// replica is torn until a full epoch commits).
    ApplyFailed,
}

/// Why an event was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecondaryRefusal {
    #[error("no committed epoch yet: nothing to take over from")]
    NothingCommitted,
    #[error("this node is a secondary: unprotect is asked of a primary that holds")]
    NotPrimary,
    #[error("already taking over")]
    Promoting,
    #[error("this node is a secondary: a switchover is asked of its primary (`castor switchover --control PRIMARY`)")]
    SwitchoverOnPrimary,
    #[error("handover after epoch {asked}, but the committed epoch here is {committed:?}")]
    HandoverEpoch { asked: u64, committed: Option<u64> },
    #[error("the replica is unusable (applying the epoch after {committed} failed halfway): no takeover until a full resync repairs it")]
    ReplicaUnusable { committed: u64 },
}

impl SecondaryMode {
    pub fn protection(&self) -> Protection {
        match self {
            SecondaryMode::Waiting => Protection::Waiting,
            SecondaryMode::Replicating { .. } => Protection::Replicating,
            SecondaryMode::Diverged { .. } => Protection::Diverged,
            SecondaryMode::Unusable { .. } => Protection::Unusable,
            SecondaryMode::Claiming { .. } => Protection::Claiming,
            SecondaryMode::Promoting { .. } => Protection::Promoting,
        }
    }

    /// The epoch a takeover would start from.
    pub fn committed(&self) -> Option<u64> {
        match *self {
            SecondaryMode::Waiting => None,
            SecondaryMode::Replicating { committed }
            | SecondaryMode::Diverged { committed }
            | SecondaryMode::Unusable { committed }
            | SecondaryMode::Claiming { committed, .. }
            | SecondaryMode::Promoting { committed, .. } => Some(committed),
        }
    }

    /// The next mode. A refused event changes nothing. Silence before the
    /// first commit is no reason to take over (there is nothing to run).
    pub fn on(self, e: SecondaryEvent) -> Result<SecondaryMode, SecondaryRefusal> {
        self.step(e, false)
    }

    /// The next mode when a witness decides takeovers (`witness`): silence
    /// or a forced failover starts a claim, and only the witness's grant
    /// turns it into a takeover.
    pub fn step(self, e: SecondaryEvent, witness: bool) -> Result<SecondaryMode, SecondaryRefusal> {
        use SecondaryEvent as E;
        use SecondaryMode as M;
        match (self, e) {
            (_, E::Command(Command::Switchover)) => Err(SecondaryRefusal::SwitchoverOnPrimary),
            (M::Promoting { .. } | M::Claiming { .. }, E::Command(Command::Failover)) => {
                Err(SecondaryRefusal::Promoting)
            }
            (M::Promoting { .. }, _) => Ok(self),
            // a torn replica: nothing may run from it; only a full epoch
            // that commits (the resync it asked for) makes it usable again
            (m, E::ApplyFailed) => Ok(M::Unusable { committed: m.committed().unwrap_or(0) }),
            (M::Unusable { .. }, E::Committed { epoch, diverged: false }) => Ok(M::Replicating { committed: epoch }),
            (M::Unusable { .. }, E::Committed { epoch, diverged: true }) => Ok(M::Diverged { committed: epoch }),
            (M::Unusable { committed }, E::Command(Command::Failover) | E::Handover { .. }) => {
                Err(SecondaryRefusal::ReplicaUnusable { committed })
            }
            (M::Unusable { .. }, E::Command(Command::Unprotect)) => Err(SecondaryRefusal::NotPrimary),
            (M::Unusable { .. }, _) => Ok(self),
            // a planned switchover: take over at once (with a witness, by
            // its promote transaction), no heartbeat timeout
            (M::Claiming { .. }, E::Handover { .. }) => Ok(self),
            (m, E::Handover { epoch }) if m.committed() == Some(epoch) => Ok(if witness {
                M::Claiming { committed: epoch, forced: true }
            } else {
                M::Promoting { committed: epoch, forced: true }
            }),
            (m, E::Handover { epoch }) => {
                Err(SecondaryRefusal::HandoverEpoch { asked: epoch, committed: m.committed() })
            }
            (M::Claiming { committed, forced }, E::WitnessGranted) => Ok(M::Promoting { committed, forced }),
            (M::Claiming { committed, .. }, E::WitnessRefused) => Ok(M::Replicating { committed }),
            // the claim stands until the witness answers; later commits
            // (a primary that was only slow) move the epoch it starts from
            (M::Claiming { forced, .. }, E::Committed { epoch, .. }) => Ok(M::Claiming { committed: epoch, forced }),
            (M::Claiming { .. }, _) => Ok(self),
            (_, E::WitnessGranted | E::WitnessRefused) => Ok(self),
            (_, E::Committed { epoch, diverged: false }) => Ok(M::Replicating { committed: epoch }),
            (_, E::Committed { epoch, diverged: true }) => Ok(M::Diverged { committed: epoch }),
            (M::Waiting, E::PrimarySilent) => Ok(self),
            (M::Waiting, E::Command(Command::Failover)) => Err(SecondaryRefusal::NothingCommitted),
            (m, E::PrimarySilent) if witness => {
                Ok(M::Claiming { committed: m.committed().unwrap_or(0), forced: false })
            }
            (m, E::Command(Command::Failover)) if witness => {
                Ok(M::Claiming { committed: m.committed().unwrap_or(0), forced: true })
            }
            (m, E::PrimarySilent) => Ok(M::Promoting { committed: m.committed().unwrap_or(0), forced: false }),
            (m, E::Command(Command::Failover)) => {
                Ok(M::Promoting { committed: m.committed().unwrap_or(0), forced: true })
            }
            (_, E::Command(Command::Unprotect)) => Err(SecondaryRefusal::NotPrimary),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SecondaryEvent as E;
    use SecondaryMode as M;

    #[test]
    fn transitions() {
        let w = M::Waiting;
        assert_eq!(w.on(E::PrimarySilent), Ok(M::Waiting));
        assert_eq!(w.on(E::Command(Command::Failover)), Err(SecondaryRefusal::NothingCommitted));
        assert_eq!(w.on(E::Command(Command::Unprotect)), Err(SecondaryRefusal::NotPrimary));
        for m in [M::Waiting, M::Replicating { committed: 1 }, M::Claiming { committed: 1, forced: false }] {
            assert_eq!(m.on(E::Command(Command::Switchover)), Err(SecondaryRefusal::SwitchoverOnPrimary));
        }
        let r = w.on(E::Committed { epoch: 5, diverged: false }).unwrap();
        assert_eq!(r, M::Replicating { committed: 5 });
        let d = r.on(E::Committed { epoch: 6, diverged: true }).unwrap();
        assert_eq!(d.protection(), Protection::Diverged);
        assert_eq!(d.on(E::Committed { epoch: 7, diverged: false }), Ok(M::Replicating { committed: 7 }));
        let p = r.on(E::PrimarySilent).unwrap();
        assert_eq!(p, M::Promoting { committed: 5, forced: false });
        // a commit racing the takeover does not undo it
        assert_eq!(p.on(E::Committed { epoch: 6, diverged: false }), Ok(p));
        assert_eq!(p.on(E::Command(Command::Failover)), Err(SecondaryRefusal::Promoting));
        assert_eq!(r.on(E::Command(Command::Failover)), Ok(M::Promoting { committed: 5, forced: true }));
    }

    #[test]
    fn with_a_witness_only_its_grant_promotes() {
        let w = M::Waiting;
        assert_eq!(w.step(E::PrimarySilent, true), Ok(M::Waiting));
        assert_eq!(w.step(E::WitnessGranted, true), Ok(M::Waiting), "a stale grant promotes nothing");
        let r = M::Replicating { committed: 5 };
        let c = r.step(E::PrimarySilent, true).unwrap();
        assert_eq!(c, M::Claiming { committed: 5, forced: false });
        assert_eq!(c.protection(), Protection::Claiming);
        // the primary was only slow: commits go on, the claim stands
        let c = c.step(E::Committed { epoch: 6, diverged: false }, true).unwrap();
        assert_eq!(c, M::Claiming { committed: 6, forced: false });
        assert_eq!(c.step(E::Command(Command::Failover), true), Err(SecondaryRefusal::Promoting));
        assert_eq!(c.step(E::WitnessRefused, true), Ok(M::Replicating { committed: 6 }));
        assert_eq!(c.step(E::WitnessGranted, true), Ok(M::Promoting { committed: 6, forced: false }));
        let f = r.step(E::Command(Command::Failover), true).unwrap();
        assert_eq!(f.step(E::WitnessGranted, true), Ok(M::Promoting { committed: 5, forced: true }));
        let d = M::Diverged { committed: 3 };
        assert_eq!(d.step(E::PrimarySilent, true), Ok(M::Claiming { committed: 3, forced: false }));
    }

    #[test]
    fn a_torn_replica_is_never_taken_over_until_a_full_epoch_commits() {
        for witness in [false, true] {
            for m in [
                M::Replicating { committed: 4 },
                M::Diverged { committed: 4 },
                M::Claiming { committed: 4, forced: false },
            ] {
                let u = m.step(E::ApplyFailed, witness).unwrap();
                assert_eq!(u, M::Unusable { committed: 4 });
                assert_eq!(u.protection(), Protection::Unusable);
                assert_eq!(u.step(E::PrimarySilent, witness), Ok(u), "silence promotes nothing");
                assert_eq!(u.step(E::WitnessGranted, witness), Ok(u), "a late grant promotes nothing");
                let refused = Err(SecondaryRefusal::ReplicaUnusable { committed: 4 });
                assert_eq!(u.step(E::Command(Command::Failover), witness), refused);
                assert_eq!(u.step(E::Handover { epoch: 4 }, witness), refused);
                assert_eq!(u.step(E::Command(Command::Unprotect), witness), Err(SecondaryRefusal::NotPrimary));
                // the full resync commits
                assert_eq!(
                    u.step(E::Committed { epoch: 9, diverged: false }, witness),
                    Ok(M::Replicating { committed: 9 })
                );
            }
        }
        let p = M::Promoting { committed: 4, forced: false };
        assert_eq!(p.on(E::ApplyFailed), Ok(p), "a takeover under way is not undone (the failover checks the replica)");
    }

    #[test]
    fn a_handover_promotes_at_once_from_exactly_the_committed_epoch() {
        let r = M::Replicating { committed: 9 };
        assert_eq!(r.step(E::Handover { epoch: 9 }, false), Ok(M::Promoting { committed: 9, forced: true }));
        assert_eq!(r.step(E::Handover { epoch: 9 }, true), Ok(M::Claiming { committed: 9, forced: true }));
        let wrong = r.step(E::Handover { epoch: 8 }, true);
        assert_eq!(wrong, Err(SecondaryRefusal::HandoverEpoch { asked: 8, committed: Some(9) }));
        assert_eq!(
            M::Waiting.step(E::Handover { epoch: 1 }, false),
            Err(SecondaryRefusal::HandoverEpoch { asked: 1, committed: None })
        );
        let c = M::Claiming { committed: 9, forced: false };
        assert_eq!(c.step(E::Handover { epoch: 9 }, true), Ok(c), "a claim already running stands");
    }
}
