//! The pool's keys in etcd and the transactions that claim them.
//!
//! | key | value | lease |
//! |---|---|---|
//! | `/castor/pool/hosts/<host>` | [`HostInfo`] | the host's agent |
//! | `/castor/pool/slots/<host>` | the host's claimed `[vm, role]` pairs | the host's agent |
//! | `/castor/pool/vms/<vm>` | [`VmSpec`] (desired state) | none |
//! | `/castor/pool/placement/<vm>/<role>` | [`Placed`] | the placed host's agent |
//! | `/castor/pool/switchover/<vm>` | the term whose primary is to hand over | none |
//! | `/castor/pool/unprotected/<vm>` | [`Unprotected`]: since when it is unprotected | none |
//!
//! A host's death is its lease expiring: its host key, slots and
//! placements vanish in one revision. Every claim is one transaction that
//! compares what the agent decided from (the slot free, the host's slots
//! unchanged, the VM's other node where it was), so of agents racing for
//! one slot exactly one wins and a host never passes its capacity.

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};

use super::{HostInfo, Mark, Placed, Role, Unprotected, View, VmPlacement, VmSpec, WitnessView};
use crate::Holder;

const ROOT: &str = "/castor/";
const POOL: &str = "/castor/pool/";

/// Errors of the pool's etcd store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("etcd is unreachable: {0}")]
    Unreachable(String),
    #[error("bad pool configuration: {0}")]
    Config(String),
    #[error("etcd holds a value castor cannot read at {key}: {value:?}")]
    Corrupt { key: String, value: String },
    #[error("host {0} is registered already (another agent of that name is alive, or its lease has not expired yet)")]
    HostTaken(String),
    #[error("vm {0} exists already")]
    VmExists(String),
    #[error(
        "vm {vm} has a witness history (term {term}): its nodes may still run; delete it with `castor vm delete` \
         (which clears the history once its nodes are gone) or use another name"
    )]
    VmHasHistory { vm: String, term: u64 },
    #[error("{0}")]
    Busy(String),
    #[error("no vm {0}")]
    NoVm(String),
    #[error("vm {vm} still has nodes or a serving primary after {secs} s: {what}")]
    StillRunning { vm: String, secs: u64, what: String },
}

fn unreachable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unreachable(e.to_string())
}

/// A name of a host or VM: 1-64 of `[A-Za-z0-9._-]`; `pool` is reserved
/// (the pool's keys live under `/castor/pool/`).
pub fn check_name(what: &str, name: &str) -> Result<(), StoreError> {
    if name.is_empty()
        || name.len() > 64
        || name == "pool"
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        || name.starts_with('.')
    {
        return Err(StoreError::Config(format!("{name:?}: a {what} name is 1-64 of [A-Za-z0-9._-], not \"pool\"")));
    }
    Ok(())
}

fn host_key(h: &str) -> String {
    format!("{POOL}hosts/{h}")
}
fn slots_key(h: &str) -> String {
    format!("{POOL}slots/{h}")
}
fn vm_key(vm: &str) -> String {
    format!("{POOL}vms/{vm}")
}
fn placement_key(vm: &str, r: Role) -> String {
    format!("{POOL}placement/{vm}/{}", r.as_str())
}
fn unprotected_key(vm: &str) -> String {
    format!("{POOL}unprotected/{vm}")
}

fn unprotected_bytes(u: &Unprotected) -> Vec<u8> {
    serde_json::to_vec(u).expect("an unprotected record serialises")
}

/// The bytes of a host's slots (sorted: the same set is the same bytes,
/// which the claim transactions compare).
fn slots_bytes(s: &BTreeSet<(String, Role)>) -> Vec<u8> {
    serde_json::to_vec(s).expect("slots serialise")
}

fn placed_bytes(p: &Placed) -> Vec<u8> {
    serde_json::to_vec(p).expect("a placement serialises")
}

