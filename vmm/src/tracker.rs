//! Dirty tracking behind one interface, two implementations chosen at VM
//! creation: the per-vCPU dirty ring, or the per-slot bitmap (KVM_GET_DIRTY_LOG
//! and KVM_CLEAR_DIRTY_LOG with manual protect). Both report the pages dirtied
//! since the previous collection, deduplicated and united with the VMM's own
//! writes, or say that tracking was lost (then every page must count as dirty).

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::abi::PAGE_SIZE;

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Default ring size (entries per vCPU).
pub const DEFAULT_RING_ENTRIES: u32 = 65536;

/// Which tracker a VM uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrackerKind {
    /// The KVM dirty ring with this many entries per vCPU.
    Ring { entries: u32 },
    /// The per-slot dirty bitmap.
    Bitmap,
}

impl TrackerKind {
    /// "ring" or "bitmap".
    pub fn name(&self) -> &'static str {
        match self {
            TrackerKind::Ring { .. } => "ring",
            TrackerKind::Bitmap => "bitmap",
        }
    }
}

/// Errors of the bitmap tracker.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("this KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")]
    NoManualProtect,
    #[error("enabling manual dirty-log protection failed: {0}")]
    Enable(vmm_sys_util::errno::Error),
    #[error("KVM_GET_DIRTY_LOG on slot {0} failed: {1}")]
    GetLog(u32, vmm_sys_util::errno::Error),
    #[error("KVM_CLEAR_DIRTY_LOG on slot {0} failed: {1}")]
    ClearLog(u32, std::io::Error),
    #[error("ring entry names slot {0}, which does not exist")]
    BadSlot(u32),
    #[error("re-protecting slot {0} (KVM_SET_USER_MEMORY_REGION) failed: {1}")]
    Reprotect(u32, vmm_sys_util::errno::Error),
    #[error(transparent)]
    Ring(#[from] crate::ring::RingError),
}

/// The result of one collection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtySet {
    /// Guest frame numbers, sorted and unique.
    pub gfns: Vec<u64>,
    /// Tracking was lost: `gfns` is incomplete and all memory must count as dirty.
    pub tracking_lost: bool,
    /// Entries/bits reported by KVM (before dedup).
    pub from_kvm: usize,
    /// Pages the VMM itself wrote.
    pub from_vmm: usize,
    /// Time spent harvesting (ring) or reading the log (bitmap), ns.
    pub harvest_ns: u64,
    /// Time spent re-arming tracking (KVM_RESET_DIRTY_RINGS / KVM_CLEAR_DIRTY_LOG), ns.
    pub reset_ns: u64,
}

/// KVM memory slots: slot id -> (first gfn, pages), and each slot's host
/// mapping (to register the slot again when re-protecting it).
#[derive(Debug, Clone, Default)]
pub struct SlotTable {
    slots: Vec<(u64, u64)>,
    hosts: Vec<u64>,
}

impl SlotTable {
    /// From the machine's regions, as registered: (gpa, bytes, host address).
    pub fn new(regions: &[(u64, u64, u64)]) -> Self {
        SlotTable {
            slots: regions.iter().map(|r| (r.0 / PAGE_SIZE, r.1 / PAGE_SIZE)).collect(),
            hosts: regions.iter().map(|r| r.2).collect(),
        }
    }

    /// The gfn of a ring entry, if it names a valid slot and page.
    pub fn gfn(&self, slot: u32, offset: u64) -> Option<u64> {
        let id = (slot & 0xffff) as usize;
        let as_id = slot >> 16;
        let (base, pages) = *self.slots.get(id)?;
        (as_id == 0 && offset < pages).then_some(base + offset)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, u64, u64)> + '_ {
        self.slots.iter().enumerate().map(|(i, s)| (i as u32, s.0, s.1))
    }
}

/// Enables manual dirty-log protection (needed for KVM_CLEAR_DIRTY_LOG).
pub fn enable_manual_protect(vm: &VmFd) -> Result<(), TrackerError> {
    if vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) <= 0 {
        return Err(TrackerError::NoManualProtect);
    }
    let mut cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
    cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
    vm.enable_cap(&cap).map_err(TrackerError::Enable)
}

