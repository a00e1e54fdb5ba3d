//! Scheduling policy of vCPU threads around a pause: real-time pauses,
//! the idle polling policy and the lift of a resumed thread.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

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
pub(super) static RT_RAISED: AtomicBool = AtomicBool::new(false);

pub(super) fn rt_pause_on() -> bool {
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
pub(super) fn boost(tid: i32) -> bool {
    tid != 0 && set_fifo(tid)
}

/// False once the kernel refused a lift (an unprivileged process whose
/// RLIMIT_NICE does not allow leaving SCHED_IDLE): not asked again.
static LIFT_OK: AtomicBool = AtomicBool::new(true);

/// Moves parked vCPU thread `tid` from its idle polling policy to
/// SCHED_OTHER (a resume it is slow to leave); false if not done.
/// Best effort: a refusal only costs the wait for a core.
pub(super) fn lift(tid: i32) -> bool {
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
pub(super) fn set_work_policy() {
    if !set_fifo(0) {
        set_idle_policy(false);
    }
}

/// Switches the calling thread to SCHED_IDLE (true) or back to SCHED_OTHER.
/// Best effort: a refusal only costs performance.
pub(super) fn set_idle_policy(idle: bool) {
    let policy = if idle { libc::SCHED_IDLE } else { libc::SCHED_OTHER };
    if !set_policy(0, policy, 0) {
        tracing::debug!(error = %std::io::Error::last_os_error(), idle, "sched_setscheduler refused");
    }
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
