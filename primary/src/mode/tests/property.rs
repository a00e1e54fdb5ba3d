//! The property test: the output-commit rules over any order of events.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

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
        let mut c = if witness { PrimaryState::with_witness() } else { PrimaryState::new() };
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
                    resync: if full { Resync::BesideCommitted } else { Resync::IntoEmpty },
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
            let Ok(actions) = res else {
                prop_assert_eq!(c.mode(), &before, "a refused event changed the mode");
                prop_assert_eq!(c.held_count(), held_before);
                continue;
            };
            if matches!(ev, Event::Fenced { .. } | Event::Witness { answer: Answer::Refused { .. }, .. }) {
                discarded = true;
            }
            if let (Gen::AckBeyond(_), Event::Ack { epoch }) = (&g_seen, &ev) {
                // a protocol error: nothing leaves, and a session ends
                prop_assert!(actions.release.is_empty(), "ack {} of an epoch never sent released {:?}", epoch, actions.release);
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
            if let Some(h) = actions.handover {
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
            prop_assert!(witness || actions.ask.is_none(), "asked a witness that is not there");
            asked.extend(actions.ask);
            match (&ev, c.mode()) {
                (Event::SessionUp { .. }, _) => sent_in_session.clear(),
                (Event::Epoch { epoch, .. }, m) if m.in_session() => sent_in_session.push(*epoch),
                _ => {}
            }
            if !c.mode().in_session() {
                sent_in_session.clear();
            }
            for o in &actions.release {
                prop_assert!(released.insert(id(o)), "output {} released twice", id(o));
            }
            if actions.release.is_empty() {
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
                    for o in &actions.release {
                        prop_assert!(produced_at[&id(o)] <= *epoch, "output of a later epoch released by ack {}", epoch);
                    }
                }
                // the sync record releases what was acked meanwhile
                (Mode::Syncing, Mode::Protected, Event::Witness { answer: Answer::Granted, .. }) if witness => {
                    let acked = sent_in_session.iter().copied().max().unwrap_or(0);
                    for o in &actions.release {
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
            let actions = c.on(Event::Command(Command::Unprotect), now).unwrap();
            for o in &actions.release {
                prop_assert!(released.insert(id(o)));
            }
            if !discarded {
                prop_assert_eq!(released.len(), produced_at.len());
            }
        }
    }
}
