//! castor-runtime: what every castor node runs beside its role, shared by
//! the primary and the secondary: status and metrics, the control API, the
//! listeners and ready file, and the join preamble.

pub mod admission;
pub mod control;
pub mod harness;
pub mod host;
pub mod http;
pub mod join;
pub mod listen;
pub mod lograte;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod service;
pub mod state_dir;
pub mod status;
