//! The vCPU's dirty-ring state and its ring-full exit (harvest, the
//! pending set's cap, reset).

use std::sync::atomic::Ordering;

use super::kick::KickBlocked;
use super::{Vcpu, VcpuContext};
use crate::ring::DirtyRing;

/// Dirty-ring state of one vCPU.
#[derive(Debug)]
pub struct RingState {
    pub ring: DirtyRing,
    /// Entries harvested on ring-full exits, not yet collected.
    pub pending: Vec<(u32, u64)>,
    /// Sticky: tracking was lost since the last collection.
    pub lost: bool,
    /// Ring-full exits since the VM started.
    pub full_exits: u64,
    /// Scan the ring for stray entries after each harvest.
    pub verify: bool,
    /// Ring-full exits that found nothing to harvest (KVM's count of used
    /// entries ran ahead of the ring after an overflow).
    pub stalls: u64,
    /// The vCPU exited ring-full while its ring was desynchronised, with no
    /// reset since it entered the guest: the value of the machine's reset
    /// count then (it cannot run until a collection unsticks it, which
    /// believes this only if no reset happened since).
    pub stuck: Option<u64>,
    /// Times `pending` passed [`pending_cap`] and was dropped (tracking
    /// marked lost).
    pub pending_overflows: u64,
}

/// Most entries a vCPU's pending set may hold: one per guest page (at
/// least 65536). Past it the entries are dropped and tracking is marked
/// lost (a resync follows), so the set stays bounded however long an
/// epoch runs.
pub fn pending_cap(mem_bytes: u64) -> usize {
    usize::try_from(mem_bytes / 4096).unwrap_or(usize::MAX).max(65536)
}

/// Ring-full exit: harvest this vCPU's ring into its pending set, reset, re-enter.
/// `harvests_seen`, `resets_seen`: the vCPU's foreign harvest count and the
/// machine's reset count before it entered the guest.
pub(super) fn ring_full(vcpu: &Vcpu, ctx: &VcpuContext, harvests_seen: u64, resets_seen: u64) {
    let mut ledger = common::sync::lock(&ctx.reset_lock);
    let mut ring = vcpu.ring();
    let Some(rs) = ring.as_mut() else { return };
    rs.full_exits += 1;
    if rs.ring.is_desynchronised() {
        // KVM's indexes are unknown: only a collection, every vCPU parked,
        // can re-synchronise the ring. The vCPU cannot run until then (KVM
        // exits ring-full at every entry): wait for the pause. An exit with
        // a reset since the vCPU entered may be stale: it is not noted.
        if ctx.ring_resets.load(Ordering::SeqCst) == resets_seen && rs.stuck.replace(resets_seen).is_none() {
            rs.stalls += 1;
        }
        drop(ring);
        drop(ledger);
        std::thread::sleep(std::time::Duration::from_micros(100));
        return;
    }
    let emptied_meanwhile = vcpu.foreign_harvests.load(Ordering::SeqCst) != harvests_seen;
    let h = rs.ring.harvest(&mut rs.pending, rs.verify);
    ctx.ring_pending.fetch_add(u64::from(h.harvested), Ordering::Relaxed);
    let expected = h.expected_reset();
    if h.overflow || h.stray {
        rs.lost = true;
    }
    // Entries are not deduplicated: a guest that keeps writing while its
    // epoch is stretched (a slow link) would grow this without bound. Past
    // one entry per guest page, the set is dropped and tracking marked
    // lost: the boundary then resyncs (bounded by the guest's size).
    let cap = pending_cap(ctx.mem.size());
    if rs.pending.len() > cap {
        ctx.ring_pending.fetch_sub(rs.pending.len() as u64, Ordering::Relaxed);
        rs.pending = Vec::new();
        rs.lost = true;
        rs.pending_overflows += 1;
    }
    if expected == 0 && ledger.unreset == 0 && emptied_meanwhile {
        // a pre-copy round harvested and reset this ring between the exit
        // and here: KVM is no longer soft-full, re-enter
        return;
    }
    if expected == 0 && ledger.unreset == 0 && ctx.ring_resets.load(Ordering::SeqCst) != resets_seen {
        // a reset since the vCPU entered the guest may have freed it: re-enter
        return;
    }
    if expected == 0 && ledger.unreset == 0 {
        // Soft-full with nothing to harvest and nothing harvested waiting for
        // a reset (hot-page retention defers resets), in a ring in sync: KVM
        // counts a whole ring more as used than it holds, left over from an
        // overflow. Take one ring size off its count if the ring is where it
        // seems (ring.rs, `full_circle`), else leave it to a collection. The
        // epoch is lost either way.
        rs.lost = true;
        rs.stalls += 1;
        let _blocked = KickBlocked::new();
        if !matches!(rs.ring.full_circle(&mut || ledger.reset_raw(&ctx.vm)), Ok(true)) {
            tracing::warn!(vcpu = vcpu.id, "a stalled dirty ring is not where it seemed: left to the next collection");
        }
        return;
    }
    ledger.unreset += u64::from(expected);
    // With a kick pending on this thread KVM cuts a reset short, and on this
    // host a cut-short reset can leave recycled pages writable (writes to
    // them were then never logged: seen as missed pages in the ring-full
    // tests). Block the kick signal for the reset; it is delivered after
    // (and immediate_exit still makes the next KVM_RUN return at once).
    let ok = {
        let _blocked = KickBlocked::new();
        ledger.reset(&ctx.vm)
    };
    if !ok {
        rs.lost = true;
        rs.ring.mark_desynchronised();
    }
}
