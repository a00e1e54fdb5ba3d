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

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::devices::{Devices, GuestFault, IoAction};
pub use crate::dirty::RingLedger;
use crate::memory::GuestMem;
use crate::ring::DirtyRing;
use crate::state::{self, OwnState, SaveContext, StateError, VcpuState};

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

/// Index of the parked thread's state save in [`Vcpu`]'s work marks.
const SAVE: usize = 0;
/// Index of the parked thread's ring reset there.
const RESET: usize = 1;

/// The signal that kicks vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn register_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    static mut RESULT: Option<vmm_sys_util::errno::Error> = None;
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler) {
            // SAFETY: written once inside call_once, before any reader (readers
            // come after call_once returns, which synchronises with this write).
            unsafe { RESULT = Some(e) };
        }
    });
    // SAFETY: call_once has completed, so the only write happened-before this read.
    match unsafe { *std::ptr::addr_of!(RESULT) } {
        Some(e) => Err(VcpuError::Signal(e)),
        None => Ok(()),
    }
}

/// Pointer to a vCPU's `kvm_run.immediate_exit`, writable from other threads.
#[derive(Debug)]
struct ImmediateExit(*mut u8);

// SAFETY: the pointer targets the kvm_run mapping of a VcpuFd that lives inside
// the same `VcpuShared` (in `core`), so the mapping outlives every use; the byte
// is only accessed atomically.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above; concurrent access is through AtomicU8.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    fn new(run: &mut kvm_run) -> Self {
        ImmediateExit(std::ptr::addr_of_mut!(run.immediate_exit))
    }
    fn set(&self, v: u8) {
        // SAFETY: see the Send/Sync justification: the byte is valid for the
        // lifetime of self and only accessed atomically.
        unsafe { AtomicU8::from_ptr(self.0) }.store(v, Ordering::SeqCst);
    }
}

/// Dirty-ring state of one vCPU.
#[derive(Debug)]
pub struct RingState {
    pub ring: DirtyRing,
    /// Entries harvested on ring-full exits, not yet collected.
    pub pending: Vec<(u32, u64)>,
    /// Sticky: tracking was lost since the last collection.
    pub lost: bool,
    /// Ring-full exits since the VM started.
    pub full_exits: u64,
    /// Scan the ring for stray entries after each harvest.
    pub verify: bool,
    /// Ring-full exits that found nothing to harvest (desynchronised ring).
    pub stalls: u64,
    /// Times `pending` passed [`pending_cap`] and was dropped (tracking
    /// marked lost).
    pub pending_overflows: u64,
}

/// Most entries a vCPU's pending set may hold: one per guest page (at
/// least 65536). Past it the entries are dropped and tracking is marked
/// lost (a resync follows), so the set stays bounded however long an
/// epoch runs.
pub fn pending_cap(mem_bytes: u64) -> usize {
    usize::try_from(mem_bytes / 4096).unwrap_or(usize::MAX).max(65536)
}

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

/// Work the parked vCPU thread does for the owner (its state save, a ring
/// reset), so it runs in parallel with the owner's page copy.
#[derive(Debug, Default)]
struct ParkedWork {
    /// The save done by the vCPU thread, with its pause generation.
    done: Option<(u64, Result<VcpuState, StateError>)>,
    /// The vCPU's own part of a save the thread began and could not finish
    /// (not every vCPU was parked in time), with its pause generation: the
    /// owner finishes it.
    own: Option<(u64, OwnState)>,
    /// The first saved state: its never-changing parts (CPUID, TSC kHz) are
    /// reused instead of asked from KVM again.
    template: Option<VcpuState>,
    /// The reset done by the vCPU thread: (pause generation, succeeded).
    reset_done: Option<(u64, bool)>,
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
    /// Ring entries harvested on ring-full exits since the last collection
    /// (summed over vCPUs): lets an epoch engine end an epoch early.
    pub ring_pending: Arc<std::sync::atomic::AtomicU64>,
    /// What a state save needs (for saves done on the vCPU threads).
    pub save_ctx: Arc<SaveContext>,
    /// How many of the machine's vCPU threads are parked now: a save begun
    /// at a park reads the parts other vCPUs can change only once all are.
    pub parked: Arc<std::sync::atomic::AtomicUsize>,
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

