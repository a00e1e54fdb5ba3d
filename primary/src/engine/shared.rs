//! What the engine shares with the network side: the counters of
//! [`EngineShared`] and the [`Queued`] share of the byte budget.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::proto::Page;

/// A share of [`EngineShared::queued_bytes`]: page copies on their way to
/// the secondary, given back when the packet that holds them is dropped
/// (written to the link, or discarded with its session).
#[derive(Debug)]
pub struct Queued {
    bytes: u64,
    shared: Arc<EngineShared>,
}

impl Queued {
    pub(super) fn new(shared: &Arc<EngineShared>, pages: &[Page]) -> Queued {
        let bytes = common::proto::pages_bytes(pages);
        let now = shared.queued_bytes.fetch_add(bytes, Ordering::SeqCst) + bytes;
        shared.queued_bytes_max.fetch_max(now, Ordering::Relaxed);
        Queued { bytes, shared: Arc::clone(shared) }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.shared.queued_bytes.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// Counters shared between the engine and the network side. What the engine
/// must do comes as [`EngineCommand`]s, never from flags here.
///
/// [`EngineCommand`]: crate::mode::EngineCommand
#[derive(Debug, Default)]
pub struct EngineShared {
    /// The first epoch not yet acknowledged: every epoch below it was
    /// (0: none was). A session's start sets it to the engine's next epoch
    /// (the new secondary has nothing of ours to acknowledge before it).
    pub next_unacked: AtomicU64,
    pub stop: AtomicBool,
    /// Next epoch number.
    pub next_epoch: AtomicU64,
    pub tracking_lost: AtomicU64,
    /// Ring-full exits of the vCPUs so far (ring tracker).
    pub ring_full_exits: AtomicU64,
    /// Longest pause of the guest so far, us (epoch boundaries and sync rounds).
    pub pause_us_max: AtomicU64,
    /// Longest pause during the last live sync, us: from the boundary that
    /// started it (a lost collection) until the epoch that ended it was acked.
    pub sync_max_pause_us: AtomicU64,
    /// Data rate of the last live sync that completed, GiB/s (f64 bits).
    pub last_sync_gib_per_s: AtomicU64,
    /// Live syncs completed (initial syncs and resyncs).
    pub live_syncs: AtomicU64,
    /// Pre-copy rounds done (pages copied while the guest ran).
    pub precopy_rounds: AtomicU64,
    /// Pages copied by pre-copy rounds and shipped (not copied in a pause).
    pub precopied_pages: AtomicU64,
    /// Bytes of page copies on their way to the secondary ([`Queued`]).
    pub queued_bytes: AtomicU64,
    /// The most [`EngineShared::queued_bytes`] ever held.
    pub queued_bytes_max: AtomicU64,
    /// Times the guest was paused because the queued bytes passed
    /// [`EngineOptions::max_queued_bytes`].
    ///
    /// [`EngineOptions::max_queued_bytes`]: super::EngineOptions::max_queued_bytes
    pub budget_pauses: AtomicU64,
    /// Frames the router has written out (or dropped, with no TAP), in the
    /// order the engine produced them ([`super::unreleased`]).
    pub frames_released: Arc<AtomicU64>,
}

impl EngineShared {
    /// The highest acknowledged epoch.
    pub fn acked_epoch(&self) -> Option<u64> {
        self.next_unacked.load(Ordering::SeqCst).checked_sub(1)
    }

    /// Epochs made and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.next_epoch.load(Ordering::SeqCst).saturating_sub(self.next_unacked.load(Ordering::SeqCst))
    }

    /// Records that `epoch` (and every one before it) was acknowledged.
    /// Saturating: an ack of epoch u64::MAX (never reached: 2^64 epochs of
    /// a millisecond are 5e8 years, and the core refuses acks of epochs it
    /// did not send) must not wrap to "none acknowledged".
    pub fn record_ack(&self, epoch: u64) {
        self.next_unacked.fetch_max(epoch.saturating_add(1), Ordering::SeqCst);
    }
}
