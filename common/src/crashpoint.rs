//! Named crash points for fault-injection tests.
//!
//! `CASTOR_CRASH_AT=name` (or `name:N`, the N-th time, default 1) makes the
//! process abort on the spot when it reaches the point `name`, as a kill -9
//! would: no destructor, no flush, no goodbye to the peer. Every test hook is
//! inert unless the command line enabled them (`--test-hooks`, which calls
//! [`enable_test_hooks`]): an environment variable alone changes nothing.
//! Disabled, a crash point costs one atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

static HOOKS: AtomicBool = AtomicBool::new(false);

/// Lets the test hooks (crash points, forced tracking loss) act. Call it at
/// start-up, before any hook is reached.
pub fn enable_test_hooks() {
    HOOKS.store(true, Ordering::SeqCst);
}

/// Whether the command line enabled the test hooks.
pub fn test_hooks_enabled() -> bool {
    HOOKS.load(Ordering::Relaxed)
}

struct Target {
    name: String,
    nth: u64,
    seen: AtomicU64,
}

fn target() -> Option<&'static Target> {
    if !test_hooks_enabled() {
        return None;
    }
    static T: OnceLock<Option<Target>> = OnceLock::new();
    T.get_or_init(|| {
        let v = std::env::var("CASTOR_CRASH_AT").ok()?;
        let (name, nth) = match v.split_once(':') {
            Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
            None => (v, 1),
        };
        Some(Target { name, nth: nth.max(1), seen: AtomicU64::new(0) })
    })
    .as_ref()
}

/// Every crash point castor has, in epoch-commit order.
pub const POINTS: &[&str] = &[
    "primary.before_pause",
    "primary.after_collect",
    "primary.after_save",
    "primary.after_resume",
    "primary.after_epoch_begin",
    "primary.mid_chunks",
    "primary.after_epoch_end",
    "primary.after_ack",
    "primary.after_release",
    "secondary.after_begin",
    "secondary.mid_chunks",
    "secondary.before_apply",
    "secondary.mid_apply",
    "secondary.after_apply",
    "secondary.after_ack",
];

/// Aborts the process if `name` is the configured crash point (and this is its N-th hit).
#[inline]
pub fn hit(name: &str) {
    if let Some(t) = target() {
        if t.name == name && t.seen.fetch_add(1, Ordering::SeqCst) + 1 == t.nth {
            eprintln!("castor: crash point {name} reached: aborting");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_point_is_inert_without_the_flag() {
        // the only test in this binary that touches this variable
        std::env::set_var("CASTOR_CRASH_AT", "test.inert:1");
        assert!(!test_hooks_enabled());
        hit("test.inert"); // would abort the test process if it acted
        assert!(target().is_none());
    }
}