    fn kick(&self) -> Result<(), VcpuError> {
        self.immediate_exit.set(1);
        // Under the status lock the thread cannot park meanwhile (parking
        // lowers it again). The signal goes first: a thread raised before
        // its signal was pending took the core from the kicker, which then
        // could not send it, and ran guest code at a real-time policy until
        // the guest exited on its own (a guest writing memory with no I/O:
        // stops of 50-500 ms, seen in the pre-copy service test). Only a
        // running thread is raised: one still in its park (resumed, not yet
        // out) must not poll at a real-time policy.
        // (the status lock only when a raise may follow: the default path
        // stays as it was)
        let st = rt_pause_on().then(|| self.status());
        {
            let t = common::sync::lock(&self.thread);
            if let Some(h) = t.as_ref() {
                // SAFETY: the handle's pthread is alive until joined (we hold its JoinHandle).
                let ret = unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
                if ret != 0 {
                    return Err(VcpuError::Kick(self.id, vmm_sys_util::errno::Error::new(ret)));
                }
            }
        }
        if st.as_ref().is_some_and(|g| g.state == RunState::Running) {
            boost(self.tid.load(Ordering::Acquire));
        }
        Ok(())
    }

    /// Asks the vCPU to park (does not wait).
    pub fn request_pause(&self) -> Result<(), VcpuError> {
        self.pause_gen.fetch_add(1, Ordering::SeqCst);
        self.pause.store(true, Ordering::SeqCst);
        self.kick()
    }

    /// Asks the vCPU to park and to save its state as it parks (does not
    /// wait): the thread saves at the policy it ran the guest at, before it
    /// starts polling, instead of waiting for a [`Vcpu::request_save`] made
    /// after the park and switching its policy twice first (about 30 us of
    /// a 100 us save on this project's host). Pick the result up with
    /// [`Vcpu::take_state`].
    pub fn request_pause_saving(&self) -> Result<(), VcpuError> {
        let gen = self.pause_gen.fetch_add(1, Ordering::SeqCst) + 1;
        // the pause before the request: a thread still in its last park
        // (resumed, not yet out) that takes this save must stay parked
        // until the next resume, or it would hand back a state from before
        // the guest ran on
        self.pause.store(true, Ordering::SeqCst);
        self.save_req.store(gen, Ordering::SeqCst);
        self.has_work.store(true, Ordering::SeqCst);
        self.kick()
    }

    /// The vCPU thread's kernel thread id, once it runs.
    pub fn thread_id(&self) -> Option<i32> {
        Some(self.tid.load(Ordering::Acquire)).filter(|&t| t != 0)
    }

