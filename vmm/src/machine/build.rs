//! Building a machine: a fresh boot, or a restore from saved state.

use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_mp_state, kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MP_STATE_RUNNABLE,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd};

use super::{Machine, MachineConfig, MachineError, WorkloadConfig};
use crate::abi::{self, BootInfo, WorkloadKind, KERNEL_END, PAGE_SIZE};
use crate::boot;
use crate::devices::Devices;
use crate::dirty::DirtyTracker;
use crate::memory::{self, GuestMem};
use crate::state::{self, MachineState, SaveContext, VmShape};
use crate::tracker::{SlotTable, TrackerKind};
use crate::vcpu::{RingLedger, Vcpu, VcpuContext};

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
        let devices = Arc::new(Devices::new(Arc::clone(&mem), Arc::clone(&vm), cfg.vcpus, cfg.net));
        let ring_resets = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ctx = VcpuContext {
            vm: Arc::clone(&vm),
            mem: Arc::clone(&mem),
            devices: Arc::clone(&devices),
            reset_lock: Arc::new(Mutex::new(RingLedger::new(Arc::clone(&ring_resets)))),
            ring_resets,
            faults: Arc::new(Mutex::new(Vec::new())),
            ring_pending: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            save_ctx: Arc::clone(&save_ctx),
            parked: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            save_point: Arc::new(std::sync::atomic::AtomicBool::new(false)),
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
            image_id: abi::image_id(abi::guest_image(cfg.workload.kind)),
        };
        let m = Machine {
            _kvm: kvm,
            vm,
            tracker: DirtyTracker::new(cfg.tracker, SlotTable::new(&regions), cfg.hot_page_epochs),
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
            vm_saved: None,
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
            ncpus: self.cfg.vcpus,
            tsc_khz,
            timer_count: 1_000_000_000 / u64::from(self.cfg.timer_hz.clamp(10, 10_000)),
            ram_size: ram,
            hole_start: memory::HOLE_START,
            hole_size: memory::HOLE_SIZE,
            heap_offset: heap,
            workload: WorkloadConfig { ws_stride: w.ws_stride.max(1), ..*w },
        })
    }

    /// Bytes of RAM the workload uses above the kernel area.
    fn workload_bytes(&self) -> u64 {
        let w = &self.cfg.workload;
        match w.kind {
            WorkloadKind::Dirty => w.ws_pages * w.ws_stride.max(1) * u64::from(self.cfg.vcpus) * PAGE_SIZE,
            WorkloadKind::KernelWrite => w.ws_pages * u64::from(self.cfg.vcpus) * PAGE_SIZE,
            WorkloadKind::Kv => w.kv_slots * 32 + w.kv_clients * 48,
            WorkloadKind::Net => abi::NET_WORKLOAD_BYTES,
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
        let header = boot::setup(&m.mem, abi::guest_image(cfg.workload.kind), cfg.vcpus, &info)?;
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
        let mut cfg = MachineConfig::new(st.shape.mem_bytes, st.shape.vcpus, tracker, workload);
        cfg.net = st.devices.net.as_ref().map(|n| crate::net::NetConfig { mac: n.mac });
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
        m.devices.restore(&st.devices)?;
        m.attach_vcpus(fds)?;
        Ok(m)
    }
}
