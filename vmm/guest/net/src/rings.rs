//! A transport wrapper that remembers where each queue's driver area (the
//! avail ring) is, so the driver can set VIRTQ_AVAIL_F_NO_INTERRUPT per queue:
//! virtio-drivers' `VirtIONetRaw` only switches both queues at once, and the
//! contract asks for RX interrupts alone while sleeping (TX returns at every
//! epoch boundary would otherwise wake an idle guest for nothing).

use alloc::rc::Rc;
use core::cell::Cell;
use core::sync::atomic::{AtomicU16, Ordering};

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::PhysAddr;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Avail-ring addresses of queues 0 (RX) and 1 (TX); 0 = not set up.
pub type AvailRings = Rc<Cell<[PhysAddr; 2]>>;

/// Delegates everything to `inner`, recording `queue_set`'s driver areas.
#[derive(Debug)]
pub struct Recording<T> {
    pub inner: T,
    pub rings: AvailRings,
}

/// Sets (true) or clears VIRTQ_AVAIL_F_NO_INTERRUPT of `queue`.
pub fn set_no_interrupt(rings: &AvailRings, queue: usize, no_interrupt: bool) {
    let a = rings.get()[queue];
    if a == 0 {
        return;
    }
    // SAFETY: `a` is the avail ring the driver's VirtQueue allocated (aligned,
    // alive as long as the driver, identity-mapped); its first u16 is the flags
    // field, which virtio-drivers itself only stores atomically from
    // set_dev_notify, never called by this crate.
    let flags = unsafe { AtomicU16::from_ptr(a as usize as *mut u16) };
    flags.store(u16::from(no_interrupt), Ordering::Release);
}

impl<T: Transport> Transport for Recording<T> {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }
    fn write_driver_features(&mut self, f: u64) {
        self.inner.write_driver_features(f)
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue)
    }
    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status)
    }
    fn set_guest_page_size(&mut self, size: u32) {
        self.inner.set_guest_page_size(size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }
    fn queue_set(&mut self, queue: u16, size: u32, desc: PhysAddr, driver: PhysAddr, device: PhysAddr) {
        if let Some(slot) = [0usize, 1].get(usize::from(queue)) {
            let mut r = self.rings.get();
            r[*slot] = driver;
            self.rings.set(r);
        }
        self.inner.queue_set(queue, size, desc, driver, device)
    }
    fn queue_unset(&mut self, queue: u16) {
        if usize::from(queue) < 2 {
            let mut r = self.rings.get();
            r[usize::from(queue)] = 0;
            self.rings.set(r);
        }
        self.inner.queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }
    fn read_config_space<V: FromBytes + IntoBytes>(&self, offset: usize) -> virtio_drivers::Result<V> {
        self.inner.read_config_space(offset)
    }
    fn write_config_space<V: IntoBytes + Immutable>(&mut self, offset: usize, value: V) -> virtio_drivers::Result<()> {
        self.inner.write_config_space(offset, value)
    }
}
