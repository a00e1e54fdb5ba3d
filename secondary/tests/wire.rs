//! The replication wire over real TCP on loopback, with a real replica: every
//! kind of bad stream is refused with its own error, and the replica is left
//! exactly at its committed epoch (same digest before and after).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use common::auth::Secret;
use common::frame::{MAX_PAYLOAD, PROTOCOL_VERSION};
use common::proto::{self, Kind, Message, Page, PageChunk, PAGE_SIZE};
use common::state::{MachineState, VmShape};
use primary::sender::{Offer, RawSession, SenderError, Session};
use secondary::receiver::{serve_connection, ReceiverConfig, ReceiverError, SessionEnd};
use secondary::replica::{data_page, Replica};
use tokio::net::TcpListener;
use vmm::memory::GuestMem;
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};

struct Fixture {
    replica: Arc<Mutex<Replica>>,
    cfg: ReceiverConfig,
    secret: Secret,
    shape: VmShape,
    state: MachineState,
    /// The primary's memory as the test sends it (for digests).
    shadow: GuestMem,
}

/// A Hello's offer of `shape` at `generation` with `pair` (no CPU check:
/// these receivers have no host CPU to check against).
fn offer(shape: &VmShape, generation: u64, pair: &proto::PairSettings) -> Offer {
    Offer { shape: shape.clone(), cpu: Default::default(), generation, pair: pair.clone() }
}

/// The settings both ends of these tests agree on.
fn pair() -> proto::PairSettings {
    proto::PairSettings { witness_vm: None, heartbeat_timeout_ms: 100, heartbeat_interval_ms: 20 }
}

fn secret() -> Secret {
    Secret::generate().expect("secret")
}

impl Fixture {
    fn new() -> Self {
        let mut m = Machine::new(MachineConfig::new(64 << 20, 1, TrackerKind::Bitmap, WorkloadConfig::idle()))
            .expect("machine");
        m.start().expect("start");
        std::thread::sleep(std::time::Duration::from_millis(20));
        m.pause().expect("pause");
        let state = m.save().expect("save");
        let shape = m.shape().clone();
        let replica = Arc::new(Mutex::new(Replica::new(shape.clone()).expect("replica")));
        let secret = secret();
        Fixture {
            replica,
            cfg: ReceiverConfig::new(secret.clone(), 1, pair()),
            secret,
            shape,
            state,
            shadow: GuestMem::new(64 << 20).expect("shadow"),
        }
    }

    /// Starts a server for one connection; returns its address and result.
    async fn serve_one(&self) -> (SocketAddr, tokio::task::JoinHandle<Result<SessionEnd, ReceiverError>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (replica, cfg) = (self.replica.clone(), self.cfg.clone());
        let h = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            serve_connection(s, &cfg, &replica, |_| {}).await
        });
        (addr, h)
    }

    fn pages(&self, epoch: u64, n: u64) -> Vec<Page> {
        let pages: Vec<Page> = (0..n)
            .map(|i| {
                let gfn = 0x400 + (epoch * 97 + i * 13) % 10_000;
                if i % 7 == 0 {
                    Page { gfn, data: None }
                } else {
                    data_page(gfn, (epoch as u8).wrapping_mul(31).wrapping_add(i as u8) | 1)
                }
            })
            .collect();
        // dedup gfns inside one epoch (a real dirty set has each page once)
        let mut seen = std::collections::HashSet::new();
        pages.into_iter().filter(|p| seen.insert(p.gfn)).collect()
    }

    fn mirror(&self, pages: &[Page]) {
        for p in pages {
            let data = p.data.clone().unwrap_or_else(|| Bytes::from(vec![0u8; PAGE_SIZE]));
            self.shadow.write(p.gfn * PAGE_SIZE as u64, &data).expect("shadow write");
        }
    }

    async fn session(&self, addr: SocketAddr) -> Session {
        Session::connect(addr, &self.secret, &offer(&self.shape, 1, &pair())).await.expect("handshake")
    }

    /// A correct epoch over a fresh connection.
    async fn good_epoch(&self, epoch: u64) {
        let (addr, server) = self.serve_one().await;
        let mut s = self.session(addr).await;
        let pages = self.pages(epoch, 40);
        self.mirror(&pages);
        s.send_epoch(epoch, false, pages, self.state.clone(), Some(self.shadow.digest())).await.expect("send");
        s.wait_ack(epoch).await.expect("ack");
        drop(s);
        assert_eq!(server.await.expect("join").expect("server"), SessionEnd::Closed);
    }

    fn snapshot(&self) -> (Option<u64>, u64) {
        let r = self.replica.lock().expect("lock");
        assert_eq!(r.staging_epoch(), None, "a staged epoch was left behind");
        (r.committed_epoch(), r.digest())
    }
}

