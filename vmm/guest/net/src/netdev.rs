//! The network card: `virtio-drivers`' VirtIONetRaw over the MMIO transport,
//! wrapped as a smoltcp `phy::Device`.
//!
//! Hot path without exits: received frames are found by reading the RX used
//! ring (no interrupt, no InterruptACK), transmitted frames are only placed on
//! the TX avail ring (the device keeps VIRTQ_USED_F_NO_NOTIFY set there, so
//! `transmit_begin` never writes QueueNotify) and are reclaimed from the TX
//! used ring when the device hands them back at an epoch boundary. When every
//! TX buffer is in flight, `transmit`/`receive` return None: smoltcp keeps the
//! data in its socket buffers and sends it later instead of losing it.

use alloc::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use crate::abi::{NET_MMIO_GPA, NET_MMIO_SIZE};
use crate::rings::{set_no_interrupt, AvailRings, Recording};

/// Descriptors per queue (the device's maximum).
pub const QUEUE_SIZE: usize = 256;
/// Bytes per receive and transmit buffer (header + a 1514-byte frame fits).
pub const BUF_SIZE: usize = 2048;
/// virtio_net_hdr (virtio 1.x layout, with num_buffers).
pub const NET_HDR: usize = 12;
/// Largest Ethernet frame (no VLAN, no FCS).
pub const FRAME_MAX: usize = 1514;

/// Identity-mapped DMA: guest-virtual == guest-physical, no IOMMU, no bounce.
#[derive(Debug)]
pub struct IdentityHal;

// SAFETY: the guest runs with an identity map of all RAM and of the MMIO
// window, so every address handed out or translated here is the physical
// address of the same bytes; dma_alloc returns zeroed, page-aligned memory
// owned by the driver until dma_dealloc.
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = Layout::from_size_align(pages.max(1) * PAGE_SIZE, PAGE_SIZE).expect("dma layout");
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        let p = NonNull::new(p).unwrap_or_else(|| handle_alloc_error(layout));
        (p.as_ptr() as usize as PhysAddr, p)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let layout = Layout::from_size_align(pages.max(1) * PAGE_SIZE, PAGE_SIZE).expect("dma layout");
        // SAFETY: the caller returns a block dma_alloc made with this layout.
        unsafe { dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as usize as *mut u8).expect("null MMIO address")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as usize as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

type Net<T> = VirtIONetRaw<IdentityHal, Recording<T>, QUEUE_SIZE>;
/// Transmit buffers the device holds, by token, with the length posted.
type InFlight = Vec<Option<(Box<[u8]>, usize)>>;

/// Counters kept by the device wrapper (reported on the console rarely).
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Times smoltcp was told "no TX buffer now".
    pub tx_full: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
}

/// The card and its buffers (`T`: the MMIO transport in the guest, a
/// device model in host tests).
pub struct NetDev<T: Transport = MmioTransport<'static>> {
    net: Net<T>,
    /// Receive buffers the device holds, by token (descriptor index).
    rx_posted: Vec<Option<Box<[u8]>>>,
    /// Receive buffers smoltcp is done with, to post again.
    rx_spare: Vec<Box<[u8]>>,
    /// Transmit buffers the device holds, by token, with the length posted.
    tx_inflight: InFlight,
    tx_free: Vec<Box<[u8]>>,
    /// Where the avail rings are (for NO_INTERRUPT per queue).
    rings: AvailRings,
    pub stats: Stats,
}

impl<T: Transport> core::fmt::Debug for NetDev<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NetDev").field("stats", &self.stats).finish_non_exhaustive()
    }
}

/// Why no card could be driven.
#[derive(Debug)]
pub enum ProbeError {
    /// Nothing (or something that is not virtio-mmio) answers at NET_MMIO_GPA.
    NoDevice(virtio_drivers::transport::mmio::MmioError),
    /// A virtio device of another type.
    NotNet(DeviceType),
    /// The driver refused the device (queue sizes, features, config).
    Init(virtio_drivers::Error),
}

fn buffer() -> Box<[u8]> {
    vec![0u8; BUF_SIZE].into_boxed_slice()
}

