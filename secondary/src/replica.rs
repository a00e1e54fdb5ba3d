//! The secondary's page-exact replica of the last committed epoch.
//!
//! Replica memory is a [`GuestMem`] in the guest's shape (anonymous mappings laid
//! out like the primary's), so at failover it is registered with KVM as guest
//! memory as it is: no copy. Epoch N is *staged* (pages held aside) until its
//! EpochEnd arrives and verifies (epoch order, every chunk, the counts, the
//! checksum); only then are its pages written and its state becomes the
//! committed state. Anything that goes wrong before that (lost connection,
//! corrupt frame, killed primary) leaves the replica exactly at N-1. Anything
//! that goes wrong while the pages are written (an error, a panic) leaves it
//! *torn*: neither N-1 nor N. A torn replica is unusable: no failover runs
//! from it, and only a full epoch (which rewrites every page) or the final
//! epoch of a live resync (a staged copy that replaces it) repairs it.

use std::sync::Arc;

use bytes::Bytes;
use common::proto::{delta, EpochChecksum, EpochEnd, Page, PageChunk, PageData, PAGE_SIZE};
use common::state::{MachineState, VmShape};
use vmm::memory::{ram_ranges, GuestMem, MemoryError};

/// Errors of the replica. Each leaves the replica at its committed epoch.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("VM shape mismatch: replica is {replica}, peer sent {peer}")]
    ShapeMismatch { replica: String, peer: String },
    #[error("epoch {got} out of order: expected {expected}")]
    EpochOrder { got: u64, expected: String },
    #[error("{0} while no epoch is being staged")]
    NotStaging(&'static str),
    #[error("epoch {got} begun while epoch {staging} is still being staged")]
    StagingInProgress { got: u64, staging: u64 },
    #[error("chunk of epoch {got} while staging epoch {staging}")]
    ChunkEpoch { got: u64, staging: u64 },
    #[error("epoch {epoch}: more pages than the {announced} announced")]
    TooManyPages { epoch: u64, announced: u64 },
    #[error("page {0:#x} is outside the guest's RAM")]
    PageOutsideRam(u64),
    #[error("epoch {epoch}: {received} pages received, {announced} announced at begin, {ended} at end")]
    CountMismatch { epoch: u64, announced: u64, received: u64, ended: u64 },
    #[error("epoch {epoch}: content checksum {got:#x} != {expected:#x}")]
    ChecksumMismatch { epoch: u64, expected: u32, got: u32 },
    #[error("epoch {epoch} state is for a different VM shape")]
    StateShape { epoch: u64 },
    #[error(
        "replica diverged from the primary after epoch {epoch}: digest {got:#x} != {expected:#x}; full resync required"
    )]
    Diverged { epoch: u64, expected: u64, got: u64 },
    #[error("epoch {epoch}, page {gfn:#x}: {source}")]
    Delta { epoch: u64, gfn: u64, source: common::proto::delta::DeltaError },
    #[error("page {gfn:#x}: a delta where the page has no base here ({what})")]
    DeltaWithoutBase { gfn: u64, what: &'static str },
    #[error("full-sync pages after an epoch was committed")]
    SyncAfterCommit,
    #[error("the replica needs a full resync; delta epochs are refused")]
    NeedsResync,
    #[error("replica memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("this node has taken over: its replica is the running guest now")]
    Retired,
    #[error("applying epoch {epoch} failed halfway ({why}): the replica is unusable until a full resync")]
    Torn { epoch: u64, why: String },
    #[error(
        "applying epoch {epoch} failed before a page was written ({why}): the replica stays at its committed epoch"
    )]
    ApplyPanicked { epoch: u64, why: String },
}

/// The last committed epoch.
#[derive(Debug, Clone)]
pub struct Committed {
    pub epoch: u64,
    pub state: MachineState,
}

#[derive(Debug)]
struct Staging {
    epoch: u64,
    announced: u64,
    full: bool,
    /// The epoch that ends a live sync: applied onto the sync's staging area,
    /// which then becomes the replica.
    onto_sync: bool,
    pages: Vec<Page>,
    sum: EpochChecksum,
}