/// Builds frames by hand with the session's one sealer, as the session
/// would have sealed its next ones (consecutive sequence numbers and record
/// nonces), each in its own buffer so a test can send them out of order,
/// twice, or damaged.
fn frames(s: &mut RawSession, ms: &[&Message]) -> Vec<BytesMut> {
    ms.iter().map(|m| s.seal(m).expect("seal")).collect()
}

fn frame(s: &mut RawSession, m: &Message) -> BytesMut {
    frames(s, &[m]).remove(0)
}

async fn bootstrap() -> Fixture {
    let f = Fixture::new();
    let (addr, server) = f.serve_one().await;
    let mut s = f.session(addr).await;
    assert_eq!(s.ack.committed_epoch, None);
    // initial sync: 600 pages (3 chunks), then epoch 0 with the state
    let sync: Vec<Page> = (0..600u64).map(|g| data_page(0x400 + g, (g % 251) as u8 + 1)).collect();
    f.mirror(&sync);
    s.send_sync(true, sync).await.expect("sync");
    let e0 = f.pages(0, 30);
    f.mirror(&e0);
    s.send_epoch(0, false, e0, f.state.clone(), Some(f.shadow.digest())).await.expect("epoch 0");
    s.wait_ack(0).await.expect("ack 0");
    drop(s);
    server.await.expect("join").expect("server");
    f.good_epoch(1).await;
    assert_eq!(f.snapshot(), (Some(1), f.shadow.digest()));
    f
}

/// Runs one bad client against a fresh connection and checks the refusal.
async fn expect_refusal<F, Fut>(f: &Fixture, code: &str, client: F)
where
    F: FnOnce(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let before = f.snapshot();
    let (addr, server) = f.serve_one().await;
    client(addr).await;
    let res = server.await.expect("join");
    match res {
        Err(e) => assert_eq!(e.code(), code, "wrong refusal: {e}"),
        Ok(end) => panic!("expected a '{code}' refusal, the server ended with {end:?}"),
    }
    assert_eq!(f.snapshot(), before, "the replica changed after a '{code}' stream");
}

