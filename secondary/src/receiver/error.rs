//! Why a connection ended with an error, and the error's short stable name.

use common::frame::{FrameError, PROTOCOL_VERSION};
use common::proto::{Kind, PairMismatch, ProtoError, RefuseCode};

use crate::replica::ReplicaError;

/// Why a connection ended with an error. Every variant leaves the replica at
/// its committed epoch (a partly staged epoch is dropped).
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error("peer is not authenticated: {0}")]
    Unauthenticated(String),
    #[error("peer offered protocol versions {min}..={max}; this build speaks {PROTOCOL_VERSION}")]
    VersionRefused { min: u16, max: u16 },
    #[error("frame: {0}")]
    Frame(FrameError),
    #[error("message: {0}")]
    Proto(#[from] ProtoError),
    #[error("replica refused: {0}")]
    Replica(#[from] ReplicaError),
    #[error("stale primary: generation {peer} < ours {ours}")]
    StaleGeneration { peer: u64, ours: u64 },
    #[error("unexpected {0:?} message {1}")]
    Unexpected(Kind, &'static str),
    #[error("connection closed {0}")]
    Closed(&'static str),
    #[error("no authenticated handshake within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("the new generation could not be stored: {0}")]
    StateDir(#[from] runtime::state_dir::StateDirError),
    #[error("a newer session from the primary took over this one")]
    Superseded,
    #[error("the primary's settings do not fit ours, refused: {0}")]
    PairMismatch(#[from] PairMismatch),
    #[error("the primary refused us: {reason}")]
    RefusedByPrimary { code: RefuseCode, reason: String },
    #[error(transparent)]
    Cpu(#[from] common::state::CpuMismatch),
    #[error("the replica does not restore on this host: {0}")]
    TrialRestore(String),
    #[error("{skipped} delta epochs skipped since the resync request, and no resync began")]
    ResyncNotStarted { skipped: u64 },
    #[error(transparent)]
    Beats(#[from] common::beats::BeatsError),
    #[error("the heartbeat task ended: {0}")]
    BeatsTask(String),
    #[error("{kind:?} of epoch {got} inside skipped epoch {skipping}")]
    SkippedEpoch { kind: Kind, got: u64, skipping: u64 },
}

impl ReceiverError {
    /// A short stable name of the error class (logs, tests, metrics).
    pub fn code(&self) -> &'static str {
        match self {
            ReceiverError::Unauthenticated(_) => "unauthenticated",
            ReceiverError::VersionRefused { .. } | ReceiverError::Frame(FrameError::WrongVersion { .. }) => "version",
            ReceiverError::Frame(FrameError::Truncated(_)) | ReceiverError::Closed(_) => "truncated",
            ReceiverError::Frame(FrameError::Corrupt) => "corrupt",
            ReceiverError::Frame(FrameError::Duplicate { .. }) => "duplicate",
            ReceiverError::Frame(FrameError::OutOfOrder { .. }) => "reordered",
            ReceiverError::Frame(FrameError::Oversize(_)) => "oversize",
            ReceiverError::Frame(FrameError::BadMagic(_)) => "bad-magic",
            ReceiverError::Frame(FrameError::InvalidKind(_)) | ReceiverError::Proto(_) => "malformed",
            ReceiverError::Frame(FrameError::Io(_)) => "io",
            ReceiverError::Replica(ReplicaError::ShapeMismatch { .. }) => "shape",
            ReceiverError::Replica(ReplicaError::EpochOrder { .. })
            | ReceiverError::Replica(ReplicaError::ChunkEpoch { .. })
            | ReceiverError::Replica(ReplicaError::StagingInProgress { .. })
            | ReceiverError::Replica(ReplicaError::NotStaging(_))
            | ReceiverError::Unexpected(..) => "protocol-order",
            ReceiverError::Replica(_) => "replica",
            ReceiverError::StaleGeneration { .. } => "stale-generation",
            ReceiverError::HandshakeTimeout(_) => "handshake-timeout",
            ReceiverError::StateDir(_) => "state-dir",
            ReceiverError::Superseded => "superseded",
            ReceiverError::PairMismatch(_) => "pair-settings",
            ReceiverError::RefusedByPrimary { code: RefuseCode::Pair, .. } => "pair-settings",
            ReceiverError::RefusedByPrimary { .. } => "refused",
            ReceiverError::Cpu(_) | ReceiverError::TrialRestore(_) => "cannot-restore",
            ReceiverError::ResyncNotStarted { .. } => "resync-not-started",
            ReceiverError::SkippedEpoch { .. } => "protocol-order",
            ReceiverError::Beats(_) | ReceiverError::BeatsTask(_) => "io",
        }
    }
}

/// Logs a replication session that ended in an error, at most once per
/// kind and peer every 10 s (a peer can repeat it at will); settings that
/// do not fit the primary's also go into the status (`pair_error`), where
/// an operator sees why the pair does not protect.
pub(crate) fn log_refusal(
    limiter: &runtime::lograte::LogLimiter,
    status: &runtime::status::NodeStatus,
    peer: std::net::SocketAddr,
    e: &ReceiverError,
) {
    let code = e.code();
    if code == "pair-settings" {
        status.update(|s| s.pair_error = Some(e.to_string()));
    }
    if let Some(skipped) = limiter.allow(&format!("{code} {}", peer.ip())) {
        if code == "pair-settings" {
            tracing::error!(%peer, skipped, error = %e, "a primary with settings that do not fit ours was refused: this pair does not protect until they agree");
        } else {
            tracing::warn!(%peer, code, skipped, error = %e, "replication session refused");
        }
    }
}
