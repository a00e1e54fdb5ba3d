//! The driver against a device model that follows the VMM's contract
//! (host tests): ring setup, no exits on the hot path, interrupt suppression
//! around sleep, and the server end to end through the virtqueues with
//! transmit buffers returned only at "epoch boundaries".

use super::*;
use crate::server::{NetConfig, Server};
use crate::test_wire::{Port, Wire};
use crate::virtio_model::{DevState, ModelTransport, MAC};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::tcp;
use smoltcp::time::Duration;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use std::cell::RefCell;
use std::rc::Rc;
use std::string::String;

fn card(rx_no_notify: bool) -> (NetDev<ModelTransport>, Rc<RefCell<DevState>>) {
    let mut state = DevState::default();
    state.rx_no_notify = rx_no_notify;
    let st = Rc::new(RefCell::new(state));
    let dev = NetDev::new(ModelTransport(st.clone())).expect("driver init");
    (dev, st)
}

#[test]
fn init_posts_every_rx_buffer_and_suppresses_interrupts() {
    let (dev, st) = card(true);
    let s = st.borrow();
    assert_eq!(s.driver_features, (1 << 32) | (1 << 5), "VERSION_1 | MAC only");
    assert_eq!(s.rx_posted(), QUEUE_SIZE as u16);
    assert!(s.no_interrupt(0) && s.no_interrupt(1), "busy by default: NO_INTERRUPT set");
    assert_eq!(s.notifies, [0, 0], "no QueueNotify while the device sets NO_NOTIFY");
    assert_eq!(dev.mac(), MAC);
    // a device that leaves RX notifications on gets one per posted buffer
    let (_dev, st) = card(false);
    assert_eq!(st.borrow().notifies, [QUEUE_SIZE as u32, 0]);
}

#[test]
fn sleep_asks_for_an_interrupt_only_while_it_waits() {
    let (mut dev, st) = card(true);
    let mut waited = false;
    dev.sleep(false, || {
        let s = st.borrow();
        assert!(!s.no_interrupt(0), "RX interrupts must be on while asleep");
        assert!(s.no_interrupt(1), "TX interrupts stay off while TX buffers are free");
        waited = true;
    });
    assert!(waited);
    assert!(st.borrow().no_interrupt(0), "and off again once awake");
    waited = false;
    dev.sleep(true, || {
        let s = st.borrow();
        assert!(s.no_interrupt(0) && !s.no_interrupt(1), "only TX on when waiting for TX buffers");
        waited = true;
    });
    assert!(waited);
    assert!(st.borrow().no_interrupt(0) && st.borrow().no_interrupt(1));
    // a frame already in the used ring: no sleep at all
    assert!(st.borrow_mut().deliver(&[0xff; 60]));
    dev.sleep(false, || panic!("slept with a frame waiting"));
    assert!(dev.rx_ready());
    // all TX buffers out: a waiting frame is no reason to stay awake, a
    // returned TX buffer is
    let now = Instant::from_millis(0);
    while let Some(tx) = dev.transmit(now) {
        phy::TxToken::consume(tx, 60, |b| b.fill(0));
    }
    waited = false;
    dev.sleep(true, || waited = true);
    assert!(waited, "a frame it cannot answer must not keep the guest spinning");
    st.borrow_mut().take_tx();
    dev.sleep(true, || panic!("slept with TX buffers returned"));
}

#[test]
fn frames_round_trip_and_tx_full_returns_none() {
    let (mut dev, st) = card(true);
    let now = Instant::from_millis(0);
    // fill every TX buffer without the device taking any
    let mut sent = 0;
    while let Some(tx) = dev.transmit(now) {
        phy::TxToken::consume(tx, 60, |b| b.fill(sent as u8));
        sent += 1;
    }
    assert_eq!(sent, QUEUE_SIZE);
    assert!(dev.tx_blocked() && dev.stats.tx_full >= 1);
    // a frame arrives: no TX buffer for a reply, so it waits in the ring
    assert!(st.borrow_mut().deliver(&[7; 100]));
    assert!(dev.receive(now).is_none());
    // epoch boundary: the device takes the frames, in order
    let frames = st.borrow_mut().take_tx();
    assert_eq!(frames.len(), QUEUE_SIZE);
    assert!(frames.iter().enumerate().all(|(i, f)| f.len() == 60 && f[0] == i as u8));
    let (rx, _tx) = dev.receive(now).expect("frame after TX buffers came back");
    phy::RxToken::consume(rx, |b| assert_eq!(b, &[7; 100][..]));
    dev.service();
    assert_eq!(st.borrow().rx_posted(), QUEUE_SIZE as u16, "the RX buffer was posted again");
    assert_eq!(st.borrow().notifies, [0, 0]);
}