    fn parked_work(&self) -> MutexGuard<'_, ParkedWork> {
        common::sync::lock(&self.work)
    }

    /// Asks the parked vCPU thread to save its state now (in parallel with
    /// whatever the owner does next). Call only while parked.
    pub fn request_save(&self) {
        let gen = self.pause_gen.load(Ordering::SeqCst);
        // (asked with the pause already: the thread may be saving now)
        if self.save_req.swap(gen, Ordering::SeqCst) != gen {
            self.has_work.store(true, Ordering::SeqCst);
        }
    }

    /// The vCPU's state in this pause: the save its thread did on
    /// [`Vcpu::request_save`] if it did one, else saved here and now. Call
    /// only while parked (the state cannot change then, so both are equal).
    pub fn take_state(&self, ctx: &SaveContext) -> Result<VcpuState, StateError> {
        let gen = self.pause_gen.load(Ordering::SeqCst);
        self.await_work(SAVE, gen);
        let mut slot = self.parked_work();
        // (with the slot locked: a save the thread took is done by now)
        self.save_req.store(0, Ordering::SeqCst);
        let own = slot.own.take();
        let st = match slot.done.take() {
            Some((g, r)) if g == gen => r?,
            // (the owner calls this with every vCPU parked)
            _ => match own {
                Some((g, own)) if g == gen => state::save_vcpu_shared(&self.core().fd, self.id, own)?,
                _ => state::save_vcpu_cached(&self.core().fd, self.id, ctx, slot.template.as_ref())?,
            },
        };
        if slot.template.is_none() {
            slot.template = Some(st.clone());
        }
        Ok(st)
    }

    /// Asks the parked vCPU thread to reset the dirty rings now (VM-wide),
    /// while the owner copies pages. Call only while parked.
    pub fn request_reset(&self) {
        self.reset_req.store(self.pause_gen.load(Ordering::SeqCst), Ordering::SeqCst);
        self.has_work.store(true, Ordering::SeqCst);
    }

    /// The result of the reset requested in this pause: waits for the vCPU
    /// thread if it took it, else resets here. False: tracking was lost.
    pub fn take_reset(&self, ctx: &VcpuContext) -> bool {
        let gen = self.pause_gen.load(Ordering::SeqCst);
        self.await_work(RESET, gen);
        let mut slot = self.parked_work();
        let requested = self.reset_req.swap(0, Ordering::SeqCst);
        match slot.reset_done.take() {
            Some((g, ok)) if g == gen => ok,
            _ if requested == gen => common::sync::lock(&ctx.reset_lock).reset(&ctx.vm),
            // nothing was requested in this pause
            _ => true,
        }
    }

    /// On the vCPU thread, in a save of pause `gen`: polls (yielding) until
    /// every vCPU thread of the machine is parked. False if that did not
    /// happen within [`SPIN_PARK`] or the pause ended or moved on (the owner
    /// then finishes the save).
    fn await_all_parked(&self, ctx: &VcpuContext, gen: u64) -> bool {
        let until = Instant::now() + SPIN_PARK;
        loop {
            if ctx.parked.load(Ordering::SeqCst) >= ctx.vcpus {
                return true;
            }
            if !self.pause.load(Ordering::SeqCst)
                || self.pause_gen.load(Ordering::SeqCst) != gen
                || self.stop.load(Ordering::SeqCst)
                || Instant::now() >= until
            {
                return false;
            }
            std::thread::yield_now();
        }
    }

    /// Polls (yielding) while the parked thread does work `kind` of pause
    /// `gen`: from the moment it took the work until it finished, for at
    /// most [`SPIN_PARK`] (then the slot lock waits). Returns at once if the
    /// thread has not taken it.
    fn await_work(&self, kind: usize, gen: u64) {
        let until = Instant::now() + SPIN_PARK;
        while self.work_taken[kind].load(Ordering::SeqCst) == gen
            && self.work_done[kind].load(Ordering::SeqCst) != gen
            && Instant::now() < until
        {
            std::thread::yield_now();
        }
    }

    /// On the vCPU thread, while parked: does a requested save or reset.
    ///
    /// The work runs at normal (or, with real-time pauses, real-time)
    /// priority, and the slot lock is held only at that priority: the owner
    /// may be waiting for the lock, and a thread that held it at idle
    /// priority lost its core to any runnable thread (lowering the policy
    /// with the lock held was such a point: the kernel preempts an
    /// idle-policy thread at once), which stalled the pause for as long as
    /// the core stayed busy.
    ///
    /// `at_work_policy`: the thread runs at the policy the work wants
    /// already (parking, before it starts polling at idle priority).
    fn serve_parked_work(&self, ctx: &VcpuContext, at_work_policy: bool) {
        if !at_work_policy {
            set_work_policy();
        }
        // (a full barrier before the requests are read: a request made
        // after this is seen here or sets the flag again)
        self.has_work.swap(false, Ordering::SeqCst);
        let gen = self.pause_gen.load(Ordering::SeqCst);
        {
            let mut slot = self.parked_work();
            if gen != 0 && self.reset_req.compare_exchange(gen, 0, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                self.work_taken[RESET].store(gen, Ordering::SeqCst);
                let ok = {
                    let _blocked = KickBlocked::new();
                    common::sync::lock(&ctx.reset_lock).reset(&ctx.vm)
                };
                slot.reset_done = Some((gen, ok));
                self.work_done[RESET].store(gen, Ordering::SeqCst);
            }
        }
        // the reset's result is out before the save starts (the owner may
        // be waiting for it alone)
        {
            let mut slot = self.parked_work();
            if gen != 0 && self.save_req.compare_exchange(gen, 0, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                self.work_taken[SAVE].store(gen, Ordering::SeqCst);
                let core = self.core();
                match state::save_vcpu_own(&core.fd, self.id, &ctx.save_ctx, slot.template.as_ref()) {
                    Err(e) => slot.done = Some((gen, Err(e))),
                    // the rest only once every vCPU is parked: a vCPU still
                    // running may send this one an IPI or an NMI
                    Ok(own) if self.await_all_parked(ctx, gen) => {
                        slot.done = Some((gen, state::save_vcpu_shared(&core.fd, self.id, own)))
                    }
                    Ok(own) => slot.own = Some((gen, own)),
                }
                drop(core);
                self.work_done[SAVE].store(gen, Ordering::SeqCst);
            }
        }
        if !at_work_policy {
            set_idle_policy(true);
        }
    }

    /// Waits until the vCPU is parked (or has exited, which is an error).
    pub fn wait_parked(&self, timeout: Duration) -> Result<(), VcpuError> {
        let deadline = Instant::now() + timeout;
        // poll first (a kick normally lands within tens of microseconds)
        let spin_until = Instant::now() + SPIN_PARK;
        while Instant::now() < spin_until && self.status().state == RunState::Running {
            std::thread::yield_now();
        }
        let mut st = self.status();
        loop {
            match &st.state {
                RunState::Parked => return Ok(()),
                RunState::Exited(r) => return Err(VcpuError::Exited { id: self.id, reason: r.clone() }),
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VcpuError::PauseTimeout(self.id, timeout));
            }
            st = self.cv.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Waits until the vCPU thread has left its park (after [`Vcpu::resume`]).
    ///
    /// A thread still in its park at `lift_at` is moved from its idle
    /// polling policy to its normal one from here: an idle-policy thread
    /// gets a core only when nothing else wants one, so on a loaded host the
    /// resume waited for it (at saturation on this project's host, resume
    /// p99 58-69 ms; 14-22 ms with the move). Not at once: moving a thread
    /// that runs on another core costs an interrupt there, tens of
    /// microseconds on a nested host, while an unloaded resume takes under
    /// ten; so only a thread that did not leave by `lift_at` is moved.
    pub fn wait_running(&self, lift_at: Instant, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < lift_at {
            if self.status().state != RunState::Parked {
                return true;
            }
            std::thread::yield_now();
        }
        let mut st = self.status();
        // (under the status lock: the thread sets Running under it first,
        // so the move cannot land once it has left; paused again before it
        // saw the resume, its polling drops it back to idle. A thread the
        // resume raised to a real-time policy is left there.)
        if st.state == RunState::Parked
            && !self.boosted.load(Ordering::Acquire)
            && lift(self.tid.load(Ordering::Acquire))
        {
            self.boosted.store(true, Ordering::Release);
        }
        while st.state == RunState::Parked {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self.cv.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// Lets a parked vCPU run again.
    pub fn resume(&self) {
        let st = self.status();
        self.pause.store(false, Ordering::SeqCst);
        self.cv.notify_all();
        // a thread polling in its park does so at idle priority and waited
        // behind any load for a core: with real-time pauses it leaves at a
        // real-time policy and lowers itself once out (it sets Running
        // under this lock first, so the boost cannot land after that);
        // without, [`Vcpu::wait_running`] moves it to its normal policy if
        // it is slow to leave. If it is paused again before it saw this
        // resume, its polling lowers it back to idle.
        if st.state == RunState::Parked && boost(self.tid.load(Ordering::Acquire)) {
            self.boosted.store(true, Ordering::Release);
        }
    }

    /// Stops the thread for good and joins it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.status();
            self.cv.notify_all();
        }
        let _ = self.kick();
        if let Some(h) = common::sync::lock(&self.thread).take() {
            let _ = h.join();
        }
    }

    fn park(&self, ctx: &VcpuContext) {
        {
            let mut st = self.status();
            st.state = RunState::Parked;
            ctx.parked.fetch_add(1, Ordering::SeqCst);
            self.cv.notify_all();
        }
        // a save asked for with the pause: now, at the policy the guest ran
        // at (the owner harvests and copies meanwhile)
        if self.has_work.load(Ordering::SeqCst) {
            self.serve_parked_work(ctx, true);
        }
        // Epoch pauses are short: poll (yielding the core) for a while before
        // sleeping, so resume does not pay a cross-core wake-up, which costs
        // hundreds of microseconds on a nested host.
        let spin_until = Instant::now() + SPIN_PARK;
        // poll at idle priority: the pauser's copy must not lose its core to
        // a parked thread's polling (on 2 cores it did, in the copy's tail)
        set_idle_policy(true);
        while self.pause.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) && Instant::now() < spin_until {
            if self.boosted.swap(false, Ordering::AcqRel) && self.pause.load(Ordering::SeqCst) {
                // boosted by a resume, then paused again before it left:
                // polling stays at idle priority
                set_idle_policy(true);
            }
            if self.has_work.load(Ordering::Acquire) {
                self.serve_parked_work(ctx, false);
            }
            std::thread::yield_now();
        }
        set_idle_policy(false);
        let mut st = self.status();
        while self.pause.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            if self.boosted.swap(false, Ordering::AcqRel) && self.pause.load(Ordering::SeqCst) {
                set_idle_policy(false);
            }
        }
        st.state = RunState::Running;
        ctx.parked.fetch_sub(1, Ordering::SeqCst);
        self.cv.notify_all();
        drop(st);
        // back to normal from the resume's real-time boost (only once a
        // thread was ever raised: otherwise it is at normal policy here,
        // lifted by the resume or set on leaving the polling)
        self.boosted.store(false, Ordering::Release);
        if RT_RAISED.load(Ordering::Acquire) {
            set_idle_policy(false);
        }
    }

    fn thread_main(self: Arc<Self>, ctx: VcpuContext) {
        // SAFETY: gettid has no arguments and cannot fail.
        self.tid.store(unsafe { libc::gettid() }, Ordering::Release);
        let reason = self.run_loop(&ctx);
        tracing::debug!(vcpu = self.id, %reason, "vCPU thread exits");
        self.set_state(RunState::Exited(reason));
    }

    fn run_loop(&self, ctx: &VcpuContext) -> String {
        let mut io_pending = false;
        let mut core = Some(self.core());
        self.set_state(RunState::Running);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return "stopped".into();
            }
            if self.pause.load(Ordering::SeqCst) && !io_pending {
                drop(core.take());
                self.park(ctx);
                core = Some(self.core());
                self.immediate_exit.set(0);
                continue;
            }
            let c = core.as_mut().expect("core held while running");
            let harvests_seen = self.foreign_harvests.load(Ordering::SeqCst);
            let exit = c.fd.run();
            match exit {
                Ok(VcpuExit::IoOut(port, data)) => {
                    io_pending = true;
                    if let IoAction::Fault(vector) = ctx.devices.io_out(self.id, port, data) {
                        let fault = read_fault(&c.fd, &ctx.mem, self.id, vector);
                        tracing::error!(?fault, "guest exception");
                        common::sync::lock(&ctx.faults).push(fault);
                        return format!("guest exception {vector} at rip {:#x}", fault.rip);
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    io_pending = true;
                    ctx.devices.io_in(self.id, port, data);
                }
                Ok(VcpuExit::MmioRead(_, data)) => {
                    io_pending = true;
                    data.fill(0xff);
                }
                Ok(VcpuExit::MmioWrite(..)) => io_pending = true,
                Ok(VcpuExit::Unsupported(r)) if r == kvm_bindings::KVM_EXIT_DIRTY_RING_FULL => {
                    io_pending = false;
                    ring_full(self, ctx, harvests_seen);
                }
                Ok(VcpuExit::Intr) => io_pending = false,
                Ok(VcpuExit::Hlt) => return "guest halted with no in-kernel irqchip to wake it".into(),
                Ok(VcpuExit::Shutdown) => return "guest shutdown (triple fault)".into(),
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return format!("KVM entry failed: reason {reason:#x} on cpu {cpu}")
                }
                Ok(VcpuExit::InternalError) => return "KVM internal error (emulation failure)".into(),
                Ok(other) => return format!("unexpected exit {other:?}"),
                Err(e) if e.errno() == libc::EINTR => io_pending = false,
                Err(e) if e.errno() == libc::EAGAIN => {}
                Err(e) => return format!("KVM_RUN failed: {e}"),
            }
        }
    }
}

