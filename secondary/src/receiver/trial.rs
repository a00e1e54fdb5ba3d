//! The trial restore of a session's first epoch, and the refusal of
//! primaries after one failed.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::replica::Replica;

/// A trial restore: the machine of the replica's committed epoch is built
/// (vCPUs created and set, never run) and dropped, before the first epoch
/// of a session is acknowledged, so a replica that could not be taken over
/// is found when the pair forms. After a failure primaries are refused for
/// [`TRIAL_RETRY`] (they would sync again only to fail again).
#[derive(Debug, Clone)]
pub struct TrialRestore {
    pub tracker: vmm::TrackerKind,
    /// Where the result is shown (`restore_check`).
    pub status: Arc<runtime::status::NodeStatus>,
    /// The last failure and when.
    pub failed: Arc<Mutex<Option<(Instant, String)>>>,
}

/// How long a failed trial restore keeps primaries away.
pub const TRIAL_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

impl TrialRestore {
    pub fn new(tracker: vmm::TrackerKind, status: Arc<runtime::status::NodeStatus>) -> Self {
        TrialRestore { tracker, status, failed: Arc::default() }
    }

    /// Why primaries are refused now, if they are.
    pub(super) fn refusal(&self) -> Option<String> {
        let f = common::sync::lock(&self.failed);
        f.as_ref().filter(|(at, _)| at.elapsed() < TRIAL_RETRY).map(|(_, why)| why.clone())
    }

    /// Builds and drops the machine of the committed epoch.
    pub(super) async fn run(&self, replica: &Arc<Mutex<Replica>>) -> Result<(), String> {
        let (replica, tracker) = (replica.clone(), self.tracker);
        let t = Instant::now();
        let r = tokio::task::spawn_blocking(move || {
            crate::takeover::build_paused(&replica, tracker, "secondary.trial_restore").map(|(_, e)| e)
        })
        .await
        .map_err(|e| format!("the trial restore did not finish: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
        let ms = t.elapsed().as_secs_f64() * 1e3;
        match &r {
            Ok(epoch) => {
                tracing::info!(epoch, ms, "trial restore: the replica builds into a machine on this host");
                *common::sync::lock(&self.failed) = None;
                self.status.update(|s| s.restore_check = Some(format!("ok at epoch {epoch} ({ms:.0} ms)")));
            }
            Err(why) => {
                tracing::error!(%why, "trial restore failed: this node could not take over; refusing primaries for {TRIAL_RETRY:?}");
                *common::sync::lock(&self.failed) = Some((Instant::now(), why.clone()));
                self.status.update(|s| s.restore_check = Some(format!("failed: {why}")));
            }
        }
        r.map(|_| ())
    }
}
