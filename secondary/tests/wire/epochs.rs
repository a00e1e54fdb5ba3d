//! Replication wire, epochs: divergence and resync, bounded skips, a
//! multi-frame machine state, live resyncs into a staging area.

use bytes::Bytes;
use common::frame::PROTOCOL_VERSION;
use common::proto::{self, Kind, Message, Page, PageChunk, PAGE_SIZE};
use primary::sender::Session;
use secondary::receiver::{ReceiverError, SessionEnd};
use secondary::replica::data_page;
use vmm::memory::GuestMem;

use super::{bootstrap, Fixture};

#[tokio::test]
async fn divergence_is_detected_and_a_full_epoch_resyncs() {
    let f = bootstrap().await;
    // epoch 2 claims a digest that the replica cannot reach: the primary's memory
    // "changed" (shadow written) without the page being sent
    let (addr, server) = f.serve_one().await;
    let mut s = f.session(addr).await;
    f.shadow.write(0x9000 * 4, &[0x77; 64]).expect("unsent change");
    let pages = f.pages(2, 10);
    f.mirror(&pages);
    s.send_epoch(2, false, pages, f.state.clone(), Some(f.shadow.digest())).await.expect("send");
    match s.recv().await.expect("recv") {
        Some(Message::ResyncRequest { reason }) => assert!(reason.contains("digest"), "{reason}"),
        other => panic!("expected a resync request, got {other:?}"),
    }
    assert!(f.replica.lock().expect("lock").needs_resync());
    // the primary keeps sending deltas until it reads the request: those in
    // flight are skipped (read, not applied, not acknowledged) and the
    // session goes on; the full epoch that follows on the same session
    // commits, and its ack is the next message the primary reads
    s.send_epoch(3, false, f.pages(3, 5), f.state.clone(), None).await.expect("send delta 3");
    s.send_epoch(4, false, f.pages(4, 5), f.state.clone(), None).await.expect("send delta 4");
    assert_eq!(f.replica.lock().expect("lock").committed_epoch(), Some(2), "a skipped delta was applied");
    let mut all = Vec::new();
    let mut buf = vec![0u8; PAGE_SIZE];
    for gfn in f.shadow.all_gfns() {
        f.shadow.read_page(gfn, &mut buf).expect("read");
        if buf.iter().any(|&b| b != 0) {
            all.push(primary::sender::page_from(gfn, &buf));
        }
    }
    s.send_epoch(5, true, all, f.state.clone(), Some(f.shadow.digest())).await.expect("full");
    s.wait_ack(5).await.expect("ack of the full epoch, and none of the skipped deltas");
    drop(s);
    assert_eq!(server.await.expect("join").expect("the session survives the skipped deltas"), SessionEnd::Closed);
    let r = f.replica.lock().expect("lock");
    assert!(!r.needs_resync());
    assert_eq!((r.committed_epoch(), r.digest()), (Some(5), f.shadow.digest()));
    let _ = Kind::Invalid;
    let _ = PROTOCOL_VERSION;
}

/// Sends epoch 2 with a digest the replica cannot reach: the receiver
/// answers with a resync request. Returns the session and its server.
async fn diverge_at_2(f: &Fixture) -> (Session, tokio::task::JoinHandle<Result<SessionEnd, ReceiverError>>) {
    let (addr, server) = f.serve_one().await;
    let mut s = f.session(addr).await;
    f.shadow.write(0x9100 * 4, &[0x55; 64]).expect("unsent change");
    let pages = f.pages(2, 10);
    f.mirror(&pages);
    s.send_epoch(2, false, pages, f.state.clone(), Some(f.shadow.digest())).await.expect("send");
    assert!(matches!(s.recv().await.expect("recv"), Some(Message::ResyncRequest { .. })));
    (s, server)
}

/// The skip after a resync request is bounded and checked: past
/// MAX_SKIPPED_EPOCHS deltas with no resync the session ends with its own
/// error; a chunk of another epoch inside a skipped one is a protocol error.
/// Neither changes the replica.
#[tokio::test]
async fn skipped_deltas_are_bounded_and_must_be_whole() {
    let f = bootstrap().await;
    let (mut s, server) = diverge_at_2(&f).await;
    let committed = f.snapshot();
    let n = secondary::receiver::MAX_SKIPPED_EPOCHS;
    for e in 3..3 + n {
        s.send_epoch(e, false, f.pages(e, 2), f.state.clone(), None).await.expect("send");
    }
    // one more than the bound (the server may close as this one arrives)
    let _ = s.send_epoch(3 + n, false, f.pages(3 + n, 2), f.state.clone(), None).await;
    let err = server.await.expect("join").expect_err("a primary that never resyncs");
    assert_eq!(err.code(), "resync-not-started", "{err}");
    assert_eq!(f.snapshot(), committed);

    let f = bootstrap().await;
    let (mut s, server) = diverge_at_2(&f).await;
    s.send(&Message::EpochBegin { epoch: 3, page_count: 4, full: false }).await.expect("begin");
    s.send(&Message::PageChunk(PageChunk { epoch: 4, pages: f.pages(4, 4) })).await.expect("chunk");
    let err = server.await.expect("join").expect_err("a chunk of another epoch");
    assert_eq!(err.code(), "protocol-order", "{err}");
    assert!(matches!(err, ReceiverError::SkippedEpoch { got: 4, skipping: 3, .. }), "{err}");
}