/// With real-time pauses, the vCPU threads a pause waits for run at
/// SCHED_FIFO while they do what it waits for: a kicked thread until it
/// parks, a parked one while it saves or resets, a resumed one until it has
/// left its park. On a loaded host each of these can wait for a core behind
/// the load while the guest stays stopped (docs/benchmarks.md, "Real-time
/// pauses": on this 2-core host it cut the saturated pause's p99 about
/// 2.5x and the saturated throughput by about a fifth, hence off by
/// default). The pauser itself stays normal: at a real-time policy its
/// polling kept vCPU threads of normal policy off its core. Each span is
/// bounded by the pause's own work.
///
/// Real-time pauses (off by default; `CASTOR_RT_PAUSE=1` turns them on):
/// 2 = not read yet, 1 = on, 0 = off (also once the kernel refused, for want
/// of CAP_SYS_NICE: best effort).
static RT_PAUSE: AtomicU8 = AtomicU8::new(2);

/// Set once any thread was raised: from then on a thread leaving its park
/// always lowers itself, even if a later raise was refused and turned
/// real-time pauses off.
static RT_RAISED: AtomicBool = AtomicBool::new(false);

fn rt_pause_on() -> bool {
    match RT_PAUSE.load(Ordering::Relaxed) {
        0 => false,
        1 => true,
        _ => {
            let on = std::env::var("CASTOR_RT_PAUSE").is_ok_and(|v| v == "1");
            RT_PAUSE.store(u8::from(on), Ordering::Relaxed);
            on
        }
    }
}

