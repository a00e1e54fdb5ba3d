//! The machine: a KVM VM with guest memory, vCPU threads, dirty tracking,
//! devices and full state save/restore. Both castor's primary and secondary
//! run this.

mod build;
mod config;
mod run;
mod tracking;

use std::sync::Arc;
use std::time::Duration;

use kvm_ioctls::{Kvm, VmFd};

use crate::abi::{self, PAGE_SIZE, PERCPU_GPA};
use crate::boot::BootError;
use crate::devices::{Devices, GuestFault};
use crate::dirty::{DirtyTracker, Trust};
use crate::memory::{GuestMem, MemoryError};
use crate::ring::{RingError, RingFlavour};
use crate::state::{SaveContext, StateError, VmShape};
use crate::tracker::TrackerError;
use crate::vcpu::{RunState, Vcpu, VcpuContext, VcpuError};

pub use config::{MachineConfig, NetAddr, WorkloadConfig};

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
    #[error("devices: {0}")]
    Device(#[from] crate::devices::DeviceError),
}

/// See [`Machine::precopy_due`].
pub const PRECOPY_HOT_FACTOR: u64 = 4;

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
    /// The VM-wide chips saved at this pause's save point (see
    /// [`Machine::pause_and_save`]).
    vm_saved: Option<common::state::VmState>,
}

impl Machine {
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

    /// Tells hot-page retention which pages (sorted ascending) changed in
    /// the epoch last collected, as a comparison with their previous copies
    /// found: retained pages among them are not idle, so the set is not let
    /// go early (see [`crate::tracker::Retention`]). Advisory: it never
    /// changes what a collection reports. Works while the guest runs.
    pub fn note_changed_pages(&mut self, changed: impl IntoIterator<Item = u64>) {
        self.tracker.note_changed(changed);
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

    /// Fault injection for tests: vCPU 0's dirty ring is treated as
    /// desynchronised and its entries are forgotten until the vCPU is stuck
    /// ring-full (see `DirtyTracker::inject_stuck_ring`).
    pub fn inject_stuck_ring(&mut self) {
        self.tracker.inject_stuck_ring();
    }

    /// (desynchronised dirty rings re-aligned, stuck ones stepped forward) so far.
    pub fn ring_resyncs(&self) -> (u64, u64) {
        self.tracker.resyncs()
    }

    /// Short resets injected so far.
    pub fn short_resets_injected(&self) -> u64 {
        self.tracker.short_resets_injected()
    }

    /// Ring-full exits so far, summed over vCPUs.
    pub fn ring_full_exits(&self) -> u64 {
        self.vcpus.iter().map(|v| v.ring().as_ref().map_or(0, |r| r.full_exits)).sum()
    }

    /// Ring-full exits with nothing to harvest (KVM counting more entries as
    /// used than the ring holds, or the ring desynchronised), summed over vCPUs.
    pub fn ring_stalls(&self) -> u64 {
        self.vcpus.iter().map(|v| v.ring().as_ref().map_or(0, |r| r.stalls)).sum()
    }

    /// Ring entries harvested on ring-full exits since the last collection
    /// (readable while the guest runs; 0 with the bitmap tracker).
    pub fn ring_pending(&self) -> u64 {
        self.ctx.ring_pending.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Raises an MSI with `vector` to vCPU 0, as a device does (the
    /// network card's is [`crate::abi::VEC_NET`]); the benchmark measures
    /// what one costs the guest.
    pub fn raise_msi(&self, vector: u32) -> Result<(), MachineError> {
        let msi = kvm_bindings::kvm_msi { address_lo: 0xfee0_0000, data: vector, ..Default::default() };
        self.vm.signal_msi(msi).map(|_| ()).map_err(|e| MachineError::Setup("KVM_SIGNAL_MSI", e))
    }

    /// Reads a u64 from a cpu's per-cpu page (see abi PC_*).
    pub fn percpu(&self, cpu: u32, offset: u64) -> u64 {
        self.mem.read_u64(PERCPU_GPA + u64::from(cpu) * PAGE_SIZE + offset).unwrap_or(0)
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
