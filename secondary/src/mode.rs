//! The secondary's mode, without I/O: one value, changed only by
//! [`SecondaryMode::step`] (or [`SecondaryMode::on`], without a witness)
//! with the event that caused it.

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
    /// `claim`: a claim that was under way when the apply failed. Its
    /// answer still counts: etcd may already have moved the term to us, so
    /// a grant is kept, and the takeover runs as soon as a full epoch
    /// repairs the replica (the primary, which does not know yet, keeps
    /// replicating until then; its next witness transaction fences it).
    Unusable { committed: u64, claim: Option<Claim> },
    /// With a witness: asking it to let us take over (its answer decides).
    Claiming { committed: u64, claim: Claim },
    /// Taking over (forced, or the primary went silent). `term`: the term a
    /// witness granted the claim from (the new generation is `term + 1`);
    /// `None` without a witness.
    Promoting { committed: u64, forced: bool, term: Option<u64> },
}

/// A takeover claim put to the witness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// The term claimed from: the witness moves it to `term + 1` for us.
    pub term: u64,
    /// An operator's failover or a handover (not silence).
    pub forced: bool,
    pub ask: Ask,
}

/// Where a claim's request to the witness stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// To be sent now.
    Due,
    /// Sent; no answer yet.
    InFlight,
    /// The witness did not answer (the outcome is unknown: the request
    /// may have been applied); asked again after a pause (the request is
    /// idempotent).
    Backoff,
    /// Granted: the witness moved the term to `term + 1` for this node.
    Granted,
}

