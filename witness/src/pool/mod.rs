//! The pool of hosts (issue 31): what the castor agents decide.
//!
//! Every agent reads the same view of etcd ([`View`]: registered hosts,
//! desired VMs, placements, each VM's witness keys) and runs the pure
//! [`decide`] on it for itself; what it decides to claim it asks of etcd
//! in a transaction ([`store`]), which alone settles a race. Nothing here
//! promotes: the witness's term transactions stay the only authority over
//! who serves; the pool follows them (a secondary that the witness
//! promoted becomes the VM's placed primary).
//!
//! Rules (each a test below, the first two also properties):
//! * never both nodes of a VM on one host (anti-affinity; the VM waits,
//!   unprotected, with its reason);
//! * never more nodes on a host than its capacity;
//! * a fresh VM (no term yet) gets a primary; a VM with a history never
//!   gets a fresh primary (its state lives only in its nodes);
//! * a VM whose primary is placed and running gets a secondary on another
//!   host; the least loaded eligible host claims first, the others after a
//!   stagger per rank (so a host that cannot act is replaced);
//! * a host claims primaries before secondaries (a VM that does not run
//!   before one that runs unprotected), and no more than its free slots.

pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Holder;

/// A node's role in a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// A registered host (`/castor/pool/hosts/<name>`, on its agent's lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// How many castor nodes (primaries and secondaries) it may run.
    pub capacity: u32,
    /// It can give a node the guest's network (its agent has a bridge for
    /// the guests' TAPs): only such hosts run VMs with a network card.
    #[serde(default)]
    pub net: bool,
}

/// A desired VM (`/castor/pool/vms/<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub guest: String,
    /// Guest memory in bytes.
    pub mem: u64,
    pub vcpus: u32,
    /// The guest's network card, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<VmNet>,
}

/// A VM's network identity: the same on every host that runs it (the MAC
/// moves with the guest at a failover; the address is the service's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNet {
    /// `52:54:00:12:34:56`.
    pub mac: String,
    /// The guest's static IPv4 address and prefix, `A.B.C.D/P`.
    pub ip: String,
    /// Its default gateway, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// One node of a VM placed on a host
/// (`/castor/pool/placement/<vm>/<role>`, on that host's lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    pub host: String,
    /// The node's replication address once it runs: where a secondary
    /// joins (a primary's `--listen`, a promoted secondary's `--listen`).
    pub addr: Option<std::net::SocketAddr>,
    /// The node's kv service address once it runs.
    pub service: Option<std::net::SocketAddr>,
}

/// Both placements of a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmPlacement {
    pub primary: Option<Placed>,
    pub secondary: Option<Placed>,
}

impl VmPlacement {
    pub fn get(&self, r: Role) -> Option<&Placed> {
        match r {
            Role::Primary => self.primary.as_ref(),
            Role::Secondary => self.secondary.as_ref(),
        }
    }
}

/// A VM's witness keys (`/castor/<vm>/{term,sync,primary}`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WitnessView {
    pub term: u64,
    pub sync: Option<Holder>,
    pub primary: Option<Holder>,
}

/// Everything the agents decide from: one read of etcd at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Live hosts (their lease holds).
    pub hosts: BTreeMap<String, HostInfo>,
    /// What each host has claimed (`/castor/pool/slots/<host>`): the count
    /// the capacity compare of a claim reads.
    pub slots: BTreeMap<String, BTreeSet<(String, Role)>>,
    pub vms: BTreeMap<String, VmSpec>,
    pub placement: BTreeMap<String, VmPlacement>,
    pub witness: BTreeMap<String, WitnessView>,
    /// Planned switchovers asked for (`/castor/pool/switchover/<vm>`): the
    /// term whose primary is to hand over.
    pub switchover: BTreeMap<String, u64>,
    /// Since when each VM has been unprotected, as recorded in etcd
    /// (`/castor/pool/unprotected/<vm>`; see [`marks`]).
    pub unprotected: BTreeMap<String, Unprotected>,
}

impl View {
    /// Nodes `host` holds (claimed slots).
    pub fn load(&self, host: &str) -> usize {
        self.slots.get(host).map_or(0, BTreeSet::len)
    }

