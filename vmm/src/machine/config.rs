//! What a machine is built from: its size, tracker and workload.

use serde::{Deserialize, Serialize};

use crate::abi::{Pattern, WorkloadKind};
use crate::tracker::TrackerKind;

/// Workload parameters handed to the guest in its boot info.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadConfig {
    pub kind: WorkloadKind,
    /// dirty: pages in each vCPU's working set; kwrite: pages per round.
    pub ws_pages: u64,
    /// dirty: distance between working-set pages, in pages (spreads the set over RAM).
    pub ws_stride: u64,
    pub pattern: Pattern,
    /// hot/cold: percentage of writes that go to the hot tenth of the set.
    pub hot_percent: u32,
    /// Page writes per second per vCPU, 0 = as fast as possible.
    pub rate: u64,
    pub seed: u64,
    /// Progress line period in ms, 0 = none.
    pub report_ms: u64,
    /// dirty: writes per vCPU before reporting done; kwrite: rounds. 0 = forever.
    pub max_writes: u64,
    /// kv: table slots (power of two).
    pub kv_slots: u64,
    /// kv: client dedup slots (power of two).
    pub kv_clients: u64,
    /// dirty: a console line after every page write (a guest flooding its
    /// console; the VMM bounds and counts what it keeps).
    pub console_flood: bool,
    /// net: the guest's address and the port it serves.
    #[serde(default)]
    pub net: NetAddr,
}

/// The networked guest's static IPv4 settings (boot info `net_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetAddr {
    pub ipv4: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<std::net::Ipv4Addr>,
    pub port: u16,
}

impl Default for NetAddr {
    /// Unset: the guest reports that it has no address and waits.
    fn default() -> Self {
        NetAddr { ipv4: std::net::Ipv4Addr::UNSPECIFIED, prefix: 24, gateway: None, port: crate::abi::NET_DEFAULT_PORT }
    }
}

impl WorkloadConfig {
    /// A `dirty` writer.
    pub fn dirty(ws_pages: u64, pattern: Pattern, rate: u64) -> Self {
        WorkloadConfig { kind: WorkloadKind::Dirty, ws_pages, pattern, rate, ..Self::idle() }
    }
    /// The networked guest (a RESP2 server behind the virtio-net card).
    pub fn net(net: NetAddr) -> Self {
        WorkloadConfig { kind: WorkloadKind::Net, net, ..Self::idle() }
    }
    /// The `kv` service.
    pub fn kv() -> Self {
        WorkloadConfig { kind: WorkloadKind::Kv, ..Self::idle() }
    }
    /// A guest that only takes timer interrupts.
    pub fn idle() -> Self {
        WorkloadConfig {
            kind: WorkloadKind::Idle,
            ws_pages: 0,
            ws_stride: 1,
            pattern: Pattern::Sequential,
            hot_percent: 90,
            rate: 0,
            seed: 1,
            report_ms: 1000,
            max_writes: 0,
            kv_slots: 1 << 16,
            kv_clients: 1 << 12,
            console_flood: false,
            net: NetAddr::default(),
        }
    }
}

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
    pub workload: WorkloadConfig,
    /// Bytes of guest RAM above the workload's area filled with non-zero
    /// data (distinct per page) before boot: a guest whose memory is full,
    /// for tests and benchmarks of real-size guests. The guest never reads
    /// or writes them.
    pub fill_bytes: u64,
    /// The network card, if the guest has one.
    pub net: Option<crate::net::NetConfig>,
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
            workload,
            fill_bytes: 0,
            net: None,
        }
    }
}
