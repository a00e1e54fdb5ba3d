//! When the next boundary may be taken: the byte budget, the wait for the
//! link, and the epochs of an unprotected engine.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vmm::abi::PAGE_SIZE;

use super::{Engine, UnprotectedPolicy};

impl Engine {
    /// Page copies held for the link plus the pages waiting in the dirty
    /// rings and pre-copy rounds (copies the next boundary makes), bytes:
    /// what the budget bounds.
    ///
    /// While the guest runs the rings are skimmed (entries not yet
    /// harvested count too; the boundary then has less to harvest). With the
    /// bitmap tracker only queued copies and hot pages count: it has no
    /// cheap count of the pages written.
    /// `skim`: harvest the rings for an exact count (while waiting for the
    /// link); without it, the entries harvested so far (the epoch loop's
    /// check every millisecond, where a skim each time slowed the guest).
    fn held_bytes(&mut self, skim: bool) -> (u64, u64) {
        let queued = self.shared.queued_bytes.load(Ordering::SeqCst);
        let in_rings =
            if skim && !self.machine.is_paused() { self.machine.skim() } else { self.machine.ring_pending() };
        // hot pages are copied at every boundary (shipped only if changed)
        let pages = in_rings + self.pre.pages() + self.machine.hot_page_count() as u64;
        let to_copy = pages * PAGE_SIZE;
        (queued, to_copy)
    }

    /// Whether the held bytes passed the budget.
    pub(super) fn over_budget(&mut self) -> bool {
        let (queued, to_copy) = self.held_bytes(false);
        queued + to_copy > self.opts.max_queued_bytes
    }

    /// Waits while epochs in flight are at their bound (5 s at most: then
    /// the epoch is stretched), or while copies are queued for the link and
    /// they and the pages the boundary would copy pass the byte budget (as
    /// long as that lasts, with the guest paused: it then writes nothing
    /// more to copy). Once nothing is queued the boundary is taken whatever
    /// its size (an epoch ends early once it passes the budget, so that is
    /// about the budget).
    pub(super) fn wait_for_the_link(&mut self) -> Result<(), vmm::MachineError> {
        let waited = Instant::now();
        let mut paused_here = false;
        loop {
            let (queued, to_copy) = self.held_bytes(true);
            let at_bound = self.in_flight() >= self.opts.max_in_flight;
            // past the budget with copies queued: no epoch until the link
            // drains it
            let over_queue = queued > 0 && queued + to_copy > self.opts.max_queued_bytes;
            // waiting for acks with nothing left to send: the guest would
            // write on, so past the budget it is paused here too (found by
            // the suite's slow-budget: a 4 s wait let the guest dirty 128
            // MiB over a 32 MiB budget); the 5 s stretch below still ends
            // this wait
            // (not when the next boundary copies all memory anyway: a lost
            // collection; pausing would only stall the guest)
            let copies_all = to_copy >= self.machine.memory().size();
            let over = over_queue || (at_bound && !copies_all && queued + to_copy > self.opts.max_queued_bytes);
            if !(at_bound || over_queue) || !self.state.protecting() || self.shared.stop.load(Ordering::SeqCst) {
                break;
            }
            if over && !self.machine.is_paused() {
                self.machine.pause()?;
                paused_here = true;
                self.shared.budget_pauses.fetch_add(1, Ordering::Relaxed);
                if self.budget_said.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    self.budget_said = Some(Instant::now());
                    tracing::warn!(
                        queued_mib = queued >> 20,
                        to_copy_mib = to_copy >> 20,
                        budget_mib = self.opts.max_queued_bytes >> 20,
                        "the link is behind by more than the byte budget: guest paused until it drains"
                    );
                }
            }
            std::thread::sleep(Duration::from_micros(500));
            self.poll_commands();
            if !over_queue && waited.elapsed() > Duration::from_secs(5) {
                tracing::warn!(in_flight = self.in_flight(), "secondary not acknowledging; epochs stretched");
                break;
            }
        }
        if paused_here && self.machine.is_paused() && self.state.protecting() {
            self.machine.resume()?;
        }
        Ok(())
    }

    fn in_flight(&self) -> u64 {
        self.shared.in_flight()
    }

    pub(super) fn unprotected_epoch(&mut self) -> Result<(), vmm::MachineError> {
        self.bases.clear();
        self.pre.clear();
        let policy = if self.state.keeps_guest_paused() { UnprotectedPolicy::Pause } else { self.opts.unprotected };
        match policy {
            UnprotectedPolicy::Pause => {
                if !self.machine.is_paused() {
                    self.machine.pause()?;
                    tracing::warn!(
                        "unprotected: guest paused until a secondary is in sync (or the old one is known dead)"
                    );
                }
            }
            UnprotectedPolicy::Continue => {
                // still collect, so tracking state stays bounded while unprotected
                self.machine.pause()?;
                let d = self.machine.collect()?;
                self.shared.tracking_lost.fetch_add(u64::from(d.tracking_lost), Ordering::Relaxed);
                self.machine.resume()?;
            }
        }
        self.held_since = None;
        let mut out = std::mem::take(&mut self.held);
        out.extend(self.machine.devices().drain());
        self.release_now(out);
        self.shared.next_epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}
