//! The replication wire over real TCP on loopback, with a real replica: every
//! kind of bad stream is refused with its own error, and the replica is left
//! exactly at its committed epoch (same digest before and after).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use common::auth::Secret;
use common::frame::MAX_PAYLOAD;
use common::proto::{self, Message, Page, PageChunk, PAGE_SIZE};
use common::state::{MachineState, VmShape};
use primary::sender::{Offer, RawSession, SenderError, Session};
use secondary::receiver::{serve_connection, ReceiverConfig, ReceiverError, SessionEnd};
use secondary::replica::{data_page, Replica};
use tokio::net::TcpListener;
use vmm::memory::GuestMem;
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};
#[path = "wire/beats.rs"]
mod beats;
#[path = "wire/epochs.rs"]
mod epochs;
#[path = "wire/handshake.rs"]
mod handshake;

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
    proto::PairSettings { witness_vm: None, heartbeat_timeout_ms: 100, heartbeat_interval_ms: 20, net_mac: None }
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
                    Page::zero(gfn)
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
            let data = p.full_data().cloned().unwrap_or_else(|| Bytes::from(vec![0u8; PAGE_SIZE]));
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
