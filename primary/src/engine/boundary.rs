//! The epoch boundary: pause, collect, copy, save, resume, and the packet
//! it makes (or the resync that replaces it).

use std::sync::atomic::Ordering;
use std::time::Instant;

use common::proto::Page;
use vmm::abi::PAGE_SIZE;

use super::live_sync::ScanProgress;
use super::precopy::merge_pages;
use super::{us, Engine, EngineEvent, EpochPacket, Phases, Queued};
use crate::sender::page_from;

impl Engine {
    /// One epoch boundary; `resume`: let the guest run on after it (not
    /// after the last epoch before a handover).
    pub(super) fn boundary(&mut self, resume: bool) -> Result<Option<EpochPacket>, vmm::MachineError> {
        let epoch = self.shared.next_epoch.load(Ordering::SeqCst);
        common::crashpoint::hit("primary.before_pause");
        let t0 = Instant::now();
        // the vCPU threads save their state as they park, while this thread
        // harvests and copies (the rings live apart from the vCPU cores the
        // saves hold), and a large ring reset (re-arming) runs on a parked
        // vCPU thread
        let stop = self.machine.pause_and_save()?;
        let t1 = Instant::now();
        let d = self.machine.collect_overlapped()?;
        self.shared.ring_full_exits.store(self.machine.ring_full_exits(), Ordering::Relaxed);
        common::crashpoint::hit("primary.after_collect");
        let t2 = Instant::now();
        // (the test hook acts once per epoch number: a resync keeps it)
        let forced_lost = self.force_lost_every.is_some_and(|n| epoch.is_multiple_of(n))
            && self.last_forced.replace(epoch) != Some(epoch);
        let lost = d.tracking_lost || forced_lost;
        if lost {
            self.shared.tracking_lost.fetch_add(1, Ordering::Relaxed);
        }
        let full_due = self.state.full_due();
        if lost && resume && !full_due {
            tracing::warn!(epoch, "dirty tracking lost: this epoch is not sent; a live resync follows");
            return self.resync_instead(t0).map(|()| None);
        }
        let mut full = lost || full_due;
        if lost {
            tracing::warn!(epoch, "dirty tracking lost: this epoch is sent as a full-memory epoch");
        }
        let mut pages = if full {
            self.all_nonzero_pages()
        } else {
            // one pooled buffer for the epoch, pages are slices of it: no
            // per-page allocation, and no page faults on a fresh buffer
            let ps = PAGE_SIZE as usize;
            let mut buf = self.pool.take(d.gfns.len() * ps);
            self.machine.copy_pages_into(&d.gfns, &mut buf.0)?;
            let buf = bytes::Bytes::from_owner(buf);
            d.gfns.iter().enumerate().map(|(i, &gfn)| Page::full(gfn, buf.slice(i * ps..(i + 1) * ps))).collect()
        };
        // a failed re-arm means this collection may be incomplete: never
        // ship it as a delta
        if !self.machine.finish_reset() && !full {
            self.shared.tracking_lost.fetch_add(1, Ordering::Relaxed);
            if resume {
                tracing::warn!(epoch, "dirty ring reset failed: this epoch is not sent; a live resync follows");
                drop(pages);
                return self.resync_instead(t0).map(|()| None);
            }
            tracing::warn!(epoch, "dirty ring reset failed: this epoch is sent as a full-memory epoch");
            full = true;
            pages = self.all_nonzero_pages();
        }
        let t3 = Instant::now();
        let mut state = self.machine.save()?;
        let digest = self.opts.digest.then(|| self.machine.memory().digest());
        common::crashpoint::hit("primary.after_save");
        let t4 = Instant::now();
        // drain after saving: output still in the saved outbox is re-released
        // by a secondary that takes over from this state
        // (output held from before this save, by a boundary whose
        // collection was lost, is not in the saved outbox)
        let earlier = self.held.len();
        self.hold_output();
        let outputs = std::mem::take(&mut self.held);
        let outputs_since = self.held_since.take();
        let resume_us = if resume { us(self.machine.resume()?.elapsed) } else { 0.0 };
        common::crashpoint::hit("primary.after_resume");
        let t5 = Instant::now();
        // (after the resume: copies) frames of earlier epochs the router has
        // not written yet ride in this state too, so a takeover from it
        // sends them again; reading the router's count later than the save
        // only leaves out frames that were written meanwhile
        self.unreleased.prepend(&outputs[..earlier], &mut state.devices.outbox);
        self.unreleased.produced(&outputs);
        let len_us = us(t0.saturating_duration_since(self.epoch_started));
        self.epoch_started = t5;
        self.shared.next_epoch.store(epoch + 1, Ordering::SeqCst);
        let dirty = pages.len() as u64;
        // (after the resume) the pre-copied pages this boundary did not
        // collect again: their copies from the rounds are current (a full
        // epoch holds every page: the rounds are dropped)
        let pre = if full {
            self.pre.clear();
            Vec::new()
        } else {
            self.pre.take_uncollected(&d.gfns)
        };
        let precopied = pre.len() as u64;
        self.shared.precopied_pages.fetch_add(precopied, Ordering::Relaxed);
        let pages = merge_pages(pages, pre);
        // (after the resume) against what the secondary holds
        let (pages, unchanged, deltas) = if full {
            self.bases.clear();
            (pages, 0, 0)
        } else {
            self.bases.against(pages)
        };
        // what changed keeps its retained pages from being let go as idle
        // (pages are sorted by frame number)
        self.machine.note_changed_pages(pages.iter().map(|p| p.gfn));
        let phases = Phases {
            epoch,
            pages: dirty,
            unchanged,
            deltas,
            stop_us: us(stop.elapsed),
            collect_us: us(t2 - t1),
            copy_us: us(t3 - t2),
            save_us: us(t4 - t3),
            resume_us,
            pause_us: us(t5 - t0),
            len_us,
            full,
            precopied,
        };
        self.note_pause(phases.pause_us);
        if phases.pause_us > 20_000.0 {
            tracing::debug!(?phases, "long epoch pause");
        }
        // (an epoch that ends a live sync: the sync lasts until its ack)
        let acked = self.shared.acked_epoch();
        if self.state.step(EngineEvent::Boundary { epoch, last: !resume, acked }).sync_pause {
            // epochs until the sync's final epoch is acknowledged count for
            // the sync's pauses (the secondary is still applying it)
            self.shared.sync_max_pause_us.fetch_max(phases.pause_us as u64, Ordering::Relaxed);
        }
        let queued = Queued::new(&self.shared, &pages);
        Ok(Some(EpochPacket {
            epoch,
            full,
            pages,
            state,
            outputs,
            outputs_since,
            digest,
            phases,
            last: !resume,
            queued,
        }))
    }

