//! The transition table: commands, sessions, switchovers, holds and acks
//! without a witness.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::*;

#[test]
fn unprotect_while_protected_is_refused_and_not_kept_for_later() {
    // read-through defect: an `unprotect` sent while the pair was healthy was
    // answered ok, queued, and fired at the next hold
    let t = Instant::now();
    let mut c = PrimaryState::new();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::IntoEmpty, peer: "s".into() }, t).unwrap();
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
    let mut c = PrimaryState::new();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::IntoEmpty, peer: "s".into() }, t).unwrap();
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    c.on(lost(), t).unwrap();
    // an unprotected epoch the engine ran before it saw Hold, then one of hold
    assert!(c.on(Event::Released(vec![out(2)]), t).unwrap().release.is_empty());
    assert!(c.on(Event::Epoch { epoch: 3, outputs: vec![out(3)] }, t).unwrap().release.is_empty());
    let s = c.on(Event::SessionUp { next_epoch: 4, resync: Resync::BesideCommitted, peer: "s".into() }, t).unwrap();
    assert_eq!(s, Actions { engine: Some(EngineCommand::Protect(Resync::BesideCommitted)), ..Actions::default() });
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
    let mut c = PrimaryState::new();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::IntoEmpty, peer: "s".into() }, t).unwrap();
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    c.on(lost(), t).unwrap();
    assert!(c.on(Event::Tick, t + GRACE * 100).unwrap().release.is_empty());
    assert_eq!(c.mode().protection(), Protection::Holding);
    // another secondary proves nothing about the one we lost
    let other = Event::SessionUp { next_epoch: 2, resync: Resync::IntoEmpty, peer: "t".into() };
    assert_eq!(c.on(other, t), Err(Refusal::HoldingFor("s".into())));
    assert_eq!(c.mode().protection(), Protection::Holding);
    // the same one back (its generation showed it did not take over)
    c.on(Event::SessionUp { next_epoch: 2, resync: Resync::BesideCommitted, peer: "s".into() }, t).unwrap();
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
    c.on(Event::SessionUp { next_epoch: 4, resync: Resync::IntoEmpty, peer: "t".into() }, t).unwrap();
}

#[test]
fn fenced_discards_and_refuses_everything() {
    let t = Instant::now();
    let mut c = PrimaryState::new();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::IntoEmpty, peer: "s".into() }, t).unwrap();
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    assert_eq!(c.on(Event::Fenced { by: 2 }, t).unwrap().engine, Some(EngineCommand::Hold));
    assert_eq!(c.held_count(), 0);
    assert!(c.on(Event::Ack { epoch: 1 }, t).unwrap().release.is_empty());
    assert_eq!(c.on(Event::Command(Command::Unprotect), t), Err(Refusal::Fenced(2)));
    assert_eq!(
        c.on(Event::SessionUp { next_epoch: 2, resync: Resync::IntoEmpty, peer: "s".into() }, t),
        Err(Refusal::Fenced(2))
    );
    assert!(c.on(Event::Released(vec![out(2)]), t).unwrap().release.is_empty());
    assert_eq!(c.mode(), &Mode::Fenced { by: 2 });
}

#[test]
fn the_primary_refuses_a_forced_failover() {
    let mut c = PrimaryState::new();
    assert_eq!(c.on(Event::Command(Command::Failover), Instant::now()), Err(Refusal::IsPrimary));
    assert_eq!(c.mode(), &Mode::Unprotected);
}

fn up(c: &mut PrimaryState, t: Instant) {
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::IntoEmpty, peer: "s".into() }, t).unwrap();
}

#[test]
fn a_switchover_hands_over_only_once_the_last_epoch_is_acked_and_then_releases_nothing() {
    let t = Instant::now();
    let mut c = PrimaryState::new();
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
        c.on(Event::SessionUp { next_epoch: 5, resync: Resync::IntoEmpty, peer: "s".into() }, t),
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
    let mut c = PrimaryState::new();
    let sw = Event::Command(Command::Switchover);
    up(&mut c, t);
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    c.on(Event::Ack { epoch: 1 }, t).unwrap();
    // a refusal before the handover was sent changes nothing
    c.on(sw.clone(), t).unwrap();
    assert_eq!(c.on(Event::HandoverRefused, t).unwrap(), Actions::default());
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
    let mut c = PrimaryState::with_witness();
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
        let mut c = if witness { PrimaryState::with_witness() } else { PrimaryState::new() };
        c.on(Event::SessionUp { next_epoch: 1, resync: Resync::IntoEmpty, peer: "s".into() }, t).unwrap();
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
    let mut c = PrimaryState::new();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::IntoEmpty, peer: "s".into() }, t).unwrap();
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    c.on(lost(), t).unwrap();
    c.on(Event::Epoch { epoch: 2, outputs: vec![out(2)] }, t).unwrap();
    c.on(Event::SessionUp { next_epoch: 3, resync: Resync::BesideCommitted, peer: "s".into() }, t).unwrap();
    let s = c.on(Event::Ack { epoch: 3 }, t).unwrap();
    assert!(s.release.is_empty(), "released {:?} on an ack before any epoch was sent", s.release);
    assert_eq!(c.mode().protection(), Protection::Holding);
    assert_eq!(c.held_count(), 2);
}

#[test]
fn a_new_session_is_not_timed_out_by_output_that_waited_before_it() {
    // seen with a full guest: after a long hold, each new session found the
    // held output's old send time and timed out within a millisecond
    let t = Instant::now();
    let mut c = PrimaryState::new();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::IntoEmpty, peer: "s".into() }, t).unwrap();
    assert_eq!(c.oldest_unacked(), None, "a live sync has no ack deadline");
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    assert_eq!(c.oldest_unacked(), Some(t));
    c.on(lost(), t).unwrap();
    let later = t + Duration::from_secs(90);
    c.on(Event::SessionUp { next_epoch: 2, resync: Resync::BesideCommitted, peer: "s".into() }, later).unwrap();
    assert_eq!(c.oldest_unacked(), None, "nothing of this session was sent yet");
    c.on(Event::Epoch { epoch: 2, outputs: vec![out(2)] }, later).unwrap();
    assert_eq!(c.oldest_unacked(), Some(later), "the deadline is this session's first epoch's");
    let ids: Vec<u32> = c.on(Event::Ack { epoch: 2 }, later).unwrap().release.iter().map(id).collect();
    assert_eq!(ids, vec![1, 2]);
}
