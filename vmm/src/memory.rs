//! Guest memory: anonymous, MAP_NORESERVE mappings (vm-memory) laid out around
//! the x86 MMIO hole, with one write path for the VMM that records every page it
//! dirties (the KVM trackers cannot see VMM writes).

use std::num::NonZeroUsize;
use std::sync::Mutex;

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::abi::PAGE_SIZE;

/// Smallest supported guest.
pub const MIN_MEM: u64 = 64 << 20;
/// Largest supported guest (the identity map has 64 page directories).
pub const MAX_MEM: u64 = 60 << 30;
/// Start of the 32-bit MMIO hole (LAPIC, IOAPIC live above it).
pub const HOLE_START: u64 = 3 << 30;
/// Size of the MMIO hole.
pub const HOLE_SIZE: u64 = 1 << 30;

/// Errors of guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0} bytes is out of range (64 MiB to 60 GiB, a multiple of 2 MiB)")]
    BadSize(u64),
    #[error("cannot map guest memory: {0}")]
    Map(String),
    #[error("guest address range {gpa:#x}+{len} is not RAM")]
    OutOfRange { gpa: u64, len: usize },
}

/// A vm-memory bitmap that remembers which pages went from clean to dirty, so
/// the VMM's own writes can be collected in time proportional to their number
/// (not to the guest's size).
#[derive(Debug)]
pub struct PageLog {
    bits: AtomicBitmap,
    fresh: Mutex<Vec<u32>>,
}

impl Default for PageLog {
    fn default() -> Self {
        Self::with_len(0)
    }
}

impl PageLog {
    /// Takes the pages dirtied since the last call (region-relative page indexes).
    pub fn take(&self) -> Vec<u32> {
        let pages = std::mem::take(&mut *common::sync::lock(&self.fresh));
        for p in &pages {
            self.bits.reset_bit(*p as usize);
        }
        pages
    }
}

