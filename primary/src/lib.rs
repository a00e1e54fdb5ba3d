//! castor primary: the replication sender. The epoch engine, output commit
//! and heartbeats come with the service (issue 4).

pub mod engine;
pub mod node;
pub mod sender;
pub mod status;
