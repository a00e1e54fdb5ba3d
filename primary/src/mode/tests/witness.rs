//! With a witness: the sync record, the run-alone grant, and its refusal.

use std::time::Instant;

use super::*;

#[test]
fn with_a_witness_a_session_releases_only_after_the_sync_record() {
    let t = Instant::now();
    let mut c = PrimaryState::with_witness();
    let s = c.on(Event::SessionUp { next_epoch: 1, resync: Resync::IntoEmpty, peer: "s".into() }, t).unwrap();
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
    let mut c = PrimaryState::with_witness();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::IntoEmpty, peer: "s".into() }, t).unwrap();
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
    let mut c = PrimaryState::with_witness();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::IntoEmpty, peer: "s".into() }, t).unwrap();
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    let Some(Ask::RunAlone { tag }) = c.on(lost(), t).unwrap().ask else { panic!() };
    let s = c.on(Event::Witness { tag, answer: Answer::Refused { term: 3 } }, t).unwrap();
    assert!(s.release.is_empty());
    assert_eq!(c.mode(), &Mode::Fenced { by: 3 });
    assert_eq!(c.held_count(), 0);
    // a stale primary's new session is refused by the witness too
    let mut c = PrimaryState::with_witness();
    c.on(Event::SessionUp { next_epoch: 1, resync: Resync::IntoEmpty, peer: "s".into() }, t).unwrap();
    c.on(Event::Epoch { epoch: 1, outputs: vec![out(1)] }, t).unwrap();
    let Some(Ask::RecordSync { tag }) = c.on(Event::Ack { epoch: 1 }, t).unwrap().ask else { panic!() };
    let s = c.on(Event::Witness { tag, answer: Answer::Refused { term: 2 } }, t).unwrap();
    assert!(s.release.is_empty());
    assert_eq!(c.mode(), &Mode::Fenced { by: 2 });
}
