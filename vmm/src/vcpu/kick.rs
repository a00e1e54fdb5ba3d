//! The kick out of `KVM_RUN`: `immediate_exit`, the kick signal and its
//! handler, and blocking the signal around a ring reset.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Once;

use kvm_bindings::kvm_run;

use super::sched::{boost, rt_pause_on};
use super::{RunState, Vcpu, VcpuError};

/// The signal that kicks vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

pub(super) fn register_kick_handler() -> Result<(), VcpuError> {
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
pub(super) struct ImmediateExit(*mut u8);

// SAFETY: the pointer targets the kvm_run mapping of a VcpuFd that lives inside
// the same `VcpuShared` (in `core`), so the mapping outlives every use; the byte
// is only accessed atomically.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above; concurrent access is through AtomicU8.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    pub(super) fn new(run: &mut kvm_run) -> Self {
        ImmediateExit(std::ptr::addr_of_mut!(run.immediate_exit))
    }
    pub(super) fn set(&self, v: u8) {
        // SAFETY: see the Send/Sync justification: the byte is valid for the
        // lifetime of self and only accessed atomically.
        unsafe { AtomicU8::from_ptr(self.0) }.store(v, Ordering::SeqCst);
    }
}

impl Vcpu {
    pub(super) fn kick(&self) -> Result<(), VcpuError> {
        self.immediate_exit.set(1);
        // Under the status lock the thread cannot park meanwhile (parking
        // lowers it again). The signal goes first: a thread raised before
        // its signal was pending took the core from the kicker, which then
        // could not send it, and ran guest code at a real-time policy until
        // the guest exited on its own (a guest writing memory with no I/O:
        // stops of tens to hundreds of ms, seen in the pre-copy service
        // test). Only a running thread is raised: one still in its park
        // (resumed, not yet out) must not poll at a real-time policy.
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
}

/// Blocks the kick signal on the calling thread until dropped.
pub(super) struct KickBlocked(libc::sigset_t);

impl KickBlocked {
    pub(super) fn new() -> Self {
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
