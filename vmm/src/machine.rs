//! The machine: a KVM VM with guest memory, vCPU threads, dirty tracking,
//! devices and full state save/restore. Both castor's primary and secondary
//! run this.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_mp_state, kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MP_STATE_RUNNABLE,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::abi::{self, BootInfo, Pattern, WorkloadKind, BOOT_MAGIC, KERNEL_END, PAGE_SIZE, PERCPU_GPA};
use crate::boot::{self, BootError};
use crate::devices::{Devices, GuestFault};
use crate::dirty::{DirtyTracker, Trust};
use crate::memory::{self, GuestMem, MemoryError};
use crate::ring::{RingError, RingFlavour};
use crate::state::{self, MachineState, SaveContext, StateError, VmShape};
use crate::tracker::{DirtySet, SlotTable, TrackerError, TrackerKind};
use crate::vcpu::{RingLedger, RunState, Vcpu, VcpuContext, VcpuError};
/// How long a pause may take before the machine reports the vCPU stuck.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a resume waits for a parked vCPU thread to leave its park at
/// idle priority before moving it to its normal policy (see
/// [`crate::vcpu::Vcpu::wait_running`]): an unloaded resume takes 5-10 us on
/// this project's host, a move costs tens of microseconds.
pub const LIFT_AFTER: Duration = Duration::from_micros(50);

/// Errors of the machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(vmm_sys_util::errno::Error),
    #[error("KVM setup step '{0}' failed: {1}")]
    Setup(&'static str, vmm_sys_util::errno::Error),
    #[error("{0} vCPUs requested: 1 to {max} are supported", max = abi::MAX_CPUS)]
    BadVcpus(u32),
    #[error("workload: {0}")]
    BadWorkload(String),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the machine must be paused for {0}")]
    NotPaused(&'static str),
    #[error("the machine must be running for {0}")]
    NotRunning(&'static str),
    #[error("saved state does not fit: {0}")]
    ShapeMismatch(String),
}

/// See [`Machine::precopy_due`].
pub const PRECOPY_HOT_FACTOR: u64 = 4;

/// Workload parameters handed to the guest in its boot info.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadConfig {
    pub kind: WorkloadKind,
    /// dirty: pages in each vCPU's working set; kwrite: pages per round.
    pub ws_pages: u64,
    /// dirty: distance between working-set pages, in pages (spreads the set over RAM).
    pub ws_stride: u64,
    pub pattern: Pattern,
    /// hot/cold: percentage of writes that go to the hot tenth of the set.
    pub hot_percent: u32,
    /// Page writes per second per vCPU, 0 = as fast as possible.
    pub rate: u64,
    pub seed: u64,
    /// Progress line period in ms, 0 = none.
    pub report_ms: u64,
    /// dirty: writes per vCPU before reporting done; kwrite: rounds. 0 = forever.
    pub max_writes: u64,
    /// kv: table slots (power of two).
    pub kv_slots: u64,
    /// kv: client dedup slots (power of two).
    pub kv_clients: u64,
    /// dirty: a console line after every page write (a guest flooding its
    /// console; the VMM bounds and counts what it keeps).
    pub console_flood: bool,
}

impl WorkloadConfig {
    /// A `dirty` writer.
    pub fn dirty(ws_pages: u64, pattern: Pattern, rate: u64) -> Self {
        WorkloadConfig { kind: WorkloadKind::Dirty, ws_pages, pattern, rate, ..Self::idle() }
    }
    /// The `kv` service.
    pub fn kv() -> Self {
        WorkloadConfig { kind: WorkloadKind::Kv, ..Self::idle() }
    }
    /// A guest that only takes timer interrupts.
    pub fn idle() -> Self {
        WorkloadConfig {
            kind: WorkloadKind::Idle,
            ws_pages: 0,
            ws_stride: 1,
            pattern: Pattern::Sequential,
            hot_percent: 90,
            rate: 0,
            seed: 1,
            report_ms: 1000,
            max_writes: 0,
            kv_slots: 1 << 16,
            kv_clients: 1 << 12,
            console_flood: false,
        }
    }
}

/// Everything needed to build a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub tracker: TrackerKind,
    /// Ring only: scan the whole ring for stray entries after each harvest
    /// (catches desynchronisation early, costs a ring scan per collection).
    pub ring_verify: bool,
    /// Guest LAPIC timer frequency.
    pub timer_hz: u32,
    /// Hot-page retention (both trackers): defer re-arming tracking so pages
    /// already reported stay writable and are reported, and copied, at every
    /// collection until the next re-arm (see [`tracker::Retention`]).
    /// Collections then report a superset of the pages written.
    pub hot_pages: bool,
    pub workload: WorkloadConfig,
    /// Bytes of guest RAM above the workload's area filled with non-zero
    /// data (distinct per page) before boot: a guest whose memory is full,
    /// for tests and benchmarks of real-size guests. The guest never reads
    /// or writes them.
    pub fill_bytes: u64,
}