    fn free(&self, host: &str) -> bool {
        self.hosts.get(host).is_some_and(|h| (self.load(host) as u64) < u64::from(h.capacity))
    }

    /// `host` can run `vm`'s nodes (a VM with a network card needs a host
    /// with a bridge for it).
    fn fits(&self, host: &str, vm: &str) -> bool {
        let needs_net = self.vms.get(vm).is_some_and(|s| s.net.is_some());
        !needs_net || self.hosts.get(host).is_some_and(|h| h.net)
    }

    fn holds(&self, host: &str, vm: &str) -> bool {
        self.slots.get(host).is_some_and(|s| s.iter().any(|(v, _)| v == vm))
    }

    /// Hosts that may take `role` of `vm`, best first (least loaded, then
    /// by name): live, below capacity, able to run it (a network card
    /// needs a host with a bridge), holding no node of the VM already, and
    /// (anti-affinity) not the host of its other node.
    pub fn eligible(&self, vm: &str, role: Role) -> Vec<String> {
        let p = self.placement.get(vm).cloned().unwrap_or_default();
        let other = match role {
            Role::Primary => p.secondary.map(|s| s.host),
            Role::Secondary => p.primary.map(|s| s.host),
        };
        let mut v: Vec<String> = self
            .hosts
            .keys()
            .filter(|h| self.free(h) && self.fits(h, vm) && !self.holds(h, vm) && other.as_deref() != Some(h.as_str()))
            .cloned()
            .collect();
        v.sort_by_key(|h| (self.load(h), h.clone()));
        v
    }
}

/// Why a VM is not protected (or that it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "why", rename_all = "snake_case")]
pub enum Protection {
    Protected,
    Unprotected(Reason),
}

/// Why a VM runs unprotected or does not run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// No live host has a free slot for its primary.
    NoHostForPrimary,
    /// Its primary is claimed and starting.
    PrimaryStarting,
    /// No live host other than the primary's has a free slot.
    NoHostForSecondary,
    /// A host may claim its secondary (within the stagger).
    SecondaryUnclaimed,
    /// A secondary is placed (claimed) and starting: it has not bound its
    /// listeners yet.
    SecondaryStarting,
    /// A secondary runs and is joining or syncing (or its host died and its
    /// lease has not expired yet).
    Syncing,
    /// The VM has a history but no placed primary: the witness's primary
    /// or caught-up secondary is being followed (a failover under way).
    FailingOver,
    /// Its primary and every caught-up copy are gone: nothing can take
    /// over without losing acknowledged state; castor does not guess.
    Lost,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::NoHostForPrimary => {
                "no host with capacity for its primary (a VM with a network card also needs a host with a bridge)"
            }
            Reason::PrimaryStarting => "primary starting",
            Reason::NoHostForSecondary => {
                "no host with capacity for its secondary but the primary's (anti-affinity: never both nodes on one host; a VM with a network card also needs a host with a bridge)"
            }
            Reason::SecondaryUnclaimed => "waiting for a host to claim its secondary",
            Reason::SecondaryStarting => "secondary starting",
            Reason::Syncing => "secondary syncing",
            Reason::FailingOver => "no live primary host: failing over (following the witness)",
            Reason::Lost => "lost: its primary and every caught-up copy are gone",
        })
    }
}

/// A VM's protection as the view shows it.
pub fn protection(view: &View, vm: &str) -> Protection {
    let p = view.placement.get(vm).cloned().unwrap_or_default();
    let w = view.witness.get(vm).cloned().unwrap_or_default();
    let Some(primary) = &p.primary else {
        if w.term == 0 {
            return Protection::Unprotected(if view.eligible(vm, Role::Primary).is_empty() {
                Reason::NoHostForPrimary
            } else {
                Reason::PrimaryStarting
            });
        }
        if w.primary.is_some() || w.sync.as_ref().is_some_and(|s| s.term == w.term) {
            return Protection::Unprotected(Reason::FailingOver);
        }
        return Protection::Unprotected(Reason::Lost);
    };
    if primary.addr.is_none() {
        return Protection::Unprotected(Reason::PrimaryStarting);
    }
    match &p.secondary {
        None if view.eligible(vm, Role::Secondary).is_empty() => Protection::Unprotected(Reason::NoHostForSecondary),
        None => Protection::Unprotected(Reason::SecondaryUnclaimed),
        Some(_) if w.sync.as_ref().is_some_and(|s| s.term == w.term && w.term > 0) => Protection::Protected,
        Some(s) if s.addr.is_none() => Protection::Unprotected(Reason::SecondaryStarting),
        Some(_) => Protection::Unprotected(Reason::Syncing),
    }
}

