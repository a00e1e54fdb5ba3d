//! The client-facing service protocol of a castor node (the `kv` guest's
//! requests and responses), framed with tokio-util's length-delimited codec
//! and encoded by the project codec.

use serde::{Deserialize, Serialize};

use crate::state::{KvRequest, KvResponse};

/// Largest service frame.
pub const MAX_SERVICE_FRAME: usize = 64 << 10;

/// Client to node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    Request(KvRequest),
}

/// Node to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeMsg {
    /// A response released by output commit, with the node and generation
    /// that released it.
    Response { resp: KvResponse, node: String, generation: u64 },
    /// The node cannot take requests (not primary, fenced, shutting down).
    Unavailable { reason: String },
}
