//! The epoch engine: runs on its own thread and owns the machine. At each
//! epoch boundary it stops the vCPUs, collects the dirty set, copies the pages,
//! (tracking was re-armed by the collection), saves the machine state, drains
//! device output, and resumes the guest; the packet goes to the network side,
//! so shipping epoch N overlaps with running N+1.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proto::Page;
use common::state::{MachineState, Output};
use tokio::sync::mpsc;
use vmm::abi::PAGE_SIZE;
use vmm::Machine;

use crate::mode::EngineCommand;
use crate::sender::page_from;

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

/// A share of [`EngineShared::queued_bytes`]: page copies on their way to
/// the secondary, given back when the packet that holds them is dropped
/// (written to the link, or discarded with its session).
#[derive(Debug)]
pub struct Queued {
    bytes: u64,
    shared: Arc<EngineShared>,
}

impl Queued {
    fn new(shared: &Arc<EngineShared>, pages: &[Page]) -> Queued {
        let bytes = pages.iter().filter(|p| p.data.is_some()).count() as u64 * PAGE_SIZE;
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

/// How often the engine skims the dirty rings for a pre-copy round.
const PRECOPY_POLL: Duration = Duration::from_micros(500);

/// How often the engine looks for output while an output-driven epoch runs.
const OUTPUT_POLL: Duration = Duration::from_micros(100);
/// Live sync attempts (each restarted by a lost round) before a full epoch.
const SYNC_ATTEMPTS: u32 = 3;
/// Pages per batch of a live sync's first round (16 MiB of data at most).
const SYNC_BATCH_PAGES: usize = 4096;

/// Progress lines, one a second, of a scan over all guest memory (a full
/// copy in a pause, or a live sync's first round).
struct ScanProgress {
    total: u64,
    what: &'static str,
    start: Instant,
    last: Instant,
}

impl ScanProgress {
    fn new(total_pages: u64, what: &'static str) -> Self {
        let now = Instant::now();
        ScanProgress { total: total_pages, what, start: now, last: now }
    }

    /// `done` pages scanned so far, `data` bytes of them kept.
    fn tick(&mut self, done: u64, data: u64) {
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

/// Outputs after which an epoch ends whatever its length: the epoch's state
/// carries its undrained output, so this bounds the state of every epoch the
/// timer or the output rule would have made longer (a stretched epoch, one
/// waiting for acks, is bounded by the state limit and travels in chunks).
pub const MAX_EPOCH_OUTPUTS: usize = 16384;

pub use runtime::status::Phases;

/// Counters shared between the engine and the network side. What the engine
/// must do comes as [`EngineCommand`]s, never from flags here.
#[derive(Debug, Default)]
pub struct EngineShared {
    /// Highest acknowledged epoch + 1 (0 = none).
    pub acked: AtomicU64,
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
    pub budget_pauses: AtomicU64,
}

/// What the engine does now: a function of the last command it applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Directive {
    /// Ship epochs.
    Protect,
    /// Keep the guest paused.
    Hold,
    /// Run by the unprotected policy.
    Alone,
}

/// Why the engine stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("guest exception {vector} at {rip:#x} on cpu {cpu}")]
    GuestFault { vector: u64, rip: u64, cpu: u32 },
    #[error("vCPU {cpu} stopped: {why}")]
    VcpuExited { cpu: u32, why: String },
    #[error("machine: {0}")]
    Machine(String),
}

impl From<vmm::MachineError> for EngineError {
    fn from(e: vmm::MachineError) -> Self {
        EngineError::Machine(e.to_string())
    }
}

impl EngineShared {
    pub fn acked_epoch(&self) -> Option<u64> {
        self.acked.load(Ordering::SeqCst).checked_sub(1)
    }

    /// Records that `epoch` (and every one before it) was acknowledged.
    /// Saturating: an ack of epoch u64::MAX (never reached: 2^64 epochs of
    /// a millisecond are 5e8 years, and the core refuses acks of epochs it
    /// did not send) must not wrap to "none acknowledged".
    pub fn record_ack(&self, epoch: u64) {
        self.acked.fetch_max(epoch.saturating_add(1), Ordering::SeqCst);
    }
}

/// One epoch, ready to ship.
#[derive(Debug)]
pub struct EpochPacket {
    pub epoch: u64,
    pub full: bool,
    pub pages: Vec<Page>,
    pub state: MachineState,
    /// Output produced up to this boundary: released when `epoch` is acked.
    pub outputs: Vec<Output>,
    /// When the oldest of `outputs` was sent by the guest.
    pub outputs_since: Option<Instant>,
    pub digest: Option<u64>,
    pub phases: Phases,
    /// The last epoch before a handover: the guest stays paused after it.
    pub last: bool,
    /// Its pages' share of the queued bytes (given back when dropped).
    pub queued: Queued,
}

/// What the engine hands to the network side.
#[derive(Debug)]
pub enum Packet {
    /// Pages of a live (re)sync, copied while the guest runs; `first`: the
    /// first batch of a sync (the secondary opens a fresh staging area).
    Sync {
        round: u32,
        first: bool,
        pages: Vec<Page>,
        queued: Queued,
    },
    Epoch(Box<EpochPacket>),
    /// Output of an unprotected epoch: release at once.
    Release(Vec<Output>),
    /// The guest failed; the engine stopped.
    Failed(EngineError),
}

/// Recycled epoch buffers: a buffer returns to the pool when the last page
/// slice of it is dropped (after the epoch went out).
#[derive(Debug, Default, Clone)]
struct BufPool(Arc<Mutex<Vec<Vec<u8>>>>);

/// An epoch buffer on loan from the pool.
#[derive(Debug)]
struct PooledBuf(Vec<u8>, BufPool);

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Bytes of buffers the pool keeps for reuse at most (it saves the page
/// faults of fresh buffers for the usual small epochs; a large epoch's
/// buffer is given back to the system, not kept).
const POOL_BYTES: usize = 64 << 20;

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let mut p = common::sync::lock(&self.1 .0);
        let kept: usize = p.iter().map(Vec::capacity).sum();
        if p.len() < 32 && kept + self.0.capacity() <= POOL_BYTES {
            p.push(std::mem::take(&mut self.0));
        }
    }
}

impl BufPool {
    fn take(&self, len: usize) -> PooledBuf {
        let mut v = common::sync::lock(&self.0).pop().unwrap_or_default();
        v.resize(len, 0);
        PooledBuf(v, self.clone())
    }
}

/// The current epoch's pre-copy rounds: each round's pages (sorted) and
/// their copies, made while the guest ran after the round re-armed their
/// tracking. A later round's copy of a page replaces an earlier one; the
/// boundary's copy replaces both.
#[derive(Debug, Default)]
struct PreCopy {
    rounds: Vec<(Vec<u64>, PooledBuf)>,
}

impl PreCopy {
    fn clear(&mut self) {
        self.rounds.clear();
    }

