//! vCPU threads and their pause/resume state machine.
//!
//! Each vCPU runs `KVM_RUN` on its own thread, holding its [`VcpuCore`] lock.
//! A pause sets the vCPU's pause flag, writes `immediate_exit = 1` into its
//! mmap'd `kvm_run` and sends it `SIGRTMIN` (no-op handler): whether the thread
//! is in the guest, about to enter it, or handling an exit, it leaves `KVM_RUN`
//! promptly. A pending PIO/MMIO exit is completed first (one more `KVM_RUN`
//! with `immediate_exit` set, as KVM requires before state is read), then the
//! thread releases the core lock and parks. Its state can then be read or
//! written by the owner; resume clears the flag and wakes it.

mod kick;
mod park;
mod parked_work;
mod ring_full;
mod run;
mod sched;

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuFd, VmFd};

use crate::devices::{Devices, GuestFault};
use crate::memory::GuestMem;
pub use crate::ring_set::RingLedger;
use crate::state::SaveContext;

pub use kick::kick_signal;
use kick::{register_kick_handler, ImmediateExit};
use parked_work::ParkedWork;
pub use ring_full::{pending_cap, RingState};
pub use sched::realtime_pauses_active;

/// Errors of vCPU management.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot register the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("cannot spawn the vCPU thread: {0}")]
    Spawn(std::io::Error),
    #[error("vCPU {0} did not park within {1:?}")]
    PauseTimeout(u32, Duration),
    #[error("vCPU {id} stopped: {reason}")]
    Exited { id: u32, reason: String },
    #[error("cannot kick vCPU {0}: {1}")]
    Kick(u32, vmm_sys_util::errno::Error),
}

/// How long a parked vCPU thread polls for resume before it sleeps.
const SPIN_PARK: Duration = Duration::from_micros(4000);

/// What the vCPU thread owns while it runs, and the owner while it is parked.
#[derive(Debug)]
pub struct VcpuCore {
    pub fd: VcpuFd,
}

/// Run state of a vCPU thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    NotStarted,
    Running,
    Parked,
    Exited(String),
}

#[derive(Debug)]
struct Status {
    state: RunState,
}

