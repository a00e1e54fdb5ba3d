//! The network card's device side, driven the way a guest driver drives it:
//! registers through MMIO accesses, rings and buffers in guest memory.
//! Real KVM (the card raises its interrupt through the VM).

use std::sync::Arc;

use vmm::memory::GuestMem;
use vmm::net::{NetConfig, NetDevice, NET_HDR_LEN, NET_MMIO_GPA, RX_BACKLOG};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const QSIZE: u16 = 16;
/// Driver-side layout: per queue a descriptor table, avail and used rings.
const RINGS: [u64; 2] = [0x50_0000, 0x51_0000];
const BUFS: [u64; 2] = [0x60_0000, 0x70_0000];
const BUF_LEN: u32 = 2048;

struct Driver {
    mem: Arc<GuestMem>,
    card: Arc<NetDevice>,
    avail_idx: [u16; 2],
    used_seen: [u16; 2],
}

fn desc(q: usize) -> u64 {
    RINGS[q]
}
fn avail(q: usize) -> u64 {
    RINGS[q] + 0x1000
}
fn used(q: usize) -> u64 {
    RINGS[q] + 0x2000
}

impl Driver {
    fn reg_w(&self, off: u64, v: u32) {
        self.card.mmio_write(NET_MMIO_GPA + off, &v.to_le_bytes());
    }
    fn reg_r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.card.mmio_read(NET_MMIO_GPA + off, &mut b);
        u32::from_le_bytes(b)
    }

    fn new() -> Driver {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("vm"));
        let mem = Arc::new(GuestMem::new(64 << 20).expect("guest memory"));
        let card = Arc::new(NetDevice::new(Arc::clone(&mem), vm, NetConfig { mac: MAC }));
        Driver { mem, card, avail_idx: [0; 2], used_seen: [0; 2] }
    }

    /// The virtio 1.x initialisation sequence (spec 3.1.1).
    fn init(&mut self) {
        assert_eq!(self.reg_r(0x000), 0x7472_6976, "magic");
        assert_eq!(self.reg_r(0x004), 2, "virtio-mmio version 2");
        assert_eq!(self.reg_r(0x008), 1, "a network card");
        self.reg_w(0x070, 0);
        self.reg_w(0x070, 1 | 2); // ACKNOWLEDGE | DRIVER
        self.reg_w(0x014, 0);
        let lo = self.reg_r(0x010);
        self.reg_w(0x014, 1);
        let hi = self.reg_r(0x010);
        assert_eq!(hi & 1, 1, "VERSION_1 offered");
        assert_ne!(lo & (1 << 5), 0, "MAC offered");
        self.reg_w(0x024, 0);
        self.reg_w(0x020, 1 << 5);
        self.reg_w(0x024, 1);
        self.reg_w(0x020, 1);
        self.reg_w(0x070, 1 | 2 | 8);
        assert_ne!(self.reg_r(0x070) & 8, 0, "FEATURES_OK kept");
        for q in 0..2u32 {
            let qi = q as usize;
            self.reg_w(0x030, q);
            assert_eq!(self.reg_r(0x034), 256);
            self.reg_w(0x038, u32::from(QSIZE));
            for (off, addr) in [(0x080, desc(qi)), (0x090, avail(qi)), (0x0a0, used(qi))] {
                self.reg_w(off, addr as u32);
                self.reg_w(off + 4, (addr >> 32) as u32);
            }
            self.reg_w(0x044, 1);
            assert_eq!(self.reg_r(0x044), 1, "queue {q} ready");
        }
        self.reg_w(0x070, 1 | 2 | 8 | 4);
        let mut mac = [0u8; 6];
        for (i, m) in mac.iter_mut().enumerate() {
            let mut b = [0u8; 1];
            self.card.mmio_read(NET_MMIO_GPA + 0x100 + i as u64, &mut b);
            *m = b[0];
        }
        assert_eq!(mac, MAC);
    }

    /// Puts buffer `slot` of queue `q` (length `len`, device-writable for
    /// the receive queue) on the avail ring.
    fn post(&mut self, q: usize, slot: u16, len: u32) {
        let addr = BUFS[q] + u64::from(slot) * u64::from(BUF_LEN);
        let flags: u16 = if q == 0 { 2 } else { 0 }; // VIRTQ_DESC_F_WRITE
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        self.mem.write(desc(q) + u64::from(slot) * 16, &d).expect("descriptor");
        let i = self.avail_idx[q];
        self.mem.write(avail(q) + 4 + u64::from(i % QSIZE) * 2, &slot.to_le_bytes()).expect("avail ring");
        self.avail_idx[q] = i.wrapping_add(1);
        self.mem.write(avail(q) + 2, &self.avail_idx[q].to_le_bytes()).expect("avail idx");
    }

    /// Used entries not seen yet: (descriptor, length).
    fn reap(&mut self, q: usize) -> Vec<(u32, u32)> {
        let idx = self.mem.read_u32(used(q)).expect("used") >> 16;
        let mut out = Vec::new();
        while self.used_seen[q] != idx as u16 {
            let e = used(q) + 4 + u64::from(self.used_seen[q] % QSIZE) * 8;
            out.push((self.mem.read_u32(e).expect("id"), self.mem.read_u32(e + 4).expect("len")));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    fn transmit(&mut self, slot: u16, frame: &[u8]) {
        let addr = BUFS[1] + u64::from(slot) * u64::from(BUF_LEN);
        let mut b = vec![0u8; NET_HDR_LEN];
        b.extend_from_slice(frame);
        self.mem.write(addr, &b).expect("tx buffer");
        self.post(1, slot, b.len() as u32);
    }
}

fn frame(n: u8, len: usize) -> Vec<u8> {
    let mut f = vec![n; len];
    f[..6].copy_from_slice(&MAC);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, n]);
    f
}

