//! Host tests only: a virtio-net device model behind virtio-drivers'
//! `Transport` trait, working on the driver's split rings in this process's
//! memory (the identity HAL makes pointers the "physical" addresses). It
//! follows the device contract the VMM implements: features VERSION_1 | MAC,
//! queue size 256, 12-byte headers, NO_NOTIFY kept set on the used rings,
//! transmit buffers taken in batches (as at epoch boundaries).

use std::cell::RefCell;
use std::rc::Rc;
use std::vec::Vec;

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::PhysAddr;
use zerocopy::{FromBytes, Immutable, IntoBytes};

pub const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const F_MAC: u64 = 1 << 5;
const F_VERSION_1: u64 = 1 << 32;
const HDR: usize = 12;

#[derive(Debug, Default, Clone, Copy)]
struct Queue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    last_avail: u16,
}

/// What the device saw and holds; shared between the transport (owned by the
/// driver) and the test.
#[derive(Debug, Default)]
pub struct DevState {
    queues: [Queue; 2],
    status: u32,
    pub driver_features: u64,
    pub notifies: [u32; 2],
    /// Keep VIRTQ_USED_F_NO_NOTIFY set on the RX used ring too.
    pub rx_no_notify: bool,
}

// SAFETY (for the helpers below): the addresses come from queue_set, i.e.
// from the driver's own allocations of the ring areas, alive while the driver
// (and so the test) runs; indexes are reduced modulo the queue size.
fn rd16(a: u64) -> u16 {
    // SAFETY: see above; ring fields are 2-aligned.
    unsafe { (a as *const u16).read_volatile() }
}
fn wr16(a: u64, v: u16) {
    // SAFETY: see above.
    unsafe { (a as *mut u16).write_volatile(v) }
}
fn wr32(a: u64, v: u32) {
    // SAFETY: see above; used elements are 4-aligned.
    unsafe { (a as *mut u32).write_volatile(v) }
}
fn rd_desc(q: &Queue, i: u16) -> (u64, u32, u16) {
    let d = q.desc + 16 * u64::from(i % q.size);
    // SAFETY: see above; the descriptor table is 16-aligned.
    unsafe { ((d as *const u64).read_volatile(), ((d + 8) as *const u32).read_volatile(), ((d + 12) as *const u16).read_volatile()) }
}

impl DevState {
    /// The next available descriptor chain head of queue `qi`, if any.
    fn pop_avail(&mut self, qi: usize) -> Option<u16> {
        let q = &mut self.queues[qi];
        if q.size == 0 || rd16(q.avail + 2) == q.last_avail {
            return None;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let head = rd16(q.avail + 4 + 2 * u64::from(q.last_avail % q.size));
        q.last_avail = q.last_avail.wrapping_add(1);
        Some(head)
    }

    fn push_used(&mut self, qi: usize, head: u16, len: u32) {
        let q = &self.queues[qi];
        let idx = rd16(q.used + 2);
        let e = q.used + 4 + 8 * u64::from(idx % q.size);
        wr32(e, u32::from(head));
        wr32(e + 4, len);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        wr16(q.used + 2, idx.wrapping_add(1));
    }

    /// Puts one received frame into the next RX buffer; false if none is posted.
    pub fn deliver(&mut self, frame: &[u8]) -> bool {
        let Some(head) = self.pop_avail(0) else { return false };
        let (addr, len, flags) = rd_desc(&self.queues[0], head);
        assert_eq!(flags & 2, 2, "RX descriptors must be device-writable");
        assert!(HDR + frame.len() <= len as usize, "RX buffer of {len} bytes too small");
        // SAFETY: the driver posted [addr, addr+len) as writable for the device.
        unsafe {
            core::ptr::write_bytes(addr as *mut u8, 0, HDR);
            core::ptr::copy_nonoverlapping(frame.as_ptr(), (addr as *mut u8).add(HDR), frame.len());
        }
        self.push_used(0, head, (HDR + frame.len()) as u32);
        true
    }

    /// Takes every frame on the TX avail ring (an epoch boundary).
    pub fn take_tx(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(head) = self.pop_avail(1) {
            let (addr, len, flags) = rd_desc(&self.queues[1], head);
            assert_eq!(flags & 3, 0, "one read-only descriptor per frame");
            // SAFETY: the driver posted [addr, addr+len) readable for the device.
            let b = unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) };
            assert!(b[..HDR].iter().all(|&x| x == 0), "virtio_net_hdr must be zero on TX");
            out.push(b[HDR..].to_vec());
            self.push_used(1, head, 0);
        }
        out
    }

    /// RX buffers posted and not yet used.
    pub fn rx_posted(&self) -> u16 {
        let q = &self.queues[0];
        rd16(q.avail + 2).wrapping_sub(q.last_avail)
    }

    /// VIRTQ_AVAIL_F_NO_INTERRUPT of queue `qi`.
    pub fn no_interrupt(&self, qi: usize) -> bool {
        rd16(self.queues[qi].avail) & 1 == 1
    }
}

/// The transport the driver owns.
#[derive(Debug)]
pub struct ModelTransport(pub Rc<RefCell<DevState>>);

impl Transport for ModelTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::Network
    }
    fn read_device_features(&mut self) -> u64 {
        F_MAC | F_VERSION_1
    }
    fn write_driver_features(&mut self, f: u64) {
        self.0.borrow_mut().driver_features = f;
    }
    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        256
    }
    fn notify(&mut self, queue: u16) {
        self.0.borrow_mut().notifies[usize::from(queue)] += 1;
    }
    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(self.0.borrow().status)
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.0.borrow_mut().status = status.bits();
    }
    fn set_guest_page_size(&mut self, _size: u32) {}
    fn requires_legacy_layout(&self) -> bool {
        false
    }
    fn queue_set(&mut self, queue: u16, size: u32, desc: PhysAddr, avail: PhysAddr, used: PhysAddr) {
        let mut st = self.0.borrow_mut();
        let q = Queue { size: size as u16, desc, avail, used, last_avail: 0 };
        let no_notify = queue == 1 || st.rx_no_notify;
        wr16(used, u16::from(no_notify));
        st.queues[usize::from(queue)] = q;
    }
    fn queue_unset(&mut self, queue: u16) {
        self.0.borrow_mut().queues[usize::from(queue)] = Queue::default();
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.0.borrow().queues[usize::from(queue)].size != 0
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }
    fn read_config_generation(&self) -> u32 {
        0
    }
    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> virtio_drivers::Result<T> {
        let mut cfg = [0u8; 16];
        cfg[..6].copy_from_slice(&MAC);
        cfg[6] = 1; // status: link up
        let end = offset + core::mem::size_of::<T>();
        T::read_from_bytes(&cfg[offset..end]).map_err(|_| virtio_drivers::Error::ConfigSpaceTooSmall)
    }
    fn write_config_space<T: IntoBytes + Immutable>(&mut self, _offset: usize, _value: T) -> virtio_drivers::Result<()> {
        Ok(())
    }
}
