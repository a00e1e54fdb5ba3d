//! Tests of the primary's state machine: a table of transitions and a
//! property test over any order of events.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::state::Output;
use proptest::prelude::*;

use super::*;

const GRACE: Duration = Duration::from_millis(300);

fn out(id: u32) -> Output {
    Output::Mark { cpu: 0, value: id }
}

fn id(o: &Output) -> u32 {
    match o {
        Output::Mark { value, .. } => *value,
        other => panic!("unexpected output {other:?}"),
    }
}

fn lost() -> Event {
    Event::SessionLost(Loss::Closed("data"))
}

#[test]
fn unprotect_while_protected_is_refused_and_not_kept_for_later() {
    // read-through defect: an `unprotect` sent while the pair was healthy was
    // answered ok, queued, and fired at the next hold
    let t = Instant::now();
    let mut c = Core::new();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::Live, peer: "s".into() }, t).unwrap();
    assert_eq!(c.on(Event::Command(Command::Unprotect), t), Err(Refusal::NotHolding(Protection::Syncing)));
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    c.on(Event::Ack { epoch: 1 }, t).unwrap();
    assert_eq!(c.on(Event::Command(Command::Unprotect), t), Err(Refusal::NotHolding(Protection::Protected)));
    c.on(Event::Epoch { epoch: 2, outputs: vec![out(2)] }, t).unwrap();
    let s = c.on(lost(), t).unwrap();
    assert_eq!(s.engine, Some(EngineCommand::Hold));
    assert!(s.release.is_empty());
    // time passes with no refused dial: the hold stands, nothing leaves
    let s = c.on(Event::Tick, t + GRACE * 10).unwrap();
    assert!(s.release.is_empty() && s.engine.is_none());
    assert_eq!(c.mode().protection(), Protection::Holding);
    assert_eq!(c.held_count(), 1);
}

#[test]
fn reprotection_after_a_hold_is_one_command_and_releases_only_with_an_ack() {
    // read-through defect: re-protection cleared `hold` before setting
    // `protected`, and an engine reading between the two ran an unprotected
    // epoch that released output. Now the engine gets one command.
    let t = Instant::now();
    let mut c = Core::new();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::Live, peer: "s".into() }, t).unwrap();
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    c.on(lost(), t).unwrap();
    // an unprotected epoch the engine ran before it saw Hold, then one of hold
    assert!(c.on(Event::Released(vec![out(2)]), t).unwrap().release.is_empty());
    assert!(c.on(Event::Epoch { epoch: 3, outputs: vec![out(3)] }, t).unwrap().release.is_empty());
    let s = c.on(Event::SessionUp { next_epoch: 4, resync: Resync::Full, peer: "s".into() }, t).unwrap();
    assert_eq!(s, Step { engine: Some(EngineCommand::Protect(Resync::Full)), ..Step::default() });
    // an unprotected epoch racing the Protect command waits for an ack too
    assert!(c.on(Event::Released(vec![out(4)]), t).unwrap().release.is_empty());
    c.on(Event::Epoch { epoch: 5, outputs: vec![out(5)] }, t).unwrap();
    let s = c.on(Event::Ack { epoch: 5 }, t).unwrap();
    let ids: BTreeSet<u32> = s.release.iter().map(id).collect();
    assert_eq!(ids, (1..=5).collect());
    assert_eq!(c.mode(), &Mode::Protected);
}

