//! Live sync: guest memory copied to the secondary while the guest runs, in
//! rounds, ended by the next boundary.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::proto::Page;
use vmm::abi::PAGE_SIZE;

use super::{Engine, EngineEvent, Packet, Queued};
use crate::sender::page_from;

/// Live sync attempts (each restarted by a lost round) before a full epoch.
const SYNC_ATTEMPTS: u32 = 3;
/// Pages per batch of a live sync's first round (16 MiB of data at most).
const SYNC_BATCH_PAGES: usize = 4096;

/// Progress lines, one a second, of a scan over all guest memory (a full
/// copy in a pause, or a live sync's first round).
pub(super) struct ScanProgress {
    total: u64,
    what: &'static str,
    start: Instant,
    last: Instant,
}

impl ScanProgress {
    pub(super) fn new(total_pages: u64, what: &'static str) -> Self {
        let now = Instant::now();
        ScanProgress { total: total_pages, what, start: now, last: now }
    }

    /// `done` pages scanned so far, `data` bytes of them kept.
    pub(super) fn tick(&mut self, done: u64, data: u64) {
        if self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last = Instant::now();
        let rate = done as f64 * PAGE_SIZE as f64 / self.start.elapsed().as_secs_f64();
        tracing::info!(
            scanned_mib = (done * PAGE_SIZE) >> 20,
            total_mib = (self.total * PAGE_SIZE) >> 20,
            data_mib = data >> 20,
            scan_gib_s = rate / f64::from(1u32 << 30),
            remaining_s = (self.total.saturating_sub(done) as f64 * PAGE_SIZE as f64 / rate) as u64,
            "{}",
            self.what
        );
    }
}

/// How one live sync attempt ended.
enum SyncEnd {
    /// Every round sent: the next boundary ends the sync.
    Copied,
    /// The session changed (lost, or a new one that syncs anew).
    Abandoned,
    /// Dirty tracking was lost in this round.
    TrackingLost(u32),
}

