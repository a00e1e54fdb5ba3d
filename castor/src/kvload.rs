//! An in-process load generator for the `kv` guest, used by `castor run`.
//!
//! Each client keeps up to `window` requests in flight. Client `c` owns keys
//! `c << 32 | k` for `k < keys`, and alternates PUTs (value = its sequence
//! number) with ADDs, so the expected table is known exactly and can be saved
//! with a snapshot and checked after restore.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use vmm::abi::{KvOp, KvRequest, KvResponse, KV_NOT_FOUND, KV_OK};
use vmm::devices::Devices;

/// What a client population has done, and what the table must hold.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KvExpectation {
    /// client id -> next sequence number to use.
    pub next_seq: BTreeMap<u32, u32>,
    /// key -> value the table must hold (for acknowledged writes).
    pub table: BTreeMap<u64, u64>,
    /// The table's applied-operation counter in the last response seen.
    pub ops: u64,
    /// Acknowledged operations.
    pub acked: u64,
}

#[derive(Debug)]
struct Client {
    id: u32,
    next_seq: u32,
    in_flight: VecDeque<KvRequest>,
}

/// The load generator.
#[derive(Debug)]
pub struct KvLoad {
    clients: Vec<Client>,
    window: usize,
    keys: u64,
    pub expect: KvExpectation,
    /// Responses that did not match a request in flight (must stay 0).
    pub unexpected: u64,
    /// Responses whose status or value contradicts the expected table.
    pub wrong: u64,
    /// Verification GETs: (key, expected value) by sequence, for one client.
    verify: HashMap<(u32, u32), (u64, u64)>,
    pub verify_checked: u64,
    pub verify_mismatch: u64,
    /// The ops counter of the first response after start.
    pub first_ops: Option<u64>,
}

impl KvLoad {
    /// `clients` clients with ids starting at `first_id`, continuing `prior` if given.
    pub fn new(clients: u32, first_id: u32, window: usize, keys: u64, prior: Option<KvExpectation>) -> Self {
        let expect = prior.unwrap_or_default();
        let clients = (first_id..first_id + clients)
            .map(|id| Client {
                id,
                next_seq: expect.next_seq.get(&id).copied().unwrap_or(1),
                in_flight: VecDeque::new(),
            })
            .collect();
        KvLoad {
            clients,
            window: window.max(1),
            keys: keys.max(1),
            expect,
            unexpected: 0,
            wrong: 0,
            verify: HashMap::new(),
            verify_checked: 0,
            verify_mismatch: 0,
            first_ops: None,
        }
    }

    /// Queues GETs of every expected key on a dedicated client (id `verifier`).
    pub fn queue_verification(&mut self, dev: &Devices, verifier: u32) -> Result<(), vmm::devices::DeviceError> {
        let entries: Vec<(u64, u64)> = self.expect.table.iter().map(|(k, v)| (*k, *v)).collect();
        let mut seq = self.expect.next_seq.get(&verifier).copied().unwrap_or(1);
        for (key, value) in entries {
            dev.submit(KvRequest { client: verifier, seq, op: KvOp::Get, key, value: 0 })?;
            self.verify.insert((verifier, seq), (key, value));
            seq += 1;
        }
        self.expect.next_seq.insert(verifier, seq);
        Ok(())
    }

    /// Verification GETs still unanswered.
    pub fn verification_pending(&self) -> usize {
        self.verify.len()
    }

    /// Tops every client up to its window.
    pub fn pump(&mut self, dev: &Devices) {
        for c in &mut self.clients {
            while c.in_flight.len() < self.window {
                let seq = c.next_seq;
                let key = (u64::from(c.id) << 32) | (u64::from(seq) % self.keys);
                let (op, value) = if seq % 4 == 3 { (KvOp::Add, 1) } else { (KvOp::Put, u64::from(seq)) };
                let req = KvRequest { client: c.id, seq, op, key, value };
                if dev.submit(req).is_err() {
                    return; // queue full: back off until responses drain
                }
                c.next_seq += 1;
                c.in_flight.push_back(req);
            }
        }
    }

    /// Accounts one released response.
    pub fn on_response(&mut self, r: &KvResponse) {
        self.first_ops.get_or_insert(r.ops);
        self.expect.ops = self.expect.ops.max(r.ops);
        if let Some((key, value)) = self.verify.remove(&(r.client, r.seq)) {
            self.verify_checked += 1;
            if r.status != KV_OK || r.value != value {
                self.verify_mismatch += 1;
                tracing::error!(key, expected = value, got = r.value, status = r.status, "kv verification mismatch");
            }
            return;
        }
        let Some(c) = self.clients.iter_mut().find(|c| c.id == r.client) else {
            self.unexpected += 1;
            return;
        };
        let Some(pos) = c.in_flight.iter().position(|q| q.seq == r.seq) else {
            self.unexpected += 1;
            return;
        };
        let req = c.in_flight.remove(pos).expect("position is valid");
        self.expect.acked += 1;
        self.expect.next_seq.insert(c.id, c.next_seq);
        let expected = match req.op {
            KvOp::Put => req.value,
            KvOp::Add => self.expect.table.get(&req.key).copied().unwrap_or(0) + req.value,
            _ => return,
        };
        if r.status != KV_OK || r.value != expected {
            self.wrong += 1;
            if r.status == KV_NOT_FOUND || self.wrong < 10 {
                tracing::error!(?req, ?r, expected, "kv response contradicts the expected table");
            }
        }
        self.expect.table.insert(req.key, r.value);
    }
}

impl KvLoad {
    /// Requests issued and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.clients.iter().map(|c| c.in_flight.len()).sum()
    }
}