#[test]
fn without_a_witness_only_the_same_secondary_or_the_operator_ends_a_hold() {
    // read-through defect (issue 11): a refused port for the fence grace
    // ended a hold, but a promoted node that crashed refuses too
    let t = Instant::now();
    let mut c = Core::new();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::Live, peer: "s".into() }, t).unwrap();
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    c.on(lost(), t).unwrap();
    assert!(c.on(Event::Tick, t + GRACE * 100).unwrap().release.is_empty());
    assert_eq!(c.mode().protection(), Protection::Holding);
    // another secondary proves nothing about the one we lost
    let other = Event::SessionUp { next_epoch: 2, resync: Resync::Live, peer: "t".into() };
    assert_eq!(c.on(other, t), Err(Refusal::HoldingFor("s".into())));
    assert_eq!(c.mode().protection(), Protection::Holding);
    // the same one back (its generation showed it did not take over)
    c.on(Event::SessionUp { next_epoch: 2, resync: Resync::Full, peer: "s".into() }, t).unwrap();
    c.on(Event::Epoch { epoch: 2, outputs: vec![out(2)] }, t).unwrap();
    let ids: Vec<u32> = c.on(Event::Ack { epoch: 2 }, t).unwrap().release.iter().map(id).collect();
    assert_eq!(ids, vec![1, 2]);
    // or the operator's word
    c.on(lost(), t).unwrap();
    c.on(Event::Epoch { epoch: 3, outputs: vec![out(3)] }, t).unwrap();
    let s = c.on(Event::Command(Command::Unprotect), t).unwrap();
    assert_eq!(s.engine, Some(EngineCommand::Alone));
    assert_eq!(s.release, vec![out(3)]);
    // once unprotected, any secondary may protect it
    c.on(Event::SessionUp { next_epoch: 4, resync: Resync::Live, peer: "t".into() }, t).unwrap();
}

#[test]
fn fenced_discards_and_refuses_everything() {
    let t = Instant::now();
    let mut c = Core::new();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::Live, peer: "s".into() }, t).unwrap();
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    assert_eq!(c.on(Event::Fenced { by: 2 }, t).unwrap().engine, Some(EngineCommand::Hold));
    assert_eq!(c.held_count(), 0);
    assert!(c.on(Event::Ack { epoch: 1 }, t).unwrap().release.is_empty());
    assert_eq!(c.on(Event::Command(Command::Unprotect), t), Err(Refusal::Fenced(2)));
    assert_eq!(
        c.on(Event::SessionUp { next_epoch: 2, resync: Resync::Live, peer: "s".into() }, t),
        Err(Refusal::Fenced(2))
    );
    assert!(c.on(Event::Released(vec![out(2)]), t).unwrap().release.is_empty());
    assert_eq!(c.mode(), &Mode::Fenced { by: 2 });
}

#[test]
fn the_primary_refuses_a_forced_failover() {
    let mut c = Core::new();
    assert_eq!(c.on(Event::Command(Command::Failover), Instant::now()), Err(Refusal::IsPrimary));
    assert_eq!(c.mode(), &Mode::Unprotected);
}

fn up(c: &mut Core, t: Instant) {
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::Live, peer: "s".into() }, t).unwrap();
}

#[test]
fn a_switchover_hands_over_only_once_the_last_epoch_is_acked_and_then_releases_nothing() {
    let t = Instant::now();
    let mut c = Core::new();
    let sw = Event::Command(Command::Switchover);
    assert_eq!(c.on(sw.clone(), t), Err(Refusal::NotProtected(Protection::Unprotected)));
    up(&mut c, t);
    assert_eq!(c.on(sw.clone(), t), Err(Refusal::NotProtected(Protection::Syncing)));
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    c.on(Event::Ack { epoch: 1 }, t).unwrap();
    c.on(Event::Epoch { epoch: 2, outputs: vec![out(2)] }, t).unwrap();
    let s = c.on(sw.clone(), t).unwrap();
    assert_eq!(s.engine, Some(EngineCommand::Finish));
    assert_eq!(c.mode().protection(), Protection::HandingOver);
    assert_eq!(c.on(sw.clone(), t), Err(Refusal::SwitchingOver));
    // the engine's last epoch
    c.on(Event::Epoch { epoch: 3, outputs: vec![out(3)] }, t).unwrap();
    c.on(Event::LastEpoch { epoch: 3 }, t).unwrap();
    // an earlier ack releases its output, no handover yet
    let s = c.on(Event::Ack { epoch: 2 }, t).unwrap();
    assert_eq!((s.release, s.handover), (vec![out(2)], None));
    let s = c.on(Event::Ack { epoch: 3 }, t).unwrap();
    assert_eq!((s.release, s.handover), (vec![out(3)], Some(3)));
    // an acceptance of another epoch is not this one's
    c.on(Event::HandoverAccepted { epoch: 2 }, t).unwrap();
    assert_eq!(c.mode(), &Mode::HandingOver { last: Some(3), sent: true });
    c.on(Event::HandoverAccepted { epoch: 3 }, t).unwrap();
    assert_eq!(c.mode(), &Mode::HandedOver { epoch: 3 });
    // the secondary runs the guest now: nothing leaves here again
    assert!(c.on(Event::Released(vec![out(4)]), t).unwrap().release.is_empty());
    assert!(c.on(Event::Epoch { epoch: 4, outputs: vec![out(5)] }, t).unwrap().release.is_empty());
    assert!(c.on(Event::Ack { epoch: 4 }, t).unwrap().release.is_empty());
    assert_eq!(c.on(Event::Command(Command::Unprotect), t), Err(Refusal::HandedOver));
    assert_eq!(
        c.on(Event::SessionUp { next_epoch: 5, resync: Resync::Live, peer: "s".into() }, t),
        Err(Refusal::HandedOver)
    );
    assert_eq!(c.held_count(), 0);
}