impl Engine {
    /// Live sync: pages copied while the guest runs, re-sending what it
    /// dirties meanwhile, a few rounds; the next boundary (a delta epoch)
    /// ends it. The secondary writes the pages into a staging area that
    /// replaces its replica only when that epoch commits, so nothing in a
    /// pause grows with guest memory and its committed replica stays usable
    /// for failover meanwhile. Output stays held until that epoch's ack. A
    /// round whose dirty tracking was lost restarts the sync (a staging
    /// area cannot be patched without knowing every write); after
    /// [`SYNC_ATTEMPTS`] lost attempts the sync ends with an in-pause full
    /// epoch instead.
    pub(super) fn live_sync(&mut self) -> Result<(), vmm::MachineError> {
        self.bases.clear();
        self.pre.clear();
        if self.state.step(EngineEvent::SyncStarted).reset_sync_pauses {
            self.shared.sync_max_pause_us.store(0, Ordering::Relaxed);
        }
        for attempt in 1..=SYNC_ATTEMPTS {
            match self.sync_attempt(attempt)? {
                SyncEnd::Copied => {
                    self.state.step(EngineEvent::SyncCopied);
                    self.shared.live_syncs.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                SyncEnd::Abandoned => {
                    self.state.step(EngineEvent::SyncAbandoned);
                    return Ok(());
                }
                SyncEnd::TrackingLost(round) => {
                    tracing::warn!(attempt, round, "dirty tracking lost during a live sync: starting it again");
                    self.shared.tracking_lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        tracing::warn!("every live sync attempt lost dirty tracking: the final epoch is a full one");
        self.state.step(EngineEvent::SyncLostEveryAttempt);
        Ok(())
    }

    /// Reads pages into packets (zero pages travel without data).
    fn read_pages(&self, gfns: impl Iterator<Item = u64>) -> Vec<Page> {
        let mem = self.machine.memory();
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        gfns.filter_map(|g| mem.read_page(g, &mut buf).ok().map(|_| page_from(g, &buf))).collect()
    }

    /// One pause of a live sync: collect (a lost collection re-protects
    /// every slot), hold the output, resume; counts for the sync's pauses.
    fn sync_pause(&mut self) -> Result<vmm::DirtySet, vmm::MachineError> {
        let t = Instant::now();
        self.machine.pause()?;
        let d = self.machine.collect()?;
        self.hold_output();
        self.machine.resume()?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        self.note_pause(us);
        self.shared.sync_max_pause_us.fetch_max(us as u64, Ordering::Relaxed);
        tracing::debug!(pause_us = us as u64, pages = d.gfns.len(), lost = d.tracking_lost, "live sync pause");
        Ok(d)
    }

    /// Waits until `bytes` more fit the byte budget beside what is queued
    /// (at once when nothing is); false if the session changed meanwhile.
    fn room_for(&mut self, bytes: u64) -> bool {
        loop {
            let queued = self.shared.queued_bytes.load(Ordering::SeqCst);
            if queued == 0 || queued + bytes <= self.opts.max_queued_bytes {
                return true;
            }
            std::thread::sleep(Duration::from_micros(500));
            self.poll_commands();
            if self.state.sync_interrupted() || self.shared.stop.load(Ordering::SeqCst) {
                return false;
            }
        }
    }

    fn sync_attempt(&mut self, attempt: u32) -> Result<SyncEnd, vmm::MachineError> {
        let t = Instant::now();
        self.sync_pause()?; // baseline: track from here
                            // round 0 in batches: bounded memory here, and the link sends one
                            // batch while the next is read
        let mem = self.machine.memory().clone();
        let total = mem.size() / PAGE_SIZE;
        let mut progress = ScanProgress::new(total, "live sync: round 0 in progress");
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let mut batch = Vec::with_capacity(SYNC_BATCH_PAGES);
        let (mut sent, mut bytes, mut first) = (0u64, 0u64, true);
        for (i, g) in mem.all_gfns().enumerate() {
            if mem.read_page(g, &mut buf).is_ok() && buf.iter().any(|&b| b != 0) {
                batch.push(page_from(g, &buf));
            }
            if batch.len() == SYNC_BATCH_PAGES || i as u64 + 1 == total {
                sent += batch.len() as u64;
                bytes += batch.len() as u64 * PAGE_SIZE;
                let pages = std::mem::replace(&mut batch, Vec::with_capacity(SYNC_BATCH_PAGES));
                // the byte budget holds for a sync's batches too: read on
                // once the link has taken enough of the earlier ones
                if !self.room_for(pages.len() as u64 * PAGE_SIZE) {
                    tracing::info!("live sync abandoned: the session changed");
                    return Ok(SyncEnd::Abandoned);
                }
                let queued = Queued::new(&self.shared, &pages);
                if !self.send(Packet::Sync { round: 0, first: std::mem::take(&mut first), pages, queued }) {
                    return Ok(SyncEnd::Abandoned);
                }
                // a lost session or a new one ends this sync
                self.poll_commands();
                if self.state.sync_interrupted() {
                    tracing::info!("live sync abandoned: the session changed");
                    return Ok(SyncEnd::Abandoned);
                }
            }
            progress.tick(i as u64 + 1, bytes);
        }
        if first {
            // an all-zero guest: still open the staging area
            let queued = Queued::new(&self.shared, &[]);
            if !self.send(Packet::Sync { round: 0, first: true, pages: Vec::new(), queued }) {
                return Ok(SyncEnd::Abandoned);
            }
        }
        tracing::info!(attempt, pages = sent, "live sync: round 0 sent");
        for round in 1..=4 {
            std::thread::sleep(self.opts.epoch);
            let d = self.sync_pause()?;
            if d.tracking_lost {
                return Ok(SyncEnd::TrackingLost(round));
            }
            let pages = self.read_pages(d.gfns.into_iter());
            let n = pages.len();
            sent += n as u64;
            bytes += common::proto::pages_bytes(&pages);
            tracing::info!(round, pages = n, "live sync: round");
            let queued = Queued::new(&self.shared, &pages);
            if !self.send(Packet::Sync { round, first: false, pages, queued }) {
                return Ok(SyncEnd::Abandoned);
            }
            if n < 256 {
                break;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        tracing::info!(
            attempt,
            pages = sent,
            gib = bytes as f64 / f64::from(1u32 << 30),
            ms = (secs * 1e3) as u64,
            gib_per_s = bytes as f64 / f64::from(1u32 << 30) / secs.max(1e-9),
            "live sync: copied, final epoch next"
        );
        self.shared
            .last_sync_gib_per_s
            .store((bytes as f64 / f64::from(1u32 << 30) / secs.max(1e-9)).to_bits(), Ordering::Relaxed);
        Ok(SyncEnd::Copied)
    }
}
