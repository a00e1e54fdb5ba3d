//! The apply thread: verified epochs larger than [`APPLY_INLINE_BYTES`] are
//! written into the replica on one thread of their own, not on a tokio
//! worker (an apply of a large epoch takes as long as its pages take to
//! copy, and would stall every task scheduled on that worker); smaller ones
//! on the receiving task (the hand-off cost more than their apply). A panic
//! while applying is contained either way: the
//! replica marked itself torn before its first write (replica.rs), so it is
//! refused for failover until a full epoch has rewritten it; the process and
//! its other tasks carry on and the session asks the primary for that resync.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use common::proto::EpochEnd;
use tokio::sync::oneshot;

use crate::replica::{Replica, ReplicaError};

struct Job {
    replica: Arc<Mutex<Replica>>,
    end: Box<EpochEnd>,
    done: oneshot::Sender<Result<u64, ReplicaError>>,
}

fn thread() -> &'static mpsc::Sender<Job> {
    static TX: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("castor-apply".into())
            .spawn(move || {
                for job in rx {
                    let _ = job.done.send(apply_here(&job.replica, *job.end));
                }
            })
            .expect("spawning the apply thread");
        tx
    })
}

/// Staged page data up to which an epoch is applied on the receiving task
/// itself: a few hundred microseconds at most, less than the two thread
/// hand-offs the apply thread costs (most epochs of a networked guest are
/// ~100 KB of deltas).
pub const APPLY_INLINE_BYTES: u64 = 512 << 10;

/// Verifies and applies `end` on this thread, a panic contained.
fn apply_here(replica: &Arc<Mutex<Replica>>, end: EpochEnd) -> Result<u64, ReplicaError> {
    let epoch = end.epoch;
    common::crashpoint::contained::contain(|| common::sync::lock(replica).end_epoch(end)).unwrap_or_else(|panic| {
        tracing::error!(epoch, %panic, "applying an epoch panicked: the replica is unusable until a full resync");
        let torn = common::sync::lock(replica).unusable().is_some();
        if torn {
            Err(ReplicaError::Torn { epoch, why: format!("panic: {panic}") })
        } else {
            // it panicked before writing a page: the replica is still its
            // committed epoch
            Err(ReplicaError::ApplyPanicked { epoch, why: panic })
        }
    })
}

/// Verifies and applies `end` (the epoch staged in `replica`): a small epoch
/// here, a larger one on the apply thread; see [`Replica::end_epoch`].
pub async fn apply_epoch(replica: &Arc<Mutex<Replica>>, end: EpochEnd) -> Result<u64, ReplicaError> {
    if common::sync::lock(replica).staged_bytes() <= APPLY_INLINE_BYTES {
        return apply_here(replica, end);
    }
    let epoch = end.epoch;
    let (done, wait) = oneshot::channel();
    let job = Job { replica: replica.clone(), end: Box::new(end), done };
    if thread().send(job).is_err() {
        return Err(ReplicaError::ApplyPanicked { epoch, why: "the apply thread is gone".into() });
    }
    wait.await.unwrap_or_else(|_| Err(ReplicaError::ApplyPanicked { epoch, why: "the apply thread is gone".into() }))
}
