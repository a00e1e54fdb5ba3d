//! Pauses without real-time pauses (the default): a parked vCPU thread
//! polls at SCHED_IDLE, a resume moves it to SCHED_OTHER from the resuming
//! thread (an idle-policy thread waited for a core behind any load), and a
//! running vCPU thread is always at SCHED_OTHER. (This test binary holds
//! this one test: the variable is cleared before any vCPU thread reads it.)

mod sched_support;

use std::time::Duration;

use sched_support::{finish_pause, policy, running_writer};

#[test]
fn parked_threads_poll_at_idle_priority_and_run_at_the_normal_policy() {
    std::env::remove_var("CASTOR_RT_PAUSE");
    let (mut m, tids) = running_writer();
    let mut idle_seen = 0;
    for i in 0..200 {
        // the epoch engine's pause (each thread saves as it parks) on odd
        // pauses, a save asked for once parked on even ones
        if i % 2 == 1 {
            m.pause_and_save().expect("pause");
        } else {
            m.pause().expect("pause");
        }
        if i % 5 == 0 {
            // polling in the park (for up to 4 ms): at idle priority, never
            // at a real-time one; asleep after that: normal
            std::thread::sleep(Duration::from_micros(500));
            for &t in &tids {
                let p = policy(t);
                assert!(p == libc::SCHED_IDLE || p == libc::SCHED_OTHER, "pause {i}: parked thread {t} at policy {p}");
                idle_seen += usize::from(p == libc::SCHED_IDLE);
            }
        }
        if i % 2 == 0 {
            m.begin_save();
        }
        finish_pause(&mut m, i);
        if i % 3 == 0 {
            // back to back
            continue;
        }
        for &t in &tids {
            assert_eq!(policy(t), libc::SCHED_OTHER, "pause {i}: running vCPU thread {t} not at SCHED_OTHER");
        }
    }
    assert!(!vmm::vcpu::realtime_pauses_active());
    // the polling really is at idle priority (a parked thread samples as
    // asleep only once it polled 4 ms without a resume)
    assert!(idle_seen > 0, "no parked thread was ever seen polling at SCHED_IDLE");
    std::thread::sleep(Duration::from_millis(30));
    for &t in &tids {
        assert_eq!(policy(t), libc::SCHED_OTHER, "vCPU thread {t} after the last resume");
    }
}
