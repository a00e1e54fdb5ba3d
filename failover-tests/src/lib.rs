//! Harness for castor's end-to-end tests: real `castor` processes on
//! loopback, a fault-injecting TCP proxy, and a kv client load that records
//! every acknowledged write.
//!
//! The `castor` binary is found through `CASTOR_BIN`, else next to this
//! crate in `target/release` (the test command builds it first).

pub mod cluster;
pub mod load;
/// The fault proxy lives in the runtime crate (the demo cuts its partition
/// with it too).
pub use runtime::proxy;

/// Path of the castor binary under test.
pub fn castor_bin() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("CASTOR_BIN") {
        return p.into();
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("castor");
        if p.exists() {
            return p;
        }
    }
    panic!("castor binary not found: build it (cargo build --release -p castor) or set CASTOR_BIN");
}

/// Serialises the tests of one binary: each starts VMs, and two clusters at
/// once on a 2-core machine would starve each other's heartbeats.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    common::sync::lock(&LOCK)
}