    /// Pages copied by this epoch's rounds (a page copied twice counts twice).
    fn pages(&self) -> u64 {
        self.rounds.iter().map(|(g, _)| g.len() as u64).sum()
    }

    /// The latest copy of every pre-copied page the boundary did not
    /// collect (`collected`: sorted), sorted by gfn.
    fn take_uncollected(&mut self, collected: &[u64]) -> Vec<Page> {
        let rounds = std::mem::take(&mut self.rounds);
        let mut latest: std::collections::HashMap<u64, (usize, usize)> = std::collections::HashMap::new();
        for (r, (gfns, _)) in rounds.iter().enumerate() {
            for (i, &g) in gfns.iter().enumerate() {
                latest.insert(g, (r, i));
            }
        }
        let mut keep: Vec<(u64, (usize, usize))> =
            latest.into_iter().filter(|(g, _)| collected.binary_search(g).is_err()).collect();
        keep.sort_unstable_by_key(|k| k.0);
        let ps = PAGE_SIZE as usize;
        let bufs: Vec<bytes::Bytes> = rounds.into_iter().map(|(_, b)| bytes::Bytes::from_owner(b)).collect();
        keep.into_iter().map(|(gfn, (r, i))| Page { gfn, data: Some(bufs[r].slice(i * ps..(i + 1) * ps)) }).collect()
    }
}

/// Merges two page lists sorted by gfn with no gfn in both.
fn merge_pages(a: Vec<Page>, b: Vec<Page>) -> Vec<Page> {
    if b.is_empty() {
        return a;
    }
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.gfn < y.gfn,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return out,
        };
        out.extend(if take_a { a.next() } else { b.next() });
    }
}