/// The pool's record that a VM is unprotected
/// (`/castor/pool/unprotected/<vm>`, no lease): written in the transaction
/// that creates the VM (`castor vm create`), or by the first agent that
/// reads the VM unprotected, and removed by the first that reads it
/// protected (each a transaction comparing the keys protection depends on,
/// as read: see [`marks`]). `vm list` and `vm show` tell from it for how
/// long the VM has been unprotected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unprotected {
    /// When it was first read unprotected: Unix time in ms, by the clock
    /// of `by` when it read the view (so within one `--poll-ms` of the
    /// change, plus the clocks' skew).
    pub since_ms: u64,
    /// Who recorded it: `castor vm create`, or the agent of host `by`.
    pub by: String,
}

/// A change of a VM's [`Unprotected`] record that the view calls for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mark {
    /// The VM is unprotected and has no record: record it (since now).
    Unprotected { vm: String },
    /// The VM is protected, or no longer desired, and has a record: remove it.
    Protected { vm: String },
}

/// The record changes this view calls for (pure; every agent runs it, the
/// store's transaction settles a race: exactly one record per stretch of
/// unprotected time).
pub fn marks(view: &View) -> Vec<Mark> {
    let mut out = Vec::new();
    for vm in view.vms.keys() {
        let recorded = view.unprotected.contains_key(vm);
        match protection(view, vm) {
            Protection::Protected if recorded => out.push(Mark::Protected { vm: vm.clone() }),
            Protection::Unprotected(_) if !recorded => out.push(Mark::Unprotected { vm: vm.clone() }),
            _ => {}
        }
    }
    for vm in view.unprotected.keys() {
        if !view.vms.contains_key(vm) {
            out.push(Mark::Protected { vm: vm.clone() });
        }
    }
    out
}

/// For how long `vm` has been unprotected at `now_ms` (Unix ms), by its
/// record in etcd; None while it is protected or not recorded yet.
pub fn unprotected_for(view: &View, vm: &str, now_ms: u64) -> Option<Duration> {
    if protection(view, vm) == Protection::Protected {
        return None;
    }
    view.unprotected.get(vm).map(|u| Duration::from_millis(now_ms.saturating_sub(u.since_ms)))
}

/// Now, in Unix ms (the clock [`Unprotected::since_ms`] is read by).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How long after a placement went missing the host of rank `r` (0: the
/// best) may claim it.
pub const STAGGER: Duration = Duration::from_secs(2);

/// A node this agent runs, as it knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    pub vm: String,
    /// Its `--name`: the witness knows it by this name (a secondary by
    /// this name and `#` and its instance).
    pub node: String,
    /// The role it was started in.
    pub role: Role,
    /// It has exited.
    pub exited: bool,
    /// Its status says it now serves as a primary (a promoted secondary).
    pub serving: bool,
    /// Its replication and service addresses, once ready.
    pub addr: Option<std::net::SocketAddr>,
    pub service: Option<std::net::SocketAddr>,
}

/// What the agent knows beside the view.
#[derive(Debug, Clone, Default)]
pub struct Local {
    pub children: Vec<Child>,
    /// For each (vm, role) missing a placement: how long it has been seen
    /// missing by this agent.
    pub missing_for: BTreeMap<(String, Role), Duration>,
    /// VMs whose node on this host failed recently: not claimed again here
    /// until the backoff ends.
    pub backoff: BTreeSet<String>,
    /// Switchovers this agent asked its primary for: (vm, term).
    pub switched: BTreeSet<(String, u64)>,
}

