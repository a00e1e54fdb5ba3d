//! The codec's decoder for machine state (what EpochEnd and snapshots carry).
#![no_main]
use common::state::MachineState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = common::codec::decode::<MachineState>(data);
});