/// A live sync's staging area: the pages the primary copied while its guest
/// ran, in memory of the guest's shape. It becomes the replica when the
/// sync's final epoch commits; until then the committed replica is untouched
/// and stays usable for failover. With nothing committed yet there is
/// nothing to keep, and the replica's own memory (cleared) is the stage.
#[derive(Debug)]
struct SyncStage {
    mem: Arc<GuestMem>,
    pages: u64,
}

/// A page-exact replica.
#[derive(Debug)]
pub struct Replica {
    mem: Arc<GuestMem>,
    shape: VmShape,
    committed: Option<Committed>,
    staging: Option<Staging>,
    synced_pages: u64,
    needs_resync: bool,
    /// No shape yet: the first primary's Hello gives it.
    unshaped: bool,
    retired: bool,
    /// The apply of this epoch began and did not finish: the memory is
    /// neither the committed epoch nor this one.
    torn: Option<u64>,
    sync: Option<SyncStage>,
    /// The authenticated data session that owns staging (the newest).
    data_session: u64,
}

fn shape_str(s: &VmShape) -> String {
    format!("{} MiB, {} vCPUs, image {:#x}", s.mem_bytes >> 20, s.vcpus, s.image_id)
}

impl Replica {
    /// An empty replica for a VM of `shape`.
    pub fn new(shape: VmShape) -> Result<Self, ReplicaError> {
        if shape.ram_ranges != ram_ranges(shape.mem_bytes) {
            return Err(ReplicaError::ShapeMismatch {
                replica: "this VMM's RAM layout".into(),
                peer: shape_str(&shape),
            });
        }
        let mem = Arc::new(GuestMem::new(shape.mem_bytes)?);
        Ok(Replica {
            mem,
            shape,
            committed: None,
            staging: None,
            synced_pages: 0,
            needs_resync: false,
            unshaped: false,
            retired: false,
            torn: None,
            sync: None,
            data_session: 0,
        })
    }

    /// A replica that takes its shape from the first primary that connects.
    pub fn unshaped() -> Result<Self, ReplicaError> {
        let mem = vmm::memory::MIN_MEM;
        let mut r = Self::new(VmShape { mem_bytes: mem, ram_ranges: ram_ranges(mem), vcpus: 1, image_id: 0 })?;
        r.unshaped = true;
        Ok(r)
    }

    /// Stops all further changes: the memory now belongs to a running VM.
    pub fn retire(&mut self) {
        self.retired = true;
        self.staging = None;
        self.sync = None;
    }

    fn check_live(&self) -> Result<(), ReplicaError> {
        if self.retired {
            return Err(ReplicaError::Retired);
        }
        Ok(())
    }

    pub fn shape(&self) -> &VmShape {
        &self.shape
    }

    /// Checks a peer's VM shape against the replica's.
    pub fn check_shape(&mut self, peer: &VmShape) -> Result<(), ReplicaError> {
        self.check_live()?;
        if self.unshaped {
            *self = Self::new(peer.clone())?;
            tracing::info!(mem_mib = peer.mem_bytes >> 20, vcpus = peer.vcpus, "replica shaped after the primary");
            return Ok(());
        }
        if *peer != self.shape {
            return Err(ReplicaError::ShapeMismatch { replica: shape_str(&self.shape), peer: shape_str(peer) });
        }
        Ok(())
    }

    pub fn committed(&self) -> Option<&Committed> {
        self.committed.as_ref()
    }

    pub fn committed_epoch(&self) -> Option<u64> {
        self.committed.as_ref().map(|c| c.epoch)
    }

    /// The epoch being staged, if any.
    pub fn staging_epoch(&self) -> Option<u64> {
        self.staging.as_ref().map(|s| s.epoch)
    }

    /// True after a failed check or a torn apply: only a full epoch is taken.
    pub fn needs_resync(&self) -> bool {
        self.needs_resync || self.torn.is_some()
    }

    /// Why no failover may run from this replica (`None`: it is exactly its
    /// committed epoch).
    pub fn unusable(&self) -> Option<String> {
        self.torn.map(|e| format!("the apply of epoch {e} did not finish: the replica is torn"))
    }

    /// The replica memory (registered with KVM at failover).
    pub fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// Digest of the replica memory.
    pub fn digest(&self) -> u64 {
        self.mem.digest()
    }

