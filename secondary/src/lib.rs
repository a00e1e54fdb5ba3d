//! castor secondary: receiver, replica store, heartbeat monitor and failover activation. Built in issues 3 and 4; this crate holds only the workspace slot for now.