/// Issue 28, item 2: a secondary that cannot take the handover (its
/// machine does not build, the witness refused) says so on the session;
/// this node resumes the guest, protected, and hands over again later.
#[test]
fn a_refused_handover_resumes_the_guest_protected() {
    let t = Instant::now();
    let mut c = Core::new();
    let sw = Event::Command(Command::Switchover);
    up(&mut c, t);
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    c.on(Event::Ack { epoch: 1 }, t).unwrap();
    // a refusal before the handover was sent changes nothing
    c.on(sw.clone(), t).unwrap();
    assert_eq!(c.on(Event::HandoverRefused, t).unwrap(), Step::default());
    assert_eq!(c.mode().protection(), Protection::HandingOver);
    c.on(Event::Epoch { epoch: 2, outputs: vec![out(2)] }, t).unwrap();
    c.on(Event::LastEpoch { epoch: 2 }, t).unwrap();
    assert_eq!(c.on(Event::Ack { epoch: 2 }, t).unwrap().handover, Some(2));
    let s = c.on(Event::HandoverRefused, t).unwrap();
    assert_eq!(s.engine, Some(EngineCommand::Resume));
    assert_eq!(c.mode(), &Mode::Protected);
    // protected as before: acks release, and a later switchover works
    c.on(Event::Epoch { epoch: 3, outputs: vec![out(3)] }, t).unwrap();
    assert_eq!(c.on(Event::Ack { epoch: 3 }, t).unwrap().release, vec![out(3)]);
    assert_eq!(c.on(sw, t).unwrap().engine, Some(EngineCommand::Finish));
}

#[test]
fn a_switchover_that_loses_its_secondary_holds_and_with_a_witness_waits_for_its_record() {
    let t = Instant::now();
    let mut c = Core::with_witness();
    up(&mut c, t);
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    let s = c.on(Event::Ack { epoch: 1 }, t).unwrap();
    let Some(Ask::RecordSync { tag }) = s.ask else { panic!("no sync record asked: {s:?}") };
    // acked, but the witness has not recorded the secondary: it may not be
    // promotable, so no switchover to it
    assert_eq!(c.on(Event::Command(Command::Switchover), t), Err(Refusal::NotRecorded));
    c.on(Event::Witness { tag, answer: Answer::Granted }, t).unwrap();
    assert_eq!(c.mode(), &Mode::Protected);
    c.on(Event::Command(Command::Switchover), t).unwrap();
    c.on(Event::Epoch { epoch: 2, outputs: vec![out(2)] }, t).unwrap();
    c.on(Event::LastEpoch { epoch: 2 }, t).unwrap();
    // the secondary is lost before acking the last epoch: a hold, and the
    // witness decides (the secondary may have taken over)
    let s = c.on(lost(), t).unwrap();
    assert!(s.release.is_empty() && s.handover.is_none());
    assert!(matches!(s.ask, Some(Ask::RunAlone { .. })), "{s:?}");
    assert_eq!(c.mode().protection(), Protection::Holding);
    assert_eq!(c.held_count(), 1);
}