impl MachineConfig {
    pub fn new(mem_bytes: u64, vcpus: u32, tracker: TrackerKind, workload: WorkloadConfig) -> Self {
        MachineConfig {
            mem_bytes,
            vcpus,
            tracker,
            ring_verify: false,
            timer_hz: 250,
            hot_pages: false,
            workload,
            fill_bytes: 0,
        }
    }
}

/// Latency of one pause or resume.
#[derive(Debug, Clone, Copy, Default)]
pub struct PauseTiming {
    pub elapsed: Duration,
}

/// A KVM virtual machine.
#[derive(Debug)]
pub struct Machine {
    _kvm: Kvm,
    vm: Arc<VmFd>,
    mem: Arc<GuestMem>,
    vcpus: Vec<Arc<Vcpu>>,
    devices: Arc<Devices>,
    tracker: DirtyTracker,
    cfg: MachineConfig,
    ctx: VcpuContext,
    save_ctx: Arc<SaveContext>,
    shape: VmShape,
    /// The CPU the guest was given (kept across a restore).
    cpu: common::state::CpuModel,
    ring_flavour: Option<RingFlavour>,
    started: bool,
    paused: bool,
}

impl Machine {
    fn build(cfg: &MachineConfig, mem: Option<Arc<GuestMem>>) -> Result<(Machine, Vec<VcpuFd>), MachineError> {
        if cfg.vcpus == 0 || cfg.vcpus > abi::MAX_CPUS {
            return Err(MachineError::BadVcpus(cfg.vcpus));
        }
        let mem = match mem {
            Some(m) if m.size() == cfg.mem_bytes => m,
            Some(m) => {
                return Err(MachineError::ShapeMismatch(format!(
                    "memory of {} bytes for a {}-byte VM",
                    m.size(),
                    cfg.mem_bytes
                )))
            }
            None => Arc::new(GuestMem::new(cfg.mem_bytes)?),
        };
        let kvm = Kvm::new().map_err(MachineError::Kvm)?;
        let vm = kvm.create_vm().map_err(|e| MachineError::Setup("KVM_CREATE_VM", e))?;
        let ring_flavour = DirtyTracker::enable(&vm, cfg.tracker)?;
        let _ = vm.set_tss_address(0xfffb_d000);
        vm.create_irq_chip().map_err(|e| MachineError::Setup("KVM_CREATE_IRQCHIP", e))?;
        vm.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() })
            .map_err(|e| MachineError::Setup("KVM_CREATE_PIT2", e))?;
        let regions = mem.regions();
        for (slot, &(gpa, size, host)) in regions.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: `host..host+size` is a mapping owned by `mem`, which the
            // machine keeps alive (Arc) for as long as the VM fd exists, and the
            // slots do not overlap (ram_ranges are disjoint).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|e| MachineError::Setup("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| MachineError::Setup("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut fds = Vec::new();
        for id in 0..cfg.vcpus {
            let fd = vm.create_vcpu(u64::from(id)).map_err(|e| MachineError::Setup("KVM_CREATE_VCPU", e))?;
            let mut cpuid = supported.clone();
            for e in cpuid.as_mut_slice() {
                match e.function {
                    1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
                    0xb | 0x1f => e.edx = id,
                    _ => {}
                }
            }
            fd.set_cpuid2(&cpuid).map_err(|e| MachineError::Setup("KVM_SET_CPUID2", e))?;
            fds.push(fd);
        }
        let save_ctx = Arc::new(SaveContext::probe(&kvm, &vm, &fds[0])?);
        let vm = Arc::new(vm);
        let devices = Arc::new(Devices::new(Arc::clone(&mem), Arc::clone(&vm), cfg.vcpus));
        let ctx = VcpuContext {
            vm: Arc::clone(&vm),
            mem: Arc::clone(&mem),
            devices: Arc::clone(&devices),
            reset_lock: Arc::new(Mutex::new(RingLedger::default())),
            faults: Arc::new(Mutex::new(Vec::new())),
            ring_pending: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            save_ctx: Arc::clone(&save_ctx),
            parked: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            vcpus: cfg.vcpus as usize,
        };
        let cpu = crate::cpu::model_of(
            supported.as_slice(),
            fds[0].get_tsc_khz().unwrap_or(0),
            crate::cpu::tsc_scaling(&kvm),
        );
        let shape = VmShape {
            mem_bytes: cfg.mem_bytes,
            ram_ranges: memory::ram_ranges(cfg.mem_bytes),
            vcpus: cfg.vcpus,
            image_id: abi::image_id(abi::GUEST_IMAGE),
        };
        let m = Machine {
            _kvm: kvm,
            vm,
            tracker: DirtyTracker::new(cfg.tracker, SlotTable::new(&regions)),
            mem,
            vcpus: Vec::new(),
            devices,
            cfg: *cfg,
            ctx,
            save_ctx,
            shape,
            cpu,
            ring_flavour,
            started: false,
            paused: true,
        };
        Ok((m, fds))
    }

    fn attach_vcpus(&mut self, fds: Vec<VcpuFd>) -> Result<(), MachineError> {
        for (id, fd) in fds.into_iter().enumerate() {
            let ring = self.tracker.vcpu_ring(&fd, self.cfg.ring_verify)?;
            self.vcpus.push(Arc::new(Vcpu::new(id as u32, fd, ring)));
        }
        Ok(())
    }

    fn boot_info(&self, tsc_khz: u64) -> Result<BootInfo, MachineError> {
        let w = &self.cfg.workload;
        let ram = self.cfg.mem_bytes;
        let heap = KERNEL_END;
        let need = self.workload_bytes();
        if heap + need + self.cfg.fill_bytes > ram {
            return Err(MachineError::BadWorkload(format!(
                "working set of {need} bytes and a fill of {} bytes do not fit {ram} bytes of RAM above the {heap:#x} kernel area",
                self.cfg.fill_bytes
            )));
        }
        if w.kind == WorkloadKind::Kv && (!w.kv_slots.is_power_of_two() || !w.kv_clients.is_power_of_two()) {
            return Err(MachineError::BadWorkload("kv slots and clients must be powers of two".into()));
        }
        if w.kind == WorkloadKind::Dirty && w.hot_percent > 100 {
            return Err(MachineError::BadWorkload("hot percent above 100".into()));
        }
        Ok(BootInfo {
            magic: BOOT_MAGIC,
            ncpus: self.cfg.vcpus,
            workload: w.kind as u32,
            tsc_khz,
            timer_count: 1_000_000_000 / u64::from(self.cfg.timer_hz.clamp(10, 10_000)),
            ram_size: ram,
            hole_start: memory::HOLE_START,
            hole_size: memory::HOLE_SIZE,
            heap_offset: heap,
            ws_pages: w.ws_pages,
            ws_stride: w.ws_stride.max(1),
            pattern: w.pattern as u32,
            hot_percent: w.hot_percent,
            rate: w.rate,
            seed: w.seed,
            report_ms: w.report_ms,
            max_writes: w.max_writes,
            kv_slots: w.kv_slots,
            kv_clients: w.kv_clients,
            console_flood: u64::from(w.console_flood),
        })
    }

    /// Bytes of RAM the workload uses above the kernel area.
    fn workload_bytes(&self) -> u64 {
        let w = &self.cfg.workload;
        match w.kind {
            WorkloadKind::Dirty => w.ws_pages * w.ws_stride.max(1) * u64::from(self.cfg.vcpus) * PAGE_SIZE,
            WorkloadKind::KernelWrite => w.ws_pages * u64::from(self.cfg.vcpus) * PAGE_SIZE,
            WorkloadKind::Kv => w.kv_slots * 32 + w.kv_clients * 48,
            WorkloadKind::Idle => 0,
        }
    }

    /// Writes `fill_bytes` of non-zero data above the workload's area: page
    /// `gfn` holds its number and a pattern derived from it, so no two pages
    /// are alike and none is zero.
    fn fill(&self) -> Result<(), MachineError> {
        let start = (KERNEL_END + self.workload_bytes()).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let pages = self.cfg.fill_bytes.div_ceil(PAGE_SIZE);
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for i in 0..pages {
            let gpa = self.mem.linear_to_gpa(start + i * PAGE_SIZE);
            let gfn = gpa / PAGE_SIZE;
            let mut x = gfn.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for chunk in page.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            page[..8].copy_from_slice(&gfn.to_le_bytes());
            self.mem.write(gpa, &page)?;
        }
        Ok(())
    }

    /// Builds and boots a fresh machine (vCPUs not yet started).
    pub fn new(cfg: MachineConfig) -> Result<Machine, MachineError> {
        let (mut m, fds) = Self::build(&cfg, None)?;
        let tsc_khz = u64::from(fds[0].get_tsc_khz().unwrap_or(0));
        let info = m.boot_info(tsc_khz)?;
        let header = boot::setup(&m.mem, abi::GUEST_IMAGE, cfg.vcpus, &info)?;
        if cfg.fill_bytes > 0 {
            m.fill()?;
        }
        for (id, fd) in fds.iter().enumerate() {
            let id = id as u32;
            let sregs = fd.get_sregs().map_err(|e| MachineError::Setup("KVM_GET_SREGS", e))?;
            fd.set_sregs(&boot::initial_sregs(sregs, id)).map_err(|e| MachineError::Setup("KVM_SET_SREGS", e))?;
            fd.set_regs(&boot::initial_regs(&header, id)).map_err(|e| MachineError::Setup("KVM_SET_REGS", e))?;
            fd.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE })
                .map_err(|e| MachineError::Setup("KVM_SET_MP_STATE", e))?;
        }
        m.attach_vcpus(fds)?;
        // Boot writes are the initial image, not guest activity.
        m.mem.take_vmm_dirty();
        Ok(m)
    }

    /// Builds a machine from saved state; `load` fills guest memory before any
    /// vCPU state is restored. The vCPUs are not yet started.
    pub fn restore(
        tracker: TrackerKind,
        st: &MachineState,
        load: impl FnOnce(&GuestMem) -> Result<(), MachineError>,
    ) -> Result<Machine, MachineError> {
        Self::restore_inner(tracker, st, None, load)
    }

    /// Builds a machine from saved state around memory that already holds the
    /// guest (a replica's): no page is copied. The vCPUs are not yet started.
    pub fn restore_with_memory(
        tracker: TrackerKind,
        st: &MachineState,
        mem: Arc<GuestMem>,
    ) -> Result<Machine, MachineError> {
        Self::restore_inner(tracker, st, Some(mem), |_| Ok(()))
    }

    fn restore_inner(
        tracker: TrackerKind,
        st: &MachineState,
        mem: Option<Arc<GuestMem>>,
        load: impl FnOnce(&GuestMem) -> Result<(), MachineError>,
    ) -> Result<Machine, MachineError> {
        let workload: WorkloadConfig = common::codec::decode(&st.boot)
            .map_err(|e| MachineError::ShapeMismatch(format!("boot parameters: {e}")))?;
        let cfg = MachineConfig::new(st.shape.mem_bytes, st.shape.vcpus, tracker, workload);
        if st.shape.ram_ranges != memory::ram_ranges(st.shape.mem_bytes) {
            return Err(MachineError::ShapeMismatch("RAM layout differs from this VMM's".into()));
        }
        if st.vcpus.len() != st.shape.vcpus as usize || st.vcpus.iter().enumerate().any(|(i, v)| v.id != i as u32) {
            return Err(MachineError::ShapeMismatch("vCPU states do not match the vCPU count".into()));
        }
        let (mut m, fds) = Self::build(&cfg, mem)?;
        m.shape.image_id = st.shape.image_id;
        // the guest keeps the CPU it was given where it started (the TSC
        // scaling flag is this host's)
        m.cpu = common::state::CpuModel { tsc_scaling: m.cpu.tsc_scaling, ..st.cpu.clone() };
        load(&m.mem)?;
        m.mem.take_vmm_dirty();
        state::restore_vm(&m.vm, &st.vm)?;
        for (fd, vs) in fds.iter().zip(&st.vcpus) {
            state::restore_vcpu(fd, vs, &m.save_ctx)?;
        }
        m.devices.restore(&st.devices);
        m.attach_vcpus(fds)?;
        Ok(m)
    }

    /// Starts the vCPU threads; the guest runs.
    pub fn start(&mut self) -> Result<(), MachineError> {
        if self.started {
            return Ok(());
        }
        for v in &self.vcpus {
            v.start(self.ctx.clone(), false)?;
        }
        self.started = true;
        self.paused = false;
        Ok(())
    }

    /// Stops every vCPU at a point where its state can be saved.
    pub fn pause(&mut self) -> Result<PauseTiming, MachineError> {
        self.pause_inner(false)
    }

    /// Pauses as [`Machine::pause`] and has every vCPU thread save its state
    /// as it parks, in parallel, while the caller harvests and copies;
    /// [`Machine::save`] picks the results up. What an epoch boundary does:
    /// a save asked for after the pause ([`Machine::begin_save`]) starts
    /// later, once the parked thread has noticed it.
    pub fn pause_and_save(&mut self) -> Result<PauseTiming, MachineError> {
        self.pause_inner(true)
    }

    fn pause_inner(&mut self, save: bool) -> Result<PauseTiming, MachineError> {
        let t = Instant::now();
        if !self.started || self.paused {
            self.paused = true;
            if save {
                self.begin_save();
            }
            return Ok(PauseTiming { elapsed: t.elapsed() });
        }
        for v in &self.vcpus {
            if save {
                v.request_pause_saving()?;
            } else {
                v.request_pause()?;
            }
        }
        for v in &self.vcpus {
            v.wait_parked(PAUSE_TIMEOUT)?;
        }
        self.paused = true;
        Ok(PauseTiming { elapsed: t.elapsed() })
    }

    /// Lets the vCPUs run again (returns once every thread has left its park).
    pub fn resume(&mut self) -> Result<PauseTiming, MachineError> {
        self.tracker.before_resume(&self.vcpus, &self.ctx);
        let t = Instant::now();
        if !self.started {
            return self.start().map(|_| PauseTiming { elapsed: t.elapsed() });
        }
        for v in &self.vcpus {
            v.resume();
        }
        let lift_at = Instant::now() + LIFT_AFTER;
        for v in &self.vcpus {
            v.wait_running(lift_at, PAUSE_TIMEOUT);
        }
        self.paused = false;
        Ok(PauseTiming { elapsed: t.elapsed() })
    }

    /// True while the vCPUs are parked (or not started).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Pages dirtied since the previous collection (the machine must be paused).
    /// The trackers are re-armed before this returns, so page contents must be
    /// read while still paused.
    pub fn collect(&mut self) -> Result<DirtySet, MachineError> {
        self.collect_inner(false)
    }

    /// Like [`Machine::collect`], but a ring reset (re-arming) is handed to a
    /// parked vCPU thread and runs while the caller copies the pages. The
    /// caller must call [`Machine::finish_reset`] before it treats the set as
    /// complete: a failed reset means tracking was lost for this collection.
    /// (The bitmap tracker re-arms inline, as in `collect`.)
    pub fn collect_overlapped(&mut self) -> Result<DirtySet, MachineError> {
        self.collect_inner(true)
    }

    /// Waits for a reset handed out by [`Machine::collect_overlapped`] (or
    /// does it here if no vCPU thread took it). Returns false if it failed:
    /// the collection it belongs to is incomplete (treat memory as all dirty).
    pub fn finish_reset(&mut self) -> bool {
        self.tracker.finish_reset(&self.vcpus, &self.ctx)
    }

    fn collect_inner(&mut self, overlap: bool) -> Result<DirtySet, MachineError> {
        if !self.paused {
            return Err(MachineError::NotPaused("collecting the dirty set"));
        }
        let retain = self.cfg.hot_pages;
        Ok(self.tracker.collect(&self.vm, &self.vcpus, &self.ctx, &self.mem, retain, overlap)?)
    }

    /// Copies the given pages, in order, into `out` (`gfns.len() * 4096`
    /// bytes). The machine must be paused: then nothing writes guest memory
    /// (device writes happen on vCPU threads, in their exits). Reuse `out`
    /// across epochs: faulting in a fresh buffer costs more than the copy.
    pub fn copy_pages_into(&self, gfns: &[u64], out: &mut [u8]) -> Result<(), MachineError> {
        if !self.paused {
            return Err(MachineError::NotPaused("copying pages"));
        }
        // SAFETY: paused means every vCPU thread is parked, and the VMM only
        // writes guest memory from those threads (device exits) or while
        // building/restoring the machine: no concurrent writer exists.
        unsafe { self.mem.copy_pages_quiescent(gfns, out)? };
        Ok(())
    }

    /// While the guest runs: harvests the dirty rings without re-arming
    /// anything and returns the ring entries pending since the last
    /// collection or pre-copy round (0 with the bitmap tracker, or while
    /// tracking is not whole). See [`Machine::precopy_round`].
    pub fn skim(&mut self) -> u64 {
        self.tracker.skim(&self.vcpus, &self.ctx)
    }

    /// Skims the rings (see [`Machine::skim`]) and says whether a pre-copy
    /// round is worth it now: at least `min` pages wait; with hot-page
    /// retention on, also at least [`crate::tracker::RETAIN_MAX_PAGES`] (a
    /// set that large makes retention re-arm at the boundary anyway) and at
    /// least [`PRECOPY_HOT_FACTOR`] times as many as it keeps writable. A
    /// round's reset write-protects the pages it took, hot ones included,
    /// and each costs the guest a write fault when written again (tens of
    /// microseconds on this host); rounds taking a hot set apart kept
    /// retention from holding it and cut the kv guest's protected throughput
    /// (0.76-0.79 of unprotected against 0.84-0.85 without pre-copy).
    ///
    /// `again`: a round already ran in this epoch (the hot pages it took are
    /// write-protected already); then only `min` applies.
    pub fn precopy_due(&mut self, min: u64, again: bool) -> bool {
        let pending = self.skim();
        let mut need = min.max(1);
        if self.cfg.hot_pages && !again {
            need = need
                .max(crate::tracker::RETAIN_MAX_PAGES as u64)
                .max(PRECOPY_HOT_FACTOR * self.tracker.retained() as u64);
        }
        pending >= need
    }

    /// A pre-copy round while the guest runs: the pages written since the
    /// last collection or round, with their tracking re-armed; copy them
    /// with [`Machine::copy_pages_running`]. The next collection reports
    /// every page written after the re-arm, so an epoch's pages are this
    /// round's copies of the pages it does not report, plus the boundary's
    /// copies of those it does. None: nothing to pre-copy (bitmap tracker,
    /// tracking not whole, or a doubt found now: the next collection is then
    /// lost). Refused while paused (the boundary collects then).
    pub fn precopy_round(&mut self) -> Result<Option<Vec<u64>>, MachineError> {
        if self.paused || !self.started {
            return Err(MachineError::NotRunning("a pre-copy round"));
        }
        Ok(self.tracker.precopy_round(&self.vm, &self.vcpus, &self.ctx)?)
    }

    /// Pre-copy rounds so far.
    pub fn precopy_rounds(&self) -> u64 {
        self.tracker.precopy_rounds()
    }

    /// Copies pages, in order, into `out` (`gfns.len() * 4096` bytes) while
    /// the guest runs: only for pages returned by [`Machine::precopy_round`]
    /// (a page the guest writes during the copy comes out torn, and the next
    /// collection reports it, so its copy is replaced).
    pub fn copy_pages_running(&self, gfns: &[u64], out: &mut [u8]) -> Result<(), MachineError> {
        // SAFETY: the caller contract above: every page here had its
        // tracking re-armed before this copy, so a torn page is reported by
        // the next collection and its bytes from here are replaced.
        unsafe { self.mem.copy_pages_racy(gfns, out)? };
        Ok(())
    }

    /// Starts saving every vCPU's state on its own parked thread, in
    /// parallel, while the caller copies pages; [`Machine::save`] then picks
    /// the results up (or saves inline what was not done). Optional; call
    /// it right after the pause: the harvest does not need the vCPU cores a
    /// save holds (each ring has its own lock).
    pub fn begin_save(&self) {
        if self.paused && self.started {
            for v in &self.vcpus {
                v.request_save();
            }
        }
    }

    /// Saves the full machine state (the machine must be paused).
    pub fn save(&self) -> Result<MachineState, MachineError> {
        if !self.paused {
            return Err(MachineError::NotPaused("saving state"));
        }
        let vm = state::save_vm(&self.vm)?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(v.take_state(&self.save_ctx)?);
        }
        Ok(MachineState {
            shape: self.shape.clone(),
            boot: common::codec::encode(&self.cfg.workload).map_err(|e| MachineError::BadWorkload(e.to_string()))?,
            vcpus,
            vm,
            devices: self.devices.save(),
            cpu: self.cpu.clone(),
        })
    }

    /// How many vCPU threads are parked now (a save begun at a park waits
    /// for all of them before it reads what other vCPUs can change).
    pub fn parked_vcpu_threads(&self) -> usize {
        self.ctx.parked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The kernel thread ids of the vCPU threads that run (for checks of
    /// their scheduling policy).
    pub fn vcpu_thread_ids(&self) -> Vec<i32> {
        self.vcpus.iter().filter_map(|v| v.thread_id()).collect()
    }

    pub fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    pub fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }

    pub fn config(&self) -> &MachineConfig {
        &self.cfg
    }

    /// The CPU the guest was given (checked against a secondary's host).
    pub fn cpu_model(&self) -> &common::state::CpuModel {
        &self.cpu
    }

    pub fn shape(&self) -> &VmShape {
        &self.shape
    }

    pub fn ring_flavour(&self) -> Option<RingFlavour> {
        self.ring_flavour
    }

    /// Guest exceptions reported so far.
    pub fn faults(&self) -> Vec<GuestFault> {
        common::sync::lock(&self.ctx.faults).clone()
    }

    /// vCPUs whose thread has ended, with the reason.
    pub fn exited_vcpus(&self) -> Vec<(u32, String)> {
        self.vcpus
            .iter()
            .filter_map(|v| match v.state() {
                RunState::Exited(r) => Some((v.id, r)),
                _ => None,
            })
            .collect()
    }

    /// Turns hot-page retention on or off (see [`MachineConfig::hot_pages`]).
    /// Turning it off takes effect at the next collection, which re-arms.
    pub fn set_hot_pages(&mut self, on: bool) {
        self.cfg.hot_pages = on;
    }

    /// Pages currently kept writable by hot-page retention.
    pub fn hot_page_count(&self) -> usize {
        self.tracker.retained()
    }

    /// Times hot-page retention re-armed tracking.
    pub fn hot_page_rearms(&self) -> u64 {
        self.tracker.rearms()
    }

    /// Whether dirty tracking is known to be whole (see [`Trust`]).
    pub fn tracking_trust(&self) -> Trust {
        self.tracker.trust()
    }

    /// Times every slot was re-protected after tracking was lost.
    pub fn tracking_reprotects(&self) -> u64 {
        self.tracker.reprotects()
    }

    /// Fault injection for tests: the next collection that resets the dirty
    /// rings synchronously is cut short, as a reset interrupted by a signal
    /// is (ring tracker only; see `DirtyTracker::inject_short_reset`).
    pub fn inject_short_reset(&mut self) {
        self.tracker.inject_short_reset();
    }

    /// Short resets injected so far.
    pub fn short_resets_injected(&self) -> u64 {
        self.tracker.short_resets_injected()
    }

    /// Ring-full exits so far, summed over vCPUs.
    pub fn ring_full_exits(&self) -> u64 {
        self.vcpus.iter().map(|v| v.ring().as_ref().map_or(0, |r| r.full_exits)).sum()
    }

    /// Ring-full exits that found the ring desynchronised, summed over vCPUs.
    pub fn ring_stalls(&self) -> u64 {
        self.vcpus.iter().map(|v| v.ring().as_ref().map_or(0, |r| r.stalls)).sum()
    }

    /// Ring entries harvested on ring-full exits since the last collection
    /// (readable while the guest runs; 0 with the bitmap tracker).
    pub fn ring_pending(&self) -> u64 {
        self.ctx.ring_pending.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads a u64 from a cpu's per-cpu page (see abi PC_*).
    pub fn percpu(&self, cpu: u32, offset: u64) -> u64 {
        self.mem.read_u64(PERCPU_GPA + u64::from(cpu) * PAGE_SIZE + offset).unwrap_or(0)
    }

    /// Stops all vCPU threads.
    pub fn shutdown(&mut self) {
        for v in &self.vcpus {
            v.stop();
        }
        self.started = false;
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