/// The witness's answer to a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WitnessAnswer {
    Granted,
    /// Refused: the primary ran alone, or the term moved on.
    Refused,
    /// An earlier request of ours was applied first: ask again.
    Superseded,
    /// No answer (etcd down or slow).
    Unreachable,
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
    /// The claim from `term` was sent to the witness.
    ClaimSent {
        term: u64,
    },
    /// A claim's pause after an unanswered request is over.
    ClaimRetry,
    /// The witness answered the claim from `term`.
    Witness {
        term: u64,
        answer: WitnessAnswer,
    },
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
            | SecondaryMode::Unusable { committed, .. }
            | SecondaryMode::Claiming { committed, .. }
            | SecondaryMode::Promoting { committed, .. } => Some(committed),
        }
    }

    /// The claim under way, if any.
    pub fn claim(&self) -> Option<Claim> {
        match *self {
            SecondaryMode::Claiming { claim, .. } => Some(claim),
            SecondaryMode::Unusable { claim, .. } => claim,
            _ => None,
        }
    }

    /// The next mode without a witness (the two-node rule). A refused event
    /// changes nothing. Silence before the first commit is no reason to take
    /// over (there is nothing to run).
    pub fn on(self, e: SecondaryEvent) -> Result<SecondaryMode, SecondaryRefusal> {
        self.step(e, None)
    }

    /// The next mode; `witness`: the term in force when a witness decides
    /// takeovers. Then silence or a forced failover starts a claim from that
    /// term, every answer of the witness is an event here, and only its
    /// grant turns the claim into a takeover; a grant is never lost,
    /// whatever mode it lands in.
    pub fn step(self, e: SecondaryEvent, witness: Option<u64>) -> Result<SecondaryMode, SecondaryRefusal> {
        use SecondaryEvent as E;
        use SecondaryMode as M;
        match (self, e) {
            (_, E::Command(Command::Switchover)) => Err(SecondaryRefusal::SwitchoverOnPrimary),
            (M::Promoting { .. } | M::Claiming { .. }, E::Command(Command::Failover)) => {
                Err(SecondaryRefusal::Promoting)
            }
            (M::Promoting { .. }, _) => Ok(self),
            // a torn replica: nothing may run from it; only a full epoch
            // that commits (the resync it asked for) makes it usable again.
            // A claim under way stays: its answer may move the term.
            (m, E::ApplyFailed) => Ok(M::Unusable { committed: m.committed().unwrap_or(0), claim: m.claim() }),
            (M::Unusable { claim, .. }, E::Committed { epoch, diverged }) => Ok(match claim {
                Some(c) if c.ask == Ask::Granted => {
                    M::Promoting { committed: epoch, forced: c.forced, term: Some(c.term) }
                }
                Some(c) => M::Claiming { committed: epoch, claim: c },
                None if diverged => M::Diverged { committed: epoch },
                None => M::Replicating { committed: epoch },
            }),
            (M::Unusable { committed, .. }, E::Command(Command::Failover) | E::Handover { .. }) => {
                Err(SecondaryRefusal::ReplicaUnusable { committed })
            }
            (M::Unusable { .. }, E::Command(Command::Unprotect)) => Err(SecondaryRefusal::NotPrimary),
            (M::Unusable { committed, claim: Some(c) }, e) => {
                let claim = match claim_step(c, e) {
                    Next::Claim(c) => Some(c),
                    // refused: the primary may run alone; nothing to keep
                    Next::Refused => None,
                    // granted: kept until the replica is repaired
                    Next::Granted => Some(Claim { ask: Ask::Granted, ..c }),
                };
                Ok(M::Unusable { committed, claim })
            }
            (M::Unusable { .. }, _) => Ok(self),
            // a planned switchover: take over at once (with a witness, by
            // its promote transaction), no heartbeat timeout
            (M::Claiming { .. }, E::Handover { .. }) => Ok(self),
            (m, E::Handover { epoch }) if m.committed() == Some(epoch) => Ok(match witness {
                Some(term) => M::Claiming { committed: epoch, claim: Claim { term, forced: true, ask: Ask::Due } },
                None => M::Promoting { committed: epoch, forced: true, term: None },
            }),
            (m, E::Handover { epoch }) => {
                Err(SecondaryRefusal::HandoverEpoch { asked: epoch, committed: m.committed() })
            }
            // the claim stands until the witness answers; later commits
            // (a primary that was only slow) move the epoch it starts from
            (M::Claiming { claim, .. }, E::Committed { epoch, .. }) => Ok(M::Claiming { committed: epoch, claim }),
            (M::Claiming { committed, claim }, e) => Ok(match claim_step(claim, e) {
                Next::Claim(claim) => M::Claiming { committed, claim },
                Next::Refused => M::Replicating { committed },
                Next::Granted => M::Promoting { committed, forced: claim.forced, term: Some(claim.term) },
            }),
            // an answer with no claim under way (a stale one) changes nothing
            (_, E::Witness { .. } | E::ClaimSent { .. } | E::ClaimRetry) => Ok(self),
            (_, E::Committed { epoch, diverged: false }) => Ok(M::Replicating { committed: epoch }),
            (_, E::Committed { epoch, diverged: true }) => Ok(M::Diverged { committed: epoch }),
            (M::Waiting, E::PrimarySilent) => Ok(self),
            (M::Waiting, E::Command(Command::Failover)) => Err(SecondaryRefusal::NothingCommitted),
            (m, E::PrimarySilent | E::Command(Command::Failover)) => {
                let forced = e != E::PrimarySilent;
                let committed = m.committed().unwrap_or(0);
                Ok(match witness {
                    Some(term) => M::Claiming { committed, claim: Claim { term, forced, ask: Ask::Due } },
                    None => M::Promoting { committed, forced, term: None },
                })
            }
            (_, E::Command(Command::Unprotect)) => Err(SecondaryRefusal::NotPrimary),
        }
    }
}

/// Where a claim goes on an event.
enum Next {
    Claim(Claim),
    Refused,
    Granted,
}

