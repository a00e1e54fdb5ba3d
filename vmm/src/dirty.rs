//! The machine's dirty tracker, one type for both implementations: the
//! per-vCPU dirty rings (with the ledger of entries awaiting a reset) or the
//! per-slot bitmap, plus hot-page retention and the rule that a collection
//! whose re-arm failed is reported as lost. The machine calls it; the vCPU
//! threads only touch the rings on ring-full exits (vcpu/ring_full.rs).

use std::sync::Arc;

use kvm_ioctls::{VcpuFd, VmFd};

use crate::memory::GuestMem;
use crate::ring::{self, DirtyRing, RingError, RingFlavour};
use crate::tracker::{self, DirtySet, Retention, SlotTable, TrackerError, TrackerKind};
use crate::vcpu::{RingState, Vcpu, VcpuContext};

/// Smallest dirty set for which an overlapped collection hands the ring
/// reset to a parked vCPU thread (below it the reset is cheaper than the
/// hand-off).
const OVERLAP_RESET_MIN_PAGES: usize = 256;

/// Ring entries harvested (marked RESET) but not yet recycled by
/// KVM_RESET_DIRTY_RINGS, over all rings. With hot-page retention the
/// collector defers the reset, so a reset on a ring-full exit recycles the
/// collector's entries too: every reset compares KVM's count with this.
#[derive(Debug, Default)]
pub struct RingLedger {
    pub unreset: u64,
    /// A reset on a ring-full exit found a count mismatch: the collector must
    /// treat every ring as desynchronised and the collection as lost.
    pub suspect: bool,
}

