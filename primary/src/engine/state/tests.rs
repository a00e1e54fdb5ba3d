//! Tests of the engine's state: a table of transitions, and a property test
//! that holds it to the flags the engine kept before (`Directive` plus
//! `want_sync`, `want_full`, `finish`, `resume_guest`, `sync_final`,
//! `sync_until`, `sync_started_by_loss`) over any order of events.

use proptest::prelude::*;

use super::*;
use crate::mode::Resync;

use EngineCommand as C;
use EngineEvent as E;

fn protecting(sync: LiveSync) -> EngineState {
    EngineState::Protecting(Protecting { sync, sync_final_unacked: None, finishing: false, resuming: false })
}

fn boundary(epoch: u64, last: bool, acked: Option<u64>) -> EngineEvent {
    E::Boundary { epoch, last, acked }
}

/// (from, event, to, effects): one row per transition the engine relies on.
#[test]
fn transitions() {
    let idle = protecting(LiveSync::Idle);
    let due = protecting(LiveSync::Due { by_loss: false, full: false });
    let due_loss = protecting(LiveSync::Due { by_loss: true, full: false });
    let running = protecting(LiveSync::Running { full: false });
    let copied = protecting(LiveSync::Copied { full: false });
    let full_due = protecting(LiveSync::FullDue);
    let unacked = |e| {
        EngineState::Protecting(Protecting {
            sync: LiveSync::Idle,
            sync_final_unacked: Some(e),
            finishing: false,
            resuming: false,
        })
    };
    let finishing = EngineState::Protecting(Protecting { sync: LiveSync::Idle, finishing: true, ..Protecting::new() });
    let fx = Effects::default();
    let resume = Effects { resume_guest: true, ..fx };
    let reset = Effects { reset_sync_pauses: true, ..fx };
    let count = Effects { sync_pause: true, ..fx };
    let handing_over = EngineState::HandingOver(Protecting { sync: LiveSync::Idle, ..Protecting::new() });
    let resuming = EngineState::Protecting(Protecting { sync: LiveSync::Idle, resuming: true, ..Protecting::new() });
    let rows: Vec<(EngineState, EngineEvent, EngineState, Effects)> = vec![
        // a session starts with a live sync, whatever the replica holds
        (EngineState::Alone, E::Command(C::Protect(Resync::IntoEmpty)), due, fx),
        (EngineState::Holding, E::Command(C::Protect(Resync::BesideCommitted)), due, fx),
        (due, E::Command(C::Hold), EngineState::Holding, fx),
        (running, E::Command(C::Alone), EngineState::Alone, fx),
        // the sync: started, copied, ended by the next boundary
        (due, E::SyncStarted, running, reset),
        (due_loss, E::SyncStarted, running, fx),
        (running, E::SyncCopied, copied, fx),
        (copied, boundary(7, false, Some(3)), unacked(7), count),
        (unacked(7), boundary(8, false, Some(6)), unacked(7), count),
        (unacked(7), boundary(9, false, Some(7)), idle, fx),
        // a sync the session abandoned, or one whose attempts all lost
        // their tracking (the next epoch is a full one)
        (running, E::SyncAbandoned, idle, fx),
        (running, E::SyncLostEveryAttempt, full_due, fx),
        (protecting(LiveSync::Running { full: true }), E::SyncAbandoned, full_due, fx),
        (full_due, boundary(4, false, None), idle, fx),
        // a resync the secondary asks for, while syncing or not
        (idle, E::Command(C::LiveResync), due, fx),
        (running, E::Command(C::LiveResync), due, fx),
        (full_due, E::Command(C::LiveResync), protecting(LiveSync::Due { by_loss: false, full: true }), fx),
        (EngineState::Holding, E::Command(C::LiveResync), EngineState::Holding, fx),
        // a lost collection: not shipped, a live resync follows
        (idle, E::CollectionLost, due_loss, fx),
        // a switchover: the last boundary hands over; refused, it resumes
        (idle, E::Command(C::Finish), finishing, fx),
        (EngineState::Alone, E::Command(C::Finish), EngineState::Alone, fx),
        (finishing, boundary(5, true, Some(4)), handing_over, fx),
        (handing_over, E::Command(C::LiveResync), handing_over, fx),
        (handing_over, E::Command(C::Resume), resuming, fx),
        (handing_over, E::Command(C::Hold), EngineState::Holding, fx),
        (resuming, E::WaitEnded, idle, resume),
        (idle, E::WaitEnded, idle, fx),
        // the engine's own progress changes nothing once it stopped protecting
        (EngineState::Holding, E::SyncCopied, EngineState::Holding, fx),
        (EngineState::Alone, boundary(3, false, None), EngineState::Alone, fx),
    ];
    for (i, (from, event, to, effects)) in rows.into_iter().enumerate() {
        let mut s = from;
        let got = s.step(event);
        assert_eq!((s, got), (to, effects), "row {i}: {from:?} + {event:?}");
    }
}