#[tokio::test]
async fn bad_streams_are_refused_distinctly_and_change_nothing() {
    let fx = bootstrap().await;
    let f = &fx;
    let begin = &Message::EpochBegin { epoch: 2, page_count: 40, full: false };
    let chunk = |f: &Fixture| Message::PageChunk(PageChunk { epoch: 2, pages: f.pages(2, 40) });

    // truncated: the stream ends inside a page chunk
    expect_refusal(f, "truncated", |addr| async move {
        let mut s = f.session(addr).await;
        s.send(begin).await.expect("begin");
        let mut s = s.into_raw().await.expect("raw");
        let b = frame(&mut s, &chunk(f));
        s.send_raw(&b[..b.len() / 2]).await.expect("half");
        s.shutdown_write().await.expect("shutdown");
    })
    .await;

    // corrupted: one sealed byte flipped in transit
    expect_refusal(f, "corrupt", |addr| async move {
        let mut s = f.session(addr).await;
        s.send(begin).await.expect("begin");
        let mut s = s.into_raw().await.expect("raw");
        let mut b = frame(&mut s, &chunk(f));
        let i = b.len() / 2;
        b[i] ^= 0x20;
        s.send_raw(&b).await.expect("send");
        let _ = s.recv().await;
    })
    .await;

    // reordered: the second chunk arrives before the first
    expect_refusal(f, "reordered", |addr| async move {
        let mut s = f.session(addr).await;
        s.send(begin).await.expect("begin");
        let c1 = Message::PageChunk(PageChunk { epoch: 2, pages: f.pages(2, 40)[..20].to_vec() });
        let c2 = Message::PageChunk(PageChunk { epoch: 2, pages: f.pages(2, 40)[20..].to_vec() });
        let mut s = s.into_raw().await.expect("raw");
        let mut ab = frames(&mut s, &[&c1, &c2]);
        let (b, a) = (ab.pop().expect("b"), ab.pop().expect("a"));
        s.send_raw(&b).await.expect("b");
        s.send_raw(&a).await.expect("a");
        let _ = s.recv().await;
    })
    .await;

    // duplicated: the same chunk frame twice
    expect_refusal(f, "duplicate", |addr| async move {
        let mut s = f.session(addr).await;
        s.send(begin).await.expect("begin");
        let c = Message::PageChunk(PageChunk { epoch: 2, pages: f.pages(2, 40)[..20].to_vec() });
        let mut s = s.into_raw().await.expect("raw");
        let a = frame(&mut s, &c);
        s.send_raw(&a).await.expect("a");
        s.send_raw(&a).await.expect("a again");
        let _ = s.recv().await;
    })
    .await;

    // oversize: a (sealed) header announcing more than the frame limit,
    // refused before any of the payload arrives
    expect_refusal(f, "oversize", |addr| async move {
        let mut s = f.session(addr).await;
        s.send(begin).await.expect("begin");
        let mut s = s.into_raw().await.expect("raw");
        let c = &mut s.sealer;
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(&common::frame::MAGIC);
        h[4..6].copy_from_slice(&common::frame::PROTOCOL_VERSION.to_le_bytes());
        h[6..8].copy_from_slice(&(proto::Kind::PageChunk as u16).to_le_bytes());
        h[8..16].copy_from_slice(&c.next_seq().to_le_bytes());
        h[16..20].copy_from_slice(&((MAX_PAYLOAD as u32) + 1).to_le_bytes());
        let mut b = BytesMut::new();
        c.seal_record(&h, &mut b).expect("seal");
        s.send_raw(&b).await.expect("header");
        let _ = s.recv().await;
    })
    .await;

    // wrong version: a peer that only speaks a later version
    expect_refusal(f, "version", |addr| async move {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let v = common::frame::PROTOCOL_VERSION + 1;
        let r = Session::handshake(stream, &f.secret, &offer(&f.shape, 1, &pair()), proto::Channel::Data, v, v).await;
        assert!(
            matches!(r, Err(SenderError::Refused { .. }) | Err(SenderError::Frame(_)) | Err(SenderError::Closed(_))),
            "{r:?}"
        );
    })
    .await;

    // wrong shape: a primary of another VM
    expect_refusal(f, "shape", |addr| async move {
        let mut shape = f.shape.clone();
        shape.vcpus = 2;
        let r = Session::connect(addr, &f.secret, &offer(&shape, 1, &pair())).await;
        assert!(matches!(r, Err(SenderError::Refused { code: proto::RefuseCode::Shape, .. })), "{r:?}");
    })
    .await;

    // a witness on one side only (issue 28, item 1): refused before
    // anything reaches the replica, whichever side has it
    expect_refusal(f, "pair-settings", |addr| async move {
        let witnessed = proto::PairSettings { witness_vm: Some("vm-1".into()), ..pair() };
        let r = Session::connect(addr, &f.secret, &offer(&f.shape, 1, &witnessed)).await;
        match r {
            Err(SenderError::Refused { code: proto::RefuseCode::Pair, reason }) => {
                assert!(reason.contains("witness"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    })
    .await;

    // other heartbeat timeouts
    expect_refusal(f, "pair-settings", |addr| async move {
        let slower = proto::PairSettings { heartbeat_timeout_ms: 400, ..pair() };
        let r = Session::connect(addr, &f.secret, &offer(&f.shape, 1, &slower)).await;
        assert!(matches!(r, Err(SenderError::Refused { code: proto::RefuseCode::Pair, .. })), "{r:?}");
    })
    .await;

    // unauthenticated: a peer without the shared secret
    expect_refusal(f, "unauthenticated", |addr| async move {
        let wrong = secret();
        let r = Session::connect(addr, &wrong, &offer(&f.shape, 1, &pair())).await;
        assert!(r.is_err(), "a peer without the secret got a session");
    })
    .await;

    // replayed: the bytes a real primary sent on another connection,
    // recorded and sent again: the handshake message is answered with
    // fresh keys, so the first recorded frame does not open
    let recorded = {
        let (addr, server) = f.serve_one().await;
        let tap = TcpListener::bind("127.0.0.1:0").await.expect("bind tap");
        let tap_addr = tap.local_addr().expect("tap addr");
        let rec = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut down, _) = tap.accept().await.expect("accept");
            let up = tokio::net::TcpStream::connect(addr).await.expect("upstream");
            let (mut ur, mut uw) = up.into_split();
            let (mut dr, mut dw) = down.split();
            let mut log = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            let back = async move {
                let _ = tokio::io::copy(&mut ur, &mut dw).await;
            };
            let fwd = async {
                loop {
                    let n = match dr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    log.extend_from_slice(&buf[..n]);
                    if uw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = uw.shutdown().await;
            };
            tokio::join!(back, fwd);
            log
        });
        {
            let mut s = f.session(tap_addr).await;
            s.send(begin).await.expect("begin");
            s.send(&chunk(f)).await.expect("chunk");
        }
        let _ = server.await.expect("join");
        rec.await.expect("recorder")
    };
    assert!(recorded.len() > 4096, "recorded {} bytes", recorded.len());
    expect_refusal(f, "unauthenticated", |addr| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut t = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = t.write_all(&recorded).await;
        let mut sink = Vec::new();
        let _ = t.read_to_end(&mut sink).await;
    })
    .await;

    // message-level disorder: a chunk of another epoch while epoch 2 is staged
    expect_refusal(f, "protocol-order", |addr| async move {
        let mut s = f.session(addr).await;
        s.send(begin).await.expect("begin");
        s.send(&Message::PageChunk(PageChunk { epoch: 3, pages: f.pages(3, 5) })).await.expect("chunk");
        let _ = s.recv().await;
    })
    .await;

    // a wrong content checksum at EpochEnd
    expect_refusal(f, "replica", |addr| async move {
        let mut s = f.session(addr).await;
        let pages = f.pages(2, 40);
        s.send(&Message::EpochBegin { epoch: 2, page_count: pages.len() as u64, full: false }).await.expect("begin");
        let n = pages.len() as u64;
        s.send(&Message::PageChunk(PageChunk { epoch: 2, pages })).await.expect("chunk");
        let end =
            proto::EpochEnd { epoch: 2, page_count: n, checksum: 0xdead_beef, digest: None, state: f.state.clone() };
        for m in end.into_messages().expect("end") {
            s.send(&m).await.expect("end");
        }
        let _ = s.recv().await;
    })
    .await;

    // the primary dies in the middle of epoch 2: a clean close, replica still at 1
    let before = f.snapshot();
    let (addr, server) = f.serve_one().await;
    {
        let mut s = f.session(addr).await;
        s.send(begin).await.expect("begin");
        s.send(&Message::PageChunk(PageChunk { epoch: 2, pages: f.pages(2, 40)[..10].to_vec() })).await.expect("chunk");
    }
    assert_eq!(server.await.expect("join").expect("clean close"), SessionEnd::Closed);
    assert_eq!(f.snapshot(), before);

    // and after all that, the next good epoch commits
    f.good_epoch(2).await;
    assert_eq!(f.snapshot(), (Some(2), f.shadow.digest()));
}

#[tokio::test]
async fn a_stale_generation_is_fenced() {
    let mut fx = Fixture::new();
    fx.cfg = ReceiverConfig::new(fx.secret.clone(), 5, pair());
    let f = &fx;
    expect_refusal(f, "stale-generation", |addr| async move {
        let r = Session::connect(addr, &f.secret, &offer(&f.shape, 4, &pair())).await;
        assert!(matches!(r, Err(SenderError::Refused { code: proto::RefuseCode::StaleGeneration, .. })), "{r:?}");
    })
    .await;
}

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
    let fin: Vec<Page> = vec![data_page(0x2001, 0x55), Page { gfn: 0x2002, data: None }];
    for p in round0.iter().chain(&round1).chain(&fin) {
        let d = p.data.clone().unwrap_or_else(|| Bytes::from(vec![0u8; PAGE_SIZE]));
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

/// Issue 28, item 3: a primary whose guest was given CPU features this
/// host's KVM lacks is refused when the pair forms (before, the pair was
/// protected and the takeover died at failover), and nothing reaches the
/// replica.
#[tokio::test]
async fn a_guest_cpu_this_host_cannot_run_is_refused_in_the_handshake() {
    let mut fx = Fixture::new();
    let guest = vmm::cpu::host_model().expect("host model");
    let mut poorer = guest.clone();
    for f in &mut poorer.features {
        if f.0 == 1 && f.2 == 'd' {
            f.3 &= !(1 << 26); // no SSE2
        }
    }
    fx.cfg.host_cpu = Some(poorer);
    let f = &fx;
    expect_refusal(f, "cannot-restore", |addr| async move {
        let o = Offer { cpu: guest.clone(), ..offer(&f.shape, 1, &pair()) };
        match Session::connect(addr, &f.secret, &o).await {
            Err(SenderError::Refused { code: proto::RefuseCode::Cpu, reason }) => {
                assert!(reason.contains("CPUID 0x1.0 d") && reason.contains("0x04000000"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    })
    .await;
    // the same guest on a host that has it all
    fx.cfg.host_cpu = Some(vmm::cpu::host_model().expect("host model"));
    let (addr, server) = fx.serve_one().await;
    let o = Offer { cpu: vmm::cpu::host_model().expect("host model"), ..offer(&fx.shape, 1, &pair()) };
    let s = Session::connect(addr, &fx.secret, &o).await.expect("a host that has every feature accepts");
    drop(s);
    let _ = server.await;
}