    /// A boundary whose collection was incomplete: nothing of it is sent
    /// (the epoch number is kept for the sync's final epoch); its output is
    /// held for that epoch, the guest runs on, and a live resync starts.
    fn resync_instead(&mut self, t0: Instant) -> Result<(), vmm::MachineError> {
        self.bases.clear();
        self.pre.clear();
        self.hold_output();
        self.machine.resume()?;
        let us = t0.elapsed().as_secs_f64() * 1e6;
        self.note_pause(us);
        self.shared.sync_max_pause_us.store(us as u64, Ordering::Relaxed);
        tracing::debug!(pause_us = us as u64, "pause of the boundary that lost tracking");
        self.state.step(EngineEvent::CollectionLost);
        self.epoch_started = Instant::now();
        Ok(())
    }

    /// Every non-zero page of guest memory, with progress lines for long scans.
    fn all_nonzero_pages(&self) -> Vec<Page> {
        let mem = self.machine.memory().clone();
        let mut progress = ScanProgress::new(mem.size() / PAGE_SIZE, "full copy in progress");
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let mut out = Vec::new();
        for (i, g) in mem.all_gfns().enumerate() {
            if mem.read_page(g, &mut buf).is_ok() && buf.iter().any(|&b| b != 0) {
                out.push(page_from(g, &buf));
            }
            progress.tick(i as u64 + 1, out.len() as u64 * PAGE_SIZE);
        }
        out
    }
}