/// A vCPU shared between its thread and the owner.
#[derive(Debug)]
pub struct Vcpu {
    pub id: u32,
    core: Mutex<VcpuCore>,
    /// The vCPU's dirty ring, apart from the core so that it can be harvested
    /// while the vCPU runs (a pre-copy). Lock order: `VcpuContext::reset_lock`
    /// first, then this (a ring-full exit holds the core, then both).
    ring: Mutex<Option<RingState>>,
    /// Harvests of this ring by another thread while the vCPU may run (a
    /// pre-copy): a ring-full exit that then finds nothing to harvest was
    /// emptied by one of them, not desynchronised.
    foreign_harvests: AtomicU64,
    immediate_exit: ImmediateExit,
    pause: AtomicBool,
    stop: AtomicBool,
    status: Mutex<Status>,
    cv: Condvar,
    /// Incremented by every pause request: tags state saves to one pause.
    pause_gen: AtomicU64,
    work: Mutex<ParkedWork>,
    /// Pause generation a save was requested for (0: none). Requests are
    /// atomics, not fields of the slot: a request must not wait for the
    /// lock a save in progress holds (the save a pause asked for with its
    /// kick runs while the owner harvests and may request a reset). Taken
    /// (cleared) only with the slot locked, by the thread or the owner.
    save_req: AtomicU64,
    /// Pause generation a ring reset was requested for (0: none); as
    /// `save_req`.
    reset_req: AtomicU64,
    /// Pause generation of the save (`[0]`) and the reset (`[1]`) the thread
    /// has taken, and of the last one it finished: while one is taken and
    /// not finished the owner polls for it instead of blocking on the slot
    /// lock the work holds (a blocked owner's wake-up costs tens of
    /// microseconds on a nested host, as long as the save itself).
    work_taken: [AtomicU64; 2],
    work_done: [AtomicU64; 2],
    /// Set when a save or reset is requested: the parked thread polls this
    /// and takes the slot lock only when there is work (polling the lock
    /// itself at idle priority let a preempted poller block the owner).
    has_work: AtomicBool,
    /// The vCPU thread's kernel thread id (0 until it runs): with real-time
    /// pauses, a kick raises it until it parks (see [`Vcpu::kick`]).
    tid: AtomicI32,
    /// Set when a resume changed the parked thread's policy (raised it to a
    /// real-time one, or moved it from idle to normal: see
    /// [`Vcpu::wait_running`]); cleared once it has left its park.
    boosted: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What the vCPU thread needs from the machine.
#[derive(Debug, Clone)]
pub struct VcpuContext {
    pub vm: Arc<VmFd>,
    pub mem: Arc<GuestMem>,
    pub devices: Arc<Devices>,
    /// Serialises ring harvest + KVM_RESET_DIRTY_RINGS (the reset is VM-wide)
    /// and keeps the count of entries marked RESET but not yet recycled.
    pub reset_lock: Arc<Mutex<RingLedger>>,
    pub faults: Arc<Mutex<Vec<GuestFault>>>,
    /// Dirty ring resets so far (the ledger's count: see
    /// [`RingLedger::resets`]).
    pub ring_resets: Arc<std::sync::atomic::AtomicU64>,
    /// Ring entries harvested on ring-full exits since the last collection
    /// (summed over vCPUs): lets an epoch engine end an epoch early.
    pub ring_pending: Arc<std::sync::atomic::AtomicU64>,
    /// What a state save needs (for saves done on the vCPU threads).
    pub save_ctx: Arc<SaveContext>,
    /// How many of the machine's vCPU threads are parked now: a save begun
    /// at a park reads the parts other vCPUs can change only once all are.
    pub parked: Arc<std::sync::atomic::AtomicUsize>,
    /// The save point of this pause has passed: every vCPU is parked, the
    /// devices are quiesced and the VM-wide chips (PIC, IOAPIC, PIT, clock)
    /// are saved. A save begun at a park reads the parts other vCPUs and the
    /// chips can change (LAPIC, pending events) only after it.
    pub save_point: Arc<AtomicBool>,
    /// The machine's vCPU count.
    pub vcpus: usize,
}

impl Vcpu {
    /// Wraps a created vCPU fd (and its mapped ring).
    pub fn new(id: u32, mut fd: VcpuFd, ring: Option<RingState>) -> Self {
        let immediate_exit = ImmediateExit::new(fd.get_kvm_run());
        Vcpu {
            id,
            core: Mutex::new(VcpuCore { fd }),
            ring: Mutex::new(ring),
            foreign_harvests: AtomicU64::new(0),
            immediate_exit,
            pause: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            status: Mutex::new(Status { state: RunState::NotStarted }),
            cv: Condvar::new(),
            pause_gen: AtomicU64::new(0),
            work: Mutex::new(ParkedWork::default()),
            save_req: AtomicU64::new(0),
            reset_req: AtomicU64::new(0),
            work_taken: [AtomicU64::new(0), AtomicU64::new(0)],
            work_done: [AtomicU64::new(0), AtomicU64::new(0)],
            has_work: AtomicBool::new(false),
            tid: AtomicI32::new(0),
            boosted: AtomicBool::new(false),
            thread: Mutex::new(None),
        }
    }

    /// Locks the core. Only call while the vCPU is parked or not started
    /// (otherwise this waits for the thread to park).
    pub fn core(&self) -> MutexGuard<'_, VcpuCore> {
        common::sync::lock(&self.core)
    }

    /// Records a harvest of this vCPU's ring by another thread while the
    /// vCPU may be running (call with the ring locked).
    pub fn note_foreign_harvest(&self) {
        self.foreign_harvests.fetch_add(1, Ordering::SeqCst);
    }

    /// Locks the dirty ring (none with the bitmap tracker). Take
    /// `VcpuContext::reset_lock` first when both are needed.
    pub fn ring(&self) -> MutexGuard<'_, Option<RingState>> {
        common::sync::lock(&self.ring)
    }

    fn status(&self) -> MutexGuard<'_, Status> {
        common::sync::lock(&self.status)
    }

    /// Current run state.
    pub fn state(&self) -> RunState {
        self.status().state.clone()
    }

    fn set_state(&self, st: RunState) {
        self.status().state = st;
        self.cv.notify_all();
    }

    /// Starts the vCPU thread. With `paused`, it parks before entering the guest.
    pub fn start(self: &Arc<Self>, ctx: VcpuContext, paused: bool) -> Result<(), VcpuError> {
        register_kick_handler()?;
        self.pause.store(paused, Ordering::SeqCst);
        let me = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || me.thread_main(ctx))
            .map_err(VcpuError::Spawn)?;
        *common::sync::lock(&self.thread) = Some(handle);
        Ok(())
    }

    /// The vCPU thread's kernel thread id, once it runs.
    pub fn thread_id(&self) -> Option<i32> {
        Some(self.tid.load(Ordering::Acquire)).filter(|&t| t != 0)
    }
}