#[test]
fn a_frame_goes_round_both_queues() {
    let mut d = Driver::new();
    d.init();
    for slot in 0..4 {
        d.post(0, slot, BUF_LEN);
    }
    // the card asks the driver not to notify transmissions: it takes them at the boundary
    assert_eq!(d.mem.read_u32(used(1)).expect("used flags") & 1, 1, "VIRTQ_USED_F_NO_NOTIFY on the transmit queue");
    let f = frame(7, 100);
    d.card.receive(f.clone());
    let got = d.reap(0);
    assert_eq!(got, vec![(0, (NET_HDR_LEN + 100) as u32)]);
    let mut b = vec![0u8; NET_HDR_LEN + 100];
    d.mem.read(BUFS[0], &mut b).expect("rx buffer");
    assert_eq!(b[10], 1, "num_buffers");
    assert_eq!(&b[NET_HDR_LEN..], &f[..]);
    assert_eq!(d.card.counts().rx_frames, 1);

    assert!(!d.card.has_transmit());
    d.transmit(0, &frame(1, 60));
    d.transmit(1, &frame(2, 1514));
    assert!(d.card.has_transmit(), "queued frames are seen from the avail index alone");
    let sent = d.card.take_transmitted();
    assert_eq!(sent, vec![frame(1, 60), frame(2, 1514)], "in order, without the header");
    assert_eq!(d.reap(1), vec![(0, 0), (1, 0)]);
    assert!(!d.card.has_transmit());
    assert!(d.card.take_transmitted().is_empty());
}

#[test]
fn received_frames_are_vmm_dirty_pages_of_the_epoch() {
    let mut d = Driver::new();
    d.init();
    d.post(0, 3, BUF_LEN);
    d.mem.take_vmm_dirty();
    d.card.receive(frame(9, 64));
    let mut dirty = d.mem.take_vmm_dirty();
    dirty.sort_unstable();
    let buf_page = (BUFS[0] + 3 * u64::from(BUF_LEN)) / 4096;
    let used_page = used(0) / 4096;
    assert!(dirty.contains(&buf_page), "the frame's page {buf_page} is dirty: {dirty:?}");
    assert!(dirty.contains(&used_page), "the used ring's page {used_page} is dirty: {dirty:?}");
    // and a transmission's used ring too
    d.transmit(0, &frame(1, 60));
    d.mem.take_vmm_dirty();
    assert_eq!(d.card.take_transmitted().len(), 1);
    assert!(d.mem.take_vmm_dirty().contains(&(used(1) / 4096)));
}

#[test]
fn a_quiesced_card_writes_nothing_until_it_runs_again() {
    let mut d = Driver::new();
    d.init();
    d.post(0, 0, BUF_LEN);
    d.mem.take_vmm_dirty();
    d.card.quiesce();
    d.card.receive(frame(1, 80));
    assert!(d.reap(0).is_empty());
    assert!(d.mem.take_vmm_dirty().is_empty(), "nothing written while quiesced");
    d.card.unquiesce();
    assert_eq!(d.reap(0).len(), 1, "delivered on unquiesce");
}