/// What the agent does next (each claim is a transaction that may lose).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Claim the primary of a fresh VM on this host.
    ClaimPrimary { vm: String },
    /// Claim the secondary of `vm` on this host, to join the primary at
    /// `join`.
    ClaimSecondary { vm: String, join: std::net::SocketAddr },
    /// Start the node placed here in `role` (`join`: the primary a
    /// secondary joins).
    Start { vm: String, role: Role, join: Option<std::net::SocketAddr> },
    /// Write the addresses of the node placed here once it runs.
    Publish { vm: String, role: Role },
    /// Our secondary was promoted by the witness: it is the VM's primary
    /// now (placement moves, the secondary slot is freed for another host).
    Promoted { vm: String },
    /// Claim again the place of a node of ours that still runs, whose
    /// placement vanished with our lease while nobody took it, and that the
    /// witness still names (the serving primary of the current term, or
    /// its caught-up secondary): an etcd outage longer than the lease TTL
    /// must not stop every VM.
    Adopt { vm: String, role: Role },
    /// Ask our primary of `vm` for a planned switchover (`castor vm
    /// switchover`): it hands over to its secondary (the witness's promote
    /// transaction decides), exits, and the placement follows.
    Switchover { vm: String },
    /// Stop a node etcd no longer places here (or whose VM is deleted).
    Stop { vm: String, role: Role },
    /// A node of ours exited: give its placement and slot back.
    Release { vm: String, role: Role },
}

impl Child {
    /// Whether the witness's `h` is this node.
    pub fn is(&self, h: &Holder) -> bool {
        h.node == self.node || h.node.strip_prefix(self.node.as_str()).is_some_and(|rest| rest.starts_with('#'))
    }
}

/// Whether our running node `c` may take `role` of its VM back: the place
/// is free, the VM's other node is not on this host, we have a free slot,
/// and the witness names `c` in the current term (as the serving primary,
/// or as the caught-up secondary).
fn adoptable(me: &str, view: &View, c: &Child, role: Role, w: &WitnessView) -> bool {
    let p = view.placement.get(&c.vm).cloned().unwrap_or_default();
    let current = |h: &Option<Holder>| h.as_ref().is_some_and(|h| h.term == w.term && w.term > 0 && c.is(h));
    p.get(role).is_none()
        && p.get(role.other()).is_none_or(|o| o.host != me)
        && view.free(me)
        && match role {
            Role::Primary => current(&w.primary),
            Role::Secondary => current(&w.sync),
        }
}

