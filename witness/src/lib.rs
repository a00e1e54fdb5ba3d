//! The witness: etcd as the third party that breaks the two-node tie.
//!
//! Keys under `/castor/<vm-id>/`:
//!
//! * `term`: the fencing token, the generation now in force (decimal, never
//!   leased). Only a primary's start and a promotion raise it.
//! * `sync`: `{"node": N, "term": T}`, the secondary that is caught up with
//!   term `T` and may be promoted. The primary writes it when a session's
//!   secondary has acknowledged an epoch, and deletes it before it releases
//!   any output that secondary has not acknowledged (running alone).
//! * `primary`: `{"node": N, "term": T}`, attached to a lease of the node
//!   that serves, for tools and to refuse a second `castor primary` for the
//!   same VM while one is alive.
//!
//! Every decision is one transaction that compares before it writes
//! ([`Witness::promote`], [`Witness::run_alone`], [`Witness::record_sync`],
//! [`Witness::claim_primary`]), so a lease or a timeout alone never decides
//! (the fencing-token argument). A request that cannot reach etcd answers
//! [`WitnessError::Unreachable`]: the caller holds, it never guesses.

pub mod pool;
pub mod server;

use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

/// Errors of the witness client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WitnessError {
    #[error("the witness is unreachable: {0}")]
    Unreachable(String),
    #[error("bad witness configuration: {0}")]
    Config(String),
    #[error("the witness holds a value castor cannot read at {key}: {value:?}")]
    Corrupt { key: String, value: String },
    #[error("a primary of vm {vm} is alive: {holder}")]
    PrimaryAlive { vm: String, holder: String },
    #[error(
        "vm {vm} already has term {term}: an earlier primary of it may be frozen, not dead (its lease expires \
         either way); start a new primary for it only with --replace, once every earlier node of it is known dead"
    )]
    HasHistory { vm: String, term: u64 },
}

/// What the witness decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Granted,
    /// A newer request of this node was applied first (this one was
    /// delayed in flight): it changed nothing.
    Superseded,
    /// Refused: the term in force (higher than ours when fenced) and why.
    Refused {
        term: u64,
        why: String,
    },
}

/// The value of `sync` and `primary`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub node: String,
    pub term: u64,
}

impl Holder {
    fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a holder serialises")
    }
}

/// Where the witness is and what it is asked about.
#[derive(Debug, Clone)]
pub struct WitnessConfig {
    /// etcd client URLs (`http://host:port`).
    pub endpoints: Vec<String>,
    pub vm_id: String,
    /// This node's name in the witness (unique per process).
    pub node: String,
    /// Each request's deadline.
    pub timeout: Duration,
    /// TTL of the `primary` key's lease.
    pub lease_ttl: Duration,
}

impl WitnessConfig {
    /// Parses `URL[,URL...]`.
    pub fn new(urls: &str, vm_id: &str, node: &str) -> Result<WitnessConfig, WitnessError> {
        let endpoints: Vec<String> =
            urls.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        if endpoints.is_empty() {
            return Err(WitnessError::Config("no witness URL".into()));
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(WitnessError::Config(format!("{e}: a witness URL is http://HOST:PORT")));
            }
        }
        if vm_id.is_empty()
            || vm_id.len() > 128
            || !vm_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(WitnessError::Config(format!("{vm_id:?}: a vm id is 1-128 of [A-Za-z0-9._-]")));
        }
        Ok(WitnessConfig {
            endpoints,
            vm_id: vm_id.into(),
            node: node.into(),
            timeout: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(5),
        })
    }
}

/// A connection to the witness (cheap to clone).
#[derive(Clone)]
pub struct Witness {
    client: Client,
    cfg: WitnessConfig,
    /// Sequence of this node's primary requests (see [`Witness::record_sync`]).
    seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Witness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Witness").field("cfg", &self.cfg).finish()
    }
}

fn unreachable(e: impl std::fmt::Display) -> WitnessError {
    WitnessError::Unreachable(e.to_string())
}