impl NetDev<MmioTransport<'static>> {
    /// Finds and initialises the card at NET_MMIO_GPA and posts every receive buffer.
    pub fn probe() -> Result<Self, ProbeError> {
        let header = NonNull::new(NET_MMIO_GPA as usize as *mut VirtIOHeader).expect("non-null");
        // SAFETY: NET_MMIO_GPA..+NET_MMIO_SIZE is the card's register window
        // (identity-mapped, uncached emulated MMIO); nothing else in the guest
        // touches it, and the transport lives for the rest of the program. With
        // no device there, reads return all-ones and `new` reports BadMagic.
        let transport = unsafe { MmioTransport::new(header, NET_MMIO_SIZE) }.map_err(ProbeError::NoDevice)?;
        if transport.device_type() != DeviceType::Network {
            return Err(ProbeError::NotNet(transport.device_type()));
        }
        NetDev::new(transport).map_err(ProbeError::Init)
    }
}

impl<T: Transport> NetDev<T> {
    /// Initialises the card behind `transport` and posts every receive buffer.
    pub fn new(transport: T) -> Result<Self, virtio_drivers::Error> {
        let rings = AvailRings::default();
        let net = Net::new(Recording { inner: transport, rings: rings.clone() })?;
        // Busy by default: the driver polls the used rings and asks for an
        // interrupt only right before it sleeps.
        set_no_interrupt(&rings, 0, true);
        set_no_interrupt(&rings, 1, true);
        let mut dev = NetDev {
            net,
            rx_posted: (0..QUEUE_SIZE).map(|_| None).collect(),
            rx_spare: (0..QUEUE_SIZE).map(|_| buffer()).collect(),
            tx_inflight: (0..QUEUE_SIZE).map(|_| None).collect(),
            tx_free: (0..QUEUE_SIZE).map(|_| buffer()).collect(),
            rings,
            stats: Stats::default(),
        };
        dev.repost_rx();
        Ok(dev)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.net.mac_address()
    }

    /// Posts the receive buffers smoltcp has finished with.
    fn repost_rx(&mut self) {
        while let Some(mut buf) = self.rx_spare.pop() {
            // SAFETY: the buffer is kept untouched in rx_posted until the
            // device returns its token and receive_complete gives it back.
            match unsafe { self.net.receive_begin(&mut buf) } {
                Ok(token) if usize::from(token) < QUEUE_SIZE && self.rx_posted[usize::from(token)].is_none() => {
                    self.rx_posted[usize::from(token)] = Some(buf);
                }
                Ok(_) | Err(_) => {
                    // cannot happen with one descriptor per buffer and QUEUE_SIZE buffers
                    self.stats.rx_errors += 1;
                    self.rx_spare.push(buf);
                    return;
                }
            }
        }
    }

    /// Takes back the transmit buffers the device has finished with.
    fn reclaim_tx(&mut self) {
        while let Some(token) = self.net.poll_transmit() {
            let Some((buf, len)) = self.tx_inflight.get_mut(usize::from(token)).and_then(Option::take) else {
                self.stats.tx_errors += 1;
                return;
            };
            // SAFETY: the same buffer (and length) was passed to transmit_begin for this token.
            if unsafe { self.net.transmit_complete(token, &buf[..len]) }.is_err() {
                self.stats.tx_errors += 1;
            }
            self.tx_free.push(buf);
        }
    }

    /// Recycles buffers in both directions (ordinary memory accesses only).
    pub fn service(&mut self) {
        self.repost_rx();
        self.reclaim_tx();
    }

    /// A received frame is waiting in the RX used ring.
    pub fn rx_ready(&self) -> bool {
        self.net.poll_receive().is_some()
    }

    /// Every transmit buffer is with the device.
    pub fn tx_blocked(&self) -> bool {
        self.tx_free.is_empty()
    }

