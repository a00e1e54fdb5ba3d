//! The machine's dirty tracker, one type for both implementations: the
//! per-vCPU dirty rings (with the ledger of entries awaiting a reset) or the
//! per-slot bitmap, plus hot-page retention and the rule that a collection
//! whose re-arm failed is reported as lost. The machine calls it; the vCPU
//! threads only touch the rings on ring-full exits (vcpu/ring_full.rs).

use std::sync::Arc;

use kvm_ioctls::{VcpuFd, VmFd};

use crate::memory::GuestMem;
use crate::ring::{self, Desync, DirtyRing, RingError, RingFlavour};
use crate::ring_set::{cut_short_reset, harvest_running, resynchronise};
use crate::tracker::{self, DirtySet, Retention, SlotTable, TrackerError, TrackerKind};
use crate::vcpu::{RingState, Vcpu, VcpuContext};

/// Smallest dirty set for which an overlapped collection hands the ring
/// reset to a parked vCPU thread (below it the reset is cheaper than the
/// hand-off).
const OVERLAP_RESET_MIN_PAGES: usize = 256;

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
    /// Fault injection: vCPU 0's ring is made desynchronised and its entries
    /// are forgotten (never recycled) at every collection until its vCPU is
    /// stuck ring-full with nothing pushed.
    stuck_armed: bool,
    /// Desynchronised rings re-aligned, and stuck ones stepped forward.
    realigns: u64,
    unsticks: u64,
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
            stuck_armed: false,
            realigns: 0,
            unsticks: 0,
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

    /// Fault injection (tests): from the next collection on, vCPU 0's ring
    /// is treated as desynchronised and what it holds is read and forgotten
    /// (never recycled), so KVM's count of used entries only grows, until
    /// its vCPU is stuck ring-full with nothing pushed; that collection
    /// unsticks it as it would after an overflow. No effect with the bitmap.
    pub fn inject_stuck_ring(&mut self) {
        self.stuck_armed = matches!(self.kind, TrackerKind::Ring { .. });
    }

    /// (desynchronised rings re-aligned, stuck rings stepped forward) so far.
    pub fn resyncs(&self) -> (u64, u64) {
        (self.realigns, self.unsticks)
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
                stuck: None,
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
            // pages the reset did not recycle stay writable: the next
            // collection is lost too (and re-protects every slot)
            self.lost_pending = true;
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
                // desynchronised rings to re-synchronise: (index, KVM's push position)
                let mut align = Vec::new();
                let mut unstick = Vec::new();
                ctx.ring_pending.store(0, std::sync::atomic::Ordering::Relaxed);
                // a stuck vCPU is believed only if no reset happened since
                // it saw its ring full (a reset may have freed it)
                let resets_now = ledger.resets.load(std::sync::atomic::Ordering::SeqCst);
                for (k, g) in rings.iter_mut().enumerate() {
                    let rs = g.as_mut().expect("ring tracker has rings");
                    entries.append(&mut rs.pending);
                    lost |= std::mem::take(&mut rs.lost);
                    let stuck = rs.stuck.take() == Some(resets_now);
                    if self.stuck_armed && k == 0 {
                        rs.ring.mark_desynchronised();
                    }
                    if rs.ring.is_desynchronised() {
                        let d = rs.ring.desync_harvest(&mut entries);
                        if self.stuck_armed && k == 0 {
                            if d == Desync::Empty && stuck {
                                self.stuck_armed = false;
                            } else {
                                rs.ring.forget();
                                lost = true;
                                harvested.push(0);
                                continue;
                            }
                        }
                        match d {
                            // nothing pushed: nothing written (every page is
                            // write-protected since the last collection)
                            Desync::Empty if !stuck => {}
                            // this collection's resets may walk the ring's
                            // own marks and free its vCPU: it is unstuck only
                            // if every mark is still there after them
                            Desync::Empty => {
                                lost = true;
                                unstick.push((k, rs.ring.marked()));
                            }
                            Desync::AllDirty => {
                                lost = true;
                                ledger.unreset += u64::from(rs.ring.entries());
                            }
                            // the run is every push since the last collection,
                            // but the re-alignment's reset cannot be checked:
                            // call it lost, the next collection checks
                            Desync::Run { end } => {
                                lost = true;
                                align.push((k, end));
                            }
                            Desync::Runs => {
                                tracing::warn!(vcpu = k, "dirty ring holds several runs of entries: tracking lost");
                                lost = true;
                            }
                        }
                        harvested.push(0);
                        continue;
                    }
                    let scan = rs.ring.take_just_aligned() || rs.verify;
                    let h = rs.ring.harvest(&mut entries, scan);
                    lost |= h.overflow || h.stray;
                    ledger.unreset += u64::from(h.expected_reset());
                    harvested.push(h.harvested);
                }
                if std::mem::take(&mut ledger.suspect) {
                    // a reset on a ring-full exit recycled more or less than
                    // the rings held: any ring may be off, not only its own
                    lost = true;
                    for g in rings.iter_mut() {
                        g.as_mut().expect("ring").ring.mark_desynchronised();
                    }
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
                        let mut clean = false;
                        for _ in 0..4 {
                            if let Ok(n) = ledger.reset_raw(vm) {
                                clean = n == 0;
                            }
                            if clean {
                                break;
                            }
                        }
                        ledger.unreset = 0;
                        ledger.suspect = false;
                        // re-synchronising needs no mark left in any ring
                        // (its resets are VM-wide); else the next collection
                        if clean {
                            let (a, u) = resynchronise(vm, &ledger, &mut rings, &align, &unstick);
                            self.realigns += a;
                            self.unsticks += u;
                        }
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
