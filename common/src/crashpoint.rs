//! Named crash points for fault-injection tests.
//!
//! `CASTOR_CRASH_AT=name` (or `name:N`, the N-th time, default 1) makes the
//! process abort on the spot when it reaches the point `name`, as a kill -9
//! would: no destructor, no flush, no goodbye to the peer. `name:N:panic`
//! panics there instead (the N-th time), and `name:N+:panic` every time from
//! the N-th on: a bug in the code at that point, as the code around it sees it. Every test hook is
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
    /// From the N-th hit on, not only at it.
    onward: bool,
    panic: bool,
    seen: AtomicU64,
}

fn parse(v: &str) -> Target {
    let mut parts = v.split(':');
    let name = parts.next().unwrap_or_default().to_string();
    let (nth, onward) = match parts.next() {
        Some(k) => match k.strip_suffix('+') {
            Some(k) => (k.parse().unwrap_or(1), true),
            None => (k.parse().unwrap_or(1), false),
        },
        None => (1, false),
    };
    let panic = parts.next() == Some("panic");
    Target { name, nth: nth.max(1), onward, panic, seen: AtomicU64::new(0) }
}

/// The target named by the environment variable `var`, read once into
/// `cell`; none unless the test hooks are on.
fn env_target(var: &str, cell: &'static OnceLock<Option<Target>>) -> Option<&'static Target> {
    if !test_hooks_enabled() {
        return None;
    }
    cell.get_or_init(|| std::env::var(var).ok().map(|v| parse(&v))).as_ref()
}

fn target() -> Option<&'static Target> {
    static T: OnceLock<Option<Target>> = OnceLock::new();
    env_target("CASTOR_CRASH_AT", &T)
}

fn fail_target() -> Option<&'static Target> {
    static T: OnceLock<Option<Target>> = OnceLock::new();
    env_target("CASTOR_FAIL_AT", &T)
}

/// Whether the N-th hit of `t` (counted here) is one it acts on: the N-th,
/// or any from the N-th on.
fn due(t: &Target) -> Option<u64> {
    let n = t.seen.fetch_add(1, Ordering::SeqCst) + 1;
    (n == t.nth || (t.onward && n > t.nth)).then_some(n)
}

/// Points where a test can inject an error (`CASTOR_FAIL_AT=name[:N[+]]`,
/// with `--test-hooks`): the code there fails as if the operation had.
pub const FAIL_POINTS: &[&str] = &["secondary.restore", "secondary.trial_restore"];

/// Whether the operation at `name` is to fail now (an injected error, see
/// [`FAIL_POINTS`]): its N-th time, or every time from the N-th on.
pub fn fail_at(name: &str) -> bool {
    fail_target().is_some_and(|t| t.name == name && due(t).is_some())
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

/// Aborts the process (or panics, if so configured) if `name` is the
/// configured crash point and this is its N-th hit (or later, with `N+`).
#[inline]
pub fn hit(name: &str) {
    if let Some(t) = target() {
        if t.name == name {
            if let Some(n) = due(t) {
                if t.panic {
                    panic!("castor: injected panic at crash point {name} (hit {n})");
                }
                eprintln!("castor: crash point {name} reached: aborting");
                std::process::abort();
            }
        }
    }
}

/// Panics that the code around them handles. castor's panic hook ends the
/// process on any panic, except inside [`contain`]: there the panic unwinds
/// to the caller, which must leave nothing half done behind (the apply of an
/// epoch marks its replica unusable before it writes a page).
pub mod contained {
    use std::cell::Cell;

    thread_local! {
        static INSIDE: Cell<bool> = const { Cell::new(false) };
    }

    /// Runs `f`; a panic in it comes back as `Err(message)`.
    pub fn contain<R>(f: impl FnOnce() -> R) -> Result<R, String> {
        INSIDE.with(|c| c.set(true));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        INSIDE.with(|c| c.set(false));
        r.map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into())
        })
    }

    /// Whether this thread is inside [`contain`] (the panic hook asks).
    pub fn is_inside() -> bool {
        INSIDE.with(|c| c.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = parse("secondary.mid_apply:3+:panic");
        assert_eq!((t.name.as_str(), t.nth, t.onward, t.panic), ("secondary.mid_apply", 3, true, true));
        let t = parse("primary.after_ack:2");
        assert_eq!((t.name.as_str(), t.nth, t.onward, t.panic), ("primary.after_ack", 2, false, false));
        let t = parse("x");
        assert_eq!((t.nth, t.onward, t.panic), (1, false, false));
    }

    #[test]
    fn contained_panics_come_back_as_errors() {
        assert_eq!(contained::contain(|| 7), Ok(7));
        assert!(!contained::is_inside());
        let e = contained::contain(|| -> u32 { panic!("boom {}", 1) });
        assert_eq!(e, Err("boom 1".to_string()));
        assert!(!contained::is_inside());
    }

    #[test]
    fn a_crash_point_is_inert_without_the_flag() {
        // the only test in this binary that touches this variable
        std::env::set_var("CASTOR_CRASH_AT", "test.inert:1");
        assert!(!test_hooks_enabled());
        hit("test.inert"); // would abort the test process if it acted
        assert!(target().is_none());
    }
}
