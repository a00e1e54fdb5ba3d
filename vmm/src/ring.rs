//! The KVM dirty ring: our own mmap, harvest and reset (kvm-ioctls has none).
//!
//! Each vCPU has a ring of `kvm_dirty_gfn {flags, slot, offset}` mapped from its
//! fd at page offset `KVM_DIRTY_LOG_PAGE_OFFSET`. KVM sets DIRTY; we harvest in
//! order (acquire-load flags, read slot/offset, release-store RESET); then the
//! VM ioctl `KVM_RESET_DIRTY_RINGS` re-protects the harvested pages.
//!
//! Overflow. On KVM-PVM, emulated writes can push entries past the ring's hard
//! limit; the kernel then overwrites unharvested entries (lost pages) and its
//! index runs ahead of ours. We detect it three ways:
//! * a harvest that finds every entry DIRTY: the ring was full, so entries may
//!   have been overwritten ([`Harvest::overflow`]);
//! * a reset count that differs from what we marked (checked by the caller);
//! * in verification mode, a DIRTY entry left anywhere after a harvest.
//!
//! After an overflow the ring is *desynchronised*: the kernel's push index
//! (`D`) and reset index (`R`) are at unknown positions, and KVM may count
//! more entries as used than the ring holds. Only a collection (every vCPU
//! parked) re-synchronises it ([`DirtyRing::desync_harvest`],
//! [`DirtyRing::align`]): it reads every DIRTY entry; when they form one run
//! (the pushes since the last collection) the run's end is `D`, and marking
//! every other entry RESET makes one reset walk `R` exactly to `D`, so KVM's
//! used count becomes a multiple of the ring size (a multiple left over shows
//! as ring-full exits with nothing pushed, each undone by one full circle of
//! RESET entries, [`DirtyRing::full_circle`]). A desynchronised ring with
//! nothing pushed whose vCPU is stuck ring-full has its reset index found
//! and stepped forward by less than KVM's soft limit
//! ([`DirtyRing::unstick`]), and is re-aligned at a later collection. The
//! machine's tracker re-protects every slot after any loss and reports
//! collections lost until a reset is exact again (dirty.rs, `Trust`).
//!
//! Found on this host (2026-12-08): the run of a desynchronised ring can wrap
//! past the position the previous harvest stopped at. Skipping from that
//! position to the run's start dropped the run's last entries unharvested,
//! and left our position short of `D`, so the next collections found nothing
//! where KVM was pushing and were reported exact (a few thousand pages
//! missed at 2048 and 4096 entries). Nothing is skipped any more.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

const DIRTY: u32 = 1;
const RESET: u32 = 2;

/// Smallest ring (bytes / 16): 4 KiB.
pub const MIN_ENTRIES: u32 = 256;
/// Largest ring: 1 MiB.
pub const MAX_ENTRIES: u32 = 65536;

/// Errors of the dirty ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("ring size {0} entries is not a power of two between 256 and 65536")]
    BadSize(u32),
    #[error("this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")]
    Unsupported,
    #[error("this KVM allows at most {max} ring entries, asked for {asked}")]
    TooLarge { asked: u32, max: u32 },
    #[error("enabling the dirty ring failed: {0}")]
    Enable(vmm_sys_util::errno::Error),
    #[error("mapping the dirty ring failed: {0}")]
    Map(std::io::Error),
    #[error("KVM_RESET_DIRTY_RINGS failed: {0}")]
    Reset(std::io::Error),
}

/// Which flavour of the ring capability was enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingFlavour {
    /// KVM_CAP_DIRTY_LOG_RING_ACQ_REL.
    AcqRel,
    /// KVM_CAP_DIRTY_LOG_RING (x86 ordering).
    Plain,
}

/// Enables the ring on `vm` (before any vCPU exists) with `entries` per vCPU.
pub fn enable(vm: &VmFd, entries: u32) -> Result<RingFlavour, RingError> {
    if !entries.is_power_of_two() || !(MIN_ENTRIES..=MAX_ENTRIES).contains(&entries) {
        return Err(RingError::BadSize(entries));
    }
    let bytes = u64::from(entries) * std::mem::size_of::<kvm_dirty_gfn>() as u64;
    for (cap, flavour) in
        [(KVM_CAP_DIRTY_LOG_RING_ACQ_REL, RingFlavour::AcqRel), (KVM_CAP_DIRTY_LOG_RING, RingFlavour::Plain)]
    {
        let max = vm.check_extension_raw(u64::from(cap));
        if max <= 0 {
            continue;
        }
        if bytes > max as u64 {
            return Err(RingError::TooLarge { asked: entries, max: (max as u64 / 16) as u32 });
        }
        let mut c = kvm_enable_cap { cap, ..Default::default() };
        c.args[0] = bytes;
        vm.enable_cap(&c).map_err(RingError::Enable)?;
        return Ok(flavour);
    }
    Err(RingError::Unsupported)
}

