//! What a machine is built from: its size, tracker and workload.

use serde::{Deserialize, Serialize};

pub use crate::abi::{NetAddr, WorkloadConfig};
use crate::tracker::TrackerKind;

/// Everything needed to build a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub tracker: TrackerKind,
    /// Ring only: scan the whole ring for stray entries after each harvest
    /// (catches desynchronisation early, costs a ring scan per collection).
    pub ring_verify: bool,
    /// Guest LAPIC timer frequency.
    pub timer_hz: u32,
    /// Hot-page retention (both trackers): defer re-arming tracking so pages
    /// already reported stay writable and are reported, and copied, at every
    /// collection until the next re-arm (see [`tracker::Retention`]).
    /// Collections then report a superset of the pages written.
    pub hot_pages: bool,
    /// With retention on: collections after which tracking is re-armed
    /// regardless of the set's size (default
    /// [`crate::tracker::RETAIN_MAX_EPOCHS`]).
    #[serde(default = "default_hot_page_epochs")]
    pub hot_page_epochs: u32,
    pub workload: WorkloadConfig,
    /// Bytes of guest RAM above the workload's area filled with non-zero
    /// data (distinct per page) before boot: a guest whose memory is full,
    /// for tests and benchmarks of real-size guests. The guest never reads
    /// or writes them.
    pub fill_bytes: u64,
    /// The network card, if the guest has one.
    pub net: Option<crate::net::NetConfig>,
}

fn default_hot_page_epochs() -> u32 {
    crate::tracker::RETAIN_MAX_EPOCHS
}

impl MachineConfig {
    pub fn new(mem_bytes: u64, vcpus: u32, tracker: TrackerKind, workload: WorkloadConfig) -> Self {
        MachineConfig {
            mem_bytes,
            vcpus,
            tracker,
            ring_verify: false,
            timer_hz: 250,
            hot_pages: false,
            hot_page_epochs: crate::tracker::RETAIN_MAX_EPOCHS,
            workload,
            fill_bytes: 0,
            net: None,
        }
    }
}
