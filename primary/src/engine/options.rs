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
    /// With output-driven epochs: end the epoch at once when the guest has
    /// handled every frame its network card gave it (nothing waits in the
    /// card's backlog and the driver has posted every receive buffer again)
    /// and it has output held: its clients wait for this epoch's ack, and
    /// nothing it was sent awaits an answer. No effect without a card.
    pub end_when_settled: bool,
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

/// What the engine sees of a running output-driven epoch at one look.
#[derive(Debug, Clone, Copy)]
pub struct OutputSeen {
    /// Since the guest resumed (the epoch's start).
    pub age: Duration,
    /// Since the guest's output last grew.
    pub still_for: Duration,
    /// The guest sent output this epoch (held until its ack).
    pub has_output: bool,
    /// The guest handled every frame its card gave it (only looked at with
    /// `end_when_settled`).
    pub settled: bool,
}

impl EngineOptions {
    /// Whether an output-driven epoch (protected, `min` its minimum age)
    /// ends now. Only an epoch with output ends here (output is what waits
    /// for the ack); then once it is `min` old, or once the output has been
    /// still for `output_quiet`, or at once when the guest has handled
    /// everything it was sent (`end_when_settled`).
    pub fn output_epoch_ends(&self, min: Duration, s: OutputSeen) -> bool {
        let quiet = self.output_quiet.is_some_and(|q| s.still_for >= q);
        let settled = self.end_when_settled && s.settled;
        s.has_output && (s.age >= min || quiet || settled)
    }
}

/// Outputs after which an epoch ends whatever its length: the epoch's state
/// carries its undrained output, so this bounds the state of every epoch the
/// timer or the output rule would have made longer (a stretched epoch, one
/// waiting for acks, is bounded by the state limit and travels in chunks).
pub const MAX_EPOCH_OUTPUTS: usize = 16384;

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(quiet_us: Option<u64>, settled: bool) -> EngineOptions {
        EngineOptions {
            epoch: Duration::from_millis(10),
            max_epoch_pages: 16384,
            max_in_flight: 4,
            digest: false,
            unprotected: UnprotectedPolicy::Continue,
            tracking_off: false,
            min_epoch: Some(Duration::from_millis(1)),
            output_quiet: quiet_us.map(Duration::from_micros),
            end_when_settled: settled,
            precopy_min_pages: None,
            max_queued_bytes: 64 << 20,
        }
    }

    fn seen(age_us: u64, still_us: u64, has_output: bool, settled: bool) -> OutputSeen {
        OutputSeen {
            age: Duration::from_micros(age_us),
            still_for: Duration::from_micros(still_us),
            has_output,
            settled,
        }
    }

    #[test]
    fn an_output_driven_epoch_ends_on_age_quiet_or_a_settled_guest_and_only_with_output() {
        let min = Duration::from_millis(1);
        let o = opts(Some(200), true);
        // young, output still growing, guest busy: runs on
        assert!(!o.output_epoch_ends(min, seen(100, 10, true, false)));
        // old enough
        assert!(o.output_epoch_ends(min, seen(1000, 10, true, false)));
        // quiet long enough
        assert!(o.output_epoch_ends(min, seen(300, 200, true, false)));
        // the guest handled everything: at once, however young and however recent the output
        assert!(o.output_epoch_ends(min, seen(10, 0, true, true)));
        // never without output (nothing waits for the ack)
        for s in [seen(5000, 5000, false, true), seen(10, 0, false, true)] {
            assert!(!o.output_epoch_ends(min, s), "{s:?}");
        }
        // the settled rule off: a settled guest waits for quiet or age
        let off = opts(Some(200), false);
        assert!(!off.output_epoch_ends(min, seen(10, 0, true, true)));
        assert!(off.output_epoch_ends(min, seen(10, 200, true, true)));
        // no quiet rule: age or settled only
        let noquiet = opts(None, true);
        assert!(!noquiet.output_epoch_ends(min, seen(300, 5000, true, false)));
        assert!(noquiet.output_epoch_ends(min, seen(300, 0, true, true)));
    }
}