#[test]
fn a_flood_is_bounded_and_counted() {
    let mut d = Driver::new();
    d.init();
    // no receive buffer posted: frames wait, up to the backlog
    for i in 0..RX_BACKLOG + 10 {
        d.card.receive(frame(i as u8, 60));
    }
    assert_eq!(d.card.counts().rx_dropped, 10);
    assert_eq!(d.card.save().rx_backlog.len(), RX_BACKLOG);
    // runts and giants are dropped
    d.card.receive(vec![0; 10]);
    d.card.receive(vec![0; 9000]);
    assert_eq!(d.card.counts().rx_dropped, 12);
}

#[test]
fn bad_driver_input_is_refused_without_harm() {
    let mut d = Driver::new();
    d.reg_w(0x070, 1 | 2);
    // a feature the card does not offer, and no VERSION_1: FEATURES_OK is not kept
    d.reg_w(0x024, 0);
    d.reg_w(0x020, 1 << 0);
    d.reg_w(0x070, 1 | 2 | 8);
    assert_eq!(d.reg_r(0x070) & 8, 0);
    // a queue whose rings are outside RAM cannot be enabled: the card needs a reset
    d.reg_w(0x070, 0);
    d.reg_w(0x070, 1 | 2);
    d.reg_w(0x024, 1);
    d.reg_w(0x020, 1);
    d.reg_w(0x070, 1 | 2 | 8);
    d.reg_w(0x030, 0);
    d.reg_w(0x038, u32::from(QSIZE));
    d.reg_w(0x080, 0xd000_0000);
    d.reg_w(0x044, 1);
    assert_eq!(d.reg_r(0x044), 0);
    assert_ne!(d.reg_r(0x070) & 0x40, 0, "DEVICE_NEEDS_RESET");
    // a reset brings it back, and a good setup works
    d.init();
    // a transmit buffer too short to hold a header and an Ethernet header is dropped and counted
    d.post(1, 0, 8);
    assert!(d.card.take_transmitted().is_empty());
    assert_eq!(d.card.counts().tx_dropped, 1);
    assert_eq!(d.reap(1), vec![(0, 0)], "the buffer still goes back to the driver");
    // unknown registers read as zero, writes to them are ignored
    d.reg_w(0x0f0, 5);
    assert_eq!(d.reg_r(0x0f0), 0);
}

#[test]
fn the_driver_kicks_for_receive_buffers_only_when_the_card_ran_out() {
    let mut d = Driver::new();
    d.init();
    let flags = |d: &Driver| d.mem.read_u32(used(0)).expect("used flags") & 1;
    assert_eq!(flags(&d), 1, "no kicks wanted while buffers are to spare");
    d.post(0, 0, BUF_LEN);
    d.card.receive(frame(1, 60));
    d.card.receive(frame(2, 60)); // no buffer left for it
    assert_eq!(flags(&d), 0, "out of buffers: the card asks for a kick");
    d.post(0, 1, BUF_LEN);
    d.card.mmio_write(NET_MMIO_GPA + 0x050, &0u32.to_le_bytes());
    assert_eq!(d.reap(0).len(), 2);
    assert_eq!(flags(&d), 1, "the backlog drained: no kicks wanted again");
}

/// Set (to a directory) only in the child process of
/// [`saved_mid_traffic_a_card_in_a_new_process_carries_on`].
const CHILD_DIR: &str = "CASTOR_NET_RESTORE_CHILD_DIR";
/// The driver's region of guest memory (rings and buffers) that travels.
const REGION: (u64, usize) = (0x50_0000, 0x30_0000);