#[test]
fn queries() {
    assert!(protecting(LiveSync::Idle).protecting());
    assert!(!EngineState::HandingOver(Protecting::new()).protecting());
    assert!(EngineState::HandingOver(Protecting::new()).keeps_guest_paused());
    assert!(EngineState::Holding.keeps_guest_paused());
    assert!(!EngineState::Alone.keeps_guest_paused());
    assert!(EngineState::Alone.alone());
    assert!(protecting(LiveSync::Copied { full: true }).full_due());
    assert!(!protecting(LiveSync::Copied { full: false }).full_due());
    assert!(EngineState::Holding.sync_interrupted());
    assert!(protecting(LiveSync::Due { by_loss: false, full: false }).sync_interrupted());
    assert!(!protecting(LiveSync::Running { full: false }).sync_interrupted());
}

/// The engine's flags as they were, applied as the engine applied them.
///
/// Leftovers of the flags are dropped at the points where the state type
/// drops them, so the comparison is exact elsewhere: `sync_started_by_loss`,
/// `resume_guest` and `sync_until` outliving a `Hold` or `Alone` (a later
/// session's sync then kept the old sync's longest pause, resumed a guest
/// its live sync resumes anyway, or counted pauses against an epoch the
/// new session's start counts as acknowledged; the core sends `Resume` only
/// right after the last boundary, never after a `Hold`), and `sync_final`
/// outliving a resync started before the boundary that ends the first sync
/// (the sync's longest pause then counted one more epoch after a full one).
/// All of them touch only the `sync_max_pause_us` figure or a resume that
/// happens anyway.
#[derive(Debug, Default)]
struct Flags {
    protect: bool,
    hold: bool,
    want_sync: bool,
    want_full: bool,
    finish: bool,
    resume_guest: bool,
    sync_final: bool,
    sync_until: Option<u64>,
    by_loss: bool,
}

impl Flags {
    fn command(&mut self, c: EngineCommand) {
        match c {
            C::Protect(_) => {
                (self.protect, self.hold) = (true, false);
                self.want_sync = true;
                self.want_full = false;
                self.sync_final = false; // dropped (see above)
            }
            C::Hold | C::Alone => {
                (self.protect, self.hold) = (false, c == C::Hold);
                self.want_sync = false;
                self.want_full = false;
                self.finish = false;
                // dropped (see above)
                (self.by_loss, self.resume_guest, self.sync_final) = (false, false, false);
                self.sync_until = None;
            }
            C::Finish => self.finish = self.protect,
            C::Resume => {
                (self.protect, self.hold) = (true, false);
                self.finish = false;
                self.resume_guest = true;
            }
            C::LiveResync => {
                if self.protect {
                    self.want_sync = true;
                    self.sync_final = false; // dropped (see above)
                }
            }
        }
    }

    fn full_due(&self) -> bool {
        self.protect && self.want_full
    }
}

#[derive(Debug, Clone)]
enum Gen {
    Command(u8),
    Wait,
    /// A boundary; `true`: its collection was lost.
    Boundary(bool),
    Ack(u8),
    /// A live sync, with these commands arriving while it copies, ending
    /// (0 copied, 1 abandoned, 2 every attempt lost).
    Sync(Vec<u8>, u8),
}

fn command(i: u8) -> EngineCommand {
    match i % 7 {
        0 => C::Protect(Resync::IntoEmpty),
        1 => C::Protect(Resync::BesideCommitted),
        2 => C::Hold,
        3 => C::Alone,
        4 => C::Finish,
        5 => C::Resume,
        _ => C::LiveResync,
    }
}