/// One slot's dirty log as read by [`get_bitmaps`].
#[derive(Debug)]
pub struct SlotLog {
    slot: u32,
    pages: u64,
    bitmap: Vec<u64>,
}

/// Bitmap collection, first half: GET each slot's log and append the dirty
/// gfns to `out`. Returns the logs (for [`clear_bitmaps`]) and the number of bits.
pub fn get_bitmaps(vm: &VmFd, slots: &SlotTable, out: &mut Vec<u64>) -> Result<(Vec<SlotLog>, usize), TrackerError> {
    let mut n = 0;
    let mut logs = Vec::new();
    for (slot, base, pages) in slots.iter() {
        let bitmap = vm.get_dirty_log(slot, (pages * PAGE_SIZE) as usize).map_err(|e| TrackerError::GetLog(slot, e))?;
        let mut any = false;
        for (w, word) in bitmap.iter().enumerate() {
            let mut bits = *word;
            any |= bits != 0;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                out.push(base + w as u64 * 64 + b);
                bits &= bits - 1;
                n += 1;
            }
        }
        if any {
            logs.push(SlotLog { slot, pages, bitmap });
        }
    }
    Ok((logs, n))
}

/// Bitmap collection, second half: CLEAR (re-protect) exactly the bits the
/// GET reported. Returns the time spent in KVM, ns.
pub fn clear_bitmaps(vm: &VmFd, logs: &mut [SlotLog]) -> Result<u64, TrackerError> {
    let t = std::time::Instant::now();
    for log in logs.iter_mut() {
        let mut clear =
            kvm_clear_dirty_log { slot: log.slot, num_pages: log.pages as u32, first_page: 0, ..Default::default() };
        clear.__bindgen_anon_1.dirty_bitmap = log.bitmap.as_mut_ptr().cast();
        // SAFETY: `clear` points at `log.bitmap`, which holds one bit for each
        // of the slot's `pages` pages (get_dirty_log sized it from the same
        // length) and outlives the call; the kernel only reads it. The result
        // is checked.
        let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret < 0 {
            return Err(TrackerError::ClearLog(log.slot, std::io::Error::last_os_error()));
        }
    }
    Ok(t.elapsed().as_nanos() as u64)
}

/// Write-protects every page of every slot again, for either tracker: dirty
/// logging is turned off and on again on each slot (KVM write-protects all of
/// a slot's pages, or with the bitmap starts an empty log, when logging is
/// enabled on it). After it every guest write is logged, whatever state the
/// rings or logs were in. The vCPUs must be parked. Returns the time it took, ns.
pub fn reprotect_all(vm: &VmFd, slots: &SlotTable) -> Result<u64, TrackerError> {
    use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
    let t = std::time::Instant::now();
    for ((slot, base, pages), &host) in slots.iter().zip(&slots.hosts) {
        for flags in [0, KVM_MEM_LOG_DIRTY_PAGES] {
            let region = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: base * PAGE_SIZE,
                memory_size: pages * PAGE_SIZE,
                userspace_addr: host,
            };
            // SAFETY: the same slot, guest range and host mapping the machine
            // registered at build (SlotTable is built from those regions, and
            // the machine keeps the mapping alive as long as the VM fd); only
            // the flags change, so no new memory is handed to KVM.
            unsafe { vm.set_user_memory_region(region) }.map_err(|e| TrackerError::Reprotect(slot, e))?;
        }
    }
    Ok(t.elapsed().as_nanos() as u64)
}

