//! The console and the marker ports: lines the guest writes (a buffer in
//! its memory named by an OUT to [`PORT_CONSOLE`]), its workload's done and
//! phase markers. They act only inside the vCPU's I/O exit, so quiescing
//! them is empty; their output goes to the outbox at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::state::Output;

use super::outbox::Outbox;
use super::{Device, DeviceError, LogLimiter};
use crate::abi::CONSOLE_MAX;
use crate::memory::GuestMem;

/// The console and marker ports.
#[derive(Debug)]
pub struct Console {
    mem: Arc<GuestMem>,
    outbox: Arc<Outbox>,
    lines: AtomicU64,
    dropped_lines: AtomicU64,
    dropped_marks: AtomicU64,
    bad: LogLimiter,
}

impl Console {
    pub fn new(mem: Arc<GuestMem>, outbox: Arc<Outbox>) -> Self {
        Console {
            mem,
            outbox,
            lines: AtomicU64::new(0),
            dropped_lines: AtomicU64::new(0),
            dropped_marks: AtomicU64::new(0),
            bad: LogLimiter::default(),
        }
    }

    /// A line the guest wrote: `{u32 len; bytes}` at `gpa`.
    pub fn line(&self, cpu: u32, gpa: u64) {
        let line = (|| {
            let len = self.mem.read_u32(gpa).ok()?;
            if len > CONSOLE_MAX {
                return None;
            }
            let mut buf = vec![0u8; len as usize];
            self.mem.read(gpa + 4, &mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf).into_owned())
        })();
        let Some(line) = line else {
            if let Some(n) = self.bad.allow() {
                tracing::warn!(cpu, gpa, occurrences = n, "malformed console buffer from guest");
            }
            return;
        };
        self.lines.fetch_add(1, Ordering::Relaxed);
        if !self.outbox.console(Output::Console { cpu, line }) {
            self.dropped_lines.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A done or marker write.
    pub fn mark(&self, o: Output) {
        if !self.outbox.mark(o) {
            self.dropped_marks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines produced so far, and lines dropped for backlog.
    pub fn counts(&self) -> (u64, u64) {
        (self.lines.load(Ordering::Relaxed), self.dropped_lines.load(Ordering::Relaxed))
    }

    /// Dropped for backlog: (console lines, marker writes).
    pub fn dropped(&self) -> (u64, u64) {
        (self.dropped_lines.load(Ordering::Relaxed), self.dropped_marks.load(Ordering::Relaxed))
    }
}

impl Device for Console {
    /// Lines produced so far.
    type State = u64;
    fn quiesce(&self) {}
    fn unquiesce(&self) {}
    fn take_output(&self, _out: &mut Vec<Output>) {}
    fn save(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }
    fn restore(&self, st: &u64) -> Result<(), DeviceError> {
        self.lines.store(*st, Ordering::Relaxed);
        Ok(())
    }
}