/// The engine.
#[derive(Debug)]
pub struct Engine {
    machine: Machine,
    opts: EngineOptions,
    shared: Arc<EngineShared>,
    tx: mpsc::Sender<Packet>,
    commands: std::sync::mpsc::Receiver<EngineCommand>,
    directive: Directive,
    /// A live sync starts at the next boundary: the initial sync, and every
    /// resync (a new session with a replica that has a committed epoch, a
    /// lost collection, a resync the secondary asked for). It copies memory
    /// while the guest runs into a staging area on the secondary.
    want_sync: bool,
    /// The next epoch is a full-memory epoch, copied in the pause: only
    /// when live syncs keep losing their dirty tracking.
    want_full: bool,
    /// End the current epoch now and keep the guest paused after it
    /// ([`EngineCommand::Finish`]).
    finish: bool,
    /// Resume the guest paused for a handover that was refused
    /// ([`EngineCommand::Resume`]).
    resume_guest: bool,
    /// When a budget pause was last logged (once per 10 s).
    budget_said: Option<Instant>,
    held: Vec<Output>,
    /// When the oldest output in `held` was sent.
    held_since: Option<Instant>,
    pool: BufPool,
    /// Test hook (`CASTOR_FORCE_TRACKING_LOST_EVERY=N`, with `--test-hooks`): treat every N-th
    /// epoch as if dirty tracking had been lost.
    force_lost_every: Option<u64>,
    /// The epoch the test hook last forced lost.
    last_forced: Option<u64>,
    /// The next epoch ends a live sync.
    sync_final: bool,
    /// The epoch that ended the last live sync, until it is acknowledged.
    sync_until: Option<u64>,
    /// The sync about to run was started by a lost collection (its pause
    /// already counts for the sync's longest pause).
    sync_started_by_loss: bool,
    /// The previous delta epoch's pages as copied (sorted by gfn). A page
    /// reported dirty again (hot-page retention reports retained pages every
    /// epoch) whose content equals its copy in the previous epoch is not
    /// shipped again: the secondary applies epochs in order, so it holds that
    /// content already. Emptied by anything that is not a delta epoch.
    last_copied: Vec<Page>,
    /// When the guest last resumed after a boundary (the epoch's start).
    epoch_started: Instant,
    /// This epoch's pre-copy rounds.
    pre: PreCopy,
    /// When the rings were last skimmed for a pre-copy round.
    last_skim: Instant,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl Engine {
    pub fn new(
        machine: Machine,
        opts: EngineOptions,
        shared: Arc<EngineShared>,
        tx: mpsc::Sender<Packet>,
        commands: std::sync::mpsc::Receiver<EngineCommand>,
    ) -> Self {
        let force_lost_every = std::env::var("CASTOR_FORCE_TRACKING_LOST_EVERY")
            .ok()
            .filter(|_| common::crashpoint::test_hooks_enabled())
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&n| n > 0);
        Engine {
            machine,
            opts,
            shared,
            tx,
            commands,
            directive: Directive::Alone,
            want_sync: false,
            want_full: false,
            finish: false,
            resume_guest: false,
            budget_said: None,
            held: Vec::new(),
            held_since: None,
            pool: BufPool::default(),
            force_lost_every,
            last_forced: None,
            sync_final: false,
            sync_until: None,
            sync_started_by_loss: false,
            last_copied: Vec::new(),
            epoch_started: Instant::now(),
            pre: PreCopy::default(),
            last_skim: Instant::now(),
        }
    }

