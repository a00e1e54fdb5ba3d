//! What the dirty-tracking tests share (`dirty.rs`, `precopy.rs`).

use std::time::Duration;

use vmm::abi::PC_WRITES;
use vmm::{Machine, TrackerKind};

pub const MIB: u64 = 1 << 20;

/// The ring tracker at castor's default size.
pub const RING: TrackerKind = TrackerKind::Ring { entries: 65536 };

/// Waits (without pausing) until every vCPU has made `n` more page writes.
pub fn wait_writes(m: &Machine, n: u64) {
    let cpus = m.config().vcpus;
    let start: Vec<u64> = (0..cpus).map(|c| m.percpu(c, PC_WRITES)).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while (0..cpus).any(|c| m.percpu(c, PC_WRITES) < start[c as usize] + n) {
        assert!(std::time::Instant::now() < deadline, "guest stopped writing");
        std::thread::sleep(Duration::from_millis(2));
    }
}