/// Compare: `key` holds exactly `bytes`, or is absent when `bytes` is None.
fn holds(key: String, bytes: Option<Vec<u8>>) -> Compare {
    match bytes {
        Some(b) => Compare::value(key, CompareOp::Equal, b),
        None => Compare::create_revision(key, CompareOp::Equal, 0),
    }
}

/// A connection to the pool's keys (cheap to clone).
#[derive(Clone)]
pub struct Store {
    client: Client,
    timeout: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("timeout", &self.timeout).finish()
    }
}

impl Store {
    /// Connects lazily to `URL[,URL...]`.
    pub async fn connect(urls: &str, timeout: Duration) -> Result<Store, StoreError> {
        let endpoints: Vec<String> =
            urls.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        if endpoints.is_empty() || endpoints.iter().any(|e| !e.starts_with("http://") && !e.starts_with("https://")) {
            return Err(StoreError::Config(format!("{urls:?}: the witness is http://HOST:PORT[,...]")));
        }
        let opts = ConnectOptions::new()
            .with_timeout(timeout)
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(1), timeout);
        let client = Client::connect(&endpoints, Some(opts)).await.map_err(unreachable)?;
        Ok(Store { client, timeout })
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        let mut c = self.client.clone();
        match tokio::time::timeout(self.timeout * 2, c.txn(txn)).await {
            Ok(r) => r.map_err(unreachable),
            Err(_) => Err(StoreError::Unreachable(format!("no answer in {:?}", self.timeout * 2))),
        }
    }

    /// Everything under `/castor/` at one revision, as the agents see it.
    pub async fn read(&self) -> Result<View, StoreError> {
        let mut c = self.client.clone();
        let r = tokio::time::timeout(self.timeout * 2, c.get(ROOT, Some(GetOptions::new().with_prefix())))
            .await
            .map_err(|_| StoreError::Unreachable("read timed out".into()))?
            .map_err(unreachable)?;
        let mut v = View::default();
        for kv in r.kvs() {
            let key = String::from_utf8_lossy(kv.key()).to_string();
            let corrupt =
                || StoreError::Corrupt { key: key.clone(), value: String::from_utf8_lossy(kv.value()).into() };
            let json = |k: &str| -> Result<_, StoreError> { Ok(k.to_string()) };
            if let Some(rest) = key.strip_prefix(POOL) {
                let parts: Vec<&str> = rest.split('/').collect();
                match parts.as_slice() {
                    ["hosts", h] => {
                        v.hosts.insert(json(h)?, serde_json::from_slice(kv.value()).map_err(|_| corrupt())?);
                    }
                    ["slots", h] => {
                        v.slots.insert(json(h)?, serde_json::from_slice(kv.value()).map_err(|_| corrupt())?);
                    }
                    ["vms", vm] => {
                        v.vms.insert(json(vm)?, serde_json::from_slice(kv.value()).map_err(|_| corrupt())?);
                    }
                    ["unprotected", vm] => {
                        v.unprotected
                            .insert(vm.to_string(), serde_json::from_slice(kv.value()).map_err(|_| corrupt())?);
                    }
                    ["switchover", vm] => {
                        let t =
                            std::str::from_utf8(kv.value()).ok().and_then(|s| s.parse().ok()).ok_or_else(corrupt)?;
                        v.switchover.insert(vm.to_string(), t);
                    }
                    ["placement", vm, role] => {
                        let p: Placed = serde_json::from_slice(kv.value()).map_err(|_| corrupt())?;
                        let e = v.placement.entry(vm.to_string()).or_default();
                        match *role {
                            "primary" => e.primary = Some(p),
                            "secondary" => e.secondary = Some(p),
                            _ => return Err(corrupt()),
                        }
                    }
                    _ => {}
                }
            } else if let Some(rest) = key.strip_prefix(ROOT) {
                let Some((vm, name)) = rest.split_once('/') else { continue };
                let e = v.witness.entry(vm.to_string()).or_default();
                match name {
                    "term" => {
                        e.term =
                            std::str::from_utf8(kv.value()).ok().and_then(|s| s.parse().ok()).ok_or_else(corrupt)?
                    }
                    "sync" => e.sync = Some(serde_json::from_slice::<Holder>(kv.value()).map_err(|_| corrupt())?),
                    "primary" => e.primary = Some(serde_json::from_slice::<Holder>(kv.value()).map_err(|_| corrupt())?),
                    _ => {}
                }
            }
        }
        v.witness.retain(|_, w| *w != WitnessView::default());
        Ok(v)
    }

    /// A lease of `ttl`.
    pub async fn lease(&self, ttl: Duration) -> Result<i64, StoreError> {
        let mut c = self.client.clone();
        let r = tokio::time::timeout(self.timeout * 2, c.lease_grant(ttl.as_secs().max(1) as i64, None))
            .await
            .map_err(|_| StoreError::Unreachable("lease grant timed out".into()))?
            .map_err(unreachable)?;
        Ok(r.id())
    }

    /// Gives `lease` back at once (its keys vanish); best effort.
    pub async fn revoke(&self, lease: i64) {
        let mut c = self.client.clone();
        let _ = tokio::time::timeout(self.timeout, c.lease_revoke(lease)).await;
    }

    /// Registers `host` on `lease`, with no slots claimed; refused while a
    /// host of that name is registered (its earlier lease still holds).
    pub async fn register(&self, host: &str, info: &HostInfo, lease: i64) -> Result<(), StoreError> {
        check_name("host", host)?;
        let leased = || Some(PutOptions::new().with_lease(lease));
        let txn = Txn::new().when([holds(host_key(host), None)]).and_then([
            TxnOp::put(host_key(host), serde_json::to_vec(info).expect("host info"), leased()),
            TxnOp::put(slots_key(host), slots_bytes(&BTreeSet::new()), leased()),
        ]);
        if self.txn(txn).await?.succeeded() {
            Ok(())
        } else {
            Err(StoreError::HostTaken(host.into()))
        }
    }

    /// Keeps `lease` alive; returns once etcd says it is gone (expired or
    /// revoked). An etcd that does not answer is tried again: only etcd
    /// says a lease is lost.
    pub async fn keep_alive(&self, lease: i64, ttl: Duration) {
        let every = (ttl / 3).max(Duration::from_millis(200));
        loop {
            match crate::keep_alive_stream(&self.client, lease, every).await {
                Ok(crate::LeaseEnd::Expired) => return,
                Ok(crate::LeaseEnd::StreamClosed) | Err(_) => tokio::time::sleep(every / 2).await,
            }
        }
    }

    /// `host` claims `role` of `vm` as it saw the pool in `view`: granted
    /// only if the slot is still free, the host's slots are what it saw
    /// (so its count, checked below its `capacity`, still holds), the VM
    /// is still desired, and its other node is where it was (never on this
    /// host). A primary is claimed only for a VM with no witness history.
    /// Returns whether the claim won.
    pub async fn claim(
        &self,
        host: &str,
        lease: i64,
        capacity: u32,
        view: &View,
        vm: &str,
        role: Role,
    ) -> Result<bool, StoreError> {
        let me = Placed { host: host.into(), addr: None, service: None };
        self.place(lease, capacity, view, (vm, role), me, role == Role::Primary).await
    }

    /// `me.host` takes back the place of a node of its own that still runs
    /// (its placement vanished with the host's lease and nobody took it;
    /// the caller checked that the witness still names the node): the
    /// claim's compares, without the fresh-VM one, with its addresses.
    pub async fn adopt(
        &self,
        lease: i64,
        capacity: u32,
        view: &View,
        vm: &str,
        role: Role,
        me: Placed,
    ) -> Result<bool, StoreError> {
        self.place(lease, capacity, view, (vm, role), me, false).await
    }

    async fn place(
        &self,
        lease: i64,
        capacity: u32,
        view: &View,
        (vm, role): (&str, Role),
        me: Placed,
        fresh: bool,
    ) -> Result<bool, StoreError> {
        let host = me.host.as_str();
        let mine = view.slots.get(host).cloned().unwrap_or_default();
        let p = view.placement.get(vm).cloned().unwrap_or_default();
        let other = p.get(role.other()).cloned();
        if mine.len() >= capacity as usize || other.as_ref().is_some_and(|o| o.host == host) {
            return Ok(false);
        }
        let Some(spec) = view.vms.get(vm) else { return Ok(false) };
        let mut next = mine.clone();
        next.insert((vm.to_string(), role));
        let mut when = vec![
            holds(placement_key(vm, role), None),
            holds(slots_key(host), Some(slots_bytes(&mine))),
            holds(vm_key(vm), Some(serde_json::to_vec(spec).expect("vm spec"))),
            holds(placement_key(vm, role.other()), other.as_ref().map(placed_bytes)),
        ];
        if fresh {
            when.push(holds(format!("{ROOT}{vm}/term"), None));
        }
        let leased = Some(PutOptions::new().with_lease(lease));
        let txn = Txn::new().when(when).and_then([
            TxnOp::put(placement_key(vm, role), placed_bytes(&me), leased.clone()),
            TxnOp::put(slots_key(host), slots_bytes(&next), leased),
        ]);
        Ok(self.txn(txn).await?.succeeded())
    }

    /// Writes the addresses of the node of `vm` on `next.host` once it runs
    /// (only while the placement is still that host's, as seen).
    pub async fn publish(
        &self,
        lease: i64,
        view: &View,
        vm: &str,
        role: Role,
        next: Placed,
    ) -> Result<bool, StoreError> {
        let Some(seen) = view.placement.get(vm).and_then(|p| p.get(role)).filter(|p| p.host == next.host) else {
            return Ok(false);
        };
        let txn = Txn::new().when([holds(placement_key(vm, role), Some(placed_bytes(seen)))]).and_then([TxnOp::put(
            placement_key(vm, role),
            placed_bytes(&next),
            Some(PutOptions::new().with_lease(lease)),
        )]);
        Ok(self.txn(txn).await?.succeeded())
    }

    /// `me.host`'s secondary of `vm` was promoted by the witness: it becomes
    /// the placed primary (on our lease), the secondary placement is freed
    /// and the host's slot changes role, in one transaction that holds only
    /// while the secondary placement and our slots are as seen.
    pub async fn promoted(&self, lease: i64, view: &View, vm: &str, me: Placed) -> Result<bool, StoreError> {
        let host = me.host.as_str();
        let Some(seen) = view.placement.get(vm).and_then(|p| p.secondary.as_ref()).filter(|p| p.host == host) else {
            return Ok(false);
        };
        let mine = view.slots.get(host).cloned().unwrap_or_default();
        let mut next = mine.clone();
        next.remove(&(vm.to_string(), Role::Secondary));
        next.insert((vm.to_string(), Role::Primary));
        let leased = Some(PutOptions::new().with_lease(lease));
        let txn = Txn::new()
            .when([
                holds(placement_key(vm, Role::Secondary), Some(placed_bytes(seen))),
                holds(slots_key(host), Some(slots_bytes(&mine))),
            ])
            .and_then([
                TxnOp::put(placement_key(vm, Role::Primary), placed_bytes(&me), leased.clone()),
                TxnOp::delete(placement_key(vm, Role::Secondary), None),
                TxnOp::put(slots_key(host), slots_bytes(&next), leased),
            ]);
        Ok(self.txn(txn).await?.succeeded())
    }

    /// Gives back `host`'s slot of `vm` in `role`: its placement first
    /// (only if it still names this host), then the slot, so a host's
    /// slots always cover its placements.
    pub async fn release(&self, host: &str, lease: i64, vm: &str, role: Role) -> Result<(), StoreError> {
        for _ in 0..8 {
            let view = self.read().await?;
            if let Some(p) = view.placement.get(vm).and_then(|p| p.get(role)).filter(|p| p.host == host) {
                let txn = Txn::new()
                    .when([holds(placement_key(vm, role), Some(placed_bytes(p)))])
                    .and_then([TxnOp::delete(placement_key(vm, role), None)]);
                self.txn(txn).await?;
                continue;
            }
            let Some(mine) = view.slots.get(host) else { return Ok(()) };
            if !mine.contains(&(vm.to_string(), role)) {
                return Ok(());
            }
            let mut next = mine.clone();
            next.remove(&(vm.to_string(), role));
            let txn = Txn::new().when([holds(slots_key(host), Some(slots_bytes(mine)))]).and_then([TxnOp::put(
                slots_key(host),
                slots_bytes(&next),
                Some(PutOptions::new().with_lease(lease)),
            )]);
            if self.txn(txn).await?.succeeded() {
                return Ok(());
            }
        }
        Err(StoreError::Unreachable(format!("the slots of {host} kept changing while releasing {vm}")))
    }

    /// Records a VM unprotected since `now_ms` (by host `by`), or removes
    /// the record of one protected or deleted, as [`super::marks`] decided
    /// from `view`: only while the record and every key the VM's protection
    /// depends on (its placements, its witness `term` and `sync`, whether
    /// it is desired) are as read, so a view read before a change can never
    /// undo the record of the change. Returns whether it was written.
    pub async fn mark(&self, view: &View, mark: &Mark, now_ms: u64, by: &str) -> Result<bool, StoreError> {
        let vm = match mark {
            Mark::Unprotected { vm } | Mark::Protected { vm } => vm.as_str(),
        };
        let p = view.placement.get(vm).cloned().unwrap_or_default();
        let w = view.witness.get(vm).cloned().unwrap_or_default();
        let mut when = vec![
            holds(unprotected_key(vm), view.unprotected.get(vm).map(unprotected_bytes)),
            holds(vm_key(vm), view.vms.get(vm).map(|s| serde_json::to_vec(s).expect("vm spec"))),
            holds(placement_key(vm, Role::Primary), p.primary.as_ref().map(placed_bytes)),
            holds(placement_key(vm, Role::Secondary), p.secondary.as_ref().map(placed_bytes)),
            holds(format!("{ROOT}{vm}/term"), (w.term > 0).then(|| w.term.to_string().into_bytes())),
            holds(format!("{ROOT}{vm}/sync"), w.sync.as_ref().map(Holder::bytes)),
        ];
        let op = match mark {
            Mark::Unprotected { .. } => {
                let u = Unprotected { since_ms: now_ms, by: by.into() };
                TxnOp::put(unprotected_key(vm), unprotected_bytes(&u), None)
            }
            Mark::Protected { .. } => {
                // a record of a VM no longer desired goes whatever its keys say
                if !view.vms.contains_key(vm) {
                    when.truncate(2);
                }
                TxnOp::delete(unprotected_key(vm), None)
            }
        };
        Ok(self.txn(Txn::new().when(when).and_then([op])).await?.succeeded())
    }

    /// `castor vm create`: the desired VM, unless it exists or its name has
    /// a witness history.
    pub async fn create_vm(&self, vm: &str, spec: &VmSpec) -> Result<(), StoreError> {
        check_name("vm", vm)?;
        let term = format!("{ROOT}{vm}/term");
        let txn = Txn::new()
            .when([holds(vm_key(vm), None), holds(term.clone(), None)])
            .and_then([
                TxnOp::put(vm_key(vm), serde_json::to_vec(spec).expect("vm spec"), None),
                // a new VM is unprotected from its creation on
                TxnOp::put(
                    unprotected_key(vm),
                    unprotected_bytes(&Unprotected { since_ms: super::unix_ms(), by: "castor vm create".into() }),
                    None,
                ),
            ])
            .or_else([TxnOp::get(vm_key(vm), None), TxnOp::get(term, None)]);
        let r = self.txn(txn).await?;
        if r.succeeded() {
            return Ok(());
        }
        let gets: Vec<Vec<etcd_client::KeyValue>> = r
            .op_responses()
            .into_iter()
            .filter_map(|o| match o {
                etcd_client::TxnOpResponse::Get(g) => Some(g.kvs().to_vec()),
                _ => None,
            })
            .collect();
        if gets.first().is_some_and(|g| !g.is_empty()) {
            return Err(StoreError::VmExists(vm.into()));
        }
        let term =
            gets.get(1).and_then(|g| g.first()).and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok());
        Err(StoreError::VmHasHistory { vm: vm.into(), term: term.unwrap_or(0) })
    }

    /// `castor vm switchover`: asks the agent of `vm`'s primary of `term`
    /// to hand over to its secondary; waits up to `wait` until the term
    /// moved on, and removes the request either way. Returns the new view.
    pub async fn switchover(&self, vm: &str, term: u64, wait: Duration) -> Result<View, StoreError> {
        let key = format!("{POOL}switchover/{vm}");
        let txn =
            Txn::new().when([holds(key.clone(), None)]).and_then([TxnOp::put(key.clone(), term.to_string(), None)]);
        if !self.txn(txn).await?.succeeded() {
            return Err(StoreError::Busy(format!("a switchover of {vm} is under way")));
        }
        let end = tokio::time::Instant::now() + wait;
        let r = loop {
            match self.read().await {
                Ok(v) if v.witness.get(vm).is_some_and(|w| w.term > term) => break Ok(v),
                Ok(_) | Err(StoreError::Unreachable(_)) if tokio::time::Instant::now() < end => {}
                Ok(_) => {
                    break Err(StoreError::Busy(format!(
                        "the primary of {vm} did not hand over within {} s (see its agent's log)",
                        wait.as_secs()
                    )))
                }
                Err(e) => break Err(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let txn = Txn::new().and_then([TxnOp::delete(key, None)]);
        self.txn(txn).await?;
        r
    }

    /// `castor vm delete`: removes the desired VM (its agents stop its
    /// nodes), waits up to `wait` until no node of it is placed and no
    /// primary of it holds its witness key, then clears its witness history
    /// (only if that is still so, in one transaction).
    pub async fn delete_vm(&self, vm: &str, wait: Duration) -> Result<(), StoreError> {
        check_name("vm", vm)?;
        let mut c = self.client.clone();
        let r = tokio::time::timeout(self.timeout * 2, c.delete(vm_key(vm), None))
            .await
            .map_err(|_| StoreError::Unreachable("delete timed out".into()))?
            .map_err(unreachable)?;
        let had_history = self.read().await?.witness.contains_key(vm);
        if r.deleted() == 0 && !had_history {
            return Err(StoreError::NoVm(vm.into()));
        }
        let end = tokio::time::Instant::now() + wait;
        loop {
            let v = self.read().await?;
            let p = v.placement.get(vm).cloned().unwrap_or_default();
            let w = v.witness.get(vm).cloned().unwrap_or_default();
            if p == VmPlacement::default() && w.primary.is_none() && !v.vms.contains_key(vm) {
                let txn = Txn::new()
                    .when([
                        holds(vm_key(vm), None),
                        holds(placement_key(vm, Role::Primary), None),
                        holds(placement_key(vm, Role::Secondary), None),
                        holds(format!("{ROOT}{vm}/primary"), None),
                    ])
                    .and_then([
                        TxnOp::delete(format!("{ROOT}{vm}/"), Some(etcd_client::DeleteOptions::new().with_prefix())),
                        TxnOp::delete(unprotected_key(vm), None),
                    ]);
                if self.txn(txn).await?.succeeded() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > end {
                return Err(StoreError::StillRunning {
                    vm: vm.into(),
                    secs: wait.as_secs(),
                    what: format!("placement {p:?}, witness primary {:?}", w.primary),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Role {
    /// The VM's other node.
    pub fn other(self) -> Role {
        match self {
            Role::Primary => Role::Secondary,
            Role::Secondary => Role::Primary,
        }
    }
}

#[cfg(test)]
mod tests;