/// A claim's own steps: sending, retrying, and the answers to it (an
/// answer to another term's claim is stale and changes nothing).
fn claim_step(c: Claim, e: SecondaryEvent) -> Next {
    use SecondaryEvent as E;
    match (c.ask, e) {
        (Ask::Due, E::ClaimSent { term }) if term == c.term => Next::Claim(Claim { ask: Ask::InFlight, ..c }),
        (Ask::Backoff, E::ClaimRetry) => Next::Claim(Claim { ask: Ask::Due, ..c }),
        (Ask::Granted, _) => Next::Claim(c),
        (_, E::Witness { term, answer }) if term == c.term => match answer {
            WitnessAnswer::Granted => Next::Granted,
            WitnessAnswer::Refused => Next::Refused,
            WitnessAnswer::Superseded => Next::Claim(Claim { ask: Ask::Due, ..c }),
            WitnessAnswer::Unreachable => Next::Claim(Claim { ask: Ask::Backoff, ..c }),
        },
        _ => Next::Claim(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use SecondaryEvent as E;
    use SecondaryMode as M;

    const W: Option<u64> = Some(5);

    fn claim(term: u64, forced: bool, ask: Ask) -> Claim {
        Claim { term, forced, ask }
    }

    fn answer(term: u64, answer: WitnessAnswer) -> E {
        E::Witness { term, answer }
    }

    #[test]
    fn transitions() {
        let w = M::Waiting;
        assert_eq!(w.on(E::PrimarySilent), Ok(M::Waiting));
        assert_eq!(w.on(E::Command(Command::Failover)), Err(SecondaryRefusal::NothingCommitted));
        assert_eq!(w.on(E::Command(Command::Unprotect)), Err(SecondaryRefusal::NotPrimary));
        for m in [
            M::Waiting,
            M::Replicating { committed: 1 },
            M::Claiming { committed: 1, claim: claim(5, false, Ask::InFlight) },
        ] {
            assert_eq!(m.on(E::Command(Command::Switchover)), Err(SecondaryRefusal::SwitchoverOnPrimary));
        }
        let r = w.on(E::Committed { epoch: 5, diverged: false }).unwrap();
        assert_eq!(r, M::Replicating { committed: 5 });
        let d = r.on(E::Committed { epoch: 6, diverged: true }).unwrap();
        assert_eq!(d.protection(), Protection::Diverged);
        assert_eq!(d.on(E::Committed { epoch: 7, diverged: false }), Ok(M::Replicating { committed: 7 }));
        let p = r.on(E::PrimarySilent).unwrap();
        assert_eq!(p, M::Promoting { committed: 5, forced: false, term: None });
        // a commit racing the takeover does not undo it
        assert_eq!(p.on(E::Committed { epoch: 6, diverged: false }), Ok(p));
        assert_eq!(p.on(E::Command(Command::Failover)), Err(SecondaryRefusal::Promoting));
        assert_eq!(r.on(E::Command(Command::Failover)), Ok(M::Promoting { committed: 5, forced: true, term: None }));
    }

    #[test]
    fn with_a_witness_only_its_grant_promotes() {
        let w = M::Waiting;
        assert_eq!(w.step(E::PrimarySilent, W), Ok(M::Waiting));
        assert_eq!(w.step(answer(5, WitnessAnswer::Granted), W), Ok(M::Waiting), "a stale grant promotes nothing");
        let r = M::Replicating { committed: 5 };
        let c = r.step(E::PrimarySilent, W).unwrap();
        assert_eq!(c, M::Claiming { committed: 5, claim: claim(5, false, Ask::Due) });
        assert_eq!(c.protection(), Protection::Claiming);
        let c = c.step(E::ClaimSent { term: 5 }, W).unwrap();
        assert_eq!(c.claim().map(|c| c.ask), Some(Ask::InFlight));
        // the primary was only slow: commits go on, the claim stands
        let c = c.step(E::Committed { epoch: 6, diverged: false }, W).unwrap();
        assert_eq!(c, M::Claiming { committed: 6, claim: claim(5, false, Ask::InFlight) });
        assert_eq!(c.step(E::Command(Command::Failover), W), Err(SecondaryRefusal::Promoting));
        assert_eq!(c.step(answer(5, WitnessAnswer::Refused), W), Ok(M::Replicating { committed: 6 }));
        assert_eq!(c.step(answer(4, WitnessAnswer::Granted), W), Ok(c), "another claim's answer is stale");
        assert_eq!(
            c.step(answer(5, WitnessAnswer::Granted), W),
            Ok(M::Promoting { committed: 6, forced: false, term: Some(5) })
        );
        // no answer: ask again after a pause; superseded: at once
        let b = c.step(answer(5, WitnessAnswer::Unreachable), W).unwrap();
        assert_eq!(b.claim().map(|c| c.ask), Some(Ask::Backoff));
        assert_eq!(b.step(E::ClaimRetry, W).unwrap().claim().map(|c| c.ask), Some(Ask::Due));
        let s = c.step(answer(5, WitnessAnswer::Superseded), W).unwrap();
        assert_eq!(s.claim().map(|c| c.ask), Some(Ask::Due));
        let f = r.step(E::Command(Command::Failover), W).unwrap();
        assert_eq!(f, M::Claiming { committed: 5, claim: claim(5, true, Ask::Due) });
        assert_eq!(
            f.step(answer(5, WitnessAnswer::Granted), W),
            Ok(M::Promoting { committed: 5, forced: true, term: Some(5) })
        );
        let d = M::Diverged { committed: 3 };
        assert_eq!(d.step(E::PrimarySilent, W), Ok(M::Claiming { committed: 3, claim: claim(5, false, Ask::Due) }));
    }

    #[test]
    fn a_torn_replica_is_never_taken_over_until_a_full_epoch_commits() {
        for witness in [None, W] {
            for m in [M::Replicating { committed: 4 }, M::Diverged { committed: 4 }] {
                let u = m.step(E::ApplyFailed, witness).unwrap();
                assert_eq!(u, M::Unusable { committed: 4, claim: None });
                assert_eq!(u.protection(), Protection::Unusable);
                assert_eq!(u.step(E::PrimarySilent, witness), Ok(u), "silence promotes nothing");
                assert_eq!(u.step(answer(5, WitnessAnswer::Granted), witness), Ok(u), "no claim: a stale grant");
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
        let p = M::Promoting { committed: 4, forced: false, term: None };
        assert_eq!(p.on(E::ApplyFailed), Ok(p), "a takeover under way is not undone (the failover checks the replica)");
    }

    /// Issue 28, item 5: a grant that lands while the replica is torn was
    /// swallowed (`(Unusable, _) => Ok(self)`), after etcd had moved the
    /// term and deleted `sync`: the secondary never promoted, the primary
    /// was fenced at its next transaction, the guest was down. Now the
    /// claim rides in the mode: the grant is kept and the takeover runs
    /// from the first epoch that repairs the replica.
    #[test]
    fn a_grant_while_the_replica_is_torn_is_kept_until_it_is_repaired() {
        let c = M::Claiming { committed: 4, claim: claim(5, false, Ask::InFlight) };
        let u = c.step(E::ApplyFailed, W).unwrap();
        assert_eq!(u, M::Unusable { committed: 4, claim: Some(claim(5, false, Ask::InFlight)) });
        let g = u.step(answer(5, WitnessAnswer::Granted), W).unwrap();
        assert_eq!(g, M::Unusable { committed: 4, claim: Some(claim(5, false, Ask::Granted)) });
        assert_eq!(g.step(E::PrimarySilent, W), Ok(g));
        assert_eq!(g.step(answer(5, WitnessAnswer::Refused), W), Ok(g), "a grant is final");
        assert_eq!(g.step(E::Command(Command::Failover), W), Err(SecondaryRefusal::ReplicaUnusable { committed: 4 }));
        assert_eq!(
            g.step(E::Committed { epoch: 9, diverged: false }, W),
            Ok(M::Promoting { committed: 9, forced: false, term: Some(5) })
        );
        // refused while torn: the claim is gone; repaired, it replicates
        let r = u.step(answer(5, WitnessAnswer::Refused), W).unwrap();
        assert_eq!(r, M::Unusable { committed: 4, claim: None });
        // unanswered while torn: asked again (the answer decides), and a
        // repair before the answer goes back to claiming
        let b = u.step(answer(5, WitnessAnswer::Unreachable), W).unwrap();
        assert_eq!(b.claim().map(|c| c.ask), Some(Ask::Backoff));
        assert_eq!(
            b.step(E::Committed { epoch: 9, diverged: false }, W),
            Ok(M::Claiming { committed: 9, claim: claim(5, false, Ask::Backoff) })
        );
    }

    #[test]
    fn a_handover_promotes_at_once_from_exactly_the_committed_epoch() {
        let r = M::Replicating { committed: 9 };
        assert_eq!(r.step(E::Handover { epoch: 9 }, None), Ok(M::Promoting { committed: 9, forced: true, term: None }));
        assert_eq!(
            r.step(E::Handover { epoch: 9 }, W),
            Ok(M::Claiming { committed: 9, claim: claim(5, true, Ask::Due) })
        );
        let wrong = r.step(E::Handover { epoch: 8 }, W);
        assert_eq!(wrong, Err(SecondaryRefusal::HandoverEpoch { asked: 8, committed: Some(9) }));
        assert_eq!(
            M::Waiting.step(E::Handover { epoch: 1 }, None),
            Err(SecondaryRefusal::HandoverEpoch { asked: 1, committed: None })
        );
        let c = M::Claiming { committed: 9, claim: claim(5, false, Ask::InFlight) };
        assert_eq!(c.step(E::Handover { epoch: 9 }, W), Ok(c), "a claim already running stands");
    }

    fn event() -> impl Strategy<Value = SecondaryEvent> {
        let answers = prop_oneof![
            Just(WitnessAnswer::Granted),
            Just(WitnessAnswer::Refused),
            Just(WitnessAnswer::Superseded),
            Just(WitnessAnswer::Unreachable)
        ];
        prop_oneof![
            (1u64..30, any::<bool>()).prop_map(|(epoch, diverged)| E::Committed { epoch, diverged }),
            Just(E::PrimarySilent),
            Just(E::Command(Command::Failover)),
            Just(E::Command(Command::Unprotect)),
            (4u64..7).prop_map(|term| E::ClaimSent { term }),
            Just(E::ClaimRetry),
            (4u64..7, answers).prop_map(|(term, answer)| E::Witness { term, answer }),
            (1u64..30).prop_map(|epoch| E::Handover { epoch }),
            Just(E::ApplyFailed),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Whatever the order of events: a grant of the claim under way is
        /// never lost (from then on the node is taking over, or holds the
        /// grant while its replica is torn, and the first commit takes it
        /// over); only a grant promotes with a witness; a takeover is
        /// never undone; and a torn replica never promotes.
        #[test]
        fn a_grant_is_never_lost_in_any_mode(events in proptest::collection::vec(event(), 1..60)) {
            let mut m = M::Waiting;
            let mut granted: Option<u64> = None;
            for e in events {
                let before = m;
                let Ok(next) = m.step(e, W) else { continue };
                let claim_term = before.claim().filter(|c| c.ask != Ask::Granted).map(|c| c.term);
                if let E::Witness { term, answer: WitnessAnswer::Granted } = e {
                    if claim_term == Some(term) {
                        granted = Some(term);
                    }
                }
                if let M::Promoting { term, .. } = next {
                    prop_assert!(term.is_some(), "promoted without the witness: {before:?} on {e:?}");
                    prop_assert_eq!(term, granted, "promoted on another term's grant");
                    prop_assert!(!matches!(before, M::Unusable { .. }) || matches!(e, E::Committed { .. }), "a torn replica promoted: {before:?} on {e:?}");
                }
                if matches!(before, M::Promoting { .. }) {
                    prop_assert_eq!(next, before, "a takeover was undone");
                }
                if let Some(t) = granted {
                    let holds = match next {
                        M::Promoting { term, .. } => term == Some(t),
                        M::Unusable { claim: Some(c), .. } => c.term == t && c.ask == Ask::Granted,
                        _ => false,
                    };
                    prop_assert!(holds, "the grant of term {t} was lost: {before:?} on {e:?} gave {next:?}");
                }
                m = next;
            }
        }
    }
}