/// Hot-page retention, for both trackers: re-arming tracking (ring reset,
/// bitmap clear) is deferred, so pages already reported stay writable and are
/// reported, and copied, at every collection until the next re-arm.
///
/// Why: on this project's host (KVM-PVM, nested) a tracked first write costs
/// ~30 us while copying a page costs ~0.3 us. A guest that writes the same
/// few hundred pages every epoch pays a write fault per page per epoch if
/// tracking is re-armed every epoch (the kv guest served 3.5x fewer requests
/// for exactly that reason). Retaining them trades copies for faults.
///
/// Correctness: a page is either write-protected when written, and then KVM
/// reports it, or it is writable because it was reported since the last
/// re-arm, and then it is in the retained set that every collection reports.
/// Re-arming happens with the vCPUs stopped, so no write falls in between.
///
/// Policy (decided at each collection, after reading what KVM reported):
/// re-arm when tracking was lost, after a number of collections (default
/// [`RETAIN_MAX_EPOCHS`], so pages no longer written leave the set), or when
/// the set would exceed
/// [`RETAIN_MAX_PAGES`]. The cap bounds what retention adds to the pause: at
/// most that many extra page copies per epoch (a streaming writer, whose
/// pages are not rewritten, reaches it quickly and then re-arms). Retained
/// pages whose content did not change are copied but not shipped (the
/// primary compares them with the previous epoch), so an idle retained page
/// costs a copy and a compare, ~0.5 us, against ~30 us for a write fault.
#[derive(Debug)]
pub struct Retention {
    /// Collections after which tracking is re-armed regardless.
    max_epochs: u32,
    /// Sorted, unique: pages reported since the last re-arm.
    retained: Vec<u64>,
    /// Collections since the last re-arm.
    since_rearm: u32,
    /// Re-arms so far.
    rearms: u64,
}

/// Collections after which tracking is re-armed regardless (the default of
/// [`crate::MachineConfig::hot_page_epochs`]).
///
/// Why 512 and not fewer: each re-arm makes the guest fault on every page it
/// keeps writing (the networked guest at 64 connections: ~200 pages within 1-3
/// epochs, ~6 ms of faults at ~30 us each, its clients' p99), while a page
/// kept in the set but no longer written costs a copy and a compare (~0.5
/// us) per epoch. That guest's set grows by ~1 page in 3 epochs beyond its
/// hot core, so a longer period costs little; docs/benchmarks.md has the
/// sweep (64 / 128 / 256 / 512). The page cap still bounds the set.
pub const RETAIN_MAX_EPOCHS: u32 = 512;
/// Largest retained set (pages); beyond it tracking is re-armed.
pub const RETAIN_MAX_PAGES: usize = 1024;

/// What [`Retention::decide`] concluded for one collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionDecision {
    /// Re-arm tracking now (then the retained set is emptied).
    pub rearm: bool,
    /// The pages this collection must report: the retained set united with
    /// the pages KVM reported (sorted, unique).
    pub report: Vec<u64>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention::new(RETAIN_MAX_EPOCHS)
    }
}

impl Retention {
    /// Retention that re-arms at the latest after `max_epochs` collections
    /// (at least 1).
    pub fn new(max_epochs: u32) -> Self {
        Retention { max_epochs: max_epochs.max(1), retained: Vec::new(), since_rearm: 0, rearms: 0 }
    }

    /// Forgets the retained set (tracking was re-armed by other means: every
    /// page is write-protected again).
    pub fn clear(&mut self) {
        self.retained.clear();
        self.since_rearm = 0;
    }

    /// Decides whether to re-arm now, given the pages KVM reported in this
    /// collection (any order, duplicates allowed); `must` forces a re-arm
    /// (tracking was lost, or a ring is filling up with deferred entries).
    pub fn decide(&mut self, reported: &[u64], must: bool) -> RetentionDecision {
        let mut new: Vec<u64> = reported.to_vec();
        new.sort_unstable();
        new.dedup();
        let mut report = Vec::with_capacity(self.retained.len() + new.len());
        merge_sorted(&self.retained, &new, &mut report);
        // pages reported now that were not retained
        let fresh = report.len() - self.retained.len();
        let rearm = must || self.since_rearm + 1 >= self.max_epochs || report.len() > RETAIN_MAX_PAGES;
        tracing::debug!(
            must,
            since = self.since_rearm,
            retained = self.retained.len(),
            fresh,
            report = report.len(),
            rearm,
            "retention"
        );
        if rearm {
            self.retained.clear();
            self.since_rearm = 0;
            self.rearms += 1;
        } else {
            self.retained.clone_from(&report);
            self.since_rearm += 1;
        }
        RetentionDecision { rearm, report }
    }