#[test]
fn held_outputs_release_in_epoch_order_up_to_the_ack() {
    let t = Instant::now();
    let mut h = HeldOutputs::default();
    h.insert(3, vec![out(3)], t);
    h.insert(1, vec![out(1)], t);
    h.insert(2, vec![out(2)], t + GRACE);
    h.insert(1, vec![out(11)], t + GRACE);
    assert_eq!(h.count(), 4);
    assert_eq!(h.sent_at(2), Some(t + GRACE));
    let r = h.take_through(2);
    assert_eq!(r.iter().map(id).collect::<Vec<_>>(), vec![1, 11, 2]);
    assert_eq!(h.sent_at(2), None);
    assert_eq!(h.count(), 1);
    assert_eq!(h.oldest_in(0, u64::MAX), Some(t));
    assert_eq!(h.take_through(0), vec![]);
    assert_eq!(h.take_all().iter().map(id).collect::<Vec<_>>(), vec![3]);
}

/// An ack of an epoch this session never sent (beyond the last one sent, or
/// before any was sent) is a protocol error: it releases nothing and ends
/// the session as a loss does (hold), with or without a witness; before,
/// it released everything held up to that epoch.
#[test]
fn an_ack_beyond_the_last_sent_epoch_releases_nothing_and_ends_the_session() {
    let t = Instant::now();
    // (witness, ack): beyond epochs 1..=2, and far beyond (u64::MAX)
    for (witness, ack) in [(false, 3), (false, u64::MAX), (true, 3), (true, u64::MAX)] {
        let mut c = if witness { Core::with_witness() } else { Core::new() };
        c.on(Event::SessionUp { next_epoch: 1, resync: Resync::Live, peer: "s".into() }, t).unwrap();
        c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
        c.on(Event::Epoch { epoch: 2, outputs: vec![out(2)] }, t).unwrap();
        let s = c.on(Event::Ack { epoch: ack }, t).unwrap();
        assert!(s.release.is_empty(), "witness {witness}, ack {ack}: released {:?}", s.release);
        assert_eq!(s.engine, Some(EngineCommand::Hold), "witness {witness}, ack {ack}");
        assert_eq!(c.mode().protection(), Protection::Holding, "witness {witness}, ack {ack}");
        assert_eq!(c.held_count(), 2);
        assert!(
            matches!(c.mode(), Mode::Holding { why: Loss::AckBeyondSent { epoch, last_sent: Some(2) }, .. } if *epoch == ack),
            "{:?}",
            c.mode()
        );
        if witness {
            // the witness decides the hold; and a grant of a record asked
            // meanwhile releases nothing either
            assert!(matches!(s.ask, Some(Ask::RunAlone { .. })), "{s:?}");
        }
        // a late, valid ack of the ended session releases nothing
        assert!(c.on(Event::Ack { epoch: 2 }, t).unwrap().release.is_empty());
    }
    // nothing sent yet in this session, output waiting from before it
    let mut c = Core::new();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::Live, peer: "s".into() }, t).unwrap();
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    c.on(lost(), t).unwrap();
    c.on(Event::Epoch { epoch: 2, outputs: vec![out(2)] }, t).unwrap();
    c.on(Event::SessionUp { next_epoch: 3, resync: Resync::Full, peer: "s".into() }, t).unwrap();
    let s = c.on(Event::Ack { epoch: 3 }, t).unwrap();
    assert!(s.release.is_empty(), "released {:?} on an ack before any epoch was sent", s.release);
    assert_eq!(c.mode().protection(), Protection::Holding);
    assert_eq!(c.held_count(), 2);
}

/// A generated event; the model fills in epoch numbers as the engine would.
#[derive(Debug, Clone)]
enum Gen {
    /// (full resync, from another secondary than "s")
    SessionUp(bool, bool),
    Epoch,
    Released,
    /// Ack one of the epochs sent in this session (index modulo their count).
    Ack(usize),
    /// Ack an epoch this session has not sent (this many past the last).
    AckBeyond(u8),
    Resync,
    Lost,
    Fenced,
    Tick(u64),
    Unprotect,
    Failover,
    Switchover,
    /// The engine's last epoch before a handover: an epoch, then its mark.
    LastEpoch,
    /// The secondary accepts the handover it was sent (or some epoch).
    Accept,
    /// Answer the oldest unanswered witness question (0 granted, 1
    /// superseded, 2 unreachable, 3 refused).
    Answer(u8),
}