    fn check_page(&self, p: &Page) -> Result<(), ReplicaError> {
        let gpa = p.gfn.checked_mul(PAGE_SIZE as u64).ok_or(ReplicaError::PageOutsideRam(p.gfn))?;
        if !self.mem.is_ram(gpa, PAGE_SIZE) {
            return Err(ReplicaError::PageOutsideRam(p.gfn));
        }
        Ok(())
    }

    /// Writes one page of `epoch`; a delta's base was checked by
    /// [`Self::check_bases`] (and its runs where its chunk was decoded).
    fn write_page(mem: &GuestMem, epoch: u64, p: &Page) -> Result<(), ReplicaError> {
        let gpa = p.gfn * PAGE_SIZE as u64;
        match &p.data {
            PageData::Full(d) => mem.write(gpa, d)?,
            PageData::Zero => mem.write(gpa, &[0u8; PAGE_SIZE])?,
            PageData::Delta(d) => {
                let (_, runs) = delta::parse(d).map_err(|source| ReplicaError::Delta { epoch, gfn: p.gfn, source })?;
                for (off, bytes) in runs {
                    mem.write(gpa + off as u64, bytes)?;
                }
            }
        }
        Ok(())
    }

    /// Checks that every delta of an epoch applies to the page `mem` holds
    /// (before anything is written: a mismatch leaves the replica committed).
    fn check_bases(mem: &GuestMem, s: &Staging) -> Result<(), ReplicaError> {
        let mut page = vec![0u8; PAGE_SIZE];
        for p in &s.pages {
            if let PageData::Delta(d) = &p.data {
                mem.read_page(p.gfn, &mut page)?;
                delta::check_base(&page, d).map_err(|source| ReplicaError::Delta {
                    epoch: s.epoch,
                    gfn: p.gfn,
                    source,
                })?;
            }
        }
        Ok(())
    }

    fn write_all(mem: &GuestMem, s: &Staging) -> Result<(), ReplicaError> {
        if s.full {
            mem.discard_all()?;
        }
        for (i, p) in s.pages.iter().enumerate() {
            if i == s.pages.len() / 2 {
                common::crashpoint::hit("secondary.mid_apply");
            }
            if s.full && p.is_zero() {
                continue; // already zero
            }
            Self::write_page(mem, s.epoch, p)?;
        }
        Ok(())
    }

    /// A live sync starts: its pages go to a fresh staging area (see
    /// [`SyncStage`]); a sync already open is replaced.
    pub fn begin_sync(&mut self) -> Result<(), ReplicaError> {
        self.check_live()?;
        if let Some(s) = &self.staging {
            return Err(ReplicaError::StagingInProgress { got: 0, staging: s.epoch });
        }
        let mem = if self.committed.is_none() {
            self.mem.discard_all()?;
            self.synced_pages = 0;
            self.mem.clone()
        } else {
            Arc::new(GuestMem::new(self.shape.mem_bytes)?)
        };
        self.sync = Some(SyncStage { mem, pages: 0 });
        Ok(())
    }

    /// A new authenticated data session from the primary: it owns staging
    /// from now on, and whatever an older session left staged (its
    /// connection not yet seen to end) is dropped. Returns its id. (Strangers
    /// never get here: only an authenticated peer opens a data session.)
    pub fn open_data_session(&mut self) -> u64 {
        self.data_session += 1;
        if let Some(e) = self.abort_staging() {
            tracing::warn!(
                epoch = e,
                "a newer session from the primary supersedes an older one: its staged epoch is dropped"
            );
        }
        if self.sync.take().is_some() {
            tracing::warn!("a newer session from the primary supersedes an older one: its live sync is dropped");
        }
        self.data_session
    }

    /// The data session that owns staging.
    pub fn data_session(&self) -> u64 {
        self.data_session
    }

    /// Drops whatever is staged (an epoch, a live sync) if `session` still
    /// owns staging; returns what was dropped (epoch, sync).
    pub fn end_data_session(&mut self, session: u64) -> (Option<u64>, bool) {
        if self.data_session != session {
            return (None, false);
        }
        (self.abort_staging(), self.sync.take().is_some())
    }

    /// Whether a live sync is open (its final epoch not yet committed).
    pub fn sync_open(&self) -> bool {
        self.sync.is_some()
    }

