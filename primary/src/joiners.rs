//! Joining secondaries' connections, paired by node: a secondary that
//! joins dials a data and a heartbeat connection, and each authenticates
//! on its own task; a session is the two of one node (the name in its
//! HelloAck), never two connections that happened to arrive one after the
//! other (two secondaries joining at once would otherwise be crossed).

use std::collections::VecDeque;

use common::proto::Channel;

/// Nodes whose other connection may be awaited at once; past it the
/// oldest is dropped (a stranger cannot get this far: both connections
/// authenticated).
pub const MAX_WAITING: usize = 4;

/// Connections waiting for their node's other one.
#[derive(Debug)]
pub struct Pairs<T> {
    waiting: VecDeque<(String, Option<T>, Option<T>)>,
}

impl<T> Default for Pairs<T> {
    fn default() -> Self {
        Pairs { waiting: VecDeque::new() }
    }
}

impl<T> Pairs<T> {
    /// Adds `node`'s connection on `channel`; returns (data, heartbeat)
    /// once both of that node are here. A second connection of the same
    /// channel replaces the first (a redial).
    pub fn add(&mut self, node: &str, channel: Channel, conn: T) -> Option<(T, T)> {
        let i = match self.waiting.iter().position(|w| w.0 == node) {
            Some(i) => i,
            None => {
                if self.waiting.len() >= MAX_WAITING {
                    self.waiting.pop_front();
                }
                self.waiting.push_back((node.to_string(), None, None));
                self.waiting.len() - 1
            }
        };
        let w = &mut self.waiting[i];
        match channel {
            Channel::Data => w.1 = Some(conn),
            Channel::Heartbeat => w.2 = Some(conn),
        }
        if w.1.is_some() && w.2.is_some() {
            let (_, d, h) = self.waiting.remove(i)?;
            return d.zip(h);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_pair_by_node_not_by_arrival() {
        let mut p = Pairs::default();
        assert_eq!(p.add("a", Channel::Data, 1), None);
        assert_eq!(p.add("b", Channel::Data, 2), None);
        // b's heartbeat arrives first: it pairs with b's data, not a's
        assert_eq!(p.add("b", Channel::Heartbeat, 3), Some((2, 3)));
        assert_eq!(p.add("a", Channel::Data, 4), None, "a redial replaces a's data");
        assert_eq!(p.add("a", Channel::Heartbeat, 5), Some((4, 5)));
        for n in 0..10 {
            p.add(&format!("n{n}"), Channel::Data, n);
        }
        assert_eq!(p.waiting.len(), MAX_WAITING);
        assert_eq!(p.add("n0", Channel::Heartbeat, 99), None, "the oldest was dropped");
        assert_eq!(p.add("n9", Channel::Heartbeat, 99), Some((9, 99)));
    }
}
