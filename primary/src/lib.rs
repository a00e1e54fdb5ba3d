//! castor primary: the epoch engine, the replicator that owns the node's
//! protection mode, output commit and the client service.
//!
//! One epoch, from the timer to the released output: [`engine`] (boundary:
//! pause, collect, copy, save, resume) -> [`replicator`] (ships it, hears the
//! ack) -> [`mode`] (decides what the ack releases) -> [`router`] (hands the
//! output to its client). [`node`] wires them; docs/epoch-path.md maps it.

pub mod engine;
pub mod joiners;
pub mod mode;
pub mod node;
pub mod replicator;
pub mod router;
pub mod sender;
