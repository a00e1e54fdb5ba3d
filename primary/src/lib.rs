//! castor primary: the epoch engine, replication sender, output commit and heartbeats. Built in issue 4; this crate holds only the workspace slot for now.