impl RingLedger {
    /// Resets the rings; false if tracking was lost. KVM must recycle exactly
    /// the entries marked RESET. A short count is a loss too: on this host a
    /// reset cut short (by a signal pending on the calling thread) left
    /// recycled pages writable, so writes to them went unlogged. Callers on
    /// vCPU threads therefore block the kick signal around the reset.
    pub fn reset(&mut self, vm: &VmFd) -> bool {
        let expected = std::mem::take(&mut self.unreset);
        match ring::reset_rings(vm) {
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

/// Whether a collection can be trusted to hold every write since the one
/// before. After any doubt about a ring or log (a short or failed reset, an
/// overflow, an entry outside memory, a failed re-arm) collections stay lost
/// until tracking is provably whole again: every slot re-protected, and then a
/// reset that recycled exactly what was harvested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Every write since the last collection will be in the next one.
    Whole,
    /// A loss was seen and re-protecting the slots failed: every collection
    /// is lost until a re-protect succeeds.
    Doubt,
    /// Every slot was re-protected at the last collection (a lost one): the
    /// next collection holds every write since, and tracking is whole again
    /// once its reset (synchronous, no retention) recycles exactly what it
    /// harvested; any loss in it starts over.
    Reprotected,
}

/// Dirty tracking of one machine.
#[derive(Debug)]
pub(crate) struct DirtyTracker {
    kind: TrackerKind,
    slots: SlotTable,
    retention: Retention,
    /// A re-arm failed after its collection was returned: the next
    /// collection is lost.
    lost_pending: bool,
    /// A ring reset handed to a vCPU thread by an overlapped collection.
    reset_in_flight: bool,
    trust: Trust,
    /// Fault injection: the next synchronous ring reset is cut short.
    short_reset_armed: bool,
    short_resets_injected: u64,
    /// Times every slot was re-protected after a loss.
    reprotects: u64,
    /// Pre-copy rounds done (tracking re-armed while the guest ran).
    precopy_rounds: u64,
}

impl DirtyTracker {
    /// Turns tracking on for `vm` (before any vCPU exists).
    pub fn enable(vm: &VmFd, kind: TrackerKind) -> Result<Option<RingFlavour>, TrackerError> {
        match kind {
            TrackerKind::Ring { entries } => Ok(Some(ring::enable(vm, entries).map_err(TrackerError::Ring)?)),
            TrackerKind::Bitmap => {
                tracker::enable_manual_protect(vm)?;
                Ok(None)
            }
        }
    }

    /// `hot_page_epochs`: see [`crate::MachineConfig::hot_page_epochs`].
    pub fn new(kind: TrackerKind, slots: SlotTable, hot_page_epochs: u32) -> Self {
        DirtyTracker {
            kind,
            slots,
            retention: Retention::new(hot_page_epochs),
            lost_pending: false,
            reset_in_flight: false,
            trust: Trust::Whole,
            short_reset_armed: false,
            short_resets_injected: 0,
            reprotects: 0,
            precopy_rounds: 0,
        }
    }

    pub fn trust(&self) -> Trust {
        self.trust
    }

    /// Fault injection (tests): the next collection that resets the rings
    /// synchronously recycles only part of what it harvested and leaves the
    /// rest marked but not recycled, as a reset cut short by a signal does on
    /// this host (their pages stay writable). No effect with the bitmap.
    pub fn inject_short_reset(&mut self) {
        self.short_reset_armed = matches!(self.kind, TrackerKind::Ring { .. });
    }

    /// Short resets injected so far.
    pub fn short_resets_injected(&self) -> u64 {
        self.short_resets_injected
    }

    /// Times every slot was re-protected after a loss.
    pub fn reprotects(&self) -> u64 {
        self.reprotects
    }

    /// The ring a new vCPU carries (none with the bitmap tracker).
    pub fn vcpu_ring(&self, fd: &VcpuFd, verify: bool) -> Result<Option<RingState>, RingError> {
        match self.kind {
            TrackerKind::Ring { entries } => Ok(Some(RingState {
                ring: DirtyRing::map(fd, entries)?,
                pending: Vec::new(),
                lost: false,
                full_exits: 0,
                stalls: 0,
                pending_overflows: 0,
                verify,
            })),
            TrackerKind::Bitmap => Ok(None),
        }
    }

    /// Waits for a reset handed out by an overlapped collection (or does it
    /// here if no vCPU thread took it). False if it failed: the collection it
    /// belongs to is incomplete (treat memory as all dirty).
    pub fn finish_reset(&mut self, vcpus: &[Arc<Vcpu>], ctx: &VcpuContext) -> bool {
        if !std::mem::take(&mut self.reset_in_flight) {
            return true;
        }
        let ok = match vcpus.first() {
            Some(v) => v.take_reset(ctx),
            None => true,
        };
        if !ok {
            common::sync::lock(&ctx.reset_lock).suspect = false;
            for v in vcpus {
                if let Some(rs) = v.ring().as_mut() {
                    rs.ring.mark_desynchronised();
                }
            }
        }
        ok
    }

    /// Before the guest runs again: tracking must be re-armed; a failure the
    /// caller did not pick up makes the next collection a lost one.
    pub fn before_resume(&mut self, vcpus: &[Arc<Vcpu>], ctx: &VcpuContext) {
        if !self.finish_reset(vcpus, ctx) {
            self.lost_pending = true;
        }
    }

    /// Pages dirtied since the previous collection (vCPUs parked), re-armed
    /// unless retention defers it; `overlap`: a large ring reset is handed to
    /// a parked vCPU thread ([`DirtyTracker::finish_reset`] picks it up).
    pub fn collect(
        &mut self,
        vm: &VmFd,
        vcpus: &[Arc<Vcpu>],
        ctx: &VcpuContext,
        mem: &GuestMem,
        retain: bool,
        overlap: bool,
    ) -> Result<DirtySet, TrackerError> {
        self.before_resume(vcpus, ctx);
        let t0 = std::time::Instant::now();
        let mut reset_ns = 0u64;
        let mut gfns = Vec::new();
        let mut lost = std::mem::take(&mut self.lost_pending) || self.trust == Trust::Doubt;
        // while tracking is not known to be whole, no retention (every
        // collection re-arms) and no overlapped reset: the reset's verdict
        // must be known before this collection is called complete
        let doubtful = self.trust != Trust::Whole;
        let from_kvm;
        match self.kind {
            TrackerKind::Ring { entries: ring_size } => {
                let mut ledger = common::sync::lock(&ctx.reset_lock);
                let mut entries = Vec::new();
                let mut rings: Vec<_> = vcpus.iter().map(|v| v.ring()).collect();
                let mut harvested = Vec::with_capacity(rings.len());
                ctx.ring_pending.store(0, std::sync::atomic::Ordering::Relaxed);
                for g in rings.iter_mut() {
                    let rs = g.as_mut().expect("ring tracker has rings");
                    entries.append(&mut rs.pending);
                    lost |= std::mem::take(&mut rs.lost);
                    let h = rs.ring.harvest(&mut entries, rs.verify);
                    lost |= h.overflow || h.stray;
                    ledger.unreset += u64::from(h.expected_reset());
                    harvested.push(h.harvested);
                }
                if std::mem::take(&mut ledger.suspect) {
                    lost = true;
                }
                from_kvm = entries.len();
                for (slot, offset) in entries {
                    match self.slots.gfn(slot, offset) {
                        Some(g) => gfns.push(g),
                        None => {
                            tracing::warn!(slot, offset, "ring entry outside guest memory: tracking lost");
                            lost = true;
                        }
                    }
                }
                // rings on average more than half full of entries waiting for
                // a reset would soon exit ring-full: re-arm now instead
                let filling = ledger.unreset > u64::from(ring_size / 2) * vcpus.len() as u64;
                let rearm = if retain && !doubtful {
                    let d = self.retention.decide(&gfns, lost || filling);
                    gfns = d.report;
                    d.rearm
                } else {
                    true
                };
                // hand the reset off only when the copy it overlaps is longer
                // than a hand-off to a parked thread (~100 us here)
                if rearm && overlap && !doubtful && !lost && gfns.len() >= OVERLAP_RESET_MIN_PAGES && !vcpus.is_empty()
                {
                    drop(rings);
                    drop(ledger);
                    vcpus[0].request_reset();
                    self.reset_in_flight = true;
                } else if rearm {
                    let tr = std::time::Instant::now();
                    let ok = if self.short_reset_armed && harvested.iter().any(|&n| n >= 2) {
                        self.short_reset_armed = false;
                        self.short_resets_injected += 1;
                        cut_short_reset(&mut ledger, vm, &mut rings, &harvested)
                    } else {
                        ledger.reset(vm)
                    };
                    reset_ns = tr.elapsed().as_nanos() as u64;
                    if !ok {
                        ledger.suspect = false;
                        lost = true;
                        for g in rings.iter_mut() {
                            g.as_mut().expect("ring").ring.mark_desynchronised();
                        }
                    }
                    if lost {
                        // (a loss always re-arms, here) recycle whatever a
                        // short reset left marked, so that the next reset
                        // counts only the next harvest
                        for _ in 0..4 {
                            if !matches!(ring::reset_rings(vm), Ok(n) if n > 0) {
                                break;
                            }
                        }
                        ledger.unreset = 0;
                        ledger.suspect = false;
                    }
                }
            }
            TrackerKind::Bitmap => {
                let (mut logs, n) = tracker::get_bitmaps(vm, &self.slots, &mut gfns)?;
                from_kvm = n;
                let rearm = if retain && !doubtful {
                    let d = self.retention.decide(&gfns, lost);
                    gfns = d.report;
                    d.rearm
                } else {
                    true
                };
                if rearm {
                    reset_ns = tracker::clear_bitmaps(vm, &mut logs)?;
                }
            }
        }
        if lost {
            tracing::warn!("dirty tracking lost for this collection: all memory must be treated as dirty");
            // any doubt: write-protect every page again now (the vCPUs are
            // parked), so the next collection holds every write from here on
            self.retention.clear();
            match tracker::reprotect_all(vm, &self.slots) {
                Ok(ns) => {
                    tracing::info!(ms = ns as f64 / 1e6, "re-protected every memory slot after a tracking loss");
                    reset_ns += ns;
                    self.reprotects += 1;
                    self.trust = Trust::Reprotected;
                }
                Err(e) => {
                    tracing::error!(error = %e, "re-protecting guest memory failed: tracking stays lost");
                    self.trust = Trust::Doubt;
                }
            }
        } else if self.trust == Trust::Reprotected {
            tracing::info!("dirty tracking is whole again");
            self.trust = Trust::Whole;
        }
        let mut d = tracker::finish(gfns, from_kvm, mem.take_vmm_dirty(), lost);
        d.reset_ns = reset_ns;
        d.harvest_ns = (t0.elapsed().as_nanos() as u64).saturating_sub(reset_ns);
        Ok(d)
    }

    /// While the guest runs: harvests every ring into its pending list
    /// (entries marked RESET, not yet recycled) and returns the entries
    /// pending since the last collection or pre-copy round. Cheap (a read of
    /// the new entries), re-arms nothing: hot pages kept writable by
    /// retention stay writable. 0 with the bitmap tracker, or while tracking
    /// is not whole.
    pub fn skim(&mut self, vcpus: &[Arc<Vcpu>], ctx: &VcpuContext) -> u64 {
        if !matches!(self.kind, TrackerKind::Ring { .. }) || self.trust != Trust::Whole || self.lost_pending {
            return 0;
        }
        let mut ledger = common::sync::lock(&ctx.reset_lock);
        let mut rings: Vec<_> = vcpus.iter().map(|v| v.ring()).collect();
        harvest_running(vcpus, &mut rings, &mut ledger);
        let pending = rings.iter().map(|g| g.as_ref().map_or(0, |rs| rs.pending.len() as u64)).sum();
        ctx.ring_pending.store(pending, std::sync::atomic::Ordering::Relaxed);
        pending
    }

    /// A pre-copy round, while the guest runs: harvests every ring, re-arms
    /// tracking (KVM_RESET_DIRTY_RINGS: every harvested page is write-protected
    /// again) and returns the pages harvested since the last collection or
    /// round, sorted. The caller copies them after this returns: a write after
    /// the reset is logged again and is in the next collection, which the
    /// boundary copies in its pause, so a page torn by a write during its
    /// pre-copy is always copied again. Pages written by the VMM stay for the
    /// boundary's collection. None (nothing to pre-copy) with the bitmap
    /// tracker or while tracking is not whole; any doubt found here (an
    /// overflow, a reset count mismatch, an entry outside memory) makes the
    /// next collection a lost one, and the round returns None.
    pub fn precopy_round(
        &mut self,
        vm: &VmFd,
        vcpus: &[Arc<Vcpu>],
        ctx: &VcpuContext,
    ) -> Result<Option<Vec<u64>>, TrackerError> {
        if !matches!(self.kind, TrackerKind::Ring { .. })
            || self.trust != Trust::Whole
            || self.lost_pending
            || self.reset_in_flight
        {
            return Ok(None);
        }
        let mut ledger = common::sync::lock(&ctx.reset_lock);
        let mut rings: Vec<_> = vcpus.iter().map(|v| v.ring()).collect();
        let mut entries = Vec::new();
        let mut lost = std::mem::take(&mut ledger.suspect);
        harvest_running(vcpus, &mut rings, &mut ledger);
        for g in rings.iter_mut() {
            let rs = g.as_mut().expect("ring tracker has rings");
            lost |= std::mem::take(&mut rs.lost);
            entries.append(&mut rs.pending);
        }
        ctx.ring_pending.store(0, std::sync::atomic::Ordering::Relaxed);
        // (this thread is no vCPU thread: no kick signal cuts the reset short)
        if !lost && !ledger.reset(vm) {
            ledger.suspect = false;
            lost = true;
            for g in rings.iter_mut() {
                g.as_mut().expect("ring").ring.mark_desynchronised();
            }
        }
        let mut gfns = Vec::with_capacity(entries.len());
        for (slot, offset) in entries {
            match self.slots.gfn(slot, offset) {
                Some(g) => gfns.push(g),
                None => lost = true,
            }
        }
        if lost {
            tracing::warn!("dirty tracking lost during a pre-copy round: the next collection is lost");
            self.lost_pending = true;
            return Ok(None);
        }
        gfns.sort_unstable();
        gfns.dedup();
        self.precopy_rounds += 1;
        Ok(Some(gfns))
    }

    /// Pre-copy rounds so far.
    pub fn precopy_rounds(&self) -> u64 {
        self.precopy_rounds
    }

    /// Pages kept writable by hot-page retention.
    pub fn retained(&self) -> usize {
        self.retention.retained()
    }

    /// Times hot-page retention re-armed tracking.
    pub fn rearms(&self) -> u64 {
        self.retention.rearms()
    }

    /// See [`Retention::note_changed`].
    pub fn note_changed(&mut self, changed: impl IntoIterator<Item = u64>) {
        self.retention.note_changed(changed);
    }
}

/// Harvests every ring into its pending list while the vCPUs may run (no
/// verification scan: a running vCPU adds entries meanwhile); an overflow
/// marks the ring's tracking lost. Entries stay marked RESET, counted in the
/// ledger, until a reset recycles them.
fn harvest_running(
    vcpus: &[Arc<Vcpu>],
    rings: &mut [std::sync::MutexGuard<'_, Option<RingState>>],
    ledger: &mut RingLedger,
) {
    for (v, g) in vcpus.iter().zip(rings.iter_mut()) {
        let Some(rs) = g.as_mut() else { continue };
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
fn cut_short_reset(
    ledger: &mut RingLedger,
    vm: &VmFd,
    rings: &mut [std::sync::MutexGuard<'_, Option<RingState>>],
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