    /// Reads pages into packets (zero pages travel without data).
    fn read_pages(&self, gfns: impl Iterator<Item = u64>) -> Vec<Page> {
        let mem = self.machine.memory();
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        gfns.filter_map(|g| mem.read_page(g, &mut buf).ok().map(|_| page_from(g, &buf))).collect()
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

    /// Drops the pages whose content equals their copy in the previous delta
    /// epoch; returns the pages to ship and how many were dropped. Runs after
    /// the guest resumed (the comparison is not part of the pause).
    fn skip_unchanged(&mut self, pages: Vec<Page>) -> (Vec<Page>, u64) {
        let prev = std::mem::take(&mut self.last_copied);
        let mut ship = Vec::with_capacity(pages.len());
        let mut j = 0;
        let mut unchanged = 0;
        for p in &pages {
            while j < prev.len() && prev[j].gfn < p.gfn {
                j += 1;
            }
            let same = j < prev.len() && prev[j].gfn == p.gfn && prev[j].data.is_some() && prev[j].data == p.data;
            if same {
                unchanged += 1;
            } else {
                ship.push(p.clone());
            }
        }
        // keep this epoch's copies (slices of this epoch's buffer only, so no
        // older buffer stays alive)
        self.last_copied = pages;
        (ship, unchanged)
    }

    fn send(&self, p: Packet) -> bool {
        self.tx.blocking_send(p).is_ok()
    }

    fn check_guest(&self) -> Result<(), EngineError> {
        if let Some(f) = self.machine.faults().first() {
            return Err(EngineError::GuestFault { vector: f.vector, rip: f.rip, cpu: f.cpu });
        }
        if let Some((id, why)) = self.machine.exited_vcpus().first() {
            return Err(EngineError::VcpuExited { cpu: *id, why: why.clone() });
        }
        Ok(())
    }

    /// Applies the commands that arrived, in order.
    fn poll_commands(&mut self) {
        while let Ok(c) = self.commands.try_recv() {
            match c {
                EngineCommand::Protect(_) => {
                    // a replica with a committed epoch (Resync::Full) keeps
                    // it usable for failover until the sync's final epoch
                    // commits: the secondary stages the sync either way
                    self.directive = Directive::Protect;
                    self.want_sync = true;
                    self.want_full = false;
                }
                EngineCommand::Hold => {
                    self.directive = Directive::Hold;
                    self.want_sync = false;
                    self.want_full = false;
                    self.finish = false;
                }
                EngineCommand::Alone => {
                    self.directive = Directive::Alone;
                    self.want_sync = false;
                    self.want_full = false;
                    self.finish = false;
                }
                EngineCommand::Finish => self.finish = self.directive == Directive::Protect,
                EngineCommand::Resume => {
                    self.directive = Directive::Protect;
                    self.finish = false;
                    self.resume_guest = true;
                }
                EngineCommand::FullEpoch => self.want_sync |= self.directive == Directive::Protect,
            }
        }
    }

    /// Runs until `shared.stop`; returns the machine (paused).
    pub fn run(mut self) -> Machine {
        if let Err(e) = self.run_loop() {
            tracing::error!(error = %e, "epoch engine stopped");
            let _ = self.send(Packet::Failed(e));
        }
        let _ = self.machine.pause();
        self.machine
    }

    fn run_loop(&mut self) -> Result<(), EngineError> {
        // a running machine handed over (a promoted secondary's) stops at
        // once under the pause policy: no output before a secondary syncs
        if self.opts.unprotected == UnprotectedPolicy::Pause {
            self.machine.pause()?;
        }
        let mut next = Instant::now();
        loop {
            self.poll_commands();
            if self.shared.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            next += self.opts.epoch;
            // sleep to the epoch's end, or end it early once the rings have
            // filled with more than max_epoch_pages entries (ring-full exits
            // make this cheap to notice; the bitmap tracker has no such signal)
            loop {
                let now = Instant::now();
                if next <= now {
                    // a boundary that overran is absorbed by the next epochs
                    // (the grid holds); only a stall of a whole epoch resets it
                    if now - next > self.opts.epoch {
                        next = now;
                    }
                    break;
                }
                if self.machine.ring_pending() + self.pre.pages() >= self.opts.max_epoch_pages
                    || self.machine.devices().outbox_len() >= MAX_EPOCH_OUTPUTS
                    || (self.directive == Directive::Protect && self.over_budget())
                {
                    next = now;
                    break;
                }
                // a switchover ends the epoch at once
                self.poll_commands();
                if self.finish {
                    next = now;
                    break;
                }
                // output-driven: held output waits for this epoch's ack, so
                // end the epoch once it is min_epoch old (the epochs in
                // flight bound the rate to what the link acknowledges)
                let output_driven = self.opts.min_epoch.filter(|_| self.directive == Directive::Protect);
                if let Some(min) = output_driven {
                    if now >= self.epoch_started + min && self.machine.devices().has_output() {
                        next = now;
                        break;
                    }
                }
                // unprotected and running: output leaves at once (no
                // secondary to wait for; the epoch only bounds tracking)
                let alone = self.directive == Directive::Alone && self.opts.unprotected == UnprotectedPolicy::Continue;
                if alone {
                    let out = self.machine.devices().drain();
                    if !out.is_empty() {
                        self.send(Packet::Release(out));
                    }
                }
                // (a guest paused until a secondary syncs has nothing to pre-copy)
                let precopy = self
                    .opts
                    .precopy_min_pages
                    .filter(|_| self.directive == Directive::Protect && !self.machine.is_paused());
                if let Some(min) = precopy {
                    if now >= self.last_skim + PRECOPY_POLL {
                        self.last_skim = now;
                        if self.machine.precopy_due(min, !self.pre.rounds.is_empty()) {
                            self.precopy_round()?;
                        }
                    }
                }
                let step = if output_driven.is_some() || alone {
                    OUTPUT_POLL
                } else if precopy.is_some() {
                    PRECOPY_POLL
                } else {
                    Duration::from_millis(1)
                };
                std::thread::sleep((next - now).min(step));
            }
            self.check_guest()?;
            self.poll_commands();
            if std::mem::take(&mut self.resume_guest)
                && self.directive == Directive::Protect
                && self.machine.is_paused()
            {
                // a refused handover: the guest runs on from its last epoch
                self.machine.resume()?;
                tracing::warn!("the handover was refused: the guest runs here again, protected");
            }
            if self.directive != Directive::Protect {
                if self.opts.tracking_off && self.directive == Directive::Alone {
                    if self.machine.is_paused() {
                        self.machine.resume()?;
                    }
                    let out = self.machine.devices().drain();
                    if !out.is_empty() {
                        self.send(Packet::Release(out));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    next = Instant::now();
                    continue;
                }
                self.unprotected_epoch()?;
                continue;
            }
            if std::mem::take(&mut self.want_sync) {
                self.live_sync()?;
                next = Instant::now();
                continue;
            }
            // Bound epochs in flight: while the secondary is behind, the
            // guest runs on (a longer epoch) instead of queueing more copies,
            // for 5 s at most; and past the byte budget it is paused until
            // the link has drained below it (no epoch is taken then).
            self.wait_for_the_link()?;
            if self.directive != Directive::Protect {
                continue;
            }
            // a last round just before the boundary, once a quarter of the
            // round minimum waits: the pause then copies only what the guest
            // wrote during this round's copy
            if let Some(min) = self.opts.precopy_min_pages {
                if !self.finish
                    && !self.machine.is_paused()
                    && self.machine.precopy_due(min / 4, !self.pre.rounds.is_empty())
                {
                    self.precopy_round()?;
                }
            }
            let last = std::mem::take(&mut self.finish);
            let Some(packet) = self.boundary(!last)? else {
                // the collection was incomplete: a live resync follows
                continue;
            };
            if last {
                // the guest stays paused: the secondary runs it from here
                self.directive = Directive::Hold;
                tracing::info!(epoch = packet.epoch, "last epoch before the handover: the guest stays paused");
            }
            if !self.send(Packet::Epoch(Box::new(packet))) {
                return Ok(());
            }
        }
    }

    /// One pre-copy round: re-arm the pages waiting in the rings and copy
    /// them while the guest runs.
    fn precopy_round(&mut self) -> Result<(), vmm::MachineError> {
        let Some(gfns) = self.machine.precopy_round()? else {
            // tracking is in doubt: the boundary's collection says so
            return Ok(());
        };
        if gfns.is_empty() {
            return Ok(());
        }
        let mut buf = self.pool.take(gfns.len() * PAGE_SIZE as usize);
        self.machine.copy_pages_running(&gfns, &mut buf.0)?;
        self.pre.rounds.push((gfns, buf));
        self.shared.precopy_rounds.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

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
        let pending = pages * PAGE_SIZE;
        (queued, pending)
    }

    /// Whether the held bytes passed the budget.
    fn over_budget(&mut self) -> bool {
        let (queued, pending) = self.held_bytes(false);
        queued + pending > self.opts.max_queued_bytes
    }

    /// Waits while epochs in flight are at their bound (5 s at most: then
    /// the epoch is stretched), or while copies are queued for the link and
    /// they and the pages the boundary would copy pass the byte budget (as
    /// long as that lasts, with the guest paused: it then writes nothing
    /// more to copy). Once nothing is queued the boundary is taken whatever
    /// its size (an epoch ends early once it passes the budget, so that is
    /// about the budget).
    fn wait_for_the_link(&mut self) -> Result<(), vmm::MachineError> {
        let waited = Instant::now();
        let mut paused_here = false;
        loop {
            let (queued, pending) = self.held_bytes(true);
            let over = queued > 0 && queued + pending > self.opts.max_queued_bytes;
            if !(self.in_flight() >= self.opts.max_in_flight || over)
                || self.directive != Directive::Protect
                || self.shared.stop.load(Ordering::SeqCst)
            {
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
                        pending_mib = pending >> 20,
                        budget_mib = self.opts.max_queued_bytes >> 20,
                        "the link is behind by more than the byte budget: guest paused until it drains"
                    );
                }
            }
            std::thread::sleep(Duration::from_micros(500));
            self.poll_commands();
            if !over && waited.elapsed() > Duration::from_secs(5) {
                tracing::warn!(in_flight = self.in_flight(), "secondary not acknowledging; epochs stretched");
                break;
            }
        }
        if paused_here && self.machine.is_paused() && self.directive == Directive::Protect {
            self.machine.resume()?;
        }
        Ok(())
    }