/// A server behind the virtio card and smoltcp clients on a wire; the device
/// hands transmitted frames to the wire every `epoch` steps.
fn serve_through_virtqueues(epoch: usize) -> Stats {
    let (mut dev, st) = card(true);
    let mut now = Instant::from_millis(1);
    let cfg = NetConfig { ip: [10, 0, 0, 2], prefix: 24, gateway: None, port: 6379 };
    let mut server = Server::new(&mut dev, MAC, &cfg, 3, now);
    let to_server: Wire = Rc::default();
    let to_client: Wire = Rc::default();
    let mut cdev = Port { rx: to_client.clone(), tx: to_server.clone(), budget: None };
    let mut client = Interface::new(Config::new(HardwareAddress::Ethernet(EthernetAddress([2, 0, 0, 0, 0, 1]))), &mut cdev, now);
    client.update_ip_addrs(|a| a.push(IpCidr::new(IpAddress::v4(10, 0, 0, 1), 24)).unwrap());
    let mut socks = SocketSet::new(Vec::new());
    let n = 64;
    let mut handles = Vec::new();
    for i in 0..n {
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; 16384]), tcp::SocketBuffer::new(vec![0; 8192]));
        s.set_ack_delay(None);
        s.connect(client.context(), (IpAddress::v4(10, 0, 0, 2), 6379), 50000 + i as u16).unwrap();
        handles.push((socks.add(s), String::new(), false));
    }
    let per_client = 30;
    let mut dropped = 0;
    for step in 0..100_000 {
        now += Duration::from_millis(1);
        client.poll(now, &mut cdev, &mut socks);
        while let Some(f) = to_server.borrow_mut().pop_front() {
            dropped += usize::from(!st.borrow_mut().deliver(&f));
        }
        dev.service();
        while server.poll(now, &mut dev) {}
        if step % epoch == 0 {
            to_client.borrow_mut().extend(st.borrow_mut().take_tx());
        }
        client.poll(now, &mut cdev, &mut socks);
        for (i, (h, got, sent)) in handles.iter_mut().enumerate() {
            let s = socks.get_mut::<tcp::Socket>(*h);
            if s.may_send() && !*sent {
                let mut req = String::new();
                for _ in 0..per_client {
                    req.push_str(&std::format!("INCR c{i}\r\n"));
                }
                req.push_str(&std::format!("SET k{i} v{i}\r\nGET k{i}\r\n"));
                req.push_str(&std::format!("SET big{i} {}\r\n", big(i)));
                for _ in 0..3 {
                    req.push_str(&std::format!("GET big{i}\r\n"));
                }
                assert_eq!(s.send_slice(req.as_bytes()).unwrap(), req.len());
                *sent = true;
            }
            while s.can_recv() {
                s.recv(|d| {
                    got.push_str(std::str::from_utf8(d).unwrap());
                    (d.len(), ())
                })
                .unwrap();
            }
        }
        if handles.iter().all(|(_, got, _)| got.matches("\r\n").count() >= per_client + 4 + 2 * 3) {
            break;
        }
    }
    for (i, (_, got, _)) in handles.iter().enumerate() {
        let mut want = String::new();
        for k in 1..=per_client {
            want.push_str(&std::format!(":{k}\r\n"));
        }
        want.push_str(&std::format!("+OK\r\n${}\r\nv{i}\r\n+OK\r\n", std::format!("v{i}").len()));
        for _ in 0..3 {
            want.push_str(&std::format!("$3000\r\n{}\r\n", big(i)));
        }
        assert_eq!(got, &want, "client {i}");
    }
    let s = st.borrow();
    assert_eq!(s.notifies, [0, 0], "the hot path wrote no QueueNotify");
    assert_eq!(dropped, 0, "the device always found an RX buffer");
    assert!(dev.stats.tx_frames > 0 && dev.stats.rx_frames > 0);
    assert_eq!((dev.stats.rx_errors, dev.stats.tx_errors), (0, 0));
    std::eprintln!("epoch {epoch} steps: {:?}", dev.stats);
    dev.stats
}

/// A 3000-byte value particular to client `i`.
fn big(i: usize) -> String {
    (0..3000).map(|k| char::from(b'a' + ((i + k) % 26) as u8)).collect()
}

#[test]
fn sixty_four_clients_through_the_virtqueues() {
    let _ = serve_through_virtqueues(1);
}

#[test]
fn sixty_four_clients_with_tx_taken_rarely() {
    // TX buffers come back only every 20 ms: the ring fills, smoltcp waits
    let st = serve_through_virtqueues(20);
    assert!(st.tx_full > 0, "the ring never filled: the test lost its point");
}
