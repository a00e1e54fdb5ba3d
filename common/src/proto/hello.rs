//! The handshake: Hello and HelloAck, the pair's settings and how they
//! are checked against the peer's, and the connection's channel.

use serde::{Deserialize, Serialize};

use crate::state::VmShape;

/// First message, primary to secondary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub shape: VmShape,
    /// The sender's generation (fencing term).
    pub generation: u64,
    /// What this connection carries.
    pub channel: Channel,
    /// The settings both nodes must agree on (since version 5).
    pub pair: PairSettings,
    /// The CPU the guest was given: a secondary whose host cannot run it
    /// refuses (since version 5).
    pub cpu: crate::state::CpuModel,
}

/// What the two nodes of a pair must agree on, or the pair is not safe:
/// with a witness on one node only, the other promotes (or runs alone) on
/// silence without asking it, and both serve. Each side sends its own in
/// the handshake (the Hello and the HelloAck) and refuses a peer whose
/// settings differ (since version 5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairSettings {
    /// The witness's VM id when a witness decides (`--witness` with
    /// `--vm-id`); `None`: the two-node rule.
    pub witness_vm: Option<String>,
    /// Silence after which the peer counts as gone (ms).
    pub heartbeat_timeout_ms: u64,
    /// The heartbeat period (ms).
    pub heartbeat_interval_ms: u64,
    /// The guest's network card MAC when the node has `--net`: a node
    /// without the card (or with another MAC) could not take the guest's
    /// network over.
    pub net_mac: Option<[u8; 6]>,
}

/// How two nodes' [`PairSettings`] differ (each line names a setting, ours
/// and the peer's value, and what to change).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the pair's settings differ: {}", .0.join("; "))]
pub struct PairMismatch(pub Vec<String>);

impl PairSettings {
    /// Why a pair of `self` (this node) and `peer` is unsafe, if it is.
    /// A witness on one node only, different VM ids, different heartbeat
    /// timeouts, or a heartbeat period that does not fit the timeout at
    /// least twice.
    pub fn check_peer(&self, peer: &PairSettings) -> Result<(), PairMismatch> {
        let mut why = Vec::new();
        match (&self.witness_vm, &peer.witness_vm) {
            (Some(_), None) | (None, Some(_)) => why.push(format!(
                "witness: this node {}, the peer {} (give both nodes --witness and the same --vm-id, or neither)",
                witness_text(&self.witness_vm),
                witness_text(&peer.witness_vm)
            )),
            (Some(a), Some(b)) if a != b => why.push(format!(
                "witness vm id: this node {a:?}, the peer {b:?} (both nodes of a pair name the same --vm-id)"
            )),
            _ => {}
        }
        if self.heartbeat_timeout_ms != peer.heartbeat_timeout_ms {
            why.push(format!(
                "heartbeat timeout: this node {} ms, the peer {} ms (give both the same --heartbeat-timeout-ms)",
                self.heartbeat_timeout_ms, peer.heartbeat_timeout_ms
            ));
        }
        if self.net_mac != peer.net_mac {
            let text = |m: &Option<[u8; 6]>| match m {
                Some(m) => format!("--net with mac {}", crate::state::mac_text(m)),
                None => "no --net".into(),
            };
            why.push(format!(
                "network card: this node {}, the peer {} (both nodes of a pair give --net with the guest's MAC, or neither)",
                text(&self.net_mac),
                text(&peer.net_mac)
            ));
        }
        for (who, s) in [("this node", self), ("the peer", peer)] {
            if s.heartbeat_interval_ms.saturating_mul(2) > s.heartbeat_timeout_ms {
                why.push(format!(
                    "{who}'s heartbeat period {} ms is more than half its heartbeat timeout {} ms (a late heartbeat would look like a dead peer)",
                    s.heartbeat_interval_ms, s.heartbeat_timeout_ms
                ));
            }
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(PairMismatch(why))
        }
    }
}

fn witness_text(w: &Option<String>) -> String {
    match w {
        Some(vm) => format!("uses a witness (vm id {vm:?})"),
        None => "has no witness".into(),
    }
}

/// The two connections of a primary/secondary pair: epochs and heartbeats
/// travel separately so a large epoch cannot delay a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Channel {
    Data,
    Heartbeat,
}

/// The secondary's answer to the Hello: the session is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub version: u16,
    /// The replica's committed epoch, if any.
    pub committed_epoch: Option<u64>,
    /// The secondary's generation.
    pub generation: u64,
    /// The secondary's name in the witness (unique per process), at most
    /// [`MAX_NODE_NAME`] bytes.
    pub node: String,
    /// The secondary's settings (the primary checks them too).
    pub pair: PairSettings,
}

/// Longest node name a HelloAck may carry.
pub const MAX_NODE_NAME: usize = 160;

#[cfg(test)]
mod pair_tests {
    use super::*;

    fn base() -> PairSettings {
        PairSettings {
            witness_vm: Some("vm-1".into()),
            heartbeat_timeout_ms: 100,
            heartbeat_interval_ms: 20,
            net_mac: None,
        }
    }

    #[test]
    fn a_pair_agrees_only_on_the_same_witness_and_timing() {
        assert_eq!(base().check_peer(&base()), Ok(()));
        let none = PairSettings { witness_vm: None, ..base() };
        assert_eq!(none.check_peer(&none), Ok(()), "the two-node rule on both sides is a pair");
        // a witness on one node only: refused whichever side has it
        for (a, b) in [(&base(), &none), (&none, &base())] {
            let e = a.check_peer(b).unwrap_err();
            assert_eq!(e.0.len(), 1, "{e}");
            assert!(e.0[0].contains("--witness"), "{e}");
        }
        let other_vm = PairSettings { witness_vm: Some("vm-2".into()), ..base() };
        assert!(base().check_peer(&other_vm).unwrap_err().to_string().contains("vm id"));
        let slower = PairSettings { heartbeat_timeout_ms: 300, ..base() };
        assert!(base().check_peer(&slower).unwrap_err().to_string().contains("heartbeat timeout"));
        // a period that does not fit twice in the timeout, on either side
        let lazy = PairSettings { heartbeat_interval_ms: 60, ..base() };
        assert!(lazy.check_peer(&lazy).is_err());
        assert!(base().check_peer(&lazy).unwrap_err().to_string().contains("the peer's heartbeat period"));
        // every difference is named at once
        let all = PairSettings { witness_vm: None, heartbeat_timeout_ms: 30, heartbeat_interval_ms: 20, net_mac: None };
        assert_eq!(base().check_peer(&all).unwrap_err().0.len(), 3);
    }

    #[test]
    fn a_pair_agrees_on_the_guests_network_card() {
        let card = PairSettings { net_mac: Some([0x52, 0x54, 0, 0, 0, 1]), ..base() };
        assert_eq!(card.check_peer(&card), Ok(()));
        let e = card.check_peer(&base()).unwrap_err().to_string();
        assert!(e.contains("52:54:00:00:00:01") && e.contains("no --net"), "{e}");
        let other = PairSettings { net_mac: Some([0x52, 0x54, 0, 0, 0, 2]), ..base() };
        assert!(card.check_peer(&other).is_err());
    }
}
