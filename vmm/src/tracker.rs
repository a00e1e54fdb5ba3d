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

/// KVM memory slots: slot id -> (first gfn, pages).
#[derive(Debug, Clone, Default)]
pub struct SlotTable {
    slots: Vec<(u64, u64)>,
}

impl SlotTable {
    pub fn new(regions: &[(u64, u64, u64)]) -> Self {
        SlotTable { slots: regions.iter().map(|r| (r.0 / PAGE_SIZE, r.1 / PAGE_SIZE)).collect() }
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

/// Bitmap collection: GET each slot's log, CLEAR (re-protect) exactly the bits
/// it reported, and append the dirty gfns to `out`. Returns the number of bits.
pub fn collect_bitmap(
    vm: &VmFd,
    slots: &SlotTable,
    out: &mut Vec<u64>,
    clear_ns: &mut u64,
    keep_writable: &dyn Fn(u64) -> bool,
) -> Result<usize, TrackerError> {
    let mut n = 0;
    for (slot, base, pages) in slots.iter() {
        let mut bitmap =
            vm.get_dirty_log(slot, (pages * PAGE_SIZE) as usize).map_err(|e| TrackerError::GetLog(slot, e))?;
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
        if !any {
            continue;
        }
        // pages kept writable are not cleared: their bit stays set, so every
        // later collection reports them again (they are copied every epoch)
        let mut to_clear = false;
        for (w, word) in bitmap.iter_mut().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                if keep_writable(base + w as u64 * 64 + b) {
                    *word &= !(1u64 << b);
                }
                bits &= bits - 1;
            }
            to_clear |= *word != 0;
        }
        if !to_clear {
            continue; // nothing to re-protect: spare KVM the call (and its TLB flush)
        }
        let mut clear = kvm_clear_dirty_log { slot, num_pages: pages as u32, first_page: 0, ..Default::default() };
        clear.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
        let t = std::time::Instant::now();
        // SAFETY: `clear` points at `bitmap`, which holds one bit for each of the
        // slot's `pages` pages (get_dirty_log sized it from the same length) and
        // outlives the call; the kernel only reads it. The result is checked.
        let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret < 0 {
            return Err(TrackerError::ClearLog(slot, std::io::Error::last_os_error()));
        }
        *clear_ns += t.elapsed().as_nanos() as u64;
    }
    Ok(n)
}

/// Hot-page retention for the bitmap tracker: a page dirty in
/// `HOT_AFTER` consecutive collections is left writable (not cleared) and
/// reported, and copied, at every collection; every `COOL_EVERY`
/// collections all pages are cleared again so cold ones leave the hot set.
/// On this host a tracked first write costs ~20 us and a page copy ~0.6 us,
/// so re-protecting a page written every epoch costs far more than copying it.
#[derive(Debug, Default)]
pub struct HotPages {
    streak: std::collections::HashMap<u64, u8>,
    hot: std::collections::HashSet<u64>,
    collections: u64,
}

/// Consecutive dirty collections before a page is kept writable.
pub const HOT_AFTER: u8 = 2;
/// Every this many collections, hot pages are re-protected (cool-down).
pub const COOL_EVERY: u64 = 32;

impl HotPages {
    /// Whether this collection is a cool-down (everything is cleared).
    pub fn begin(&mut self) -> bool {
        self.collections += 1;
        let cool = self.collections.is_multiple_of(COOL_EVERY);
        if cool {
            self.hot.clear();
            self.streak.clear();
        }
        cool
    }

    /// Is `gfn` kept writable in this collection?
    pub fn is_hot(&self, gfn: u64) -> bool {
        self.hot.contains(&gfn)
    }

    /// Updates streaks after a collection reported `dirty` (sorted, unique).
    pub fn update(&mut self, dirty: &[u64]) {
        let mut next = std::collections::HashMap::with_capacity(dirty.len());
        for &g in dirty {
            if self.hot.contains(&g) {
                continue;
            }
            let s = self.streak.get(&g).copied().unwrap_or(0) + 1;
            if s >= HOT_AFTER {
                self.hot.insert(g);
            } else {
                next.insert(g, s);
            }
        }
        self.streak = next;
    }

    pub fn hot_count(&self) -> usize {
        self.hot.len()
    }
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
    fn finish_dedups_and_unites() {
        let d = finish(vec![5, 3, 5, 9], 4, vec![3, 7], false);
        assert_eq!(d.gfns, vec![3, 5, 7, 9]);
        assert_eq!((d.from_kvm, d.from_vmm), (4, 2));
        assert_eq!((d.harvest_ns, d.reset_ns), (0, 0));
    }
}