impl<'a> WithBitmapSlice<'a> for PageLog {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for PageLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE as usize;
        let last = (offset + len - 1) / PAGE_SIZE as usize;
        let mut fresh = common::sync::lock(&self.fresh);
        for page in first..=last.min(self.bits.len().saturating_sub(1)) {
            if !self.bits.is_bit_set(page) {
                self.bits.set_bit(page);
                fresh.push(page as u32);
            }
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.bits.is_addr_set(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for PageLog {
    fn with_len(len: usize) -> Self {
        PageLog {
            bits: AtomicBitmap::new(len, NonZeroUsize::new(PAGE_SIZE as usize).expect("page size")),
            fresh: Mutex::new(Vec::new()),
        }
    }
}

/// The guest-physical RAM ranges of a guest of `mem_bytes` (below and above the hole).
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= HOLE_START {
        vec![(0, mem_bytes)]
    } else {
        vec![(0, HOLE_START), (HOLE_START + HOLE_SIZE, mem_bytes - HOLE_START)]
    }
}

/// Bytes [`GuestMem::release_in_background`] gives back per step.
pub const RELEASE_CHUNK: u64 = 8 << 20;

/// Guest memory of one VM.
#[derive(Debug)]
pub struct GuestMem {
    mem: GuestMemoryMmap<PageLog>,
    size: u64,
}

impl GuestMem {
    /// Maps `mem_bytes` of anonymous, never-reserved memory.
    pub fn new(mem_bytes: u64) -> Result<Self, MemoryError> {
        if !(MIN_MEM..=MAX_MEM).contains(&mem_bytes) || !mem_bytes.is_multiple_of(2 << 20) {
            return Err(MemoryError::BadSize(mem_bytes));
        }
        let regions = ram_ranges(mem_bytes)
            .into_iter()
            .map(|(gpa, size)| {
                let region = MmapRegion::<PageLog>::new(size as usize).map_err(|e| MemoryError::Map(e.to_string()))?;
                GuestRegionMmap::new(region, GuestAddress(gpa))
                    .ok_or_else(|| MemoryError::Map("address overflow".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(GuestMem { mem, size: mem_bytes })
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The tracked mapping itself, for device models that address guest
    /// memory through vm-memory (virtio queues): their writes are recorded
    /// as the VMM's, like [`GuestMem::write`]'s.
    pub fn guest_memory(&self) -> &GuestMemoryMmap<PageLog> {
        &self.mem
    }

    /// (guest address, size, host address) of each RAM region, in slot order.
    pub fn regions(&self) -> Vec<(u64, u64, u64)> {
        self.mem.iter().map(|r| (r.start_addr().0, r.len(), r.as_ptr() as u64)).collect()
    }

    /// Number of guest page frames (including the hole's, which are never RAM).
    pub fn is_ram(&self, gpa: u64, len: usize) -> bool {
        self.mem.check_range(GuestAddress(gpa), len)
    }

    /// The VMM's one write path into guest memory: the pages it touches are
    /// recorded and reported by the next dirty collection.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.mem.write_slice(data, GuestAddress(gpa)).map_err(|_| MemoryError::OutOfRange { gpa, len: data.len() })
    }

    /// Reads guest memory (not a write: nothing is recorded).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.mem.read_slice(buf, GuestAddress(gpa)).map_err(|_| MemoryError::OutOfRange { gpa, len: buf.len() })
    }

    /// Reads one little-endian u64.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads one little-endian u32.
    pub fn read_u32(&self, gpa: u64) -> Result<u32, MemoryError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Copies the page at `gfn` into `out` (4096 bytes).
    pub fn read_page(&self, gfn: u64, out: &mut [u8]) -> Result<(), MemoryError> {
        self.read(gfn * PAGE_SIZE, &mut out[..PAGE_SIZE as usize])
    }

    /// Copies whole pages, in order, into `out` (`gfns.len() * 4096` bytes)
    /// with plain memcpy from the host mapping (vm-memory's volatile path is
    /// several times slower: it dominated the epoch pause).
    ///
    /// # Safety
    ///
    /// Nothing may write guest memory while this runs: every vCPU parked and
    /// no VMM write in flight. (Concurrent writes would make this a data race;
    /// use [`GuestMem::read_page`] while the guest runs.)
    pub unsafe fn copy_pages_quiescent(&self, gfns: &[u64], out: &mut [u8]) -> Result<(), MemoryError> {
        // SAFETY: the caller's guarantee (no writer) is this function's.
        unsafe { self.copy_pages_raw(gfns, out) }
    }

    /// Copies whole pages, in order, into `out` while the guest may be
    /// writing them (a pre-copy). A page written during its copy comes out
    /// torn: callers use this only for pages whose tracking was re-armed
    /// before the copy, so that any such write is logged and the page copied
    /// again in the boundary's pause.
    ///
    /// # Safety
    ///
    /// The result is defined only for pages nobody writes meanwhile; the
    /// caller must treat every other page's bytes as garbage to be replaced
    /// (re-armed tracking guarantees it will be).
    pub unsafe fn copy_pages_racy(&self, gfns: &[u64], out: &mut [u8]) -> Result<(), MemoryError> {
        // SAFETY: guest memory is an mmap the guest writes through KVM, from
        // outside this program's view (like memory shared with another
        // process): the copy goes through raw pointers only, never through a
        // reference to guest memory, and any byte value is a valid u8. The
        // VMM's own writes (vm-memory's volatile stores, on vCPU threads in
        // device exits) may race with it; the caller discards what they tear.
        unsafe { self.copy_pages_raw(gfns, out) }
    }

    /// # Safety
    ///
    /// See [`GuestMem::copy_pages_quiescent`] and [`GuestMem::copy_pages_racy`].
    unsafe fn copy_pages_raw(&self, gfns: &[u64], out: &mut [u8]) -> Result<(), MemoryError> {
        let ps = PAGE_SIZE as usize;
        if out.len() != gfns.len() * ps {
            return Err(MemoryError::OutOfRange { gpa: 0, len: out.len() });
        }
        let regions = self.regions();
        for (i, &gfn) in gfns.iter().enumerate() {
            let gpa = gfn.checked_mul(PAGE_SIZE).ok_or(MemoryError::OutOfRange { gpa: u64::MAX, len: ps })?;
            let (start, _, host) = *regions
                .iter()
                .find(|r| gpa >= r.0 && gpa + PAGE_SIZE <= r.0 + r.1)
                .ok_or(MemoryError::OutOfRange { gpa, len: ps })?;
            // SAFETY: the page lies inside one of our mappings (checked just
            // above), `out` has room for it (length checked on entry), the two
            // never overlap (`out` is ordinary heap memory); concurrent writes
            // are the callers' contract (see the two public wrappers).
            unsafe {
                std::ptr::copy_nonoverlapping((host + (gpa - start)) as *const u8, out.as_mut_ptr().add(i * ps), ps);
            }
        }
        Ok(())
    }

    /// Drains the pages the VMM wrote since the last call, as guest frame numbers.
    pub fn take_vmm_dirty(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for r in self.mem.iter() {
            let base = r.start_addr().0 / PAGE_SIZE;
            out.extend(MmapRegion::bitmap(r).take().into_iter().map(|p| base + u64::from(p)));
        }
        out
    }

    /// Guest frame numbers of all RAM pages.
    pub fn all_gfns(&self) -> impl Iterator<Item = u64> + '_ {
        self.mem.iter().flat_map(|r| (r.start_addr().0 / PAGE_SIZE)..((r.start_addr().0 + r.len()) / PAGE_SIZE))
    }

    /// A 64-bit digest of all guest memory (order-sensitive over 1 MiB chunks of
    /// CRC32): equal digests mean equal memory, for verification mode.
    pub fn digest(&self) -> u64 {
        const CHUNK: usize = 1 << 20;
        let mut buf = vec![0u8; CHUNK];
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut i: u64 = 0;
        for (gpa, size, _) in self.regions() {
            let mut off = 0;
            while off < size {
                let n = CHUNK.min((size - off) as usize);
                // regions are RAM by construction
                if self.read(gpa + off, &mut buf[..n]).is_ok() {
                    let c = u64::from(crc32fast::hash(&buf[..n]));
                    h = (h ^ c ^ (i << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
                }
                off += n as u64;
                i += 1;
            }
        }
        h
    }

    /// Zeroes all guest memory at once, giving the pages back to the host
    /// (`MADV_DONTNEED` on the anonymous private mappings). Used by a replica
    /// applying a full-memory epoch.
    pub fn discard_all(&self) -> Result<(), MemoryError> {
        for (_, size, host) in self.regions() {
            // SAFETY: `host..host+size` is exactly one of our own anonymous
            // private mappings (vm-memory MmapRegion), valid while `self` lives;
            // MADV_DONTNEED on such a mapping only replaces its contents with
            // zero pages, which every reader of guest memory must tolerate (the
            // guest itself is not running while a replica applies an epoch).
            let ret = unsafe { libc::madvise(host as *mut libc::c_void, size as usize, libc::MADV_DONTNEED) };
            if ret != 0 {
                return Err(MemoryError::Map(format!("madvise: {}", std::io::Error::last_os_error())));
            }
        }
        Ok(())
    }

    /// Gives this memory back to the host without stalling the rest of the
    /// process, on a thread of its own (named `name`), and returns at once.
    ///
    /// Unmapping a GiB of touched memory in one call took 20-35 ms on an idle
    /// host of this project (over 100 ms loaded), and meanwhile every other
    /// thread of the process that maps or unmaps memory (an allocation of a
    /// large frame, say) waits for it: a secondary that dropped its old
    /// replica this way when a live sync committed answered its heartbeats
    /// over 100 ms late (the suite's 1 GiB sync test failed on it). Here the
    /// pages go back [`RELEASE_CHUNK`] at a time (`MADV_DONTNEED`, which
    /// leaves the mapping to others meanwhile) with a short sleep between
    /// chunks, and the empty mapping is dropped last. The memory is gone
    /// from the host's view within a few hundred milliseconds instead of at
    /// once. (At normal priority, not idle: on a saturated host an idle
    /// thread could hold a GiB for a minute, and syncs that follow each
    /// other would pile old copies up.)
    /// If another holder of `mem` remains, this one is only dropped there
    /// (the last holder frees it at once, as any drop does).
    pub fn release_in_background(mem: std::sync::Arc<GuestMem>, name: &str) {
        let run = move || {
            let Ok(this) = std::sync::Arc::try_unwrap(mem) else {
                return;
            };
            for (_, size, host) in this.regions() {
                let mut off = 0u64;
                while off < size {
                    let len = RELEASE_CHUNK.min(size - off);
                    // SAFETY: `host+off..host+off+len` lies inside one of our
                    // own anonymous private mappings, valid while `this`
                    // lives (owned by this thread); nothing else can reach
                    // this memory any more (the last Arc was unwrapped
                    // here), so replacing its pages with zero pages is
                    // unobservable.
                    unsafe { libc::madvise((host + off) as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
                    off += len;
                    std::thread::sleep(std::time::Duration::from_micros(500));
                }
            }
            drop(this);
        };
        if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(run) {
            // (the closure, and the memory with it, was dropped here)
            tracing::warn!(error = %e, "no thread to release guest memory on: released at once");
        }
    }

    /// Maps a linear RAM offset (RAM counted without the hole) to a guest address.
    pub fn linear_to_gpa(&self, lin: u64) -> u64 {
        if lin < HOLE_START {
            lin
        } else {
            lin + HOLE_SIZE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory released in the background is freed (its last holder goes)
    /// soon, and memory someone else still holds is never zeroed under them.
    #[test]
    fn memory_released_in_the_background_is_freed_but_never_while_shared() {
        let m = std::sync::Arc::new(GuestMem::new(64 << 20).unwrap());
        for gfn in (0..(64 << 20) / PAGE_SIZE).step_by(3) {
            m.write(gfn * PAGE_SIZE, &[0xab; 16]).unwrap();
        }
        let other = m.clone();
        GuestMem::release_in_background(m, "test-release");
        std::thread::sleep(std::time::Duration::from_millis(300));
        for gfn in (0..(64 << 20) / PAGE_SIZE).step_by(3) {
            assert_eq!(other.read_u32(gfn * PAGE_SIZE).unwrap(), 0xabababab, "page {gfn} changed under its holder");
        }
        let weak = std::sync::Arc::downgrade(&other);
        GuestMem::release_in_background(other, "test-release");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while weak.upgrade().is_some() {
            assert!(std::time::Instant::now() < deadline, "the released memory was never dropped");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(GuestMem::new(1 << 20), Err(MemoryError::BadSize(_))));
        assert!(matches!(GuestMem::new((64 << 20) + 4096), Err(MemoryError::BadSize(_))));
        assert!(matches!(GuestMem::new(61 << 30), Err(MemoryError::BadSize(_))));
    }

    #[test]
    fn large_guest_is_split_around_the_hole_and_costs_nothing_untouched() {
        let m = GuestMem::new(16 << 30).expect("16 GiB");
        let r = m.regions();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].0, r[0].1), (0, HOLE_START));
        assert_eq!((r[1].0, r[1].1), (4 << 30, 13 << 30));
        assert!(!m.is_ram(HOLE_START, 8));
        assert_eq!(m.linear_to_gpa(HOLE_START), 4 << 30);
    }

    #[test]
    fn vmm_writes_are_recorded_once_and_drained() {
        let m = GuestMem::new(64 << 20).expect("mem");
        let d0 = m.digest();
        m.write(0x5000, &[1; 10]).expect("write");
        assert_ne!(m.digest(), d0);
        m.write(0x5ff0, &[2; 32]).expect("write across a page boundary");
        m.write(0x5000, &[3; 1]).expect("rewrite");
        let mut d = m.take_vmm_dirty();
        d.sort();
        assert_eq!(d, vec![5, 6]);
        assert!(m.take_vmm_dirty().is_empty());
        m.write(0x5000, &[4; 1]).expect("write after drain");
        assert_eq!(m.take_vmm_dirty(), vec![5]);
        assert!(matches!(m.write(64 << 20, &[0]), Err(MemoryError::OutOfRange { .. })));
    }

    proptest::proptest! {
        /// Oracle: the VMM-dirty set is exactly the pages the writes covered,
        /// deduplicated, and a drain leaves nothing behind.
        #[test]
        fn vmm_dirty_set_matches_oracle(writes in proptest::collection::vec((0u64..(64 << 20) - 9000, 1usize..9000), 0..40)) {
            let m = GuestMem::new(64 << 20).expect("mem");
            let mut oracle = std::collections::BTreeSet::new();
            for (gpa, len) in &writes {
                m.write(*gpa, &vec![0xa5; *len]).expect("write");
                for p in (*gpa / PAGE_SIZE)..=((*gpa + *len as u64 - 1) / PAGE_SIZE) {
                    oracle.insert(p);
                }
            }
            let mut got = m.take_vmm_dirty();
            got.sort_unstable();
            let n = got.len();
            got.dedup();
            proptest::prop_assert_eq!(n, got.len(), "duplicates reported");
            proptest::prop_assert_eq!(got, oracle.into_iter().collect::<Vec<_>>());
            proptest::prop_assert!(m.take_vmm_dirty().is_empty());
        }
    }
}
