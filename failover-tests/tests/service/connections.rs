//! Service end to end: client connections to the service port, and what
//! the replication link carries.

use std::time::Duration;

use client::KvClient;
use common::state::KvOp;
use failover_tests::cluster::{Cluster, NodeOpts};
use failover_tests::proxy::Proxy;
use failover_tests::serial;

use super::{rt, T};

/// The service port holds up: 2000 client connections opened, used once and
/// closed leave the node's open file count where it started (each used to
/// leak its socket and a task).
#[test]
fn service_connections_are_freed_when_they_close() {
    let _g = serial();
    let c = Cluster::new("fds");
    let p = c.primary_with("p", &NodeOpts::default(), None, false);
    p.wait_status(T, |v| v["role"] == "primary").expect("primary up");
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", p.child.id())).map(|d| d.count()).unwrap_or(0);
    let rt = rt();
    let svc = p.service;
    // warm up (lazily opened files, runtime threads)
    rt.block_on(async {
        let mut k = KvClient::new(1, vec![svc]);
        k.call(KvOp::Put, 1, 1).await.expect("warm-up call");
    });
    std::thread::sleep(Duration::from_millis(300));
    let before = fds();
    rt.block_on(async {
        // 40 rounds of 50 clients at once, each with one request on its own
        // connection, closed after its answer
        for round in 0..40u32 {
            let calls: Vec<_> = (0..50u32)
                .map(|j| {
                    tokio::spawn(async move {
                        let id = 100 + round * 50 + j;
                        let mut k = KvClient::new(id, vec![svc]);
                        k.call(KvOp::Put, u64::from(id), 1).await.map(|_| ())
                    })
                })
                .collect();
            for c in calls {
                c.await.expect("join").expect("call");
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let after = fds();
    eprintln!("open files of the node: {before} before, {after} after 2000 connections");
    assert!(after <= before + 4, "connections leaked: {before} open files before, {after} after");
}

/// Responses go to the connection that sent the request (issue 12): a
/// second connection declaring the same client id cannot take a live
/// connection's responses, and a retry of a request on a new connection is
/// still answered (the exactly-once rule needs it).
#[test]
fn a_second_connection_cannot_take_a_live_connections_responses() {
    use common::service::{ClientMsg, NodeMsg};
    use common::state::KvRequest;
    use futures::{SinkExt, StreamExt};
    let _g = serial();
    let c = Cluster::new("steal");
    // protected with long timer-only epochs: a response leaves only after
    // its epoch's ack, so the stranger's request below lands before it
    let o = NodeOpts { epoch_ms: 300, extra: vec!["--min-epoch-us".into(), "0".into()], ..NodeOpts::default() };
    let s = c.secondary("s", &o, None);
    let p = c.primary("p", &o, s.listen.expect("listen"));
    p.wait_status(T, |v| v["protection"] == "protected")
        .unwrap_or_else(|| panic!("never protected:\n{}", p.log_tail()));
    let svc = p.service;
    rt().block_on(async {
        type Conn = tokio_util::codec::Framed<tokio::net::TcpStream, tokio_util::codec::LengthDelimitedCodec>;
        let connect = || async {
            let s = tokio::net::TcpStream::connect(svc).await.expect("connect");
            tokio_util::codec::Framed::new(s, runtime::service::service_codec())
        };
        async fn send(conn: &mut Conn, seq: u32, key: u64) {
            let req = KvRequest { client: 77, seq, op: KvOp::Put, key, value: u64::from(seq) };
            let b = bytes::Bytes::from(common::codec::encode(&ClientMsg::Request(req)).expect("encode"));
            conn.send(b).await.expect("send")
        }
        // the response to `seq` on `conn` within `t` (others are skipped)
        async fn answer(conn: &mut Conn, seq: u32, t: Duration) -> bool {
            let end = tokio::time::Instant::now() + t;
            while let Ok(Some(Ok(f))) = tokio::time::timeout_at(end, conn.next()).await {
                if let Ok(NodeMsg::Response { resp, .. }) = common::codec::decode::<NodeMsg>(&f) {
                    if resp.seq == seq {
                        return true;
                    }
                }
            }
            false
        }
        let mut a = connect().await;
        send(&mut a, 1, 1).await;
        assert!(answer(&mut a, 1, T).await, "no answer to the first request");
        // a stranger declares client 77 on its own connection
        let mut b = connect().await;
        send(&mut b, 2, 2).await;
        assert!(answer(&mut b, 2, T).await, "the stranger's own request is answered");
        // the live connection's next request, and at once the stranger's:
        // a's response still goes to a
        send(&mut a, 3, 3).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        send(&mut b, 4, 4).await;
        assert!(answer(&mut a, 3, T).await, "the second connection took the first one's response");
        assert!(!answer(&mut b, 3, Duration::from_millis(300)).await, "b received a response it did not ask for");
        // a client that reconnects retries the same request: answered there
        let mut a2 = connect().await;
        send(&mut a2, 3, 3).await;
        assert!(answer(&mut a2, 3, T).await, "a retry on a new connection was not answered");
    });
}

/// Guest memory travels encrypted (issue 12): clients write values carrying
/// a marker, a recording proxy between the nodes keeps every byte the
/// primary sends, and the marker is not in it; the same marker is found in
/// what the clients sent to the primary (the check itself works), and the
/// secondary holds it (it took over with the values).
#[test]
fn the_replication_link_carries_no_guest_data_in_clear() {
    let _g = serial();
    let c = Cluster::new("plaintext");
    let o = NodeOpts::default();
    let s = c.secondary("s", &o, None);
    let rt = rt();
    let link = rt.block_on(Proxy::start(s.listen.expect("listen"))).expect("start the proxy");
    link.record();
    let mut p = c.primary("p", &o, link.addr);
    p.wait_status(T, |v| v["protection"] == "protected")
        .unwrap_or_else(|| panic!("never protected:\n{}", p.log_tail()));
    let front = rt.block_on(Proxy::start(p.service)).expect("start the proxy");
    front.record();
    const MARKER: u64 = 0x5eb1_7a5c_a570_4c1e;
    let svc = front.addr;
    rt.block_on(async {
        let mut k = KvClient::new(9, vec![svc]);
        for key in 0..64u64 {
            k.call(KvOp::Put, key, MARKER).await.expect("put");
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let needle = MARKER.to_le_bytes();
    let has = |hay: &[u8]| hay.windows(8).any(|w| w == needle);
    let sent = front.recording();
    assert!(has(&sent), "the marker is not in the clients' requests: the check cannot see it");
    let wire = link.recording();
    assert!(wire.len() > 64 << 10, "the link carried only {} bytes", wire.len());
    assert!(!has(&wire), "guest data crossed the replication link in clear");
    p.kill9();
    s.wait_status(T, |v| v["role"] == "primary").unwrap_or_else(|| panic!("no takeover:\n{}", s.log_tail()));
    let ssvc = s.service;
    let v = rt.block_on(async { KvClient::new(10, vec![ssvc]).call(KvOp::Get, 63, 0).await.expect("get") });
    assert_eq!(v.resp.value, MARKER, "the secondary took over with the values");
}