/// An epoch whose machine state is several frames long (a long epoch's
/// undrained output: here 3+ MiB of kv responses and console lines) commits
/// and is acknowledged: the state travels in chunks. Before protocol v3 the
/// whole state was one frame, its encoding failed past 1 MiB and the
/// session was lost.
#[tokio::test]
async fn an_epoch_with_a_state_of_several_frames_commits() {
    let mut f = bootstrap().await;
    f.state.devices.outbox = (0..150_000u32)
        .map(|i| common::state::Output::Console { cpu: 0, line: format!("console line {i:010} of a flooding guest") })
        .collect();
    let size = common::codec::encode(&f.state).expect("encode").len();
    assert!(size > 3 * common::frame::MAX_PAYLOAD, "state of {size} bytes");
    f.good_epoch(2).await;
    assert_eq!(f.snapshot(), (Some(2), f.shadow.digest()));
    let r = f.replica.lock().expect("lock");
    assert_eq!(r.committed().expect("committed").state.devices.outbox.len(), 150_000);
}

/// A live resync of a replica that has a committed epoch (issue 13): its
/// pages go to a staging area, the committed replica stays as it was (a
/// failover meanwhile would run epoch 1 exactly), a session that ends before
/// the resync's final epoch leaves it so, and the final epoch of a complete
/// resync (a later epoch number) makes the staged copy the replica, pages
/// the new image no longer has included (they are zero there).
#[tokio::test]
async fn a_live_resync_stages_until_its_final_epoch_commits() {
    let f = bootstrap().await;
    let before = f.snapshot();
    // the primary's memory now: other pages than the replica holds
    let img = GuestMem::new(64 << 20).expect("image");
    let round0: Vec<Page> = (0..300u64).map(|g| data_page(0x2000 + g, (g % 200) as u8 + 7)).collect();
    let round1: Vec<Page> = (0..20u64).map(|g| data_page(0x2000 + g * 5, 0xee)).collect();
    let fin: Vec<Page> = vec![data_page(0x2001, 0x55), Page::zero(0x2002)];
    for p in round0.iter().chain(&round1).chain(&fin) {
        let d = p.full_data().cloned().unwrap_or_else(|| Bytes::from(vec![0u8; PAGE_SIZE]));
        img.write(p.gfn * PAGE_SIZE as u64, &d).expect("image write");
    }
    assert!(img.digest() != before.1);

    // a resync whose session ends before its final epoch changes nothing
    let (addr, server) = f.serve_one().await;
    {
        let mut s = f.session(addr).await;
        s.send_sync(true, round0.clone()).await.expect("round 0");
        s.send_sync(false, round1.clone()).await.expect("round 1");
    }
    assert_eq!(server.await.expect("join").expect("clean close"), SessionEnd::Closed);
    assert_eq!(f.snapshot(), before, "an unfinished resync touched the committed replica");
    assert!(!f.replica.lock().expect("lock").sync_open(), "the unfinished resync was kept");

    // a complete resync: its final epoch (number 7: the primary ran on) commits it
    let (addr, server) = f.serve_one().await;
    {
        let mut s = f.session(addr).await;
        s.send_sync(true, round0).await.expect("round 0");
        s.send_sync(false, round1).await.expect("round 1");
        s.send_epoch(7, false, fin, f.state.clone(), Some(img.digest())).await.expect("final epoch");
        s.wait_ack(7).await.expect("ack 7");
    }
    assert_eq!(server.await.expect("join").expect("server"), SessionEnd::Closed);
    let r = f.replica.lock().expect("lock");
    assert_eq!((r.committed_epoch(), r.digest()), (Some(7), img.digest()), "the replica is not the resynced image");
    assert!(!r.needs_resync() && !r.sync_open());
}

