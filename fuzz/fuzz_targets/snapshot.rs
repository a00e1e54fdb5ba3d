//! The snapshot file parser (verification only: nothing is built).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm::snapshot::Snapshot::parse(data.to_vec());
});