/// Calls `KVM_RESET_DIRTY_RINGS`: re-protects every harvested entry of every
/// ring of `vm`, returning how many entries were recycled.
pub fn reset_rings(vm: &VmFd) -> Result<u32, RingError> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and only touches kernel
    // state of the VM behind `vm`, a valid VM fd; the result is checked.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if ret < 0 {
        return Err(RingError::Reset(std::io::Error::last_os_error()));
    }
    Ok(ret as u32)
}

/// What one harvest found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Harvest {
    /// Entries harvested (and marked RESET).
    pub harvested: u32,
    /// Every entry was DIRTY: the ring overflowed, pages may be lost.
    pub overflow: bool,
    /// After the harvest a DIRTY entry was still in the ring (verification mode).
    pub stray: bool,
}

impl Harvest {
    /// Entries the next `KVM_RESET_DIRTY_RINGS` must recycle for this ring.
    pub fn expected_reset(&self) -> u32 {
        self.harvested
    }
}

/// What [`DirtyRing::desync_harvest`] found in a desynchronised ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desync {
    /// Nothing pushed since the last collection.
    Empty,
    /// Every entry DIRTY: the ring overflowed again (all marked RESET).
    AllDirty,
    /// One run of DIRTY entries, ending before `end`: KVM pushes at `end` next.
    Run { end: u32 },
    /// Several runs: KVM did not push where the model says.
    Runs,
}

/// One vCPU's mapped dirty ring.
#[derive(Debug)]
pub struct DirtyRing {
    gfns: NonNull<kvm_dirty_gfn>,
    entries: u32,
    fetch: u64,
    desync: bool,
    /// Re-aligned at the last collection: the next harvest scans the ring.
    just_aligned: bool,
}