    /// Live-sync pages: into the open sync's staging area; with no sync open
    /// and nothing committed, straight into memory (there is no consistent
    /// state to protect yet).
    pub fn full_sync_chunk(&mut self, c: &PageChunk) -> Result<(), ReplicaError> {
        self.check_live()?;
        if self.sync.is_none() && self.committed.is_some() {
            return Err(ReplicaError::SyncAfterCommit);
        }
        for p in &c.pages {
            self.check_page(p)?;
            if matches!(p.data, PageData::Delta(_)) {
                return Err(ReplicaError::DeltaWithoutBase { gfn: p.gfn, what: "a live sync's page" });
            }
        }
        let mem = self.sync.as_ref().map_or_else(|| self.mem.clone(), |s| s.mem.clone());
        for p in &c.pages {
            // (no delta reaches here: refused above)
            Self::write_page(&mem, c.epoch, p)?;
        }
        mem.take_vmm_dirty();
        self.synced_pages += c.pages.len() as u64;
        if let Some(s) = &mut self.sync {
            s.pages += c.pages.len() as u64;
        }
        Ok(())
    }

    /// Starts staging epoch `epoch`.
    pub fn begin_epoch(&mut self, epoch: u64, announced: u64, full: bool) -> Result<(), ReplicaError> {
        self.check_live()?;
        if let Some(s) = &self.staging {
            return Err(ReplicaError::StagingInProgress { got: epoch, staging: s.epoch });
        }
        // the epoch after a live sync's pages ends it (a full epoch replaces
        // everything, an open sync included: dropped once it is accepted)
        let onto_sync = self.sync.is_some() && !full;
        match &self.committed {
            // a full epoch, or the epoch that ends a live sync, replaces
            // everything: it may skip epoch numbers (the primary ran on
            // while this replica was disconnected or syncing)
            Some(c) if (full || onto_sync) && epoch <= c.epoch => {
                return Err(ReplicaError::EpochOrder { got: epoch, expected: format!("> {}", c.epoch) })
            }
            Some(c) if !full && !onto_sync && epoch != c.epoch + 1 => {
                return Err(ReplicaError::EpochOrder { got: epoch, expected: (c.epoch + 1).to_string() })
            }
            None if !full && !onto_sync && self.synced_pages == 0 => {
                return Err(ReplicaError::EpochOrder {
                    got: epoch,
                    expected: "a full sync or a full epoch first".into(),
                })
            }
            _ => {}
        }
        if self.needs_resync() && !full && !onto_sync {
            return Err(ReplicaError::NeedsResync);
        }
        if full {
            self.sync = None;
        }
        self.staging =
            Some(Staging { epoch, announced, full, onto_sync, pages: Vec::new(), sum: EpochChecksum::default() });
        Ok(())
    }

    /// Stages one chunk of the current epoch.
    pub fn chunk(&mut self, c: PageChunk) -> Result<(), ReplicaError> {
        let Some(s) = self.staging.as_ref() else {
            return Err(ReplicaError::NotStaging("page chunk"));
        };
        if c.epoch != s.epoch {
            return Err(ReplicaError::ChunkEpoch { got: c.epoch, staging: s.epoch });
        }
        if s.pages.len() as u64 + c.pages.len() as u64 > s.announced {
            return Err(ReplicaError::TooManyPages { epoch: s.epoch, announced: s.announced });
        }
        for p in &c.pages {
            self.check_page(p)?;
            if s.full && matches!(p.data, PageData::Delta(_)) {
                return Err(ReplicaError::DeltaWithoutBase { gfn: p.gfn, what: "a full epoch's page" });
            }
        }
        let s = self.staging.as_mut().expect("checked above");
        for p in c.pages {
            s.sum.add(&p);
            s.pages.push(p);
        }
        Ok(())
    }

    /// Page data bytes of the epoch being staged (0 when none is).
    pub fn staged_bytes(&self) -> u64 {
        self.staging.as_ref().map_or(0, |s| common::proto::pages_bytes(&s.pages))
    }

    /// Drops a partly staged epoch (connection lost, bad frame): the replica stays committed.
    pub fn abort_staging(&mut self) -> Option<u64> {
        self.staging.take().map(|s| s.epoch)
    }