/// Whether real-time pauses are on and no policy change was refused yet
/// (false before the first pause reads `CASTOR_RT_PAUSE`).
pub fn realtime_pauses_active() -> bool {
    RT_PAUSE.load(Ordering::Relaxed) == 1
}

/// Moves thread `tid` (0: the calling thread) to SCHED_FIFO at the lowest
/// real-time priority. False if real-time pauses are off or refused.
fn set_fifo(tid: i32) -> bool {
    if !rt_pause_on() {
        return false;
    }
    let ok = set_policy(tid, libc::SCHED_FIFO, 1);
    if ok {
        RT_RAISED.store(true, Ordering::Release);
    } else {
        RT_PAUSE.store(0, Ordering::Relaxed);
        tracing::debug!(error = %std::io::Error::last_os_error(), "no real-time policy for pauses");
    }
    ok
}

/// `sched_setscheduler(tid, policy, priority)`: true if the kernel agreed.
/// `tid` is 0 (the calling thread) or a vCPU thread of this process (a
/// vCPU thread lives until joined, after its last kick or resume).
fn set_policy(tid: i32, policy: libc::c_int, priority: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: priority };
    // SAFETY: `tid` names the calling thread or a live thread of this
    // process (the callers' contract above); `param` is a valid sched_param,
    // read by the kernel during the call; a policy or priority it does not
    // accept is refused with an error, never acted on.
    unsafe { libc::sched_setscheduler(tid, policy, &param) == 0 }
}

