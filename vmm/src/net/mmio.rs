//! The virtio-mmio transport (virtio 1.x, version 2 register layout) of the
//! network card: what the guest's driver reads and writes at
//! [`NET_MMIO_GPA`]. Each access is an MMIO exit (~75 us from CPL3 on this
//! host): a driver touches these registers to set the card up, not per frame.

use std::sync::atomic::Ordering;

use virtio_queue::QueueT;

use super::{Inner, NetDevice, QUEUE_SIZE_MAX, RX};

/// Where the card's registers are (the start of the 32-bit MMIO hole: no
/// memory slot there, so accesses exit to the VMM) and their window.
pub use crate::abi::{NET_MMIO_GPA, NET_MMIO_SIZE};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const DEVICE_NET: u32 = 1;
const VENDOR: u32 = 0x5254_5343; // "CSTR"

/// Feature bits the card offers: VIRTIO_NET_F_MAC and VIRTIO_F_VERSION_1
/// (no offloads, no mergeable buffers, no event index).
pub const DEVICE_FEATURES: u64 =
    (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MAC) | (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1);

pub(super) const INT_USED_RING: u32 = 1;

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;

/// The transport's registers (the queues' own are in [`virtio_queue::Queue`]).
pub(super) type Transport = common::state::MmioRegs;

/// Whether the driver has set the card up and it works.
pub(super) fn driver_ok(t: &Transport) -> bool {
    t.status & STATUS_DRIVER_OK != 0 && t.status & STATUS_NEEDS_RESET == 0
}

fn half(v: u64, high: bool) -> u32 {
    if high {
        (v >> 32) as u32
    } else {
        v as u32
    }
}

impl NetDevice {
    /// Whether `gpa` is one of the card's registers.
    pub fn claims(gpa: u64) -> bool {
        (NET_MMIO_GPA..NET_MMIO_GPA + NET_MMIO_SIZE).contains(&gpa)
    }

    /// A read of the card's registers (`data.len()` bytes at `gpa`).
    pub fn mmio_read(&self, gpa: u64, data: &mut [u8]) {
        let off = gpa - NET_MMIO_GPA;
        let g = self.lock();
        if off >= 0x100 {
            // device config: mac[6], status u16 (link up), max pairs u16
            let mut cfg = [0u8; 10];
            cfg[..6].copy_from_slice(&self.cfg.mac);
            cfg[6..8].copy_from_slice(&1u16.to_le_bytes());
            cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
            for (i, d) in data.iter_mut().enumerate() {
                *d = cfg.get((off - 0x100) as usize + i).copied().unwrap_or(0);
            }
            return;
        }
        let t = &g.transport;
        let q = g.queues.get(t.queue_sel as usize);
        let v = match off {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => DEVICE_NET,
            0x00c => VENDOR,
            0x010 => match t.device_features_sel {
                0 | 1 => half(DEVICE_FEATURES, t.device_features_sel == 1),
                _ => 0,
            },
            0x034 => q.map_or(0, |_| u32::from(QUEUE_SIZE_MAX)),
            0x044 => q.map_or(0, |q| u32::from(q.ready())),
            0x060 => t.interrupt_status,
            0x070 => t.status,
            0x0fc => t.config_generation,
            _ => 0,
        };
        let b = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(i).copied().unwrap_or(0);
        }
    }

    /// A write to the card's registers.
    pub fn mmio_write(&self, gpa: u64, data: &[u8]) {
        let off = gpa - NET_MMIO_GPA;
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        let mut g = self.lock();
        let sel = g.transport.queue_sel as usize;
        match off {
            0x014 => g.transport.device_features_sel = v,
            0x020 => {
                let shift = match g.transport.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                g.transport.driver_features = (g.transport.driver_features & !mask) | (u64::from(v) << shift);
            }
            0x024 => g.transport.driver_features_sel = v,
            0x030 => g.transport.queue_sel = v,
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => self.queue_write(&mut g, sel, off, v),
            0x050 => {
                // a notify: receive buffers posted (deliver what waits);
                // transmit is taken at the boundary
                if v as usize == RX && !g.quiesced {
                    self.deliver(&mut g);
                }
            }
            0x064 => g.transport.interrupt_status &= !v,
            0x070 => self.status_write(&mut g, v),
            _ => {
                if let Some(c) = self.bad.allow() {
                    tracing::debug!(
                        offset = off,
                        value = v,
                        occurrences = c,
                        "write to a read-only or unknown network card register"
                    );
                }
            }
        }
    }

    fn queue_write(&self, g: &mut Inner, sel: usize, off: u64, v: u32) {
        let Some(q) = g.queues.get_mut(sel) else { return };
        // a live queue's configuration is fixed (virtio 1.x, 4.2.2.2)
        if q.ready() && off != 0x044 {
            return;
        }
        match off {
            0x038 => q.set_size(v as u16),
            0x080 => q.set_desc_table_address(Some(v), None),
            0x084 => q.set_desc_table_address(None, Some(v)),
            0x090 => q.set_avail_ring_address(Some(v), None),
            0x094 => q.set_avail_ring_address(None, Some(v)),
            0x0a0 => q.set_used_ring_address(Some(v), None),
            0x0a4 => q.set_used_ring_address(None, Some(v)),
            _ => {
                let ready = v == 1;
                // (virtio-queue validates only a queue marked ready)
                q.set_ready(ready);
                if ready && !q.is_valid(self.mem.guest_memory()) {
                    q.set_ready(false);
                    if let Some(c) = self.bad.allow() {
                        tracing::warn!(
                            queue = sel,
                            occurrences = c,
                            "the guest enabled an invalid virtqueue; the card needs a reset"
                        );
                    }
                    g.transport.status |= STATUS_NEEDS_RESET;
                    return;
                }
                if ready {
                    // transmit is taken at epoch boundaries, and receive
                    // buffers are looked for when a frame arrives: ask for
                    // no kicks (an exit costs ~75 us); the receive queue
                    // asks again only when it ran out of buffers
                    let _ = q.disable_notification(self.mem.guest_memory());
                }
            }
        }
    }

    fn status_write(&self, g: &mut Inner, v: u32) {
        if v == 0 {
            // reset: back to the initial state (waiting frames are dropped)
            let dropped = g.rx_backlog.len() as u64;
            self.counters.rx_dropped.fetch_add(dropped, Ordering::Relaxed);
            g.rx_backlog.clear();
            g.rx_kicks = false;
            g.transport = Transport { config_generation: g.transport.config_generation, ..Transport::default() };
            for q in g.queues.iter_mut() {
                q.reset();
            }
            return;
        }
        if v & STATUS_FEATURES_OK != 0 && g.transport.status & STATUS_FEATURES_OK == 0 {
            // the driver may accept only what the card offers, and must take VERSION_1
            let f = g.transport.driver_features;
            let version_1 = 1u64 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
            if f & !DEVICE_FEATURES != 0 || f & version_1 == 0 {
                g.transport.status = v & !STATUS_FEATURES_OK;
                return;
            }
        }
        g.transport.status = v;
        if driver_ok(&g.transport) && !g.quiesced {
            self.deliver(g);
        }
    }
}