impl Witness {
    /// Connects lazily: an etcd that is down now is not an error here.
    pub async fn connect(cfg: WitnessConfig) -> Result<Witness, WitnessError> {
        let opts = ConnectOptions::new()
            .with_timeout(cfg.timeout)
            .with_connect_timeout(cfg.timeout)
            .with_keep_alive(Duration::from_secs(1), cfg.timeout);
        let client = Client::connect(&cfg.endpoints, Some(opts)).await.map_err(unreachable)?;
        Ok(Witness { client, cfg, seq: Default::default() })
    }

    pub fn config(&self) -> &WitnessConfig {
        &self.cfg
    }

    fn key(&self, name: &str) -> String {
        format!("/castor/{}/{name}", self.cfg.vm_id)
    }

    /// Compare: `term` is `t` (absent counts as 0).
    fn term_is(&self, t: u64) -> Compare {
        if t == 0 {
            Compare::create_revision(self.key("term"), CompareOp::Equal, 0)
        } else {
            Compare::value(self.key("term"), CompareOp::Equal, t.to_string())
        }
    }

    /// Compare: no newer request of this primary was applied.
    fn in_order(&self, seq: u64) -> (Compare, TxnOp) {
        (Compare::value(self.key("pseq"), CompareOp::Less, pad(seq)), TxnOp::put(self.key("pseq"), pad(seq), None))
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, WitnessError> {
        let mut c = self.client.clone();
        // the client's own deadline covers each attempt; this one covers a
        // channel that waits for a connection
        match tokio::time::timeout(self.cfg.timeout * 2, c.txn(txn)).await {
            Ok(r) => r.map_err(unreachable),
            Err(_) => Err(WitnessError::Unreachable(format!("no answer in {:?}", self.cfg.timeout * 2))),
        }
    }

    fn parse_term(&self, kvs: &[etcd_client::KeyValue]) -> Result<u64, WitnessError> {
        match kvs.first() {
            None => Ok(0),
            Some(kv) => {
                let v = String::from_utf8_lossy(kv.value()).to_string();
                v.parse().map_err(|_| WitnessError::Corrupt { key: self.key("term"), value: v })
            }
        }
    }

    fn parse_holder(&self, name: &str, kvs: &[etcd_client::KeyValue]) -> Result<Option<Holder>, WitnessError> {
        match kvs.first() {
            None => Ok(None),
            Some(kv) => serde_json::from_slice(kv.value()).map(Some).map_err(|_| WitnessError::Corrupt {
                key: self.key(name),
                value: String::from_utf8_lossy(kv.value()).into(),
            }),
        }
    }

    fn gets(resp: &etcd_client::TxnResponse) -> Vec<Vec<etcd_client::KeyValue>> {
        resp.op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs().to_vec()),
                _ => None,
            })
            .collect()
    }

    /// The term in force and the sync holder.
    pub async fn read(&self) -> Result<(u64, Option<Holder>), WitnessError> {
        let txn = Txn::new().and_then([TxnOp::get(self.key("term"), None), TxnOp::get(self.key("sync"), None)]);
        let r = self.txn(txn).await?;
        let g = Self::gets(&r);
        Ok((self.parse_term(&g[0])?, self.parse_holder("sync", &g[1])?))
    }

    async fn lease(&self) -> Result<i64, WitnessError> {
        let mut c = self.client.clone();
        let ttl = self.cfg.lease_ttl.as_secs().max(1) as i64;
        let r = tokio::time::timeout(self.cfg.timeout * 2, c.lease_grant(ttl, None))
            .await
            .map_err(|_| WitnessError::Unreachable("lease grant timed out".into()))?
            .map_err(unreachable)?;
        Ok(r.id())
    }

    /// Gives a lease back at once (best effort: unrevoked, it expires by
    /// its TTL).
    async fn revoke(&self, lease: i64) {
        let mut c = self.client.clone();
        let _ = tokio::time::timeout(self.cfg.timeout, c.lease_revoke(lease)).await;
    }

    /// A new primary's claim: raises `term` by one and writes `primary`
    /// (leased), unless a primary of this VM is alive. A VM id that already
    /// has a term is claimed only with `replace` (the operator's word that
    /// every earlier primary is dead: a frozen one cannot be told from a
    /// dead one here, and it would run on). Returns the new term and the
    /// lease to keep alive.
    pub async fn claim_primary(&self, replace: bool) -> Result<(u64, i64), WitnessError> {
        for _ in 0..8 {
            let txn = Txn::new().and_then([TxnOp::get(self.key("term"), None), TxnOp::get(self.key("primary"), None)]);
            let g = Self::gets(&self.txn(txn).await?);
            let term = self.parse_term(&g[0])?;
            if let Some(h) = self.parse_holder("primary", &g[1])? {
                return Err(WitnessError::PrimaryAlive {
                    vm: self.cfg.vm_id.clone(),
                    holder: format!("{} (term {})", h.node, h.term),
                });
            }
            if term > 0 && !replace {
                return Err(WitnessError::HasHistory { vm: self.cfg.vm_id.clone(), term });
            }
            let lease = self.lease().await?;
            let me = Holder { node: self.cfg.node.clone(), term: term + 1 };
            let txn = Txn::new()
                .when([self.term_is(term), Compare::create_revision(self.key("primary"), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(self.key("term"), (term + 1).to_string(), None),
                    TxnOp::put(self.key("pseq"), pad(0), None),
                    TxnOp::put(self.key("primary"), me.bytes(), Some(PutOptions::new().with_lease(lease))),
                ]);
            if self.txn(txn).await?.succeeded() {
                return Ok((term + 1, lease));
            }
        }
        Err(WitnessError::Unreachable("the term kept changing while claiming it".into()))
    }

    /// Records `node` as the caught-up secondary of term `term`; refused
    /// when the term moved on (this primary is fenced).
    ///
    /// A request that timed out may still be applied later (it waited in a
    /// frozen etcd's socket), so every primary request also carries a
    /// sequence number compared with the last one applied (`pseq`): a
    /// delayed `record_sync` can never land after a later `run_alone`.
    pub async fn record_sync(&self, term: u64, node: &str) -> Result<Decision, WitnessError> {
        self.record_sync_at(term, node, self.next_seq()).await
    }

    async fn record_sync_at(&self, term: u64, node: &str, seq: u64) -> Result<Decision, WitnessError> {
        let sync = Holder { node: node.into(), term };
        let (order, mark) = self.in_order(seq);
        let txn = Txn::new()
            .when([self.term_is(term), order])
            .and_then([mark, TxnOp::put(self.key("sync"), sync.bytes(), None)])
            .or_else([TxnOp::get(self.key("term"), None)]);
        self.decide(txn, term, "the term moved on: a newer primary exists").await
    }

    /// A primary of `term` that lost its secondary asks to release what it
    /// holds and run alone: deletes `sync` if the term is still ours.
    pub async fn run_alone(&self, term: u64) -> Result<Decision, WitnessError> {
        self.run_alone_at(term, self.next_seq()).await
    }

    async fn run_alone_at(&self, term: u64, seq: u64) -> Result<Decision, WitnessError> {
        let (order, mark) = self.in_order(seq);
        let txn = Txn::new()
            .when([self.term_is(term), order])
            .and_then([mark, TxnOp::delete(self.key("sync"), None)])
            .or_else([TxnOp::get(self.key("term"), None)]);
        self.decide(txn, term, "the term moved on: the secondary took over").await
    }

    async fn decide(&self, txn: Txn, term: u64, why: &str) -> Result<Decision, WitnessError> {
        let r = self.txn(txn).await?;
        if r.succeeded() {
            return Ok(Decision::Granted);
        }
        let now = self.parse_term(&Self::gets(&r)[0])?;
        if now == term {
            return Ok(Decision::Superseded);
        }
        Ok(Decision::Refused { term: now, why: format!("{why} (term {now}, ours {term})") })
    }

    /// The secondary `me` of `term` takes over: only if `term` is unchanged
    /// and `sync` names it, it writes `term + 1`, deletes `sync` and writes
    /// `primary` in one transaction. Idempotent: a retry after an answer
    /// that was lost finds its own win.
    pub async fn promote(&self, term: u64) -> Result<(Decision, Option<i64>), WitnessError> {
        let me = Holder { node: self.cfg.node.clone(), term };
        let next = Holder { node: self.cfg.node.clone(), term: term + 1 };
        let lease = self.lease().await?;
        let txn = Txn::new()
            .when([self.term_is(term), Compare::value(self.key("sync"), CompareOp::Equal, me.bytes())])
            .and_then([
                TxnOp::put(self.key("term"), (term + 1).to_string(), None),
                TxnOp::delete(self.key("sync"), None),
                TxnOp::put(self.key("pseq"), pad(0), None),
                TxnOp::put(self.key("primary"), next.bytes(), Some(PutOptions::new().with_lease(lease))),
            ])
            .or_else([
                TxnOp::get(self.key("term"), None),
                TxnOp::get(self.key("sync"), None),
                TxnOp::get(self.key("primary"), None),
            ]);
        let r = self.txn(txn).await?;
        if r.succeeded() {
            return Ok((Decision::Granted, Some(lease)));
        }
        let g = Self::gets(&r);
        let now = self.parse_term(&g[0])?;
        if now == term + 1 && self.parse_holder("primary", &g[2])?.as_ref() == Some(&next) {
            // our own earlier attempt won (its answer was lost): keep the
            // lease its `primary` key carries, give this one back
            self.revoke(lease).await;
            return Ok((Decision::Granted, g[2].first().map(|kv| kv.lease()).filter(|&l| l != 0)));
        }
        self.revoke(lease).await;
        let why = match self.parse_holder("sync", &g[1])? {
            _ if now != term => format!("the term moved on (term {now}, ours {term})"),
            None => "no secondary is recorded as caught up: the primary ran alone".to_string(),
            Some(h) => format!("the caught-up secondary is {} of term {}, not us", h.node, h.term),
        };
        Ok((Decision::Refused { term: now, why }, None))
    }

    /// Keeps `lease` alive until the future is dropped; a lost lease is
    /// logged (the `primary` key is for tools, decisions never read it).
    pub async fn keep_alive(self, lease: i64) {
        let every = (self.cfg.lease_ttl / 3).max(Duration::from_millis(200));
        // a lapsed keep-alive is tried again within `every`, jittered
        let mut again = backon::BackoffBuilder::build(
            backon::ExponentialBuilder::default()
                .with_min_delay(every / 4)
                .with_max_delay(every / 2)
                .with_jitter()
                .without_max_times(),
        );
        let mut warned = false;
        loop {
            let r = keep_alive_stream(&self.client, lease, every).await;
            if !warned {
                tracing::warn!(lease, error = ?r.err(), "the witness lease of the primary key lapsed");
                warned = true;
            }
            tokio::time::sleep(again.next().unwrap_or(every)).await;
        }
    }
}

/// How one keep-alive stream of a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseEnd {
    /// etcd answered a refresh with TTL 0: the lease is gone.
    Expired,
    /// The stream ended without saying so.
    StreamClosed,
}

/// Refreshes `lease` every `every` on one keep-alive stream, until etcd
/// says it expired or the stream ends (or fails).
pub(crate) async fn keep_alive_stream(
    client: &Client,
    lease: i64,
    every: Duration,
) -> Result<LeaseEnd, etcd_client::Error> {
    let mut c = client.clone();
    let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
    loop {
        keeper.keep_alive().await?;
        match stream.message().await? {
            Some(m) if m.ttl() > 0 => {}
            Some(_) => return Ok(LeaseEnd::Expired),
            None => return Ok(LeaseEnd::StreamClosed),
        }
        tokio::time::sleep(every).await;
    }
}

/// A sequence number as a value that compares like the number.
fn pad(seq: u64) -> String {
    format!("{seq:020}")
}

/// Times a witness request.
pub async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, f64) {
    let t = Instant::now();
    let v = f.await;
    (v, t.elapsed().as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests;