    /// Verifies and commits the staged epoch. On `Diverged` the epoch is
    /// applied but the replica is marked as needing a full resync.
    pub fn end_epoch(&mut self, end: EpochEnd) -> Result<u64, ReplicaError> {
        self.check_live()?;
        let Some(s) = self.staging.as_ref() else {
            return Err(ReplicaError::NotStaging("epoch end"));
        };
        if end.epoch != s.epoch {
            return Err(ReplicaError::EpochOrder { got: end.epoch, expected: s.epoch.to_string() });
        }
        let received = s.pages.len() as u64;
        if received != s.announced || received != end.page_count {
            return Err(ReplicaError::CountMismatch {
                epoch: s.epoch,
                announced: s.announced,
                received,
                ended: end.page_count,
            });
        }
        if s.sum.value() != end.checksum {
            return Err(ReplicaError::ChecksumMismatch { epoch: s.epoch, expected: end.checksum, got: s.sum.value() });
        }
        if end.state.shape != self.shape {
            return Err(ReplicaError::StateShape { epoch: s.epoch });
        }
        // verified: apply. From the first write until the last the replica
        // is torn; an error (or a panic, see `mark_torn`) leaves it so.
        // every delta against the page it will be written onto: a page that
        // is not its base (an epoch missed, another sync's copy) refuses the
        // epoch before anything is written
        let target = match (&s.onto_sync, &self.sync) {
            (true, Some(stage)) => stage.mem.clone(),
            _ => self.mem.clone(),
        };
        if let Err(e) = Self::check_bases(&target, s) {
            // the replica is still its committed epoch (and usable for a
            // failover), but no later delta can apply: a resync is needed
            self.staging = None;
            self.needs_resync = true;
            return Err(e);
        }
        common::crashpoint::hit("secondary.before_apply");
        let s = self.staging.take().expect("checked above");
        if s.onto_sync {
            // onto the sync's staging area, which then becomes the replica:
            // a failure here leaves the committed replica as it was (an
            // in-place stage has no committed epoch to lose)
            let stage = self.sync.take().expect("onto_sync means a sync is open");
            if let Err(e) = Self::write_all(&stage.mem, &s) {
                tracing::error!(epoch = s.epoch, error = %e, "applying a sync's final epoch failed: the sync is dropped");
                return Err(e);
            }
            stage.mem.take_vmm_dirty();
            tracing::info!(
                epoch = s.epoch,
                pages = stage.pages,
                "live sync committed: the staged copy is the replica now"
            );
            // the old copy is released on a thread of its own, a chunk at a
            // time: dropping gigabytes of touched memory takes long (the ack
            // waits for this apply), and at once it held up every thread
            // of this process that maps memory meanwhile
            let old = std::mem::replace(&mut self.mem, stage.mem);
            GuestMem::release_in_background(old, "castor-unmap");
            self.torn = None;
            self.needs_resync = false;
        } else {
            let was_torn = self.torn.replace(s.epoch);
            if let Err(e) = Self::write_all(&self.mem, &s) {
                tracing::error!(epoch = s.epoch, error = %e, "applying a verified epoch failed: the replica is unusable");
                return Err(ReplicaError::Torn { epoch: s.epoch, why: e.to_string() });
            }
            self.mem.take_vmm_dirty();
            // a full epoch rewrote every page: whatever was torn is repaired
            self.torn = if s.full { None } else { was_torn };
            if s.full {
                self.needs_resync = false;
            }
        }
        self.committed = Some(Committed { epoch: s.epoch, state: end.state });
        if let Some(expected) = end.digest {
            let got = self.mem.digest();
            if got != expected {
                self.needs_resync = true;
                tracing::error!(
                    epoch = s.epoch,
                    expected,
                    got,
                    "REPLICA DIVERGED from the primary: requesting a full resync"
                );
                return Err(ReplicaError::Diverged { epoch: s.epoch, expected, got });
            }
        }
        Ok(s.epoch)
    }
}

/// Helper for tests and benches: a data page.
pub fn data_page(gfn: u64, fill: u8) -> Page {
    Page::full(gfn, Bytes::from(vec![fill; PAGE_SIZE]))
}