fn gen() -> impl Strategy<Value = Gen> {
    prop_oneof![
        2 => (any::<bool>(), any::<bool>()).prop_map(|(f, other)| Gen::SessionUp(f, other)),
        6 => Just(Gen::Epoch),
        2 => Just(Gen::Released),
        4 => any::<usize>().prop_map(Gen::Ack),
        1 => any::<u8>().prop_map(Gen::AckBeyond),
        1 => Just(Gen::Resync),
        2 => Just(Gen::Lost),
        1 => Just(Gen::Fenced),
        3 => (0u64..400).prop_map(Gen::Tick),
        2 => Just(Gen::Unprotect),
        1 => Just(Gen::Failover),
        2 => Just(Gen::Switchover),
        1 => Just(Gen::LastEpoch),
        2 => Just(Gen::Accept),
        4 => (0u8..4).prop_map(Gen::Answer),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any order of events: output is released only for acknowledged epochs
    /// while a secondary exists, never while holding or fenced, at most once,
    /// and a refused event changes nothing.
    #[test]
    fn output_commit_rules_hold_for_any_event_order(
        events in proptest::collection::vec(gen(), 1..120),
        witness in any::<bool>(),
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut c = if witness { Core::with_witness() } else { Core::new() };
        // the witness's questions in flight, oldest first (it answers in order)
        let mut asked: std::collections::VecDeque<Ask> = Default::default();
        // a sync record was granted in this session
        let mut recorded = false;
        let mut engine_epoch = 0u64; // last epoch the engine numbered
        let mut next_id = 0u32;
        let mut produced_at: BTreeMap<u32, u64> = BTreeMap::new();
        let mut sent_in_session: Vec<u64> = Vec::new();
        let mut released: BTreeSet<u32> = BTreeSet::new();
        let mut discarded = false;
        // the handover the core asked to send, and the highest epoch acked
        let mut handover_sent: Option<u64> = None;
        let mut acked_max = 0u64;
        for g in events {
            let g_seen = g.clone();
            let before = c.mode().clone();
            let mut fresh = |engine_epoch: u64| {
                next_id += 1;
                produced_at.insert(next_id, engine_epoch);
                vec![out(next_id)]
            };
            let ev = match g {
                Gen::SessionUp(full, other) => Event::SessionUp {
                    next_epoch: engine_epoch + 1,
                    resync: if full { Resync::Full } else { Resync::Live },
                    peer: if other { "t" } else { "s" }.into(),
                },
                Gen::Epoch => {
                    engine_epoch += 1;
                    Event::Epoch { epoch: engine_epoch, outputs: fresh(engine_epoch) }
                }
                Gen::Released => {
                    engine_epoch += 1;
                    Event::Released(fresh(engine_epoch))
                }
                Gen::Ack(i) if !sent_in_session.is_empty() => {
                    Event::Ack { epoch: sent_in_session[i % sent_in_session.len()] }
                }
                Gen::Ack(_) => Event::Tick,
                Gen::AckBeyond(k) => {
                    let last = sent_in_session.iter().copied().max().unwrap_or(engine_epoch);
                    Event::Ack { epoch: last + 1 + u64::from(k) }
                }
                Gen::Resync => Event::ResyncRequested,
                Gen::Lost => lost(),
                Gen::Fenced => Event::Fenced { by: 9 },
                Gen::Tick(ms) => {
                    now += Duration::from_millis(ms);
                    Event::Tick
                }
                Gen::Unprotect => Event::Command(Command::Unprotect),
                Gen::Failover => Event::Command(Command::Failover),
                Gen::Switchover => Event::Command(Command::Switchover),
                Gen::LastEpoch => {
                    // applied right after its epoch, as the replicator does
                    engine_epoch += 1;
                    let e = Event::Epoch { epoch: engine_epoch, outputs: fresh(engine_epoch) };
                    if c.mode().in_session() {
                        sent_in_session.push(engine_epoch);
                    }
                    let s = c.on(e, now).expect("an epoch is never refused");
                    prop_assert!(s.release.is_empty() || matches!(c.mode(), Mode::Unprotected));
                    for o in &s.release {
                        prop_assert!(released.insert(id(o)));
                    }
                    Event::LastEpoch { epoch: engine_epoch }
                }
                Gen::Accept => Event::HandoverAccepted { epoch: handover_sent.unwrap_or(engine_epoch) },
                Gen::Answer(k) => match asked.pop_front() {
                    None => Event::Tick,
                    Some(a) => {
                        let tag = match a { Ask::RecordSync { tag } | Ask::RunAlone { tag } => tag };
                        let answer = match k {
                            0 => Answer::Granted,
                            1 => Answer::Superseded,
                            2 => Answer::Unreachable("down".into()),
                            _ => Answer::Refused { term: 9 },
                        };
                        if matches!((a, &answer), (Ask::RecordSync { .. }, Answer::Granted)) && c.mode().in_session() {
                            recorded = true;
                        }
                        Event::Witness { tag, answer }
                    }
                },
            };
            let held_before = c.held_count();
            let res = c.on(ev.clone(), now);
            let Ok(step) = res else {
                prop_assert_eq!(c.mode(), &before, "a refused event changed the mode");
                prop_assert_eq!(c.held_count(), held_before);
                continue;
            };
            if matches!(ev, Event::Fenced { .. } | Event::Witness { answer: Answer::Refused { .. }, .. }) {
                discarded = true;
            }
            if let (Gen::AckBeyond(_), Event::Ack { epoch }) = (&g_seen, &ev) {
                // a protocol error: nothing leaves, and a session ends
                prop_assert!(step.release.is_empty(), "ack {} of an epoch never sent released {:?}", epoch, step.release);
                if before.in_session() {
                    prop_assert_eq!(c.mode().protection(), Protection::Holding, "ack {} beyond the last sent", epoch);
                } else {
                    prop_assert_eq!(c.mode(), &before);
                }
                continue;
            }
            if let Event::Ack { epoch } = ev {
                acked_max = acked_max.max(epoch);
            }
            if let Some(h) = step.handover {
                // the handover goes only once the last epoch is acked, and
                // nothing of it or before it is still held
                let on_ack = matches!(ev, Event::Ack { epoch } if epoch >= h);
                prop_assert!(on_ack, "handover on {:?}", ev);
                let handing = matches!(c.mode(), Mode::HandingOver { last: Some(l), sent: true } if *l == h);
                prop_assert!(handing, "handover asked outside its mode: {:?}", c.mode());
                handover_sent = Some(h);
            }
            if matches!(c.mode(), Mode::HandedOver { .. }) {
                // the secondary's state holds what was not released
                discarded = true;
            }
            if !matches!(c.mode(), Mode::HandingOver { .. } | Mode::HandedOver { .. }) {
                handover_sent = None;
            }
            if matches!(ev, Event::SessionUp { .. }) || !c.mode().in_session() {
                recorded = false;
            }
            prop_assert!(witness || step.ask.is_none(), "asked a witness that is not there");
            asked.extend(step.ask);
            match (&ev, c.mode()) {
                (Event::SessionUp { .. }, _) => sent_in_session.clear(),
                (Event::Epoch { epoch, .. }, m) if m.in_session() => sent_in_session.push(*epoch),
                _ => {}
            }
            if !c.mode().in_session() {
                sent_in_session.clear();
            }
            for o in &step.release {
                prop_assert!(released.insert(id(o)), "output {} released twice", id(o));
            }
            if step.release.is_empty() {
                continue;
            }
            match (&before, c.mode(), &ev) {
                // rule 2: nothing leaves while holding or fenced, except by
                // the decision that ends the hold
                (Mode::Fenced { .. }, _, _) => prop_assert!(false, "released while fenced"),
                (Mode::HandedOver { .. }, _, _) => prop_assert!(false, "released after the handover"),
                (Mode::Holding { .. }, Mode::Unprotected, Event::Command(Command::Unprotect)) if !witness => {}
                // with a witness only its grant ends a hold
                (Mode::Holding { .. }, Mode::Unprotected, Event::Witness { answer: Answer::Granted, .. }) if witness => {}
                (Mode::Holding { .. }, _, _) => prop_assert!(false, "released while holding: {:?}", ev),
                // rule 1: with a secondary, only what an ack covers
                (Mode::Syncing | Mode::Protected | Mode::HandingOver { .. }, _, Event::Ack { epoch }) => {
                    prop_assert!(!witness || recorded, "released before the witness recorded the secondary");
                    for o in &step.release {
                        prop_assert!(produced_at[&id(o)] <= *epoch, "output of a later epoch released by ack {}", epoch);
                    }
                }
                // the sync record releases what was acked meanwhile
                (Mode::Syncing, Mode::Protected, Event::Witness { answer: Answer::Granted, .. }) if witness => {
                    let acked = sent_in_session.iter().copied().max().unwrap_or(0);
                    for o in &step.release {
                        prop_assert!(produced_at[&id(o)] <= acked, "released output of an epoch never sent");
                    }
                }
                (Mode::Syncing | Mode::Protected | Mode::HandingOver { .. }, _, _) => {
                    prop_assert!(false, "released in a session without an ack: {:?}", ev)
                }
                (Mode::Unprotected, Mode::Unprotected, Event::Epoch { .. } | Event::Released(_)) => {}
                (b, a, e) => prop_assert!(false, "release from {:?} to {:?} on {:?}", b, a, e),
            }
        }
        // nothing is lost: everything produced is released or still held,
        // unless a fence discarded it
        if !discarded {
            prop_assert_eq!(released.len() as u64 + c.held_count(), produced_at.len() as u64);
        }
        if let (Mode::Holding { .. }, false) = (c.mode(), witness) {
            let step = c.on(Event::Command(Command::Unprotect), now).unwrap();
            for o in &step.release {
                prop_assert!(released.insert(id(o)));
            }
            if !discarded {
                prop_assert_eq!(released.len(), produced_at.len());
            }
        }
    }
}

#[test]
fn with_a_witness_a_session_releases_only_after_the_sync_record() {
    let t = Instant::now();
    let mut c = Core::with_witness();
    let s = c.on(Event::SessionUp { next_epoch: 1, resync: Resync::Live, peer: "s".into() }, t).unwrap();
    assert_eq!(s.ask, None, "recorded only once the secondary committed an epoch");
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    let s = c.on(Event::Ack { epoch: 1 }, t).unwrap();
    assert!(s.release.is_empty(), "acked but not recorded");
    let Some(Ask::RecordSync { tag }) = s.ask else { panic!("no sync record asked: {s:?}") };
    assert_eq!(c.mode(), &Mode::Syncing);
    // an acked epoch does not count against the ack deadline meanwhile
    assert_eq!(c.oldest_unacked(), None);
    // unreachable: asked again after the retry interval, with a new tag
    c.on(Event::Witness { tag, answer: Answer::Unreachable("down".into()) }, t).unwrap();
    assert!(matches!(c.witness(), WitnessView::Unreachable(_)));
    assert_eq!(c.on(Event::Tick, t).unwrap().ask, None);
    let s = c.on(Event::Tick, t + WITNESS_RETRY).unwrap();
    let Some(Ask::RecordSync { tag: tag2 }) = s.ask else { panic!("not asked again") };
    assert_ne!(tag, tag2);
    // a late answer to the old question changes nothing
    assert!(c.on(Event::Witness { tag, answer: Answer::Granted }, t).unwrap().release.is_empty());
    let s = c.on(Event::Witness { tag: tag2, answer: Answer::Granted }, t).unwrap();
    assert_eq!(s.release, vec![out(1)]);
    assert_eq!(c.mode(), &Mode::Protected);
    assert!(c.sync_recorded());
    c.on(Event::Epoch { epoch: 2, outputs: vec![out(2)] }, t).unwrap();
    assert_eq!(c.on(Event::Ack { epoch: 2 }, t).unwrap().release, vec![out(2)]);
}

#[test]
fn with_a_witness_only_its_grant_ends_a_hold() {
    let t = Instant::now();
    let mut c = Core::with_witness();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::Live, peer: "s".into() }, t).unwrap();
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    let tag = match c.on(Event::Ack { epoch: 1 }, t).unwrap().ask {
        Some(Ask::RecordSync { tag }) => tag,
        a => panic!("{a:?}"),
    };
    assert_eq!(c.on(Event::Witness { tag, answer: Answer::Granted }, t).unwrap().release, vec![out(1)]);
    c.on(Event::Epoch { epoch: 2, outputs: vec![out(2)] }, t).unwrap();
    let s = c.on(lost(), t).unwrap();
    let Some(Ask::RunAlone { tag }) = s.ask else { panic!("no run-alone asked: {s:?}") };
    assert!(!c.sync_recorded());
    // time, unprotect: neither decides
    assert!(c.on(Event::Tick, t + GRACE * 10).unwrap().release.is_empty());
    assert_eq!(c.on(Event::Command(Command::Unprotect), t), Err(Refusal::WitnessDecides));
    c.on(Event::Witness { tag, answer: Answer::Unreachable("down".into()) }, t).unwrap();
    assert_eq!(c.mode().protection(), Protection::Holding);
    let s = c.on(Event::Tick, t + WITNESS_RETRY).unwrap();
    let Some(Ask::RunAlone { tag }) = s.ask else { panic!("not asked again") };
    let s = c.on(Event::Witness { tag, answer: Answer::Granted }, t).unwrap();
    assert_eq!(s.engine, Some(EngineCommand::Alone));
    assert_eq!(s.release, vec![out(2)]);
    assert_eq!(c.mode(), &Mode::Unprotected);
}

