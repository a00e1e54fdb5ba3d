//! The data path: received frames into the guest's receive buffers, and
//! the frames the guest queued for transmission out of its transmit ring.
//! Every write into guest memory goes through [`crate::memory::GuestMem`]'s
//! tracked mapping, so the pages it touches are dirty pages of the epoch.

use std::io::{Read, Write};
use std::sync::atomic::Ordering;

use virtio_queue::{QueueOwnedT, QueueT};

use super::{Inner, NetDevice, MAX_FRAME, NET_HDR_LEN, RX, TX};

/// `VIRTQ_AVAIL_F_NO_INTERRUPT`: the driver asks for no interrupt.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

impl NetDevice {
    /// Delivers waiting frames while the guest has receive buffers; raises
    /// one interrupt for the batch unless the driver suppressed it.
    pub(super) fn deliver(&self, g: &mut Inner) {
        if g.rx_backlog.is_empty() || !super::mmio::driver_ok(&g.transport) || !g.queues[RX].ready() {
            return;
        }
        let mem = self.mem.guest_memory();
        let mut delivered = 0u32;
        while !g.rx_backlog.is_empty() {
            let Some(chain) = g.queues[RX].pop_descriptor_chain(mem) else {
                // out of receive buffers: ask the driver to kick when it
                // posts more (and look once more: it may just have)
                g.rx_kicks = true;
                match g.queues[RX].enable_notification(mem) {
                    Ok(true) => continue,
                    _ => break,
                }
            };
            let head = chain.head_index();
            let frame = g.rx_backlog.pop_front().expect("backlog not empty");
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[10] = 1; // num_buffers
            let written = chain.writer(mem).map_err(|e| e.to_string()).and_then(|mut w| {
                if w.available_bytes() < NET_HDR_LEN + frame.len() {
                    return Err(format!("receive buffer of {} bytes", w.available_bytes()));
                }
                w.write_all(&hdr).and_then(|()| w.write_all(&frame)).map_err(|e| e.to_string())?;
                Ok(NET_HDR_LEN + frame.len())
            });
            let len = match written {
                Ok(n) => {
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    n as u32
                }
                Err(why) => {
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    if let Some(c) = self.bad.allow() {
                        tracing::warn!(%why, occurrences = c, "a receive buffer from the guest is unusable; frame dropped");
                    }
                    0
                }
            };
            if g.queues[RX].add_used(mem, head, len).is_err() {
                break;
            }
            delivered += 1;
        }
        if g.rx_backlog.is_empty() && g.rx_kicks {
            // buffers to spare again: no kicks wanted
            let _ = g.queues[RX].disable_notification(mem);
            g.rx_kicks = false;
        }
        if delivered > 0 && !self.interrupt_suppressed(g, RX) {
            self.interrupt(g);
        }
    }

    fn interrupt_suppressed(&self, g: &Inner, q: usize) -> bool {
        let addr = vm_memory::GuestAddress(g.queues[q].avail_ring());
        vm_memory::Bytes::read_obj::<u16>(self.mem.guest_memory(), addr)
            .is_ok_and(|flags| flags & AVAIL_F_NO_INTERRUPT != 0)
    }

    pub(super) fn take_tx(&self, g: &mut Inner) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if !super::mmio::driver_ok(&g.transport) || !g.queues[TX].ready() {
            return out;
        }
        let mem = self.mem.guest_memory();
        let mut heads = Vec::new();
        match g.queues[TX].iter(mem) {
            Ok(iter) => {
                for chain in iter {
                    let head = chain.head_index();
                    let frame = chain.reader(mem).map_err(|e| e.to_string()).and_then(|mut r| {
                        let n = r.available_bytes();
                        if !(NET_HDR_LEN + 14..=NET_HDR_LEN + MAX_FRAME).contains(&n) {
                            return Err(format!("a transmit buffer of {n} bytes"));
                        }
                        let mut b = vec![0u8; n];
                        r.read_exact(&mut b).map_err(|e| e.to_string())?;
                        Ok(b.split_off(NET_HDR_LEN))
                    });
                    match frame {
                        Ok(f) => out.push(f),
                        Err(why) => {
                            self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                            if let Some(c) = self.bad.allow() {
                                tracing::warn!(%why, occurrences = c, "a transmit buffer from the guest is unusable; dropped");
                            }
                        }
                    }
                    heads.push(head);
                }
            }
            Err(e) => {
                if let Some(c) = self.bad.allow() {
                    tracing::warn!(error = %e, occurrences = c, "the transmit ring is unreadable");
                }
            }
        }
        for &h in &heads {
            let _ = g.queues[TX].add_used(mem, h, 0);
        }
        self.counters.tx_frames.fetch_add(out.len() as u64, Ordering::Relaxed);
        if !heads.is_empty() && !self.interrupt_suppressed(g, TX) {
            self.interrupt(g);
        }
        out
    }
}
