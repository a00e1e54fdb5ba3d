//! The outbox: everything the devices send out of the VM, in order, until
//! the machine's owner drains it at an epoch boundary (where output commit
//! hooks in). Console lines and marker writes are bounded per drain (a
//! guest flooding them cannot grow the outbox, nor the epoch's state).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use common::state::Output;

/// Bound on console lines kept between two drains; more are dropped.
pub const CONSOLE_BACKLOG: usize = 10_000;
/// Marker and done writes kept between two drains (an epoch); more are
/// dropped.
pub const MARK_BACKLOG: usize = 4096;

#[derive(Debug, Default)]
struct Inner {
    outputs: Vec<Output>,
    /// When the oldest output was sent (None while empty).
    first_at: Option<Instant>,
    console_backlog: usize,
    mark_backlog: usize,
}

/// The machine's outbox (shared by its devices).
#[derive(Debug, Default)]
pub struct Outbox {
    inner: Mutex<Inner>,
    /// Not empty (read without the lock by the epoch engine).
    has_output: AtomicBool,
    /// Outputs held (read without the lock by the epoch loop).
    len: AtomicUsize,
}

impl Outbox {
    fn publish(&self, g: &mut Inner) {
        g.first_at.get_or_insert_with(Instant::now);
        self.has_output.store(!g.outputs.is_empty(), Ordering::Relaxed);
        self.len.store(g.outputs.len(), Ordering::Relaxed);
    }

    /// Adds outputs.
    pub fn extend(&self, outputs: impl IntoIterator<Item = Output>) {
        let mut g = common::sync::lock(&self.inner);
        let before = g.outputs.len();
        g.outputs.extend(outputs);
        if g.outputs.len() > before {
            self.publish(&mut g);
        }
    }

    /// Adds a console line (false: dropped for backlog).
    pub fn console(&self, o: Output) -> bool {
        let mut g = common::sync::lock(&self.inner);
        if g.console_backlog >= CONSOLE_BACKLOG {
            return false;
        }
        g.console_backlog += 1;
        g.outputs.push(o);
        self.publish(&mut g);
        true
    }

    /// Adds a marker or done write (false: dropped for backlog).
    pub fn mark(&self, o: Output) -> bool {
        let mut g = common::sync::lock(&self.inner);
        if g.mark_backlog >= MARK_BACKLOG {
            return false;
        }
        g.mark_backlog += 1;
        g.outputs.push(o);
        self.publish(&mut g);
        true
    }

    /// Takes everything, and when the oldest of it was sent.
    pub fn drain_timed(&self) -> (Vec<Output>, Option<Instant>) {
        let mut g = common::sync::lock(&self.inner);
        g.console_backlog = 0;
        g.mark_backlog = 0;
        self.has_output.store(false, Ordering::Relaxed);
        self.len.store(0, Ordering::Relaxed);
        (std::mem::take(&mut g.outputs), g.first_at.take())
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        !self.has_output.load(Ordering::Relaxed)
    }

    /// A copy of what it holds (the state save).
    pub fn snapshot(&self) -> Vec<Output> {
        common::sync::lock(&self.inner).outputs.clone()
    }

    /// Replaces what it holds (a restore: output still held by the saved
    /// state is released again by its new owner).
    pub fn replace(&self, outputs: Vec<Output>) {
        let mut g = common::sync::lock(&self.inner);
        g.outputs = outputs;
        g.first_at = None;
        if g.outputs.is_empty() {
            self.has_output.store(false, Ordering::Relaxed);
            self.len.store(0, Ordering::Relaxed);
        } else {
            self.publish(&mut g);
        }
    }
}
