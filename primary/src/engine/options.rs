//! Engine settings: the unprotected policy, [`EngineOptions`] and the bound
//! on an epoch's outputs.

use std::time::Duration;

/// What the primary does while no secondary protects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnprotectedPolicy {
    /// Keep running and release output at once.
    Continue,
    /// Keep the guest paused until a secondary is in sync.
    Pause,
}

/// Engine settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    pub epoch: Duration,
    /// End an epoch early once this many pages are dirty (checked every ms).
    pub max_epoch_pages: u64,
    /// Epochs sent but not acknowledged before the engine stretches epochs.
    pub max_in_flight: u64,
    /// Send a digest of all guest memory with each epoch (verification mode).
    pub digest: bool,
    pub unprotected: UnprotectedPolicy,
    /// Baseline mode for benchmarks: while unprotected, never pause or
    /// collect; just pass device output on every millisecond.
    pub tracking_off: bool,
    /// Output-driven epochs: while protected, once the guest has sent
    /// output (held until its epoch is acknowledged), end the epoch as soon
    /// as it is this old instead of at `epoch`. `None`: timer only.
    pub min_epoch: Option<Duration>,
    /// With output-driven epochs: end the epoch sooner, once the guest's
    /// output has stopped growing for this long (it answered what it had
    /// and waits; its clients wait for this epoch's ack). `None`: off.
    pub output_quiet: Option<Duration>,
    /// Pre-copy: while an epoch runs, once this many pages wait in the dirty
    /// rings, re-arm their tracking and copy them while the guest runs, so
    /// the boundary's pause copies only what was written since (plus
    /// hot pages kept writable). `None`: every page is copied in the pause.
    pub precopy_min_pages: Option<u64>,
    /// Bytes of page copies the engine may hold on their way to the
    /// secondary (epochs and sync batches made and not yet written to the
    /// link). Past it the guest is paused until the link drains (epochs are
    /// not stretched past it): a slow but moving link cannot drive the
    /// primary out of memory.
    pub max_queued_bytes: u64,
}

/// Outputs after which an epoch ends whatever its length: the epoch's state
/// carries its undrained output, so this bounds the state of every epoch the
/// timer or the output rule would have made longer (a stretched epoch, one
/// waiting for acks, is bounded by the state limit and travels in chunks).
pub const MAX_EPOCH_OUTPUTS: usize = 16384;
