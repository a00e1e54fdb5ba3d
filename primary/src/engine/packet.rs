//! What the engine hands to the network side: [`Packet`]s, the
//! [`EpochPacket`] and the [`EngineError`] that stopped it.

use std::time::Instant;

use common::proto::Page;
use common::state::{MachineState, Output};

use super::{Phases, Queued};

/// Why the engine stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("guest exception {vector} at {rip:#x} on cpu {cpu}")]
    GuestFault { vector: u64, rip: u64, cpu: u32 },
    #[error("vCPU {cpu} stopped: {why}")]
    VcpuExited { cpu: u32, why: String },
    #[error("machine: {0}")]
    Machine(String),
}

impl From<vmm::MachineError> for EngineError {
    fn from(e: vmm::MachineError) -> Self {
        EngineError::Machine(e.to_string())
    }
}

/// One epoch, ready to ship.
#[derive(Debug)]
pub struct EpochPacket {
    pub epoch: u64,
    pub full: bool,
    pub pages: Vec<Page>,
    pub state: MachineState,
    /// Output produced up to this boundary: released when `epoch` is acked.
    pub outputs: Vec<Output>,
    /// When the oldest of `outputs` was sent by the guest.
    pub outputs_since: Option<Instant>,
    pub digest: Option<u64>,
    pub phases: Phases,
    /// The last epoch before a handover: the guest stays paused after it.
    pub last: bool,
    /// Its pages' share of the queued bytes (given back when dropped).
    pub queued: Queued,
}

/// What the engine hands to the network side.
#[derive(Debug)]
pub enum Packet {
    /// Pages of a live (re)sync, copied while the guest runs; `first`: the
    /// first batch of a sync (the secondary opens a fresh staging area).
    Sync {
        round: u32,
        first: bool,
        pages: Vec<Page>,
        queued: Queued,
    },
    Epoch(Box<EpochPacket>),
    /// Output of an unprotected epoch: release at once.
    Release(Vec<Output>),
    /// The guest failed; the engine stopped.
    Failed(EngineError),
}
