//! Real-time pauses (vmm/src/vcpu/sched.rs, `CASTOR_RT_PAUSE=1`): the vCPU threads a
//! pause waits for run at SCHED_FIFO only while they do what it waits for. A
//! thread left at a real-time policy while the guest runs (or while it polls
//! in its park) would starve everything else on its core, so every pause and
//! resume here, back to back or spaced, must leave the vCPU threads at their
//! normal policy while the guest runs and never at SCHED_FIFO while parked.
//! (This test binary holds this one test: the variable is set before any
//! vCPU thread reads it.)

mod sched_support;

use std::time::Duration;

use sched_support::{finish_pause, policy, running_writer};

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn pauses_leave_no_thread_at_a_real_time_policy() {
    std::env::set_var("CASTOR_RT_PAUSE", "1");
    let (mut m, tids) = running_writer();
    for i in 0..300 {
        if i % 2 == 0 {
            // the epoch engine's pause: each thread saves as it parks
            m.pause_and_save().expect("pause");
        } else {
            m.pause().expect("pause");
            // the parked threads save their state (at the work's policy)
            m.begin_save();
        }
        if i % 10 == 0 {
            // parked (polling, or asleep): never at a real-time policy
            std::thread::sleep(Duration::from_millis(if i % 20 == 0 { 1 } else { 6 }));
            for &t in &tids {
                let p = policy(t);
                assert_ne!(p, libc::SCHED_FIFO, "pause {i}: parked vCPU thread {t} at SCHED_FIFO");
                assert!(p >= 0, "thread {t} gone");
            }
        }
        // the threads that saved did so at SCHED_FIFO (as root); none of
        // them is still there once the work is done
        finish_pause(&mut m, i);
        if i % 3 == 0 {
            // back to back: the next pause may come before a resumed thread
            // has left its park
            continue;
        }
        std::thread::sleep(Duration::from_millis(if i % 2 == 0 { 1 } else { 3 }));
        for &t in &tids {
            assert_eq!(policy(t), libc::SCHED_OTHER, "pause {i}: running vCPU thread {t} not at SCHED_OTHER");
        }
    }
    if is_root() {
        assert!(vmm::vcpu::realtime_pauses_active(), "as root, no policy change may be refused");
    }
    // a guest that runs on: its threads stay normal
    std::thread::sleep(Duration::from_millis(30));
    for &t in &tids {
        assert_eq!(policy(t), libc::SCHED_OTHER, "vCPU thread {t} after the last resume");
    }
}
