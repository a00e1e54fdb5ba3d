//! castor secondary: the replication receiver, the page-exact replica, the
//! heartbeat monitor and failover activation (handing a running VM back as a
//! [`node::Promotion`]).

pub mod apply;
mod liveness;
pub mod mode;
pub mod node;
pub mod receiver;
mod rejoin;
pub mod replica;
pub mod takeover;
