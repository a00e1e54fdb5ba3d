//! The card on a real TAP device, inside a network namespace of the test's
//! own (runtime::netns): the namespace's Linux stack talks to the "guest"
//! (this test, acting as the driver) through the bridge.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime::netns::{TestNet, BRIDGE};
use vmm::memory::GuestMem;
use vmm::net::tap::{RxPump, RxSink, Tap};
use vmm::net::{NetConfig, NetDevice, NET_HDR_LEN, NET_MMIO_GPA};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01];
const RING: u64 = 0x50_0000;
const BUF: u64 = 0x60_0000;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn reg(card: &NetDevice, off: u64, v: u32) {
    card.mmio_write(NET_MMIO_GPA + off, &v.to_le_bytes());
}

/// A minimal driver: receive queue of 8 buffers, transmit queue of 8.
fn setup(card: &NetDevice, mem: &GuestMem) {
    reg(card, 0x070, 3);
    reg(card, 0x024, 1);
    reg(card, 0x020, 1);
    reg(card, 0x024, 0);
    reg(card, 0x020, 1 << 5);
    reg(card, 0x070, 11);
    for q in 0..2u64 {
        reg(card, 0x030, q as u32);
        reg(card, 0x038, 8);
        let base = RING + q * 0x10000;
        for (off, a) in [(0x080, base), (0x090, base + 0x1000), (0x0a0, base + 0x2000)] {
            reg(card, off, a as u32);
            reg(card, off + 4, 0);
        }
        reg(card, 0x044, 1);
    }
    reg(card, 0x070, 15);
    for i in 0..8u64 {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&(BUF + i * 2048).to_le_bytes());
        d[8..12].copy_from_slice(&2048u32.to_le_bytes());
        d[12..14].copy_from_slice(&2u16.to_le_bytes());
        mem.write(RING + i * 16, &d).expect("desc");
        mem.write(RING + 0x1000 + 4 + i * 2, &(i as u16).to_le_bytes()).expect("avail");
    }
    mem.write(RING + 0x1000 + 2, &8u16.to_le_bytes()).expect("avail idx");
}

#[test]
fn frames_cross_a_real_tap_both_ways() {
    let net = match TestNet::create("tap") {
        Ok(n) => n,
        Err(runtime::netns::NetNsError::NotRoot(_)) => {
            eprintln!("skipped: creating a network namespace needs root");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let vm = Arc::new(kvm.create_vm().expect("vm"));
    let mem = Arc::new(GuestMem::new(64 << 20).expect("memory"));
    let card = Arc::new(NetDevice::new(Arc::clone(&mem), vm, NetConfig { mac: MAC }));
    setup(&card, &mem);
    let name = format!("ct{}", std::process::id() % 100_000);
    let tap = Tap::open(&name).expect("TAP (root)");
    ip(&["link", "set", "dev", &name, "netns", &net.name]);
    ip(&["-n", &net.name, "link", "set", "dev", &name, "master", BRIDGE, "up"]);
    let pump = RxPump::start(Arc::clone(&tap), RxSink::Card(Arc::clone(&card))).expect("pump");

    // the namespace looks for 10.77.0.2: its ARP request reaches the guest's receive ring
    std::thread::sleep(Duration::from_millis(300));
    // (a TCP connection attempt: ping may not be installed)
    let _ = net.command("timeout").args(["1", "bash", "-c", "echo > /dev/tcp/10.77.0.2/7"]).output();
    let end = Instant::now() + Duration::from_secs(5);
    let mut arp = None;
    while arp.is_none() && Instant::now() < end {
        let used = mem.read_u32(RING + 0x2000).expect("used") >> 16;
        for i in 0..used.min(8) {
            let len = mem.read_u32(RING + 0x2000 + 4 + u64::from(i) * 8 + 4).expect("len") as usize;
            let mut b = vec![0u8; len];
            mem.read(BUF + u64::from(i) * 2048, &mut b).expect("buf");
            if len > NET_HDR_LEN + 14 && b[NET_HDR_LEN + 12..NET_HDR_LEN + 14] == [0x08, 0x06] {
                arp = Some(b[NET_HDR_LEN..].to_vec());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let arp = arp.unwrap_or_else(|| {
        panic!(
            "no ARP request reached the card: pump {} counts {:?} waiting {:?} first {:x?}",
            pump.received(),
            card.counts(),
            card.save().rx_backlog.len(),
            {
                let mut b = vec![0u8; 60];
                mem.read(BUF, &mut b).expect("buf");
                b
            }
        )
    });
    assert_eq!(&arp[0..6], &[0xff; 6], "a broadcast");
    assert_eq!(&arp[38..42], &[10, 77, 0, 2], "asking for the guest's address");
    assert!(pump.received() >= 1);

    // the guest answers that 10.77.0.2 is at MAC: the frame leaves through the TAP
    // and the namespace's neighbour table learns it
    let mut reply = vec![0u8; 42];
    reply[0..6].copy_from_slice(&arp[6..12]);
    reply[6..12].copy_from_slice(&MAC);
    reply[12..14].copy_from_slice(&[0x08, 0x06]);
    reply[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    reply[22..28].copy_from_slice(&MAC);
    reply[28..32].copy_from_slice(&[10, 77, 0, 2]);
    reply[32..42].copy_from_slice(&arp[22..32]);
    let mut b = vec![0u8; NET_HDR_LEN];
    b.extend_from_slice(&reply);
    mem.write(BUF + 0x10_0000, &b).expect("tx buf");
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&(BUF + 0x10_0000).to_le_bytes());
    d[8..12].copy_from_slice(&(b.len() as u32).to_le_bytes());
    mem.write(RING + 0x10000, &d).expect("tx desc");
    mem.write(RING + 0x11000 + 4, &0u16.to_le_bytes()).expect("tx avail");
    mem.write(RING + 0x11000 + 2, &1u16.to_le_bytes()).expect("tx avail idx");
    let frames = card.take_transmitted();
    assert_eq!(frames, vec![reply.clone()]);
    for f in &frames {
        tap.send(f);
    }
    assert_eq!(tap.sent_counts(), (1, 0));
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let out = net.command("ip").args(["neigh", "show", "10.77.0.2"]).output().expect("ip neigh");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains("52:54:00:ab:cd:01") {
            break;
        }
        assert!(Instant::now() < end, "the namespace never learned the guest's MAC: {text:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(pump);
}
