//! Dirty tracking and page copies: collections, pre-copy rounds and the
//! copies of the pages they name.

use super::{Machine, MachineError, PRECOPY_HOT_FACTOR};
use crate::tracker::DirtySet;

impl Machine {
    /// Pages dirtied since the previous collection (the machine must be paused).
    /// The trackers are re-armed before this returns, so page contents must be
    /// read while still paused.
    pub fn collect(&mut self) -> Result<DirtySet, MachineError> {
        self.collect_inner(false)
    }

    /// Like [`Machine::collect`], but a ring reset (re-arming) is handed to a
    /// parked vCPU thread and runs while the caller copies the pages. The
    /// caller must call [`Machine::finish_reset`] before it treats the set as
    /// complete: a failed reset means tracking was lost for this collection.
    /// (The bitmap tracker re-arms inline, as in `collect`.)
    pub fn collect_overlapped(&mut self) -> Result<DirtySet, MachineError> {
        self.collect_inner(true)
    }

    /// Waits for a reset handed out by [`Machine::collect_overlapped`] (or
    /// does it here if no vCPU thread took it). Returns false if it failed:
    /// the collection it belongs to is incomplete (treat memory as all dirty).
    pub fn finish_reset(&mut self) -> bool {
        self.tracker.finish_reset(&self.vcpus, &self.ctx)
    }

    fn collect_inner(&mut self, overlap: bool) -> Result<DirtySet, MachineError> {
        if !self.paused {
            return Err(MachineError::NotPaused("collecting the dirty set"));
        }
        let retain = self.cfg.hot_pages;
        Ok(self.tracker.collect(&self.vm, &self.vcpus, &self.ctx, &self.mem, retain, overlap)?)
    }

    /// Copies the given pages, in order, into `out` (`gfns.len() * 4096`
    /// bytes). The machine must be paused: then nothing writes guest memory
    /// (device writes happen on vCPU threads, in their exits). Reuse `out`
    /// across epochs: faulting in a fresh buffer costs more than the copy.
    pub fn copy_pages_into(&self, gfns: &[u64], out: &mut [u8]) -> Result<(), MachineError> {
        if !self.paused {
            return Err(MachineError::NotPaused("copying pages"));
        }
        // SAFETY: paused means every vCPU thread is parked, and the VMM only
        // writes guest memory from those threads (device exits) or while
        // building/restoring the machine: no concurrent writer exists.
        unsafe { self.mem.copy_pages_quiescent(gfns, out)? };
        Ok(())
    }

    /// While the guest runs: harvests the dirty rings without re-arming
    /// anything and returns the ring entries pending since the last
    /// collection or pre-copy round (0 with the bitmap tracker, or while
    /// tracking is not whole). See [`Machine::precopy_round`].
    pub fn skim(&mut self) -> u64 {
        self.tracker.skim(&self.vcpus, &self.ctx)
    }

    /// Skims the rings (see [`Machine::skim`]) and says whether a pre-copy
    /// round is worth it now: at least `min` pages wait; with hot-page
    /// retention on, also at least [`crate::tracker::RETAIN_MAX_PAGES`] (a
    /// set that large makes retention re-arm at the boundary anyway) and at
    /// least [`PRECOPY_HOT_FACTOR`] times as many as it keeps writable. A
    /// round's reset write-protects the pages it took, hot ones included,
    /// and each costs the guest a write fault when written again (tens of
    /// microseconds on this host); rounds taking a hot set apart kept
    /// retention from holding it and cut the kv guest's protected throughput
    /// (measured: docs/benchmarks.md, "Figures once kept in comments").
    ///
    /// `again`: a round already ran in this epoch (the hot pages it took are
    /// write-protected already); then only `min` applies.
    pub fn precopy_due(&mut self, min: u64, again: bool) -> bool {
        let pending = self.skim();
        let mut need = min.max(1);
        if self.cfg.hot_pages && !again {
            need = need
                .max(crate::tracker::RETAIN_MAX_PAGES as u64)
                .max(PRECOPY_HOT_FACTOR * self.tracker.retained() as u64);
        }
        pending >= need
    }

    /// A pre-copy round while the guest runs: the pages written since the
    /// last collection or round, with their tracking re-armed; copy them
    /// with [`Machine::copy_pages_running`]. The next collection reports
    /// every page written after the re-arm, so an epoch's pages are this
    /// round's copies of the pages it does not report, plus the boundary's
    /// copies of those it does. None: nothing to pre-copy (bitmap tracker,
    /// tracking not whole, or a doubt found now: the next collection is then
    /// lost). Refused while paused (the boundary collects then).
    pub fn precopy_round(&mut self) -> Result<Option<Vec<u64>>, MachineError> {
        if self.paused || !self.started {
            return Err(MachineError::NotRunning("a pre-copy round"));
        }
        Ok(self.tracker.precopy_round(&self.vm, &self.vcpus, &self.ctx)?)
    }

    /// Pre-copy rounds so far.
    pub fn precopy_rounds(&self) -> u64 {
        self.tracker.precopy_rounds()
    }

    /// Copies pages, in order, into `out` (`gfns.len() * 4096` bytes) while
    /// the guest runs: only for pages returned by [`Machine::precopy_round`]
    /// (a page the guest writes during the copy comes out torn, and the next
    /// collection reports it, so its copy is replaced).
    pub fn copy_pages_running(&self, gfns: &[u64], out: &mut [u8]) -> Result<(), MachineError> {
        // SAFETY: the caller contract above: every page here had its
        // tracking re-armed before this copy, so a torn page is reported by
        // the next collection and its bytes from here are replaced.
        unsafe { self.mem.copy_pages_racy(gfns, out)? };
        Ok(())
    }
}
