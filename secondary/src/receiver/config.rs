//! The receiver's settings.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::auth::Secret;
use common::proto::PairSettings;

use super::TrialRestore;

/// Receiver settings.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub secret: Secret,
    /// This node's name in the witness, sent in the HelloAck.
    pub node: String,
    /// What the primary must agree on (refused otherwise).
    pub pair: PairSettings,
    /// The CPU this host can give a guest: a primary whose guest needs
    /// more is refused in the handshake. `None`: not checked.
    pub host_cpu: Option<common::state::CpuModel>,
    /// A trial restore of the first epoch each session commits, before it
    /// is acknowledged (see [`TrialRestore`]). `None`: none.
    pub trial: Option<TrialRestore>,
    /// Where a planned handover is put to the node, which answers once it
    /// runs the guest or cannot. `None`: accepted at once (tests of the
    /// wire alone).
    pub takeover: Option<tokio::sync::mpsc::UnboundedSender<crate::takeover::TakeoverAsk>>,
    /// Where a raised generation is stored (`--state-dir`).
    pub state: Option<Arc<runtime::state_dir::StateDir>>,
    /// This node's generation: primaries with a lower one are refused.
    pub generation: Arc<AtomicU64>,
    /// Bytes read from authenticated data connections so far, sent in every
    /// heartbeat reply: the primary's sign that a slow link still moves
    /// (an epoch's ack can take seconds on it).
    pub data_received: Arc<AtomicU64>,
    /// When the primary was last heard: the heartbeat thread marks every
    /// heartbeat here as it reads it, so the node's silence check sees it
    /// even while the node's runtime is busy (the node marks other frames).
    pub(crate) liveness: Arc<std::sync::Mutex<crate::liveness::Liveness>>,
}

impl ReceiverConfig {
    pub fn new(secret: Secret, generation: u64, pair: PairSettings) -> Self {
        ReceiverConfig {
            secret,
            node: String::new(),
            pair,
            takeover: None,
            host_cpu: None,
            trial: None,
            state: None,
            generation: Arc::new(AtomicU64::new(generation)),
            data_received: Arc::default(),
            liveness: Arc::new(std::sync::Mutex::new(crate::liveness::Liveness::new())),
        }
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}
