//! Full machine state save and restore.
//!
//! Save order per vCPU (pending I/O completed): CPUID, MSRs, regs, sregs,
//! xsave, xcrs, debug regs ([`save_vcpu_own`]: only the vCPU changes these,
//! so they may be read as soon as it has parked), then LAPIC, mp_state,
//! vcpu_events ([`save_vcpu_shared`]: other vCPUs and the in-kernel devices
//! change these, so they are read only once every vCPU is parked), TSC kHz.
//! VM: PIC master, PIC slave, IOAPIC, PIT, KVM clock.
//!
//! Restore order (modelled on Firecracker's x86_64 vCPU restore):
//! 1. VM: PIT, KVM clock, PIC master, PIC slave, IOAPIC (before any vCPU state).
//! 2. Per vCPU: TSC kHz, CPUID (before anything CPUID-dependent), mp_state,
//!    regs, sregs, xsave, xcrs, debug regs, LAPIC (before MSRs: the TSC deadline
//!    MSR only sticks in TSC-deadline mode), MSRs, vcpu_events (last: pending
//!    exceptions and interrupts apply to the restored registers).

use kvm_bindings::{
    kvm_msr_entry, kvm_xsave, CpuId, Msrs, Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

pub use common::state::{MachineState, VcpuState, VmShape, VmState};

/// Errors of state save/restore.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{op} failed on vCPU {vcpu}: {err}")]
    Vcpu { vcpu: u32, op: &'static str, err: vmm_sys_util::errno::Error },
    #[error("{op} failed: {err}")]
    Vm { op: &'static str, err: vmm_sys_util::errno::Error },
    #[error("vCPU {vcpu}: KVM accepted {set} of {total} MSRs (first refused: {first:#x})")]
    MsrsRefused { vcpu: u32, set: usize, total: usize, first: u32 },
    #[error("saved xsave area is {saved} words, this host needs {need}")]
    XsaveSize { saved: usize, need: usize },
    #[error("FAM struct: {0}")]
    Fam(String),
}

fn vcpu_err(vcpu: u32, op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> StateError {
    move |err| StateError::Vcpu { vcpu, op, err }
}

fn vm_err(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> StateError {
    move |err| StateError::Vm { op, err }
}

/// Host facts needed to save vCPU state, computed once per VM.
#[derive(Debug, Clone)]
pub struct SaveContext {
    /// MSRs of KVM_GET_MSR_INDEX_LIST that this vCPU model can read.
    pub msr_indices: Vec<u32>,
    /// KVM_CAP_XSAVE2 size in bytes (0: use legacy KVM_GET_XSAVE).
    pub xsave_size: usize,
}

impl SaveContext {
    /// Probes the MSR list against `probe` (a configured vCPU) and the xsave size.
    pub fn probe(kvm: &Kvm, vm: &VmFd, probe: &VcpuFd) -> Result<Self, StateError> {
        let list = kvm.get_msr_index_list().map_err(vm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let mut readable = Vec::new();
        for chunk in list.as_slice().chunks(64) {
            let mut rest: Vec<u32> = chunk.to_vec();
            while !rest.is_empty() {
                let entries: Vec<kvm_msr_entry> =
                    rest.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
                let mut msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Fam(format!("{e:?}")))?;
                let n = probe.get_msrs(&mut msrs).map_err(vcpu_err(0, "KVM_GET_MSRS"))?;
                readable.extend_from_slice(&rest[..n]);
                // entry n (if any) was refused: skip it and continue after it
                rest = rest.get(n + 1..).map(<[u32]>::to_vec).unwrap_or_default();
            }
        }
        let xsave_size = usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        Ok(SaveContext { msr_indices: readable, xsave_size })
    }

    fn xsave_fam_len(&self) -> usize {
        self.xsave_size.saturating_sub(std::mem::size_of::<kvm_xsave>()).div_ceil(4)
    }
}

/// Saves one parked vCPU.
pub fn save_vcpu(fd: &VcpuFd, id: u32, ctx: &SaveContext) -> Result<VcpuState, StateError> {
    save_vcpu_cached(fd, id, ctx, None)
}

/// Like [`save_vcpu`], reusing CPUID and TSC frequency saved before: both are
/// fixed once the vCPU runs (KVM refuses to change CPUID after KVM_RUN), and
/// each costs an ioctl on the epoch's critical path.
pub fn save_vcpu_cached(
    fd: &VcpuFd,
    id: u32,
    ctx: &SaveContext,
    fixed: Option<&VcpuState>,
) -> Result<VcpuState, StateError> {
    save_vcpu_shared(fd, id, save_vcpu_own(fd, id, ctx, fixed)?)
}

/// The part of a parked vCPU's state that only the vCPU itself changes:
/// everything but its LAPIC, mp_state and pending events, which other vCPUs
/// (IPIs, INIT and SIPI, NMIs) and the in-kernel devices can change while
/// it is parked. Save it as soon as the vCPU parks; save the rest
/// ([`save_vcpu_shared`]) only once every vCPU is parked, or an IPI sent by
/// a vCPU still running would be in its sender's saved state and missing
/// from its target's.
#[derive(Debug)]
pub struct OwnState {
    cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    msrs: Vec<kvm_msr_entry>,
    regs: kvm_bindings::kvm_regs,
    sregs: kvm_bindings::kvm_sregs,
    xsave: Vec<u32>,
    xcrs: kvm_bindings::kvm_xcrs,
    debugregs: kvm_bindings::kvm_debugregs,
    tsc_khz: Option<u32>,
}

/// Saves a parked vCPU's [`OwnState`] (CPUID and TSC frequency from `fixed`
/// where given, as [`save_vcpu_cached`]).
pub fn save_vcpu_own(
    fd: &VcpuFd,
    id: u32,
    ctx: &SaveContext,
    fixed: Option<&VcpuState>,
) -> Result<OwnState, StateError> {
    let (cpuid, tsc_khz) = match fixed {
        Some(f) => (f.cpuid.clone(), f.tsc_khz),
        None => (
            fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(vcpu_err(id, "KVM_GET_CPUID2"))?
                .as_slice()
                .to_vec(),
            fd.get_tsc_khz().ok(),
        ),
    };
    let mut msrs = Vec::with_capacity(ctx.msr_indices.len());
    for chunk in ctx.msr_indices.chunks(64) {
        let entries: Vec<kvm_msr_entry> =
            chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut m = Msrs::from_entries(&entries).map_err(|e| StateError::Fam(format!("{e:?}")))?;
        let n = fd.get_msrs(&mut m).map_err(vcpu_err(id, "KVM_GET_MSRS"))?;
        if n != chunk.len() {
            return Err(StateError::MsrsRefused { vcpu: id, set: n, total: chunk.len(), first: chunk[n] });
        }
        msrs.extend_from_slice(m.as_slice());
    }
    let regs = fd.get_regs().map_err(vcpu_err(id, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(vcpu_err(id, "KVM_GET_SREGS"))?;
    let xsave = if ctx.xsave_size > 0 {
        let mut x = Xsave::new(ctx.xsave_fam_len()).map_err(|e| StateError::Fam(format!("{e:?}")))?;
        // SAFETY: `x` was allocated with the size KVM_CAP_XSAVE2 reported for this VM.
        unsafe { fd.get_xsave2(&mut x) }.map_err(vcpu_err(id, "KVM_GET_XSAVE2"))?;
        let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
        words.extend_from_slice(x.as_slice());
        words
    } else {
        fd.get_xsave().map_err(vcpu_err(id, "KVM_GET_XSAVE"))?.region.to_vec()
    };
    let xcrs = fd.get_xcrs().map_err(vcpu_err(id, "KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(vcpu_err(id, "KVM_GET_DEBUGREGS"))?;
    Ok(OwnState { cpuid, msrs, regs, sregs, xsave, xcrs, debugregs, tsc_khz })
}

/// Completes a vCPU's save begun by [`save_vcpu_own`]: its LAPIC, mp_state
/// and pending events (in that order), read now. Every vCPU must be parked.
pub fn save_vcpu_shared(fd: &VcpuFd, id: u32, own: OwnState) -> Result<VcpuState, StateError> {
    let lapic = fd.get_lapic().map_err(vcpu_err(id, "KVM_GET_LAPIC"))?;
    let mp_state = fd.get_mp_state().map_err(vcpu_err(id, "KVM_GET_MP_STATE"))?;
    let vcpu_events = fd.get_vcpu_events().map_err(vcpu_err(id, "KVM_GET_VCPU_EVENTS"))?;
    let OwnState { cpuid, msrs, regs, sregs, xsave, xcrs, debugregs, tsc_khz } = own;
    Ok(VcpuState { id, cpuid, msrs, regs, sregs, xsave, xcrs, debugregs, lapic, mp_state, vcpu_events, tsc_khz })
}

/// Restores one vCPU (fresh, not yet run) in the documented order.
pub fn restore_vcpu(fd: &VcpuFd, st: &VcpuState, ctx: &SaveContext) -> Result<(), StateError> {
    let id = st.id;
    if let Some(khz) = st.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz).map_err(vcpu_err(id, "KVM_SET_TSC_KHZ"))?;
        }
    }
    let cpuid = CpuId::from_entries(&st.cpuid).map_err(|e| StateError::Fam(format!("{e:?}")))?;
    fd.set_cpuid2(&cpuid).map_err(vcpu_err(id, "KVM_SET_CPUID2"))?;
    fd.set_mp_state(st.mp_state).map_err(vcpu_err(id, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&st.regs).map_err(vcpu_err(id, "KVM_SET_REGS"))?;
    fd.set_sregs(&st.sregs).map_err(vcpu_err(id, "KVM_SET_SREGS"))?;
    if ctx.xsave_size > 0 {
        let fam = ctx.xsave_fam_len();
        if st.xsave.len() != 1024 + fam {
            return Err(StateError::XsaveSize { saved: st.xsave.len(), need: 1024 + fam });
        }
        let mut x = Xsave::new(fam).map_err(|e| StateError::Fam(format!("{e:?}")))?;
        // SAFETY: only the fixed-size legacy region is written; the FAM length is untouched.
        unsafe { x.as_mut_fam_struct() }.xsave.region.copy_from_slice(&st.xsave[..1024]);
        x.as_mut_slice().copy_from_slice(&st.xsave[1024..]);
        // SAFETY: `x` has the size KVM_CAP_XSAVE2 reported for this VM.
        unsafe { fd.set_xsave2(&x) }.map_err(vcpu_err(id, "KVM_SET_XSAVE2"))?;
    } else {
        if st.xsave.len() < 1024 {
            return Err(StateError::XsaveSize { saved: st.xsave.len(), need: 1024 });
        }
        let mut x = kvm_xsave::default();
        x.region.copy_from_slice(&st.xsave[..1024]);
        // SAFETY: a legacy 4 KiB kvm_xsave, which is what KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&x) }.map_err(vcpu_err(id, "KVM_SET_XSAVE"))?;
    }
    fd.set_xcrs(&st.xcrs).map_err(vcpu_err(id, "KVM_SET_XCRS"))?;
    fd.set_debug_regs(&st.debugregs).map_err(vcpu_err(id, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&st.lapic).map_err(vcpu_err(id, "KVM_SET_LAPIC"))?;
    for chunk in st.msrs.chunks(64) {
        let m = Msrs::from_entries(chunk).map_err(|e| StateError::Fam(format!("{e:?}")))?;
        let n = fd.set_msrs(&m).map_err(vcpu_err(id, "KVM_SET_MSRS"))?;
        if n != chunk.len() {
            return Err(StateError::MsrsRefused { vcpu: id, set: n, total: chunk.len(), first: chunk[n].index });
        }
    }
    fd.set_vcpu_events(&st.vcpu_events).map_err(vcpu_err(id, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Saves the VM-wide in-kernel device state.
pub fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    let chip = |id: u32| {
        let mut c = kvm_bindings::kvm_irqchip { chip_id: id, ..Default::default() };
        vm.get_irqchip(&mut c).map(|_| c)
    };
    Ok(VmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER).map_err(vm_err("KVM_GET_IRQCHIP(pic master)"))?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE).map_err(vm_err("KVM_GET_IRQCHIP(pic slave)"))?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC).map_err(vm_err("KVM_GET_IRQCHIP(ioapic)"))?,
        pit: vm.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?,
    })
}

/// Restores the VM-wide state (before any vCPU state).
pub fn restore_vm(vm: &VmFd, st: &VmState) -> Result<(), StateError> {
    vm.set_pit2(&st.pit).map_err(vm_err("KVM_SET_PIT2"))?;
    let mut clock = st.clock;
    // Only the clock value is restorable; flags such as KVM_CLOCK_TSC_STABLE are output-only.
    clock.flags = 0;
    vm.set_clock(&clock).map_err(vm_err("KVM_SET_CLOCK"))?;
    vm.set_irqchip(&st.pic_master).map_err(vm_err("KVM_SET_IRQCHIP(pic master)"))?;
    vm.set_irqchip(&st.pic_slave).map_err(vm_err("KVM_SET_IRQCHIP(pic slave)"))?;
    vm.set_irqchip(&st.ioapic).map_err(vm_err("KVM_SET_IRQCHIP(ioapic)"))?;
    Ok(())
}
