//! Building the VM a takeover runs, from the committed replica, before
//! anything is decided: a planned switchover is accepted only once the
//! machine stands (vCPUs created, their state set, not run), and a replica
//! that cannot be built into a machine is found before it is needed.

use std::sync::Mutex;

use tokio::sync::oneshot;
use vmm::{Machine, TrackerKind};

use crate::replica::Replica;

/// Why the machine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("no committed epoch: nothing to run")]
    NothingCommitted,
    #[error("{0}")]
    Unusable(String),
    #[error("the committed state does not restore on this host: {0}")]
    Restore(#[from] vmm::MachineError),
    #[error("the restore failed (injected by a test hook)")]
    Injected,
}

/// Builds the machine of the replica's committed epoch, paused (its vCPUs
/// are created and set, never run), around the replica's memory (no copy):
/// the replica is not changed. Returns it with the epoch it is at.
/// `hook`: the test hook's fail point (`secondary.restore` for a takeover,
/// `secondary.trial_restore` for a trial).
pub fn build_paused(
    replica: &Mutex<Replica>,
    tracker: TrackerKind,
    hook: &str,
) -> Result<(Machine, u64), TakeoverError> {
    let (state, mem, epoch) = {
        let r = common::sync::lock(replica);
        let c = r.committed().ok_or(TakeoverError::NothingCommitted)?;
        if let Some(why) = r.unusable() {
            return Err(TakeoverError::Unusable(why));
        }
        (c.state.clone(), r.memory().clone(), c.epoch)
    };
    if common::crashpoint::fail_at(hook) {
        return Err(TakeoverError::Injected);
    }
    let machine = Machine::restore_with_memory(tracker, &state, mem)?;
    Ok((machine, epoch))
}

/// The primary asks to hand over after `epoch`; `reply` carries the
/// secondary's answer once it runs the guest (`Ok`) or cannot (`Err`, why),
/// which the receiver sends back on the session.
#[derive(Debug)]
pub struct TakeoverAsk {
    pub epoch: u64,
    pub reply: oneshot::Sender<Result<(), String>>,
}
