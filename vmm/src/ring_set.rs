//! Operations over every vCPU's dirty ring at once, under the machine's
//! reset lock: the ledger of entries awaiting a (VM-wide) reset, the harvest
//! while the vCPUs run, the injected short reset, and re-synchronising rings
//! after an overflow. The tracker (dirty.rs) calls them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};

use kvm_ioctls::VmFd;

use crate::ring;
use crate::vcpu::{RingState, Vcpu};

/// Ring entries harvested (marked RESET) but not yet recycled by
/// KVM_RESET_DIRTY_RINGS, over all rings. With hot-page retention the
/// collector defers the reset, so a reset on a ring-full exit recycles the
/// collector's entries too: every reset compares KVM's count with this.
#[derive(Debug)]
pub struct RingLedger {
    pub unreset: u64,
    /// A reset on a ring-full exit found a count mismatch: the collector must
    /// treat every ring as desynchronised and the collection as lost.
    pub suspect: bool,
    /// Resets so far (bumped before and after each, so a reader during one
    /// sees a change after it): a vCPU reads it before it enters the guest,
    /// so a ring-full exit can tell whether a reset since may have made it
    /// stale (the machine's `VcpuContext::ring_resets`).
    pub resets: Arc<AtomicU64>,
}

impl RingLedger {
    /// A ledger counting its resets in `resets`.
    pub fn new(resets: Arc<AtomicU64>) -> Self {
        RingLedger { unreset: 0, suspect: false, resets }
    }

    /// `KVM_RESET_DIRTY_RINGS`, counted; no check of what it recycled.
    pub fn reset_raw(&self, vm: &VmFd) -> Result<u32, ring::RingError> {
        self.resets.fetch_add(1, Ordering::SeqCst);
        let r = ring::reset_rings(vm);
        self.resets.fetch_add(1, Ordering::SeqCst);
        r
    }

    /// Resets the rings; false if tracking was lost. KVM must recycle exactly
    /// the entries marked RESET. A short count is a loss too: on this host a
    /// reset cut short (by a signal pending on the calling thread) left
    /// recycled pages writable, so writes to them went unlogged. Callers on
    /// vCPU threads therefore block the kick signal around the reset.
    pub fn reset(&mut self, vm: &VmFd) -> bool {
        let expected = std::mem::take(&mut self.unreset);
        match self.reset_raw(vm) {
            Ok(n) if u64::from(n) == expected => true,
            Ok(n) => {
                tracing::warn!(expected, reset = n, "dirty ring reset count mismatch: tracking lost");
                self.suspect = true;
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "dirty ring reset failed: tracking lost");
                self.suspect = true;
                false
            }
        }
    }
}

/// Re-synchronises desynchronised rings in a lost collection, every vCPU
/// parked and no ring holding a mark (the caller's last reset recycled
/// nothing): `align` (ring, KVM's push position) get one reset that walks
/// KVM's reset index to that position; `unstick` (nothing pushed, vCPU stuck
/// ring-full; with the entries it had marked before this collection's
/// resets, all of which must still be marked: then those resets did not
/// move its reset index) get their reset index stepped forward. See
/// ring.rs. Returns how many of each succeeded.
pub(crate) fn resynchronise(
    vm: &VmFd,
    ledger: &RingLedger,
    rings: &mut [MutexGuard<'_, Option<RingState>>],
    align: &[(usize, u32)],
    unstick: &[(usize, Vec<u32>)],
) -> (u64, u64) {
    let (mut aligned, mut unstuck) = (0, 0);
    if !align.is_empty() {
        for &(k, end) in align {
            rings[k].as_mut().expect("ring").ring.align(end);
        }
        let r = ledger.reset_raw(vm);
        for &(k, end) in align {
            rings[k].as_mut().expect("ring").ring.finish_align(end);
        }
        match r {
            Ok(n) => {
                tracing::info!(rings = align.len(), recycled = n, "dirty rings re-synchronised");
                aligned = align.len() as u64;
            }
            Err(e) => {
                tracing::error!(error = %e, "re-synchronising the dirty rings failed");
                for &(k, _) in align {
                    rings[k].as_mut().expect("ring").ring.mark_desynchronised();
                }
            }
        }
    }
    for (k, marks) in unstick {
        let k = *k;
        let rs = rings[k].as_mut().expect("ring");
        if !rs.ring.still_marked(marks) {
            // a reset of this collection walked the ring: its vCPU may run
            // again; a later ring-full exit says if it does not
            continue;
        }
        match rs.ring.unstick(&mut || ledger.reset_raw(vm)) {
            Ok(true) => {
                tracing::info!(vcpu = k, "stuck dirty ring stepped forward");
                unstuck += 1;
            }
            Ok(false) => tracing::warn!(vcpu = k, "a stuck dirty ring could not be stepped forward"),
            Err(e) => tracing::error!(vcpu = k, error = %e, "stepping a stuck dirty ring failed"),
        }
    }
    (aligned, unstuck)
}

/// Harvests every ring into its pending list while the vCPUs may run (no
/// verification scan: a running vCPU adds entries meanwhile); an overflow
/// marks the ring's tracking lost. Entries stay marked RESET, counted in the
/// ledger, until a reset recycles them.
pub(crate) fn harvest_running(
    vcpus: &[Arc<Vcpu>],
    rings: &mut [MutexGuard<'_, Option<RingState>>],
    ledger: &mut RingLedger,
) {
    for (v, g) in vcpus.iter().zip(rings.iter_mut()) {
        let Some(rs) = g.as_mut() else { continue };
        if rs.ring.is_desynchronised() {
            // only a collection (every vCPU parked) re-synchronises a ring:
            // what it pushes meanwhile stays in it for that collection
            continue;
        }
        v.note_foreign_harvest();
        let h = rs.ring.harvest(&mut rs.pending, false);
        if h.overflow {
            rs.lost = true;
        }
        ledger.unreset += u64::from(h.expected_reset());
    }
}

/// The injected short reset: the last half of each ring's fresh harvest is
/// held back, the rings are reset (KVM stops at the first entry not marked
/// RESET, so it recycles less than was harvested and says so), and the held
/// entries are marked again: the state a signal-interrupted reset leaves.
pub(crate) fn cut_short_reset(
    ledger: &mut RingLedger,
    vm: &VmFd,
    rings: &mut [MutexGuard<'_, Option<RingState>>],
    harvested: &[u32],
) -> bool {
    let held: Vec<u32> = harvested.iter().map(|&n| n / 2).collect();
    for (g, &n) in rings.iter_mut().zip(&held) {
        g.as_mut().expect("ring").ring.hold_back(n);
    }
    let ok = ledger.reset(vm);
    for (g, &n) in rings.iter_mut().zip(&held) {
        g.as_mut().expect("ring").ring.release_held(n);
    }
    tracing::warn!(held = held.iter().sum::<u32>(), "injected a short ring reset");
    ok
}
