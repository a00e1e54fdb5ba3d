//! The guest's network card: virtio-net (virtio 1.x) over the virtio-mmio
//! transport, with rust-vmm's `virtio-queue` on the device side.
//!
//! How it fits the epoch path (docs/epoch-path.md):
//! * **Transmit** is not driven by the guest's notifications: the device keeps
//!   `VIRTQ_USED_F_NO_NOTIFY` set on the transmit queue (an MMIO exit costs
//!   ~75 us on this host) and takes what the guest queued at the epoch
//!   boundary, with every vCPU parked ([`NetDevice::take_transmitted`]).
//!   Those frames are output of the epoch: they go to the outbox, are saved
//!   with the epoch's state and leave the host only once the epoch is
//!   acknowledged (output commit, [`common::state::Output::Frame`]).
//! * **Receive**: frames from the backend go into the guest at once
//!   ([`NetDevice::receive`]), written through [`GuestMem`] so they are
//!   VMM-dirty pages of the running epoch, and the guest is woken by an MSI
//!   (vector [`crate::abi::VEC_NET`] to vCPU 0) unless it asked for none
//!   (`VIRTQ_AVAIL_F_NO_INTERRUPT`). While the machine is paused the device is
//!   quiesced ([`NetDevice::quiesce`]): frames wait in a bounded queue, so
//!   nothing writes guest memory or raises an interrupt between the harvest
//!   and the state save.
//! * Its state (transport registers, both queues' indexes and addresses,
//!   frames not yet delivered) is [`common::state::NetState`], part of every
//!   epoch's machine state.

mod mmio;
mod queues;
pub mod tap;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use common::state::{NetState, QueueSnapshot};
use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use virtio_queue::{Queue, QueueT};

use crate::devices::LogLimiter;
use crate::memory::GuestMem;

pub use mmio::{NET_MMIO_GPA, NET_MMIO_SIZE};

/// Queue size the device offers (the driver may pick less).
pub const QUEUE_SIZE_MAX: u16 = 256;
/// Frames received while the guest has no buffer (or the machine is
/// paused) that the device keeps; more are dropped and counted (a flood
/// cannot grow the VMM, nor the epoch's state).
pub const RX_BACKLOG: usize = 512;
/// Largest frame either way: Ethernet header + 1500 bytes (no offloads, no
/// VLAN tag).
pub const MAX_FRAME: usize = 1514;
/// virtio-net header in front of every frame (virtio 1.x layout).
pub const NET_HDR_LEN: usize = 12;

const RX: usize = 0;
const TX: usize = 1;

/// Errors of the network card.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("saved network card state: {0}")]
    BadState(String),
    #[error("TAP device {name}: {source}")]
    Tap { name: String, source: std::io::Error },
}

/// How the card is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// Counters of the card (monotonic, for status and metrics).
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_frames: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub interrupts: AtomicU64,
}

/// A snapshot of [`NetCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetCounts {
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_dropped: u64,
    pub interrupts: u64,
}

#[derive(Debug)]
struct Inner {
    transport: mmio::Transport,
    queues: [Queue; 2],
    rx_backlog: VecDeque<Vec<u8>>,
    quiesced: bool,
    /// An interrupt was due while quiesced: raised at [`NetDevice::unquiesce`].
    irq_due: bool,
    /// The receive queue may be asking the driver for kicks (it ran out of
    /// buffers): turned off again once the backlog is delivered, and only
    /// then (each turn is a write to guest memory).
    rx_kicks: bool,
}

/// The virtio-net device of one machine.
#[derive(Debug)]
pub struct NetDevice {
    mem: Arc<GuestMem>,
    vm: Arc<VmFd>,
    cfg: NetConfig,
    inner: Mutex<Inner>,
    counters: NetCounters,
    bad: LogLimiter,
}

fn new_queues() -> [Queue; 2] {
    // QUEUE_SIZE_MAX is a power of two below 32768: `new` cannot fail
    [Queue::new(QUEUE_SIZE_MAX).expect("queue size"), Queue::new(QUEUE_SIZE_MAX).expect("queue size")]
}

