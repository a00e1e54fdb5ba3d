//! The pause/resume protocol: requests, the park itself, waiting for
//! it, resume and stop.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::sched::{boost, lift, set_idle_policy, RT_RAISED};
use super::{RunState, Vcpu, VcpuContext, VcpuError, SPIN_PARK};

impl Vcpu {
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

    pub(super) fn park(&self, ctx: &VcpuContext) {
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
}