    fn in_flight(&self) -> u64 {
        self.shared.next_epoch.load(Ordering::SeqCst).saturating_sub(self.shared.acked.load(Ordering::SeqCst))
    }

    fn unprotected_epoch(&mut self) -> Result<(), vmm::MachineError> {
        self.last_copied.clear();
        self.pre.clear();
        let policy = if self.directive == Directive::Hold { UnprotectedPolicy::Pause } else { self.opts.unprotected };
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
        if !out.is_empty() {
            self.send(Packet::Release(out));
        }
        self.shared.next_epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

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
    fn live_sync(&mut self) -> Result<(), vmm::MachineError> {
        self.last_copied.clear();
        self.pre.clear();
        if !std::mem::take(&mut self.sync_started_by_loss) {
            self.shared.sync_max_pause_us.store(0, Ordering::Relaxed);
        }
        for attempt in 1..=SYNC_ATTEMPTS {
            match self.sync_attempt(attempt)? {
                SyncEnd::Copied => {
                    self.sync_final = true;
                    self.shared.live_syncs.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                SyncEnd::Abandoned => return Ok(()),
                SyncEnd::TrackingLost(round) => {
                    tracing::warn!(attempt, round, "dirty tracking lost during a live sync: starting it again");
                    self.shared.tracking_lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        tracing::warn!("every live sync attempt lost dirty tracking: the final epoch is a full one");
        self.want_full = true;
        Ok(())
    }

    /// Moves the devices' output into `held` (the guest is paused).
    fn hold_output(&mut self) {
        let (out, since) = self.machine.devices().drain_timed();
        self.held.extend(out);
        self.held_since = match (self.held_since, since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
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
            if self.directive != Directive::Protect || self.want_sync || self.shared.stop.load(Ordering::SeqCst) {
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
                if self.directive != Directive::Protect || self.want_sync {
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
            bytes += pages.iter().filter(|p| p.data.is_some()).count() as u64 * PAGE_SIZE;
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

    /// One epoch boundary; `resume`: let the guest run on after it (not
    /// after the last epoch before a handover).
    fn boundary(&mut self, resume: bool) -> Result<Option<EpochPacket>, vmm::MachineError> {
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
        if lost && resume && !self.want_full {
            tracing::warn!(epoch, "dirty tracking lost: this epoch is not sent; a live resync follows");
            return self.resync_instead(t0).map(|()| None);
        }
        let mut full = lost || std::mem::take(&mut self.want_full);
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
            d.gfns
                .iter()
                .enumerate()
                .map(|(i, &gfn)| Page { gfn, data: Some(buf.slice(i * ps..(i + 1) * ps)) })
                .collect()
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
        let state = self.machine.save()?;
        let digest = self.opts.digest.then(|| self.machine.memory().digest());
        common::crashpoint::hit("primary.after_save");
        let t4 = Instant::now();
        // drain after saving: output still in the saved outbox is re-released
        // by a secondary that takes over from this state
        self.hold_output();
        let outputs = std::mem::take(&mut self.held);
        let outputs_since = self.held_since.take();
        let resume_us = if resume { us(self.machine.resume()?.elapsed) } else { 0.0 };
        common::crashpoint::hit("primary.after_resume");
        let t5 = Instant::now();
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
        let (pages, unchanged) = if full {
            self.last_copied.clear();
            (pages, 0)
        } else {
            self.skip_unchanged(pages)
        };
        let phases = Phases {
            epoch,
            pages: dirty,
            unchanged,
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
        if std::mem::take(&mut self.sync_final) {
            // the epoch that ends a live sync: the sync lasts until its ack
            self.sync_until = Some(epoch);
        }
        if let Some(e) = self.sync_until {
            // epochs until the sync's final epoch is acknowledged count for
            // the sync's pauses (the secondary is still applying it)
            if self.shared.acked.load(Ordering::SeqCst) > e && epoch > e {
                self.sync_until = None;
            } else {
                self.shared.sync_max_pause_us.fetch_max(phases.pause_us as u64, Ordering::Relaxed);
            }
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
        self.last_copied.clear();
        self.pre.clear();
        self.hold_output();
        self.machine.resume()?;
        let us = t0.elapsed().as_secs_f64() * 1e6;
        self.note_pause(us);
        self.shared.sync_max_pause_us.store(us as u64, Ordering::Relaxed);
        tracing::debug!(pause_us = us as u64, "pause of the boundary that lost tracking");
        self.sync_started_by_loss = true;
        self.want_sync = true;
        self.epoch_started = Instant::now();
        Ok(())
    }

    /// Every pause counts for the longest one (status `pause_us_max`).
    fn note_pause(&self, us: f64) {
        self.shared.pause_us_max.fetch_max(us as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(pool: &BufPool, gfns: &[u64], fill: u8) -> (Vec<u64>, PooledBuf) {
        let mut b = pool.take(gfns.len() * PAGE_SIZE as usize);
        b.0.fill(fill);
        (gfns.to_vec(), b)
    }

    fn summary(pages: &[Page]) -> Vec<(u64, u8)> {
        pages.iter().map(|p| (p.gfn, p.data.as_ref().map_or(0, |d| d[0]))).collect()
    }

    #[test]
    fn the_latest_round_copy_of_each_uncollected_page_is_shipped() {
        let pool = BufPool::default();
        let mut pre = PreCopy::default();
        pre.rounds.push(round(&pool, &[1, 3, 5, 9], b'a'));
        pre.rounds.push(round(&pool, &[3, 7], b'b'));
        assert_eq!(pre.pages(), 6);
        // the boundary collected 5 and 9 again: its copies win
        let got = pre.take_uncollected(&[5, 9]);
        assert_eq!(summary(&got), vec![(1, b'a'), (3, b'b'), (7, b'b')]);
        assert!(pre.rounds.is_empty() && pre.pages() == 0);
        assert!(pre.take_uncollected(&[]).is_empty());
    }

    #[test]
    fn boundary_pages_and_round_pages_merge_in_gfn_order() {
        let page = |gfn: u64, b: u8| Page { gfn, data: Some(bytes::Bytes::from(vec![b; 8])) };
        let a = vec![page(2, b'x'), page(5, b'x'), page(8, b'x')];
        let b = vec![page(1, b'y'), page(3, b'y'), page(9, b'y')];
        let m = merge_pages(a, b);
        assert_eq!(summary(&m), vec![(1, b'y'), (2, b'x'), (3, b'y'), (5, b'x'), (8, b'x'), (9, b'y')]);
        assert_eq!(summary(&merge_pages(Vec::new(), vec![page(4, b'z')])), vec![(4, b'z')]);
    }
}