impl NetDevice {
    pub fn new(mem: Arc<GuestMem>, vm: Arc<VmFd>, cfg: NetConfig) -> Self {
        NetDevice {
            mem,
            vm,
            cfg,
            inner: Mutex::new(Inner {
                transport: mmio::Transport::default(),
                queues: new_queues(),
                rx_backlog: VecDeque::new(),
                quiesced: false,
                irq_due: false,
                rx_kicks: false,
            }),
            counters: NetCounters::default(),
            bad: LogLimiter::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        common::sync::lock(&self.inner)
    }

    /// The configuration (MAC).
    pub fn config(&self) -> NetConfig {
        self.cfg
    }

    /// The counters so far.
    pub fn counts(&self) -> NetCounts {
        let c = &self.counters;
        NetCounts {
            rx_frames: c.rx_frames.load(Ordering::Relaxed),
            rx_dropped: c.rx_dropped.load(Ordering::Relaxed),
            tx_frames: c.tx_frames.load(Ordering::Relaxed),
            tx_dropped: c.tx_dropped.load(Ordering::Relaxed),
            interrupts: c.interrupts.load(Ordering::Relaxed),
        }
    }

    /// Stops the device writing guest memory and raising interrupts until
    /// [`NetDevice::unquiesce`]: received frames wait in the backlog. Returns
    /// once no delivery is in progress.
    pub fn quiesce(&self) {
        self.lock().quiesced = true;
    }

    /// Lets the device deliver again, starting with what waited.
    pub fn unquiesce(&self) {
        let mut g = self.lock();
        g.quiesced = false;
        if std::mem::take(&mut g.irq_due) {
            self.interrupt(&mut g);
        }
        self.deliver(&mut g);
    }

    /// A frame from the network for the guest. Delivered at once unless the
    /// device is quiesced or the guest has no buffer posted; then it waits
    /// (up to [`RX_BACKLOG`] frames, then dropped and counted).
    pub fn receive(&self, frame: Vec<u8>) {
        if frame.len() > MAX_FRAME || frame.len() < 14 {
            self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut g = self.lock();
        if g.rx_backlog.len() >= RX_BACKLOG {
            self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        g.rx_backlog.push_back(frame);
        if !g.quiesced {
            self.deliver(&mut g);
        }
    }

    /// Whether the guest has queued frames the device has not taken yet (an
    /// ordinary memory read: the transmit queue's avail index).
    pub fn has_transmit(&self) -> bool {
        let g = self.lock();
        let q = &g.queues[TX];
        if !q.ready() || !mmio::driver_ok(&g.transport) {
            return false;
        }
        q.avail_idx(self.mem.guest_memory(), Ordering::Acquire).is_ok_and(|i| i.0 != q.next_avail())
    }

    /// Whether the guest has handled every frame the device gave it: nothing
    /// waits in the backlog and the driver has posted again every receive
    /// buffer the device used (all `size` buffers are available to the
    /// device). An ordinary memory read. A driver that keeps fewer buffers
    /// posted never looks settled.
    pub fn rx_settled(&self) -> bool {
        let g = self.lock();
        if !g.rx_backlog.is_empty() {
            return false;
        }
        let q = &g.queues[RX];
        if !q.ready() || !mmio::driver_ok(&g.transport) {
            return false;
        }
        q.avail_idx(self.mem.guest_memory(), Ordering::Acquire)
            .is_ok_and(|i| i.0.wrapping_sub(q.next_avail()) == q.size())
    }

    /// The transmit queue's avail index as the guest last wrote it (an
    /// ordinary memory read; 0 before the queue is ready): it changes with
    /// every frame the guest queues.
    pub fn transmit_mark(&self) -> u64 {
        let g = self.lock();
        let q = &g.queues[TX];
        if !q.ready() {
            return 0;
        }
        q.avail_idx(self.mem.guest_memory(), Ordering::Acquire).map_or(0, |i| i.0 as u64)
    }

    /// Takes every frame the guest queued for transmission (call with the
    /// vCPUs parked, at the epoch boundary): returns them without their
    /// virtio-net header, in the order the guest queued them.
    pub fn take_transmitted(&self) -> Vec<Vec<u8>> {
        let mut g = self.lock();
        self.take_tx(&mut g)
    }

    /// Raises the card's interrupt; while quiesced it is only noted (an MSI
    /// then would reach a LAPIC whose state may already be saved) and raised
    /// at [`NetDevice::unquiesce`].
    fn interrupt(&self, g: &mut Inner) {
        g.transport.interrupt_status |= mmio::INT_USED_RING;
        if g.quiesced {
            g.irq_due = true;
            return;
        }
        self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
        let msi = kvm_msi { address_lo: 0xfee0_0000, address_hi: 0, data: crate::abi::VEC_NET, ..Default::default() };
        if let Err(e) = self.vm.signal_msi(msi) {
            if let Some(n) = self.bad.allow() {
                tracing::warn!(error = %e, occurrences = n, "network card interrupt failed");
            }
        }
    }

    /// Saves the card's state (quiesced, vCPUs parked).
    pub fn save(&self) -> NetState {
        let g = self.lock();
        let snap = |q: &Queue| QueueSnapshot {
            max_size: q.max_size(),
            size: q.size(),
            ready: q.ready(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
        };
        NetState {
            mac: self.cfg.mac,
            regs: g.transport,
            queues: vec![snap(&g.queues[RX]), snap(&g.queues[TX])],
            rx_backlog: g.rx_backlog.iter().cloned().collect(),
        }
    }

    /// Restores what [`NetDevice::save`] saved (a card built with the same
    /// MAC). The device stays quiesced until [`NetDevice::unquiesce`].
    pub fn restore(&self, st: &NetState) -> Result<(), NetError> {
        if st.mac != self.cfg.mac {
            return Err(NetError::BadState(format!(
                "MAC {:02x?} differs from the card's {:02x?}",
                st.mac, self.cfg.mac
            )));
        }
        if st.queues.len() != 2 || st.rx_backlog.len() > RX_BACKLOG {
            return Err(NetError::BadState(format!(
                "{} queues and {} waiting frames",
                st.queues.len(),
                st.rx_backlog.len()
            )));
        }
        let mut queues = new_queues();
        for (q, s) in queues.iter_mut().zip(&st.queues) {
            *q = Queue::try_from(virtio_queue::QueueState {
                max_size: s.max_size,
                next_avail: s.next_avail,
                next_used: s.next_used,
                event_idx_enabled: false,
                size: s.size,
                ready: s.ready,
                desc_table: s.desc_table,
                avail_ring: s.avail_ring,
                used_ring: s.used_ring,
            })?;
        }
        let mut g = self.lock();
        g.transport = st.regs;
        g.queues = queues;
        g.rx_backlog = st.rx_backlog.iter().filter(|f| f.len() <= MAX_FRAME).cloned().collect();
        g.quiesced = true;
        // the interrupt status says whether one was raised and not taken
        g.irq_due = st.regs.interrupt_status != 0;
        // the restored ring's flags may ask for kicks: the first delivery
        // that empties the backlog turns them off
        g.rx_kicks = true;
        Ok(())
    }
}

/// When a node that starts serving the guest announces its MAC (ms after
/// it starts): QEMU's announce rounds (net/announce.c), so a switch or
/// bridge moves the guest's MAC to this node's port at once.
pub const ANNOUNCE_ROUNDS_MS: [u64; 5] = [0, 50, 200, 450, 800];

/// A 60-byte broadcast RARP request for `mac` (ethertype 0x8035, opcode 3,
/// sender and target hardware address `mac`, addresses 0), the frame QEMU
/// sends after a migration or a failover.
pub fn rarp_announce(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(&mac);
    f[32..38].copy_from_slice(&mac);
    f
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_announce_is_qemus_rarp_frame() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = super::rarp_announce(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(
            (&f[22..28], &f[28..32], &f[32..38], &f[38..42]),
            (&mac[..], &[0u8; 4][..], &mac[..], &[0u8; 4][..])
        );
    }
}
