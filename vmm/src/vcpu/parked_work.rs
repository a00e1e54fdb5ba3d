//! Work a parked vCPU thread does for the owner: its state save and the
//! ring reset, requested by the owner and taken at the park.

use std::sync::atomic::Ordering;
use std::sync::MutexGuard;
use std::time::Instant;

use super::kick::KickBlocked;
use super::sched::{set_idle_policy, set_work_policy};
use super::{Vcpu, VcpuContext, SPIN_PARK};
use crate::state::{self, OwnState, SaveContext, StateError, VcpuState};

/// Index of the parked thread's state save in [`Vcpu`]'s work marks.
const SAVE: usize = 0;
/// Index of the parked thread's ring reset there.
const RESET: usize = 1;

/// Work the parked vCPU thread does for the owner (its state save, a ring
/// reset), so it runs in parallel with the owner's page copy.
#[derive(Debug, Default)]
pub(super) struct ParkedWork {
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
impl Vcpu {
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
    /// every vCPU thread of the machine is parked and the owner has passed
    /// the save point (devices quiesced, chips saved). False if that did not
    /// happen within [`SPIN_PARK`] or the pause ended or moved on (the owner
    /// then finishes the save).
    fn await_all_parked(&self, ctx: &VcpuContext, gen: u64) -> bool {
        let until = Instant::now() + SPIN_PARK;
        loop {
            if ctx.parked.load(Ordering::SeqCst) >= ctx.vcpus && ctx.save_point.load(Ordering::SeqCst) {
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
    pub(super) fn serve_parked_work(&self, ctx: &VcpuContext, at_work_policy: bool) {
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
                    // the rest only at the save point: a vCPU still running
                    // may send this one an IPI or an NMI, a device or a chip
                    // an interrupt
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
}