/// The agent `me`'s actions for this view. Pure: the same view and local
/// state always give the same actions.
pub fn decide(me: &str, view: &View, local: &Local) -> Vec<Action> {
    let mut out = Vec::new();
    // without our registration (lease lost, re-registering) we claim and
    // start nothing; nodes not placed here are stopped below
    let registered = view.hosts.contains_key(me);
    let placed_here = |vm: &str, role: Role| {
        view.placement.get(vm).and_then(|p| p.get(role)).is_some_and(|p| p.host == me)
            && view.slots.get(me).is_some_and(|s| s.contains(&(vm.to_string(), role)))
    };
    for c in &local.children {
        let vm = c.vm.clone();
        if !view.vms.contains_key(&vm) {
            out.push(Action::Stop { vm, role: c.role });
            continue;
        }
        if placed_here(&vm, c.role) {
            if c.exited {
                out.push(Action::Release { vm, role: c.role });
            } else if c.role == Role::Secondary && c.serving {
                // the witness promoted it: the placement follows
                out.push(Action::Promoted { vm });
            } else if c.role == Role::Primary
                && view.switchover.get(&vm).is_some_and(|t| {
                    Some(*t) == view.witness.get(&vm).map(|w| w.term) && !local.switched.contains(&(vm.clone(), *t))
                })
                && protection(view, &vm) == Protection::Protected
            {
                out.push(Action::Switchover { vm });
            } else if c.addr.is_some() {
                let p = view.placement.get(&vm).and_then(|p| p.get(c.role));
                if p.is_some_and(|p| p.addr != c.addr || p.service != c.service) {
                    out.push(Action::Publish { vm, role: c.role });
                }
            }
            continue;
        }
        // not placed here: another host holds its place (taken over while
        // we were cut off or frozen), or our lease, and with it our
        // placements, is gone
        let now = if c.role == Role::Secondary && c.serving { Role::Primary } else { c.role };
        let p = view.placement.get(&vm).cloned().unwrap_or_default();
        let w = view.witness.get(&vm).cloned().unwrap_or_default();
        if c.exited {
            out.push(Action::Release { vm, role: c.role });
        } else if p.get(now).is_some_and(|x| x.host != me) || p.get(c.role).is_some_and(|x| x.host != me) {
            out.push(Action::Stop { vm, role: c.role });
        } else if !registered || p.get(now).is_some() {
            // until we are registered again (or a placement of ours
            // without its slot settles), nothing: etcd decides
        } else if adoptable(me, view, c, now, &w) {
            out.push(Action::Adopt { vm, role: now });
        } else {
            out.push(Action::Stop { vm, role: c.role });
        }
    }
    if !registered {
        return out;
    }
    let has_child = |vm: &str, role: Role| local.children.iter().any(|c| c.vm == vm && c.role == role);
    let mut claims = Vec::new();
    // a slot of ours with no node and no placement (a node stopped before
    // its slot was given back): give it back
    for (vm, role) in view.slots.get(me).into_iter().flatten() {
        if !has_child(vm, *role) && !placed_here(vm, *role) {
            out.push(Action::Release { vm: vm.clone(), role: *role });
        }
    }
    for vm in view.vms.keys() {
        let p = view.placement.get(vm).cloned().unwrap_or_default();
        let w = view.witness.get(vm).cloned().unwrap_or_default();
        // placed here, not running: start it
        for role in [Role::Primary, Role::Secondary] {
            if placed_here(vm, role) && !has_child(vm, role) {
                let join = match role {
                    Role::Primary => None,
                    Role::Secondary => p.primary.as_ref().and_then(|p| p.addr),
                };
                if role == Role::Primary || join.is_some() {
                    out.push(Action::Start { vm: vm.clone(), role, join });
                }
            }
        }
        if local.backoff.contains(vm) || local.children.iter().any(|c| c.vm == *vm) {
            continue;
        }
        let may_claim = |role: Role| {
            let ranks = view.eligible(vm, role);
            let missing = local.missing_for.get(&(vm.clone(), role)).copied().unwrap_or_default();
            ranks.iter().position(|h| h == me).is_some_and(|r| missing >= STAGGER * r as u32)
        };
        match (&p.primary, &p.secondary) {
            // a fresh VM: a primary; with a history, the witness decides
            (None, None) if w.term == 0 && w.primary.is_none() && may_claim(Role::Primary) => {
                claims.push(Action::ClaimPrimary { vm: vm.clone() });
            }
            (Some(pr), None) => {
                if let Some(join) = pr.addr {
                    // while the witness names a caught-up secondary of the
                    // current term, that node lives (its host is taking its
                    // place back) or the primary runs alone soon (which
                    // deletes the record): no second secondary meanwhile
                    let caught_up = w.sync.as_ref().is_some_and(|s| s.term == w.term);
                    if w.primary.is_some() && !caught_up && may_claim(Role::Secondary) {
                        claims.push(Action::ClaimSecondary { vm: vm.clone(), join });
                    }
                }
            }
            _ => {}
        }
    }
    // a VM that does not run comes before one that runs unprotected, and
    // no more claims than the slots left (the rest would lose anyway)
    claims.sort_by_key(|a| !matches!(a, Action::ClaimPrimary { .. }));
    let adopting = out.iter().filter(|a| matches!(a, Action::Adopt { .. })).count();
    let room = view.hosts.get(me).map_or(0, |h| (h.capacity as usize).saturating_sub(view.load(me) + adopting));
    claims.truncate(room);
    out.extend(claims);
    out
}

#[cfg(test)]
mod tests;
