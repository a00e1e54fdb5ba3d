//! The heartbeat channel is answered on the heartbeat thread
//! (`common::beats`): replies keep coming while the node's runtime is
//! blocked (a sync's frames being opened, an apply).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proto::{Channel, Message};
use primary::sender::Session;
use secondary::receiver::{serve_connection, SessionEnd};

use super::{offer, pair, Fixture};

fn beat(seq: u64) -> Message {
    Message::Heartbeat { generation: 1, seq, time_us: seq, received: 0 }
}

#[test]
fn heartbeats_are_answered_while_the_node_runtime_is_blocked() {
    let fx = Fixture::new();
    // the node's runtime, as a node runs it: one worker
    let node_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let client_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let listener = node_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let (replica, cfg) = (fx.replica.clone(), fx.cfg.clone());
    let server = node_rt.spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        serve_connection(s, &cfg, &replica, |_| {}).await
    });
    let mut hb = client_rt
        .block_on(Session::connect_channel(addr, &fx.secret, &offer(&fx.shape, 1, &pair()), Channel::Heartbeat))
        .expect("handshake");
    let exchange = |hb: &mut Session, seq: u64| {
        client_rt.block_on(async {
            hb.send(&beat(seq)).await.expect("send");
            tokio::time::timeout(Duration::from_secs(5), hb.recv()).await
        })
    };
    let answered = |got: &Result<Result<Option<Message>, _>, _>, seq: u64| matches!(got, Ok(Ok(Some(Message::Heartbeat { seq: s, .. }))) if *s == seq);
    let got = exchange(&mut hb, 0);
    assert!(answered(&got, 0), "{got:?}");
    // the node runtime's one worker is taken (at most 20 s)
    let (blocked, release) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (b, r) = (blocked.clone(), release.clone());
    node_rt.spawn(async move {
        b.store(true, Ordering::SeqCst);
        let until = Instant::now() + Duration::from_secs(20);
        while !r.load(Ordering::SeqCst) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        b.store(false, Ordering::SeqCst);
    });
    while !blocked.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(1));
    }
    for seq in 1..=3 {
        let got = exchange(&mut hb, seq);
        assert!(blocked.load(Ordering::SeqCst), "the reply to heartbeat {seq} waited for the node's runtime");
        assert!(answered(&got, seq), "heartbeat {seq}: {got:?}");
    }
    release.store(true, Ordering::SeqCst);
    drop(hb);
    let end = node_rt.block_on(server).expect("join").expect("server");
    assert_eq!(end, SessionEnd::Closed);
}
