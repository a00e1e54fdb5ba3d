//! What the scheduling-policy tests share (`sched.rs`, `sched_default.rs`:
//! one binary each, since real-time pauses are read once per process).

use std::time::Duration;

use vmm::abi::Pattern;
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};

/// The scheduling policy of thread `tid`.
pub fn policy(tid: i32) -> i32 {
    // SAFETY: sched_getscheduler only reads the policy of thread `tid` (0:
    // the calling thread); an id that is gone gives -1, which fails the test.
    unsafe { libc::sched_getscheduler(tid) }
}

/// A started 2-vCPU machine writing memory, and its vCPU threads' ids.
pub fn running_writer() -> (Machine, Vec<i32>) {
    let mut w = WorkloadConfig::dirty(512, Pattern::Random, 0);
    w.report_ms = 0;
    let cfg = MachineConfig::new(256 << 20, 2, TrackerKind::Ring { entries: 4096 }, w);
    let mut m = Machine::new(cfg).expect("machine");
    m.start().expect("start");
    std::thread::sleep(Duration::from_millis(50));
    let tids = m.vcpu_thread_ids();
    assert_eq!(tids.len(), 2, "both vCPU threads run");
    (m, tids)
}

/// The rest of pause `i` as the epoch engine does it: collect, save (the
/// saves the test asked of the parked threads are picked up), resume.
pub fn finish_pause(m: &mut Machine, i: usize) {
    let d = m.collect().expect("collect");
    let _ = m.save().expect("save");
    assert!(!d.tracking_lost || i == 0, "pause {i}: tracking lost");
    m.resume().expect("resume");
}