    /// Sleeps until the card or the timer interrupts, unless work arrived.
    /// `for_tx` false: wakes for a received frame (RX interrupts on).
    /// `for_tx` true (every TX buffer is out, so received frames cannot be
    /// answered yet): wakes when the device returns TX buffers (TX interrupts
    /// on, RX off). `wait`: sleep until an interrupt (HC_WAIT in the guest).
    pub fn sleep(&mut self, for_tx: bool, wait: impl FnOnce()) {
        let queue = usize::from(for_tx);
        set_no_interrupt(&self.rings, queue, false);
        // The flag store must be visible before the used index is read again,
        // or a buffer placed in between would raise no MSI.
        fence(Ordering::SeqCst);
        let work = if for_tx { self.net.poll_transmit().is_some() } else { self.rx_ready() };
        if !work {
            wait();
        }
        set_no_interrupt(&self.rings, queue, true);
    }
}

/// A received frame; its buffer goes back to the spare list once consumed.
pub struct RxToken<'a> {
    buf: Box<[u8]>,
    len: usize,
    spare: &'a mut Vec<Box<[u8]>>,
}

/// The right to send one frame (a free transmit buffer exists).
pub struct TxToken<'a, T: Transport> {
    net: &'a mut Net<T>,
    inflight: &'a mut InFlight,
    free: &'a mut Vec<Box<[u8]>>,
    stats: &'a mut Stats,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.buf[NET_HDR..NET_HDR + self.len]);
        self.spare.push(self.buf);
        r
    }
}

impl<T: Transport> phy::TxToken for TxToken<'_, T> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.free.pop().expect("a TxToken exists only while a buffer is free");
        let len = len.min(BUF_SIZE - NET_HDR);
        let total = NET_HDR + len;
        buf[..NET_HDR].fill(0);
        let r = f(&mut buf[NET_HDR..total]);
        // SAFETY: the buffer stays untouched in `inflight` until the device
        // returns its token and transmit_complete gives it back.
        match unsafe { self.net.transmit_begin(&buf[..total]) } {
            Ok(token) if usize::from(token) < QUEUE_SIZE && self.inflight[usize::from(token)].is_none() => {
                self.inflight[usize::from(token)] = Some((buf, total));
                self.stats.tx_frames += 1;
            }
            Ok(_) | Err(_) => {
                self.stats.tx_errors += 1;
                self.free.push(buf);
            }
        }
        r
    }
}

impl<T: Transport> phy::Device for NetDev<T> {
    type RxToken<'a>
        = RxToken<'a>
    where
        T: 'a;
    type TxToken<'a>
        = TxToken<'a, T>
    where
        T: 'a;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_, T>)> {
        self.service();
        if self.tx_free.is_empty() {
            // no buffer for a reply: leave the frame in the ring for now
            self.stats.tx_full += 1;
            return None;
        }
        loop {
            let token = self.net.poll_receive()?;
            let Some(mut buf) = self.rx_posted.get_mut(usize::from(token)).and_then(Option::take) else {
                self.stats.rx_errors += 1;
                return None;
            };
            // SAFETY: the same buffer was passed to receive_begin for this token.
            match unsafe { self.net.receive_complete(token, &mut buf) } {
                Ok((hdr, len)) if hdr == NET_HDR && len <= BUF_SIZE - NET_HDR => {
                    self.stats.rx_frames += 1;
                    let NetDev { net, rx_spare, tx_inflight, tx_free, stats, .. } = self;
                    let rx = RxToken { buf, len, spare: rx_spare };
                    let tx = TxToken { net, inflight: tx_inflight, free: tx_free, stats };
                    return Some((rx, tx));
                }
                _ => {
                    self.stats.rx_errors += 1;
                    self.rx_spare.push(buf);
                }
            }
        }
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_, T>> {
        self.reclaim_tx();
        if self.tx_free.is_empty() {
            self.stats.tx_full += 1;
            return None;
        }
        let NetDev { net, tx_inflight, tx_free, stats, .. } = self;
        Some(TxToken { net, inflight: tx_inflight, free: tx_free, stats })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = FRAME_MAX;
        caps.max_burst_size = None;
        caps
    }
}

#[cfg(test)]
#[path = "netdev_tests.rs"]
mod tests;
