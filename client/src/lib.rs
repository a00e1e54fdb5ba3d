//! Client library for a castor node's `kv` service.
//!
//! A [`KvClient`] has a client id and numbers its requests; it sends one
//! request at a time and waits for the response the node releases after
//! output commit. On connection loss or timeout it reconnects, trying the
//! nodes in turn, and sends the unanswered request again with the same
//! sequence number: the guest answers a retry again but applies it once.

pub mod resp;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::service::{ClientMsg, NodeMsg, MAX_SERVICE_FRAME};
use common::state::{KvOp, KvRequest, KvResponse};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// First pause between two tries of a call (jittered: up to twice as long).
const RETRY_MIN: Duration = Duration::from_millis(10);
/// Longest pause between two tries (jittered: up to twice as long).
const RETRY_MAX: Duration = Duration::from_millis(50);

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no node answered request {seq} within {waited:?}")]
    Timeout { seq: u32, waited: Duration },
    #[error("malformed message from node: {0}")]
    Malformed(String),
}

/// A released response and who released it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub resp: KvResponse,
    pub node: String,
    pub generation: u64,
    /// Connection attempts that failed before this reply (0 = first try).
    pub retries: u32,
}

/// A kv client bound to one client id.
#[derive(Debug)]
pub struct KvClient {
    id: u32,
    seq: u32,
    nodes: Vec<SocketAddr>,
    current: usize,
    conn: Option<Framed<TcpStream, LengthDelimitedCodec>>,
    /// How long to wait for one response before trying another node.
    pub attempt_timeout: Duration,
    /// How long to keep retrying one request.
    pub deadline: Duration,
    /// Reconnections so far.
    pub reconnects: u64,
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(MAX_SERVICE_FRAME).new_codec()
}

impl KvClient {
    /// A client with id `id` that talks to `nodes` (tried in order).
    pub fn new(id: u32, nodes: Vec<SocketAddr>) -> Self {
        KvClient {
            id,
            seq: 0,
            nodes,
            current: 0,
            conn: None,
            attempt_timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(60),
            reconnects: 0,
        }
    }

    /// Adds a node to try (one that started after this client).
    pub fn add_node(&mut self, addr: SocketAddr) {
        if !self.nodes.contains(&addr) {
            self.nodes.push(addr);
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// Continues an existing client's numbering (after a restart).
    pub fn set_next_seq(&mut self, next: u32) {
        self.seq = next.saturating_sub(1);
    }

    async fn connect(&mut self) -> bool {
        for _ in 0..self.nodes.len() {
            let addr = self.nodes[self.current];
            match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    self.conn = Some(Framed::new(s, codec()));
                    return true;
                }
                _ => self.current = (self.current + 1) % self.nodes.len(),
            }
        }
        false
    }

    fn fail_over(&mut self) {
        self.conn = None;
        self.reconnects += 1;
        self.current = (self.current + 1) % self.nodes.len();
    }

    /// Sends one operation and waits for its released response, retrying
    /// (same sequence number) against the other nodes as needed.
    pub async fn call(&mut self, op: KvOp, key: u64, value: u64) -> Result<Reply, ClientError> {
        self.seq += 1;
        let req = KvRequest { client: self.id, seq: self.seq, op, key, value };
        let start = Instant::now();
        let mut retries = 0;
        // between tries: a short pause, growing while no node answers
        let mut pause = common::retry::backoff(RETRY_MIN, RETRY_MAX);
        let payload = Bytes::from(
            common::codec::encode(&ClientMsg::Request(req)).map_err(|e| ClientError::Malformed(e.to_string()))?,
        );
        loop {
            if start.elapsed() > self.deadline {
                return Err(ClientError::Timeout { seq: req.seq, waited: start.elapsed() });
            }
            if self.conn.is_none() && !self.connect().await {
                retries += 1;
                tokio::time::sleep(common::retry::next_pause(&mut pause)).await;
                continue;
            }
            let conn = self.conn.as_mut().expect("connected");
            if conn.send(payload.clone()).await.is_err() {
                retries += 1;
                self.fail_over();
                continue;
            }
            let attempt_end = Instant::now() + self.attempt_timeout;
            loop {
                let left = attempt_end.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, conn.next()).await {
                    Ok(Some(Ok(frame))) => match common::codec::decode::<NodeMsg>(&frame) {
                        Ok(NodeMsg::Response { resp, node, generation })
                            if resp.client == self.id && resp.seq == req.seq =>
                        {
                            return Ok(Reply { resp, node, generation, retries });
                        }
                        Ok(NodeMsg::Response { .. }) => continue, // a late answer to an earlier try
                        Ok(NodeMsg::Unavailable { .. }) => break,
                        Err(e) => return Err(ClientError::Malformed(e.to_string())),
                    },
                    _ => break, // closed, error or timeout: try the next node
                }
            }
            retries += 1;
            self.fail_over();
            tokio::time::sleep(common::retry::next_pause(&mut pause)).await;
        }
    }
}