/// Raises vCPU thread `tid`; false if it was not raised. (0, a thread not
/// started yet, is never passed on: to `set_fifo` it names the caller.)
fn boost(tid: i32) -> bool {
    tid != 0 && set_fifo(tid)
}

/// False once the kernel refused a lift (an unprivileged process whose
/// RLIMIT_NICE does not allow leaving SCHED_IDLE): not asked again.
static LIFT_OK: AtomicBool = AtomicBool::new(true);

/// Moves parked vCPU thread `tid` from its idle polling policy to
/// SCHED_OTHER (a resume it is slow to leave); false if not done.
/// Best effort: a refusal only costs the wait for a core.
fn lift(tid: i32) -> bool {
    if tid == 0 || !LIFT_OK.load(Ordering::Relaxed) {
        return false;
    }
    let ok = set_policy(tid, libc::SCHED_OTHER, 0);
    if !ok {
        LIFT_OK.store(false, Ordering::Relaxed);
        tracing::debug!(error = %std::io::Error::last_os_error(), "no lift of resumed vCPU threads");
    }
    ok
}

/// The policy a parked vCPU thread does its requested work at: real-time
/// when pauses are (the pauser may be waiting for it), else normal.
fn set_work_policy() {
    if !set_fifo(0) {
        set_idle_policy(false);
    }
}

/// Switches the calling thread to SCHED_IDLE (true) or back to SCHED_OTHER.
/// Best effort: a refusal only costs performance.
fn set_idle_policy(idle: bool) {
    let policy = if idle { libc::SCHED_IDLE } else { libc::SCHED_OTHER };
    if !set_policy(0, policy, 0) {
        tracing::debug!(error = %std::io::Error::last_os_error(), idle, "sched_setscheduler refused");
    }
}

/// Blocks the kick signal on the calling thread until dropped.
struct KickBlocked(libc::sigset_t);

impl KickBlocked {
    fn new() -> Self {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it
        // and pthread_sigmask only changes this thread's mask, saving the old
        // one into `old` (restored on drop). Results are checked by debug
        // assertions: with valid arguments these calls cannot fail.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, kick_signal());
            let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            debug_assert_eq!(r, 0);
            KickBlocked(old)
        }
    }
}