fn gen() -> impl Strategy<Value = Gen> {
    prop_oneof![
        4 => any::<u8>().prop_map(Gen::Command),
        2 => Just(Gen::Wait),
        4 => any::<bool>().prop_map(Gen::Boundary),
        2 => any::<u8>().prop_map(Gen::Ack),
        3 => (proptest::collection::vec(any::<u8>(), 0..3), 0u8..3).prop_map(|(c, e)| Gen::Sync(c, e)),
    ]
}

fn check(s: &EngineState, f: &Flags) {
    assert_eq!(s.protecting(), f.protect, "{s:?} {f:?}");
    assert_eq!(s.alone(), !f.protect && !f.hold, "{s:?} {f:?}");
    assert_eq!(s.keeps_guest_paused(), f.hold, "{s:?} {f:?}");
    assert_eq!(s.finishing(), f.finish, "{s:?} {f:?}");
    if f.protect {
        assert_eq!(s.sync_due(), f.want_sync, "{s:?} {f:?}");
        assert_eq!(s.full_due(), f.full_due(), "{s:?} {f:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Any order of events: the state answers every question the epoch loop
    /// asks as the flags did, and its effects are the flags' effects.
    #[test]
    fn same_as_the_flags(events in proptest::collection::vec(gen(), 0..60)) {
        let mut s = EngineState::Alone;
        let mut f = Flags::default();
        let (mut next_epoch, mut acked) = (0u64, None::<u64>);
        for g in events {
            match g {
                Gen::Command(i) => {
                    let c = command(i);
                    if matches!(c, C::Protect(_)) && !f.protect {
                        // a session starts: the replicator counts every
                        // epoch before it as acknowledged
                        acked = next_epoch.checked_sub(1);
                    }
                    f.command(c);
                    prop_assert_eq!(s.step(E::Command(c)), Effects::default());
                }
                Gen::Wait => {
                    let old = std::mem::take(&mut f.resume_guest) && f.protect;
                    prop_assert_eq!(s.step(E::WaitEnded).resume_guest, old);
                }
                Gen::Ack(n) => {
                    if next_epoch > 0 {
                        acked = acked.max(Some(u64::from(n) % next_epoch));
                    }
                }
                Gen::Boundary(lost) => {
                    if !f.protect {
                        continue;
                    }
                    let last = std::mem::take(&mut f.finish);
                    let epoch = next_epoch;
                    if lost && !last && !f.want_full {
                        f.by_loss = true;
                        f.want_sync = true;
                        f.sync_final = false; // dropped (see above)
                        prop_assert_eq!(s.step(E::CollectionLost), Effects::default());
                    } else {
                        f.want_full = false;
                        next_epoch += 1;
                        if std::mem::take(&mut f.sync_final) {
                            f.sync_until = Some(epoch);
                        }
                        let mut count = false;
                        if let Some(e) = f.sync_until {
                            if acked.map_or(0, |a| a + 1) > e && epoch > e {
                                f.sync_until = None;
                            } else {
                                count = true;
                            }
                        }
                        if last {
                            (f.protect, f.hold) = (false, true);
                        }
                        let fx = s.step(boundary(epoch, last, acked));
                        prop_assert_eq!(fx.sync_pause, count);
                    }
                }
                Gen::Sync(during, end) => {
                    if !(f.protect && f.want_sync) {
                        continue;
                    }
                    f.want_sync = false;
                    let reset = !std::mem::take(&mut f.by_loss);
                    prop_assert_eq!(s.step(E::SyncStarted).reset_sync_pauses, reset);
                    for i in during {
                        f.command(command(i));
                        s.step(E::Command(command(i)));
                    }
                    // the engine abandons a sync the session interrupted
                    let interrupted = !f.protect || f.want_sync;
                    prop_assert_eq!(s.sync_interrupted(), interrupted);
                    match if interrupted { 1 } else { end } {
                        0 => {
                            f.sync_final = true;
                            s.step(E::SyncCopied);
                        }
                        1 => {
                            s.step(E::SyncAbandoned);
                        }
                        _ => {
                            f.want_full = true;
                            s.step(E::SyncLostEveryAttempt);
                        }
                    }
                }
            }
            check(&s, &f);
        }
    }
}
