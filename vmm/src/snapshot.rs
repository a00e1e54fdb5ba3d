//! Snapshots: a paused machine's memory and full state in one file, and a fresh
//! machine (in any process) built from it.
//!
//! Format (little endian): magic `CASTSNP1`, u32 version, u64 state length,
//! the state (codec-encoded [`MachineState`]), then records of
//! `u64 gfn + 4096 bytes` for every non-zero page, a terminating gfn of
//! `u64::MAX`, and a CRC32 of everything before it. The whole file is verified
//! before anything is built from it.

use std::io::{BufWriter, Write};
use std::path::Path;

use crate::abi::PAGE_SIZE;
use crate::machine::{Machine, MachineError};
use crate::state::MachineState;
use crate::tracker::TrackerKind;

const MAGIC: &[u8; 8] = b"CASTSNP1";
const VERSION: u32 = 1;
const END: u64 = u64::MAX;

/// Errors of snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O on {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("not a castor snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot version {0} is not supported (this build reads {VERSION})")]
    Version(u32),
    #[error("snapshot is truncated")]
    Truncated,
    #[error("snapshot checksum mismatch: the file is corrupt")]
    Checksum,
    #[error("snapshot state: {0}")]
    State(String),
    #[error("snapshot page {0:#x} is outside the saved VM's memory")]
    BadPage(u64),
    #[error(transparent)]
    Machine(#[from] MachineError),
}

/// Writes the paused `machine`'s state and memory to `path`. Returns the number of pages written.
pub fn save(machine: &Machine, path: &Path) -> Result<u64, SnapshotError> {
    let io = |err| SnapshotError::Io { path: path.display().to_string(), err };
    let st = machine.save()?;
    let state = common::codec::encode(&st).map_err(|e| SnapshotError::State(e.to_string()))?;
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = BufWriter::new(file);
    let mut crc = crc32fast::Hasher::new();
    let mut put = |w: &mut BufWriter<std::fs::File>, b: &[u8]| -> std::io::Result<()> {
        crc.update(b);
        w.write_all(b)
    };
    put(&mut w, MAGIC).map_err(io)?;
    put(&mut w, &VERSION.to_le_bytes()).map_err(io)?;
    put(&mut w, &(state.len() as u64).to_le_bytes()).map_err(io)?;
    put(&mut w, &state).map_err(io)?;
    let mem = machine.memory();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut pages = 0;
    for gfn in mem.all_gfns() {
        mem.read_page(gfn, &mut page).map_err(MachineError::from)?;
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        put(&mut w, &gfn.to_le_bytes()).map_err(io)?;
        put(&mut w, &page).map_err(io)?;
        pages += 1;
    }
    put(&mut w, &END.to_le_bytes()).map_err(io)?;
    let sum = crc.finalize();
    w.write_all(&sum.to_le_bytes()).map_err(io)?;
    w.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)?;
    Ok(pages)
}

/// A verified snapshot file in memory.
#[derive(Debug)]
pub struct Snapshot {
    pub state: MachineState,
    bytes: Vec<u8>,
    pages_at: usize,
}

impl Snapshot {
    /// Reads and verifies `path`.
    pub fn read(path: &Path) -> Result<Self, SnapshotError> {
        let bytes = std::fs::read(path).map_err(|err| SnapshotError::Io { path: path.display().to_string(), err })?;
        Self::parse(bytes)
    }

    /// Verifies and parses snapshot bytes.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, SnapshotError> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        if bytes.len() < 8 + 4 + 8 + 8 + 4 {
            return Err(SnapshotError::Truncated);
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4"));
        if version != VERSION {
            return Err(SnapshotError::Version(version));
        }
        let body = bytes.len() - 4;
        let sum = u32::from_le_bytes(bytes[body..].try_into().expect("4"));
        if crc32fast::hash(&bytes[..body]) != sum {
            return Err(SnapshotError::Checksum);
        }
        let state_len = u64::from_le_bytes(bytes[12..20].try_into().expect("8")) as usize;
        let state_end = 20usize.checked_add(state_len).filter(|&e| e <= body).ok_or(SnapshotError::Truncated)?;
        let state: MachineState =
            common::codec::decode(&bytes[20..state_end]).map_err(|e| SnapshotError::State(e.to_string()))?;
        // validate the page records before anything is built
        let mut at = state_end;
        let limit = crate::memory::ram_ranges(state.shape.mem_bytes);
        loop {
            let gfn = u64::from_le_bytes(bytes.get(at..at + 8).ok_or(SnapshotError::Truncated)?.try_into().expect("8"));
            at += 8;
            if gfn == END {
                break;
            }
            let gpa = gfn.checked_mul(PAGE_SIZE).ok_or(SnapshotError::BadPage(gfn))?;
            if !limit.iter().any(|&(s, l)| gpa >= s && gpa + PAGE_SIZE <= s + l) {
                return Err(SnapshotError::BadPage(gfn));
            }
            at = at.checked_add(PAGE_SIZE as usize).filter(|&a| a <= body).ok_or(SnapshotError::Truncated)?;
        }
        if at != body {
            return Err(SnapshotError::Truncated);
        }
        Ok(Snapshot { state, pages_at: state_end, bytes })
    }

    /// Builds a machine from this snapshot (vCPUs not started).
    pub fn restore(&self, tracker: TrackerKind) -> Result<Machine, SnapshotError> {
        let m = Machine::restore(tracker, &self.state, |mem| {
            let mut at = self.pages_at;
            loop {
                let gfn = u64::from_le_bytes(self.bytes[at..at + 8].try_into().expect("8"));
                at += 8;
                if gfn == END {
                    return Ok(());
                }
                mem.write(gfn * PAGE_SIZE, &self.bytes[at..at + PAGE_SIZE as usize])?;
                at += PAGE_SIZE as usize;
            }
        })?;
        Ok(m)
    }
}