impl Drop for KickBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new` on this same thread (the
        // guard is never sent: sigset_t is not Send-relevant here, the guard
        // lives in one stack frame).
        let r = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
        debug_assert_eq!(r, 0);
    }
}

/// Ring-full exit: harvest this vCPU's ring into its pending set, reset, re-enter.
/// `harvests_seen`: the vCPU's foreign harvest count before it entered the
/// guest.
fn ring_full(vcpu: &Vcpu, ctx: &VcpuContext, harvests_seen: u64) {
    let mut ledger = common::sync::lock(&ctx.reset_lock);
    let mut ring = vcpu.ring();
    let Some(rs) = ring.as_mut() else { return };
    rs.full_exits += 1;
    let emptied_meanwhile = vcpu.foreign_harvests.load(Ordering::SeqCst) != harvests_seen;
    let h = rs.ring.harvest(&mut rs.pending, rs.verify);
    ctx.ring_pending.fetch_add(u64::from(h.harvested), Ordering::Relaxed);
    let mut expected = h.expected_reset();
    if h.overflow || h.stray {
        rs.lost = true;
    }
    // Entries are not deduplicated: a guest that keeps writing while its
    // epoch is stretched (a slow link) would grow this without bound. Past
    // one entry per guest page, the set is dropped and tracking marked
    // lost: the boundary then resyncs (bounded by the guest's size).
    let cap = pending_cap(ctx.mem.size());
    if rs.pending.len() > cap {
        ctx.ring_pending.fetch_sub(rs.pending.len() as u64, Ordering::Relaxed);
        rs.pending = Vec::new();
        rs.lost = true;
        rs.pending_overflows += 1;
    }
    if expected == 0 && ledger.unreset == 0 && emptied_meanwhile {
        // a pre-copy round harvested and reset this ring between the exit
        // and here: KVM is no longer soft-full, re-enter
        return;
    }
    if expected == 0 && ledger.unreset == 0 {
        // Soft-full with nothing to harvest and nothing harvested waiting for
        // a reset (hot-page retention defers resets): KVM's indexes ran ahead
        // of the ring's contents (an overflow overwrote entries). Pages are lost.
        rs.lost = true;
        rs.stalls += 1;
        expected = rs.ring.step_stalled();
    }
    ledger.unreset += u64::from(expected);
    // With a kick pending on this thread KVM cuts a reset short, and on this
    // host a cut-short reset can leave recycled pages writable (writes to
    // them were then never logged: seen as missed pages in the ring-full
    // tests). Block the kick signal for the reset; it is delivered after
    // (and immediate_exit still makes the next KVM_RUN return at once).
    let ok = {
        let _blocked = KickBlocked::new();
        ledger.reset(&ctx.vm)
    };
    if !ok {
        rs.lost = true;
        rs.ring.mark_desynchronised();
    }
}

fn read_fault(fd: &VcpuFd, mem: &GuestMem, cpu: u32, vector: u64) -> GuestFault {
    let rsp = fd.get_regs().map(|r| r.rsp).unwrap_or(0);
    let q = |i: u64| mem.read_u64(rsp + 8 * i).unwrap_or(u64::MAX);
    GuestFault { cpu, vector, error_code: q(1), rip: q(2) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(tid: i32) -> i32 {
        // SAFETY: sched_getscheduler only reads the policy of thread `tid`.
        unsafe { libc::sched_getscheduler(tid) }
    }

    /// What a resume does to a parked vCPU thread polling at idle priority
    /// without real-time pauses: moves it to its normal policy from the
    /// resuming thread, so it need not wait at idle priority for a core.
    #[test]
    fn a_lift_moves_another_idle_thread_to_the_normal_policy() {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            set_idle_policy(true);
            // SAFETY: gettid has no arguments and cannot fail.
            tid_tx.send(unsafe { libc::gettid() }).expect("send");
            done_rx.recv().expect("recv");
        });
        let tid = tid_rx.recv().expect("tid");
        assert_eq!(policy(tid), libc::SCHED_IDLE);
        // SAFETY: geteuid has no arguments and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        // (without privilege RLIMIT_NICE may forbid leaving SCHED_IDLE: then
        // the lift is refused, and not asked again)
        if lift(tid) {
            assert_eq!(policy(tid), libc::SCHED_OTHER);
        } else {
            assert!(!root, "lift refused as root");
            assert!(!lift(tid), "asked again after a refusal");
        }
        // 0 would name the caller: never passed on
        assert!(!lift(0));
        done_tx.send(()).expect("send");
        h.join().expect("join");
    }
}
