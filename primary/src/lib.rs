//! castor primary: the replication sender. The epoch engine, output commit
//! and heartbeats come with the service (issue 4).

pub mod sender;
