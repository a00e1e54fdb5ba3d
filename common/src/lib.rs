//! castor-common: the types and wire both sides of castor agree on (no KVM calls).
//!
//! * [`state`]: the serde-serializable machine state (vCPU, VM, devices, shape).
//! * [`codec`]: the one place that knows the binary encoding (bincode 2).
//! * [`frame`]: framing with CRC, MAC and sequence checks (tokio-util codec).
//! * [`proto`]: replication messages, raw page chunks, chunking, checksums.
//! * [`auth`]: shared-secret handshake and session keys.

pub mod auth;
pub mod beats;
pub mod codec;
pub mod crashpoint;
pub mod frame;
pub mod link;
pub mod liveness;
pub mod proto;
pub mod retry;
pub mod service;
pub mod state;
pub mod sync;
