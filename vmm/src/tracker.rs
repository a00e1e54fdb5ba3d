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

pub use crate::retention::{Retention, RetentionDecision, RETAIN_MAX_EPOCHS, RETAIN_MAX_PAGES};

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
    fn finish_dedups_and_unites() {
        let d = finish(vec![5, 3, 5, 9], 4, vec![3, 7], false);
        assert_eq!(d.gfns, vec![3, 5, 7, 9]);
        assert_eq!((d.from_kvm, d.from_vmm), (4, 2));
        assert_eq!((d.harvest_ns, d.reset_ns), (0, 0));
    }
}