/// A card saved mid-traffic (a frame waiting for a buffer, a frame queued
/// after the boundary): the saved card and the guest memory it works on go
/// to files, and a new process (this test binary again, running
/// [`restoring_half_in_a_new_process`]) builds a card on a new VM from them
/// and carries on: the frame that waited for a buffer arrives, the frame
/// queued after the boundary is taken. The secondary does the same at a
/// failover (the suite's net-* scenarios check it end to end).
#[test]
fn saved_mid_traffic_a_card_in_a_new_process_carries_on() {
    if std::env::var_os(CHILD_DIR).is_some() {
        return; // (the child runs the other half only)
    }
    let mut d = Driver::new();
    d.init();
    d.post(0, 0, BUF_LEN);
    d.card.receive(frame(1, 70));
    d.card.receive(frame(2, 70)); // waits: one buffer only
    d.transmit(0, &frame(3, 60));
    d.card.quiesce();
    assert_eq!(d.card.take_transmitted(), vec![frame(3, 60)]);
    d.transmit(1, &frame(4, 60)); // queued after the boundary
    let st = d.card.save();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("card"), common::codec::encode(&st).expect("encode")).expect("write card");
    let mut region = vec![0u8; REGION.1];
    d.mem.read(REGION.0, &mut region).expect("read memory");
    std::fs::write(dir.path().join("memory"), &region).expect("write memory");
    let driver: Vec<u8> = d.avail_idx.iter().chain(&d.used_seen).flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.path().join("driver"), driver).expect("write driver");
    drop(d);
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "restoring_half_in_a_new_process", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir.path())
        .output()
        .expect("spawn the child");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the restored card did not carry on:\n{text}");
    assert!(text.contains("1 passed"), "the child did not run the restoring half:\n{text}");
    assert!(text.contains("restored card carried on"), "{text}");
}

/// The child's half of the test above (returns at once when run by itself).
#[test]
fn restoring_half_in_a_new_process() {
    let Some(dir) = std::env::var_os(CHILD_DIR).map(std::path::PathBuf::from) else { return };
    let st = common::codec::decode(&std::fs::read(dir.join("card")).expect("card")).expect("decode the card");
    let mut d = Driver::new();
    d.mem.write(REGION.0, &std::fs::read(dir.join("memory")).expect("memory")).expect("write memory");
    let v: Vec<u16> = std::fs::read(dir.join("driver"))
        .expect("driver")
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    d.avail_idx = [v[0], v[1]];
    d.used_seen = [v[2], v[3]];
    d.card.restore(&st).expect("restore");
    assert_eq!(d.card.save(), st, "the restored card saves what it was given");
    d.card.unquiesce();
    d.post(0, 1, BUF_LEN);
    d.card.mmio_write(NET_MMIO_GPA + 0x050, &0u32.to_le_bytes()); // notify: buffers posted
    assert_eq!(d.reap(0), vec![(0, 82), (1, 82)], "the waiting frame arrives in the new buffer");
    let mut b = vec![0u8; 70];
    d.mem.read(BUFS[0] + u64::from(BUF_LEN) + NET_HDR_LEN as u64, &mut b).expect("read");
    assert_eq!(b, frame(2, 70), "the frame that waited, intact");
    assert_eq!(d.card.take_transmitted(), vec![frame(4, 60)]);
    // a card with another MAC refuses the state
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let other = NetDevice::new(Arc::clone(&d.mem), Arc::new(kvm.create_vm().expect("vm")), NetConfig { mac: [2; 6] });
    assert!(other.restore(&st).is_err());
    println!("restored card carried on");
}

#[test]
fn the_card_is_settled_only_once_the_driver_handled_every_frame() {
    let mut d = Driver::new();
    assert!(!d.card.rx_settled(), "not before the driver is ready");
    d.init();
    for slot in 0..QSIZE - 1 {
        d.post(0, slot, BUF_LEN);
    }
    assert!(!d.card.rx_settled(), "a buffer short of the queue's size");
    d.post(0, QSIZE - 1, BUF_LEN);
    assert!(d.card.rx_settled(), "every buffer posted, nothing delivered");
    d.card.receive(frame(1, 80));
    d.card.receive(frame(2, 80));
    assert!(!d.card.rx_settled(), "two frames with the driver");
    let got = d.reap(0);
    assert_eq!(got.len(), 2);
    // the driver handled the first and posts its buffer again
    d.post(0, got[0].0 as u16, BUF_LEN);
    assert!(!d.card.rx_settled(), "one frame still with the driver");
    d.post(0, got[1].0 as u16, BUF_LEN);
    assert!(d.card.rx_settled(), "every frame handled");
    // a frame waiting in the backlog (quiesced) is not handled
    d.card.quiesce();
    d.card.receive(frame(3, 80));
    assert!(!d.card.rx_settled(), "a frame waits in the backlog");
    d.card.unquiesce();
    assert!(!d.card.rx_settled(), "delivered, not handled");
    let got = d.reap(0);
    d.post(0, got[0].0 as u16, BUF_LEN);
    assert!(d.card.rx_settled());
}
