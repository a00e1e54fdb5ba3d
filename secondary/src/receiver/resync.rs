//! A session that asked for a resync, and the delta epochs it skips.

use common::proto::Kind;

use super::ReceiverError;

/// Delta epochs a session skips after it asked for a resync before it
/// gives up on the primary (`ResyncNotStarted`). The primary sends until it
/// reads the request; it stretches its epochs once `--max-in-flight`
/// (default 4) are unacknowledged, so far fewer arrive in practice.
pub const MAX_SKIPPED_EPOCHS: u64 = 64;

/// A session that asked for a resync: the delta epochs the primary sent
/// before it read the request are skipped (read, checked to be whole,
/// neither applied nor acknowledged) until the resync (a live sync or a
/// full epoch) begins.
#[derive(Debug, Default)]
pub(super) struct Resyncing {
    /// The delta epoch being skipped, between its begin and its end.
    pub(super) skipping: Option<u64>,
    /// Delta epochs skipped so far.
    pub(super) skipped: u64,
}

impl Resyncing {
    /// Checks that a message of epoch `got` belongs to the epoch skipped.
    pub(super) fn inside(&self, kind: Kind, got: u64) -> Result<(), ReceiverError> {
        match self.skipping {
            Some(s) if s == got => Ok(()),
            Some(s) => Err(ReceiverError::SkippedEpoch { kind, got, skipping: s }),
            None => Err(ReceiverError::Unexpected(kind, "outside an epoch")),
        }
    }
}