#[test]
fn with_a_witness_a_refusal_fences_and_discards() {
    let t = Instant::now();
    let mut c = Core::with_witness();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::Live, peer: "s".into() }, t).unwrap();
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    let Some(Ask::RunAlone { tag }) = c.on(lost(), t).unwrap().ask else { panic!() };
    let s = c.on(Event::Witness { tag, answer: Answer::Refused { term: 3 } }, t).unwrap();
    assert!(s.release.is_empty());
    assert_eq!(c.mode(), &Mode::Fenced { by: 3 });
    assert_eq!(c.held_count(), 0);
    // a stale primary's new session is refused by the witness too
    let mut c = Core::with_witness();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::Live, peer: "s".into() }, t).unwrap();
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    let Some(Ask::RecordSync { tag }) = c.on(Event::Ack { epoch: 1 }, t).unwrap().ask else { panic!() };
    let s = c.on(Event::Witness { tag, answer: Answer::Refused { term: 2 } }, t).unwrap();
    assert!(s.release.is_empty());
    assert_eq!(c.mode(), &Mode::Fenced { by: 2 });
}

#[test]
fn a_new_session_is_not_timed_out_by_output_that_waited_before_it() {
    // seen with a full guest: after a long hold, each new session found the
    // held output's old send time and timed out within a millisecond
    let t = Instant::now();
    let mut c = Core::new();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::Live, peer: "s".into() }, t).unwrap();
    assert_eq!(c.oldest_unacked(), None, "a live sync has no ack deadline");
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    assert_eq!(c.oldest_unacked(), Some(t));
    c.on(lost(), t).unwrap();
    let later = t + Duration::from_secs(90);
    c.on(Event::SessionUp { next_epoch: 2, resync: Resync::Full, peer: "s".into() }, later).unwrap();
    assert_eq!(c.oldest_unacked(), None, "nothing of this session was sent yet");
    c.on(Event::Epoch { epoch: 2, outputs: vec![out(2)] }, later).unwrap();
    assert_eq!(c.oldest_unacked(), Some(later), "the deadline is this session's first epoch's");
    let ids: Vec<u32> = c.on(Event::Ack { epoch: 2 }, later).unwrap().release.iter().map(id).collect();
    assert_eq!(ids, vec![1, 2]);
}
