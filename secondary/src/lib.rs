//! castor secondary: the replication receiver and the page-exact replica.
//! Heartbeat monitoring and failover activation come with the service (issue 4).

pub mod node;
pub mod receiver;
pub mod replica;