/// The initial live sync of an all-zero guest: SyncBegin and no pages, then
/// the final epoch, which commits on an empty replica; a refused epoch begin
/// while a sync is open keeps the sync.
#[test]
fn an_empty_live_sync_commits_and_a_refused_begin_keeps_the_sync() {
    let f = Fixture::new();
    let mut r = f.replica.lock().expect("lock");
    r.begin_sync().expect("sync");
    let sum = common::proto::EpochChecksum::default().value();
    r.begin_epoch(4, 0, false).expect("the final epoch of an all-zero sync");
    let end = proto::EpochEnd { epoch: 4, page_count: 0, checksum: sum, digest: None, state: f.state.clone() };
    assert_eq!(r.end_epoch(end).expect("commit"), 4);
    assert!(!r.sync_open());
    // a sync over a committed replica, then a begin with a stale number: refused, the sync stays
    r.begin_sync().expect("resync");
    assert!(r.begin_epoch(4, 0, true).is_err(), "a full epoch that does not move forward");
    assert!(r.sync_open(), "a refused begin dropped the open sync");
    r.begin_epoch(9, 0, false).expect("the resync's final epoch");
    let end = proto::EpochEnd { epoch: 9, page_count: 0, checksum: sum, digest: None, state: f.state.clone() };
    assert_eq!(r.end_epoch(end).expect("commit"), 9);
}

/// A page that changed in a few bytes travels as a delta against the copy
/// the replica holds; a delta against another base (the replica missed the
/// epoch that made it) is refused before anything is written: the replica
/// stays at its committed epoch, asks for a resync, and skips the deltas in
/// flight. Deltas where no base exists (a full epoch) are refused as bad
/// input.
#[tokio::test]
async fn deltas_apply_onto_the_replica_and_a_wrong_base_asks_for_a_resync() {
    use bytes::BytesMut;
    use proto::{delta, PageData};
    let f = bootstrap().await;
    let (addr, server) = f.serve_one().await;
    let mut s = f.session(addr).await;
    // epoch 2: three pages the replica holds, each changed in a few bytes
    let mut pages = Vec::new();
    let mut base = vec![0u8; PAGE_SIZE];
    for gfn in [0x401u64, 0x402, 0x500] {
        f.shadow.read_page(gfn, &mut base).expect("read");
        let mut new = base.clone();
        new[10] ^= 0xff;
        new[2000..2040].fill(0x5a);
        let mut d = BytesMut::new();
        assert!(delta::encode(&base, &new, &mut d));
        f.shadow.write(gfn * PAGE_SIZE as u64, &new).expect("shadow write");
        pages.push(Page { gfn, data: PageData::Delta(d.freeze()) });
    }
    s.send_epoch(2, false, pages, f.state.clone(), Some(f.shadow.digest())).await.expect("send");
    s.wait_ack(2).await.expect("ack of the deltas");
    assert_eq!(f.snapshot(), (Some(2), f.shadow.digest()), "the deltas made the primary's pages");
    // epoch 3: a delta made against content the replica does not hold
    let before = f.snapshot();
    let mut d = BytesMut::new();
    assert!(delta::encode(
        &vec![0x33; PAGE_SIZE],
        &vec![0x34; 8].into_iter().chain(vec![0x33; PAGE_SIZE - 8]).collect::<Vec<_>>(),
        &mut d
    ));
    let wrong = vec![Page { gfn: 0x403, data: PageData::Delta(d.freeze()) }];
    s.send_epoch(3, false, wrong, f.state.clone(), None).await.expect("send");
    match s.recv().await.expect("recv") {
        Some(Message::ResyncRequest { reason }) => assert!(reason.contains("delta"), "{reason}"),
        other => panic!("expected a resync request, got {other:?}"),
    }
    assert_eq!(f.snapshot(), before, "a refused delta changed the replica");
    assert!(f.replica.lock().expect("lock").needs_resync());
    // a delta in flight is skipped, not applied
    s.send_epoch(4, false, f.pages(4, 5), f.state.clone(), None).await.expect("send delta 4");
    drop(s);
    assert_eq!(server.await.expect("join").expect("the session survives"), SessionEnd::Closed);
    assert_eq!(f.snapshot(), before);
    // a full epoch carrying a delta is refused as bad input
    let mut r = f.replica.lock().expect("lock");
    r.begin_epoch(9, 1, true).expect("begin a full epoch");
    let mut d = BytesMut::new();
    assert!(delta::encode(&base, &base, &mut d));
    let c = PageChunk { epoch: 9, pages: vec![Page { gfn: 0x401, data: PageData::Delta(d.freeze()) }] };
    assert!(matches!(r.chunk(c), Err(secondary::replica::ReplicaError::DeltaWithoutBase { .. })));
}
