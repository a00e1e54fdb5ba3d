//! `--state-dir`: what a node must not forget across a restart, written
//! with fsync before it matters.
//!
//! * `node-id`: this node's durable name (made once): a primary that lost
//!   its secondary knows it is the same node when it comes back;
//! * `generation`: the highest fencing generation this node has seen or
//!   taken, stored on every change before the node acts on it (a promoted
//!   node that restarts as a secondary still refuses the primary it
//!   replaced).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("state dir {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("state dir {path}: unreadable {what}: {value:?}")]
    Corrupt { path: PathBuf, what: &'static str, value: String },
}

/// A node's state directory.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    /// Serialises every read-compare-write of the directory (the receiver
    /// and the promotion both raise the generation): held across the read,
    /// the comparison and the write, so two raisers cannot both read the
    /// old value and the lower one land last. One process owns a state
    /// directory, so an in-process lock is enough.
    lock: std::sync::Mutex<()>,
}

/// Writes `bytes` to `path` atomically: a temporary file beside it (made
/// by `tempfile`, mode 0666 less the umask as `File::create` would), then a
/// rename over `path`. `durable`: the file is synced before the rename and
/// the directory after it.
pub fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut f = tempfile::Builder::new()
        .prefix(".castor-")
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)?;
    f.write_all(bytes)?;
    if durable {
        f.as_file().sync_all()?;
    }
    f.persist(path).map_err(|e| e.error)?;
    if durable {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateDirError + '_ {
    move |err| StateDirError::Io { path: path.to_path_buf(), err }
}

impl StateDir {
    /// Opens (creating) `dir`.
    pub fn open(dir: &Path) -> Result<StateDir, StateDirError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(StateDir { dir: dir.to_path_buf(), lock: std::sync::Mutex::new(()) })
    }

    fn read(&self, file: &str) -> Result<Option<String>, StateDirError> {
        let p = self.dir.join(file);
        match std::fs::read_to_string(&p) {
            Ok(s) => Ok(Some(s.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StateDirError::Io { path: p, err: e }),
        }
    }

    /// Writes `file` atomically and durably: temp file, fsync, rename,
    /// fsync of the directory. The caller holds `self.lock` (the guard
    /// proves it) across whatever it read to decide this write.
    fn write(&self, _locked: &std::sync::MutexGuard<'_, ()>, file: &str, value: &str) -> Result<(), StateDirError> {
        let p = self.dir.join(file);
        write_atomic(&p, value.as_bytes(), true).map_err(io(&p))
    }

    /// The durable node id, made from `name` and a random suffix on first use.
    pub fn node_id(&self, name: &str) -> Result<String, StateDirError> {
        let locked = common::sync::lock(&self.lock);
        if let Some(id) = self.read("node-id")? {
            if !id.is_empty() {
                return Ok(id);
            }
        }
        let nonce = common::auth::nonce()
            .map_err(|e| StateDirError::Io { path: self.dir.clone(), err: std::io::Error::other(e.to_string()) })?;
        let id = format!("{name}@{}", nonce[..6].iter().map(|b| format!("{b:02x}")).collect::<String>());
        self.write(&locked, "node-id", &id)?;
        Ok(id)
    }

    /// The stored generation (0 if none).
    pub fn generation(&self) -> Result<u64, StateDirError> {
        let _locked = common::sync::lock(&self.lock);
        self.read_generation()
    }

    fn read_generation(&self) -> Result<u64, StateDirError> {
        match self.read("generation")? {
            None => Ok(0),
            Some(v) => v.parse().map_err(|_| StateDirError::Corrupt {
                path: self.dir.join("generation"),
                what: "generation",
                value: v,
            }),
        }
    }

    /// Stores `g` if it is higher than the stored one; returns the stored
    /// value. The read, the comparison and the write are one critical
    /// section: concurrent raises leave the highest of them stored.
    pub fn raise_generation(&self, g: u64) -> Result<u64, StateDirError> {
        let locked = common::sync::lock(&self.lock);
        let now = self.read_generation()?;
        if g > now {
            self.write(&locked, "generation", &g.to_string())?;
            return Ok(g);
        }
        Ok(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_the_file_and_leave_nothing_beside_it() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("castor-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("value");
        write_atomic(&f, b"one", true).unwrap();
        write_atomic(&f, b"two", false).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        // as File::create would make it: 0666 less the umask, never more
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert!(mode & 0o600 == 0o600 && mode & !0o666 == 0, "{mode:o}");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1, "a temporary file was left");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn generation_and_node_id_survive_a_reopen_and_never_go_down() {
        let d = std::env::temp_dir().join(format!("castor-statedir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let s = StateDir::open(&d).unwrap();
        assert_eq!(s.generation().unwrap(), 0);
        let id = s.node_id("s").unwrap();
        assert!(id.starts_with("s@"));
        assert_eq!(s.raise_generation(3).unwrap(), 3);
        assert_eq!(s.raise_generation(2).unwrap(), 3, "a generation never goes down");
        drop(s);
        let s = StateDir::open(&d).unwrap();
        assert_eq!(s.generation().unwrap(), 3);
        assert_eq!(s.node_id("other").unwrap(), id);
        std::fs::write(d.join("generation"), "x").unwrap();
        assert!(matches!(s.generation(), Err(StateDirError::Corrupt { .. })));
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Many threads raise the generation to different values at once, round
    /// after round: what a fresh open reads back is always the highest (a
    /// promotion raising to 7 racing a receiver raising to 6 never ends at 6).
    #[test]
    fn concurrent_raises_keep_the_maximum() {
        let d = std::env::temp_dir().join(format!("castor-statedir-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        const THREADS: u64 = 8;
        const ROUNDS: u64 = 40;
        let s = StateDir::open(&d).unwrap();
        for round in 0..ROUNDS {
            let base = round * THREADS;
            let barrier = std::sync::Barrier::new(THREADS as usize);
            std::thread::scope(|sc| {
                for t in 0..THREADS {
                    let (s, barrier) = (&s, &barrier);
                    sc.spawn(move || {
                        barrier.wait();
                        s.raise_generation(base + t + 1).unwrap();
                    });
                }
            });
            let want = base + THREADS;
            assert_eq!(
                StateDir::open(&d).unwrap().generation().unwrap(),
                want,
                "round {round}: the generation went down"
            );
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