// SAFETY: the mapping is owned by this value (unmapped on drop) and all access
// to it goes through `&mut self`, so moving it to another thread is sound.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `vcpu` (the VM must have the ring enabled with `entries`).
    pub fn map(vcpu: &VcpuFd, entries: u32) -> Result<Self, RingError> {
        use std::os::fd::AsRawFd;
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: a fresh shared mapping of `len` bytes of the vCPU fd at the
        // offset KVM documents for the dirty ring; no existing memory is
        // affected and the result is checked before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                (KVM_DIRTY_LOG_PAGE_OFFSET as i64) * 4096,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(RingError::Map(std::io::Error::last_os_error()));
        }
        let gfns = NonNull::new(addr.cast::<kvm_dirty_gfn>())
            .ok_or_else(|| RingError::Map(std::io::ErrorKind::Other.into()))?;
        let ring = DirtyRing { gfns, entries, fetch: 0, desync: false, just_aligned: false };
        // Fault the whole mapping in now: KVM maps ring pages on first
        // access, and a harvest that walks onto new pages paid a page fault
        // per 256 entries inside the epoch pause.
        let per_page = (4096 / std::mem::size_of::<kvm_dirty_gfn>()) as u32;
        for i in (0..entries).step_by(per_page as usize) {
            ring.flags(i).load(Ordering::Relaxed);
        }
        Ok(ring)
    }

    /// Ring size in entries.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// The entries marked RESET (harvested, not yet recycled).
    pub fn marked(&self) -> Vec<u32> {
        (0..self.entries).filter(|&i| self.flags(i).load(Ordering::Acquire) & RESET != 0).collect()
    }

    /// True if every entry in `marks` is still marked RESET: no reset since
    /// [`DirtyRing::marked`] walked any of them (KVM clears what it walks),
    /// so none moved this ring's reset index.
    pub fn still_marked(&self, marks: &[u32]) -> bool {
        marks.iter().all(|&i| self.flags(i).load(Ordering::Acquire) & RESET != 0)
    }

    /// True while the ring is waiting to re-synchronise after an overflow.
    pub fn is_desynchronised(&self) -> bool {
        self.desync
    }

    fn flags(&self, i: u32) -> &AtomicU32 {
        debug_assert!(i < self.entries);
        // SAFETY: `i` is below `entries`, so the entry lies inside the mapping
        // we own; `flags` is a naturally aligned u32 that the kernel and we
        // access concurrently, which is what AtomicU32 is for.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.gfns.as_ptr().add(i as usize)).flags)) }
    }

    fn entry(&self, i: u32) -> (u32, u64) {
        // SAFETY: `i` is inside the mapping; the caller has observed DIRTY with
        // acquire ordering, so the kernel's writes of slot/offset are visible.
        unsafe {
            let e = self.gfns.as_ptr().add(i as usize);
            (
                std::ptr::read_volatile(std::ptr::addr_of!((*e).slot)),
                std::ptr::read_volatile(std::ptr::addr_of!((*e).offset)),
            )
        }
    }

    fn is_dirty(&self, i: u32) -> bool {
        self.flags(i).load(Ordering::Acquire) & DIRTY != 0
    }

    /// Harvests every DIRTY entry in order into `out` as (slot, offset), marking
    /// each RESET. The vCPU may be running (KVM publishes an entry's contents
    /// before its DIRTY flag, read here with acquire ordering): then `verify`
    /// must be false. With `verify` (vCPU parked, or this is its own thread
    /// handling a ring-full exit), the whole ring is scanned afterwards for
    /// DIRTY entries that should not be there. A desynchronised ring harvests
    /// nothing here ([`DirtyRing::desync_harvest`] does, in a collection).
    pub fn harvest(&mut self, out: &mut Vec<(u32, u64)>, verify: bool) -> Harvest {
        let mask = self.entries - 1;
        let mut h = Harvest::default();
        if self.desync {
            return h;
        }
        loop {
            if h.harvested == self.entries {
                h.overflow = true;
                break;
            }
            let i = (self.fetch as u32) & mask;
            if !self.is_dirty(i) {
                break;
            }
            out.push(self.entry(i));
            self.flags(i).store(RESET, Ordering::Release);
            self.fetch += 1;
            h.harvested += 1;
        }
        if h.overflow {
            self.desync = true;
        } else if verify && (0..self.entries).any(|i| self.is_dirty(i)) {
            h.stray = true;
            self.desync = true;
        }
        h
    }

    /// A desynchronised ring, every vCPU parked: appends every DIRTY entry
    /// to `out` and says how they lie. Marks on other entries stay (every
    /// mark this module leaves between operations is on an entry KVM pushed,
    /// so a reset walking through it cannot pass KVM's push index; the
    /// ledger counts it). With [`Desync::AllDirty`] every entry is marked
    /// RESET (the next reset must recycle `entries`: every entry was pushed
    /// since it was last recycled, so KVM's push index is at least a ring
    /// ahead of its reset index); with [`Desync::Runs`] every DIRTY entry is
    /// cleared unrecycled (KVM did not push where the model says; its pages
    /// stay writable until the lost collection re-protects every slot);
    /// otherwise the DIRTY entries stay DIRTY for [`DirtyRing::align`].
    pub fn desync_harvest(&mut self, out: &mut Vec<(u32, u64)>) -> Desync {
        let mask = self.entries - 1;
        let mut dirty = 0u32;
        for i in 0..self.entries {
            if self.is_dirty(i) {
                dirty += 1;
                out.push(self.entry(i));
            }
        }
        if dirty == 0 {
            return Desync::Empty;
        }
        if dirty == self.entries {
            self.store_all(RESET);
            return Desync::AllDirty;
        }
        // the start of a run: a DIRTY entry after one that is not
        let start = (0..self.entries)
            .find(|&i| self.is_dirty(i) && !self.is_dirty(i.wrapping_sub(1) & mask))
            .expect("some entry is DIRTY and some is not");
        let mut end = start;
        let mut run = 0;
        while self.is_dirty(end) {
            end = (end + 1) & mask;
            run += 1;
        }
        if run == dirty {
            Desync::Run { end }
        } else {
            for i in 0..self.entries {
                if self.is_dirty(i) {
                    self.flags(i).store(0, Ordering::Release);
                }
            }
            Desync::Runs
        }
    }

    /// First half of re-synchronising after [`Desync::Run`]: marks every
    /// entry but `end` (KVM's push position) RESET, and `end` not, so the
    /// next reset walks KVM's reset index to `end` whatever it was. It
    /// cannot pass the push index: every DIRTY entry was pushed after the
    /// reset index last moved, so the run lies between the two indexes (or
    /// they are a ring or more apart), and `end` follows the run. The caller
    /// resets (no other ring holding a mark), then calls
    /// [`DirtyRing::finish_align`].
    pub fn align(&mut self, end: u32) {
        self.store_all(RESET);
        self.flags(end).store(0, Ordering::Release);
    }

    /// Second half: clears the marks the reset did not walk through, and
    /// carries on in sync from `end`. The next harvest scans the whole ring
    /// (a stray DIRTY entry there means `end` was not KVM's push position).
    pub fn finish_align(&mut self, end: u32) {
        self.forget();
        let mask = u64::from(self.entries - 1);
        self.fetch = (self.fetch & !mask) + u64::from(end);
        self.desync = false;
        self.just_aligned = true;
    }

    /// True once after [`DirtyRing::finish_align`]: the caller should scan.
    pub fn take_just_aligned(&mut self) -> bool {
        std::mem::take(&mut self.just_aligned)
    }

    /// Clears every entry's flags without a reset (KVM keeps counting them
    /// as used): drops the marks an operation left behind its reset, and,
    /// as fault injection, the entries a stuck ring is made of.
    pub fn forget(&mut self) {
        self.store_all(0);
    }

    fn store_all(&mut self, flag: u32) {
        for i in 0..self.entries {
            self.flags(i).store(flag, Ordering::Release);
        }
    }

    /// A ring in sync whose vCPU exits ring-full with nothing pushed (its
    /// own thread, no ring holding a mark): if KVM's reset index is where
    /// this ring says (checked by a reset of the one entry there) and no
    /// entry is DIRTY, KVM's push index is there too modulo the ring size,
    /// so its used count is a non-zero multiple of the size (left over from
    /// an overflow): the rest of the ring is marked RESET and recycled,
    /// taking one ring size off the count. Otherwise (false) the ring is
    /// not where it seems: it is marked desynchronised, for a collection.
    pub fn full_circle(&mut self, reset: &mut dyn FnMut() -> Result<u32, RingError>) -> Result<bool, RingError> {
        let ok = self.checked_circle(reset);
        self.forget();
        if !matches!(ok, Ok(true)) {
            self.desync = true;
        }
        ok
    }

    fn checked_circle(&mut self, reset: &mut dyn FnMut() -> Result<u32, RingError>) -> Result<bool, RingError> {
        let mask = self.entries - 1;
        let at = (self.fetch as u32) & mask;
        if (0..self.entries).any(|i| self.is_dirty(i)) {
            return Ok(false);
        }
        self.forget();
        self.flags(at).store(RESET, Ordering::Release);
        if reset()? != 1 {
            return Ok(false);
        }
        for k in 1..self.entries {
            self.flags((at + k) & mask).store(RESET, Ordering::Release);
        }
        Ok(reset()? == self.entries - 1)
    }

    /// A desynchronised ring with nothing pushed whose vCPU is stuck
    /// ring-full (seen after the last reset): KVM counts at least its soft
    /// limit (>= entries - 576) as used. Moves KVM's reset index `max(1, entries - 1024)` entries forward,
    /// fewer than that count, so it cannot pass the push index: blocks of
    /// that many entries are marked RESET one at a time (every other entry
    /// clear) until a reset recycles some, which shows where the index was
    /// and leaves it at the block's end; a second reset moves it the rest of
    /// the way. No other ring may hold a mark (resets are VM-wide). False if
    /// KVM did not do what this model says; the ring stays desynchronised.
    pub fn unstick(&mut self, reset: &mut dyn FnMut() -> Result<u32, RingError>) -> Result<bool, RingError> {
        let r = self.step_forward(reset);
        self.forget();
        r
    }

    fn step_forward(&mut self, reset: &mut dyn FnMut() -> Result<u32, RingError>) -> Result<bool, RingError> {
        let mask = self.entries - 1;
        let step = self.entries.saturating_sub(1024).max(1);
        self.forget();
        let mut moved = None;
        let mut start = 0;
        while start < self.entries {
            let end = (start + step).min(self.entries);
            for i in start..end {
                self.flags(i).store(RESET, Ordering::Release);
            }
            let n = reset()?;
            self.forget();
            if n > end - start {
                return Ok(false);
            }
            if n > 0 {
                moved = Some((end & mask, n));
                break;
            }
            start = end;
        }
        let Some((at, n)) = moved else { return Ok(false) };
        let rest = step - n;
        if rest > 0 {
            for k in 0..rest {
                self.flags((at + k) & mask).store(RESET, Ordering::Release);
            }
            return Ok(reset()? == rest);
        }
        Ok(true)
    }

    /// Fault injection (tests): takes the RESET mark off the last `n` entries
    /// harvested, so the next reset stops before them, as a reset cut short
    /// by a signal does; [`DirtyRing::release_held`] puts the marks back
    /// after it (their pages then stay writable until a later reset).
    pub fn hold_back(&mut self, n: u32) {
        self.mark_last(n, DIRTY);
    }

    /// Marks the `n` entries taken by [`DirtyRing::hold_back`] RESET again.
    pub fn release_held(&mut self, n: u32) {
        self.mark_last(n, RESET);
    }

    fn mark_last(&mut self, n: u32, flag: u32) {
        let mask = self.entries - 1;
        for k in 1..=u64::from(n.min(self.entries)) {
            self.flags((self.fetch.wrapping_sub(k) as u32) & mask).store(flag, Ordering::Release);
        }
    }

    /// Declares the ring desynchronised (the caller saw a reset count mismatch).
    pub fn mark_desynchronised(&mut self) {
        self.desync = true;
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps exactly the mapping created in `map`, which nothing
        // else references (all access borrows `self`).
        unsafe {
            libc::munmap(self.gfns.as_ptr().cast(), len);
        }
    }
}
