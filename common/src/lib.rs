//! castor-common: the types both sides of castor agree on.
//!
//! * [`state`]: the serde-serializable machine state (vCPU, VM, devices, shape).
//! * [`codec`]: the one place that knows the binary encoding (bincode 2).

pub mod codec;
pub mod state;