    /// Pages currently retained (writable, reported every collection).
    pub fn retained(&self) -> usize {
        self.retained.len()
    }

    /// Re-arms so far.
    pub fn rearms(&self) -> u64 {
        self.rearms
    }
}

/// Merges two sorted, unique lists into `out` (sorted, unique).
fn merge_sorted(a: &[u64], b: &[u64], out: &mut Vec<u64>) {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                out.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
}

/// Sorts, dedups and packages a collection.
pub fn finish(mut gfns: Vec<u64>, from_kvm: usize, vmm: Vec<u64>, tracking_lost: bool) -> DirtySet {
    let from_vmm = vmm.len();
    gfns.extend(vmm);
    gfns.sort_unstable();
    gfns.dedup();
    DirtySet { gfns, tracking_lost, from_kvm, from_vmm, harvest_ns: 0, reset_ns: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_table_maps_and_refuses() {
        let t = SlotTable::new(&[(0, 3 << 30, 0), (4 << 30, 1 << 30, 0)]);
        assert_eq!(t.gfn(0, 5), Some(5));
        assert_eq!(t.gfn(1, 0), Some((4 << 30) / PAGE_SIZE));
        assert_eq!(t.gfn(1, (1 << 30) / PAGE_SIZE), None);
        assert_eq!(t.gfn(2, 0), None);
        assert_eq!(t.gfn(1 << 16, 0), None);
    }

    #[test]
    fn retention_keeps_a_stable_working_set_and_rearms_on_schedule() {
        const EPOCHS: u32 = 64;
        let mut r = Retention::new(EPOCHS);
        let ws: Vec<u64> = (100..400).collect();
        let d = r.decide(&ws, false);
        assert!(!d.rearm);
        assert_eq!(d.report, ws);
        // the same pages are no longer reported by KVM (writable), yet reported
        for i in 1..EPOCHS - 1 {
            let d = r.decide(&[5, 5, 1000], false);
            assert!(!d.rearm, "collection {i}");
            assert_eq!(d.report.len(), 300 + 2);
            assert_eq!(r.retained(), 302);
        }
        let d = r.decide(&[7], false);
        assert!(d.rearm, "re-armed after EPOCHS collections");
        assert_eq!(d.report.len(), 303, "the re-arming collection still reports everything retained");
        assert_eq!(r.retained(), 0);
        assert_eq!(r.rearms(), 1);
    }

    #[test]
    fn retention_rearms_on_loss_cap_and_streaming_writers() {
        let mut r = Retention::default();
        assert!(r.decide(&[1, 2, 3], true).rearm);
        let big: Vec<u64> = (0..RETAIN_MAX_PAGES as u64 + 1).collect();
        assert!(r.decide(&big, false).rearm, "cap");
        // streaming: every collection brings 300 new pages: re-armed at the cap
        for k in 0..3u64 {
            assert!(!r.decide(&(k * 300..k * 300 + 300).collect::<Vec<_>>(), false).rearm, "collection {k}");
        }
        assert!(r.decide(&(900..1200).collect::<Vec<_>>(), false).rearm, "cap");
        // a filling working set: 100 new pages a few times, then few
        for k in 0..3u64 {
            assert!(!r.decide(&(k * 100..k * 100 + 100).collect::<Vec<_>>(), false).rearm);
        }
        let d = r.decide(&(295..330).collect::<Vec<_>>(), false);
        assert!(!d.rearm);
        assert_eq!(d.report, (0..330).collect::<Vec<_>>());
    }

    #[test]
    fn merge_sorted_unites() {
        let mut out = Vec::new();
        merge_sorted(&[1, 3, 5], &[2, 3, 6, 7], &mut out);
        assert_eq!(out, vec![1, 2, 3, 5, 6, 7]);
    }

    #[test]
    fn finish_dedups_and_unites() {
        let d = finish(vec![5, 3, 5, 9], 4, vec![3, 7], false);
        assert_eq!(d.gfns, vec![3, 5, 7, 9]);
        assert_eq!((d.from_kvm, d.from_vmm), (4, 2));
        assert_eq!((d.harvest_ns, d.reset_ns), (0, 0));
    }
}
