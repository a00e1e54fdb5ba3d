//! The pool's decisions as pure functions of the view.

use std::net::SocketAddr;

use proptest::prelude::*;

use super::*;

fn addr(p: u16) -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], p)))
}

fn view(hosts: &[(&str, u32)], vms: &[&str]) -> View {
    let mut v = View::default();
    for (h, c) in hosts {
        v.hosts.insert(h.to_string(), HostInfo { capacity: *c, net: false });
    }
    for vm in vms {
        v.vms.insert(vm.to_string(), VmSpec { guest: "kv".into(), mem: 128 << 20, vcpus: 2, net: None });
    }
    v
}

fn place(v: &mut View, vm: &str, role: Role, host: &str, port: Option<u16>) {
    let p = Placed { host: host.into(), addr: port.and_then(addr), service: port.and_then(|p| addr(p + 1)) };
    let e = v.placement.entry(vm.into()).or_default();
    match role {
        Role::Primary => e.primary = Some(p),
        Role::Secondary => e.secondary = Some(p),
    }
    v.slots.entry(host.into()).or_default().insert((vm.into(), role));
}

fn serving(v: &mut View, vm: &str, term: u64, sync: bool) {
    let w = v.witness.entry(vm.into()).or_default();
    w.term = term;
    w.primary = Some(Holder { node: "p".into(), term });
    w.sync = sync.then(|| Holder { node: "s".into(), term });
}

fn child(vm: &str, role: Role) -> Child {
    Child {
        vm: vm.into(),
        node: format!("{vm}.{}", role.as_str()),
        role,
        exited: false,
        serving: false,
        addr: addr(7000),
        service: addr(7001),
    }
}

fn local(children: Vec<Child>) -> Local {
    Local { children, ..Local::default() }
}

fn waited(vm: &str, role: Role, secs: u64) -> Local {
    let mut l = Local::default();
    l.missing_for.insert((vm.into(), role), Duration::from_secs(secs));
    l
}

#[test]
fn a_fresh_vm_is_claimed_first_by_the_least_loaded_host_then_by_the_others_after_the_stagger() {
    let mut v = view(&[("a", 2), ("b", 2), ("c", 2)], &["vm1", "vm2"]);
    place(&mut v, "vm2", Role::Primary, "a", Some(7000));
    place(&mut v, "vm2", Role::Secondary, "b", Some(7100));
    serving(&mut v, "vm2", 1, true);
    // c holds nothing: it is the best host for vm1
    assert_eq!(decide("c", &v, &Local::default()), vec![Action::ClaimPrimary { vm: "vm1".into() }]);
    let running =
        |vm: &str, r: Role, secs: u64| Local { children: vec![child(vm, r)], ..waited("vm1", Role::Primary, secs) };
    let a = |secs| running("vm2", Role::Primary, secs);
    let b = |secs| Local {
        children: vec![Child { addr: addr(7100), service: addr(7101), ..child("vm2", Role::Secondary) }],
        ..waited("vm1", Role::Primary, secs)
    };
    assert_eq!(decide("a", &v, &a(0)), vec![]);
    // a is of rank 1 (tied with b on load, first by name): after one stagger
    assert_eq!(decide("a", &v, &a(2)), vec![Action::ClaimPrimary { vm: "vm1".into() }]);
    assert_eq!(decide("b", &v, &b(2)), vec![]);
    assert_eq!(decide("b", &v, &b(4)), vec![Action::ClaimPrimary { vm: "vm1".into() }]);
    assert_eq!(protection(&v, "vm1"), Protection::Unprotected(Reason::PrimaryStarting));
    assert_eq!(protection(&v, "vm2"), Protection::Protected);
}

#[test]
fn a_vm_with_a_network_card_runs_only_on_hosts_with_a_bridge() {
    let mut v = view(&[("a", 2), ("b", 2), ("c", 2)], &["net", "kv"]);
    v.vms.get_mut("net").unwrap().net =
        Some(VmNet { mac: "52:54:00:00:00:01".into(), ip: "10.0.0.2/24".into(), gw: None });
    v.hosts.get_mut("b").unwrap().net = true;
    // a has no bridge: it may claim the kv VM, never the networked one
    assert_eq!(v.eligible("net", Role::Primary), vec!["b".to_string()]);
    assert_eq!(v.eligible("kv", Role::Primary).len(), 3);
    assert_eq!(decide("a", &v, &Local::default()), vec![Action::ClaimPrimary { vm: "kv".into() }]);
    assert!(decide("b", &v, &Local::default()).contains(&Action::ClaimPrimary { vm: "net".into() }));
    // its primary on b: no other host has a bridge, so it waits unprotected
    // rather than place its secondary on a host that cannot run it
    place(&mut v, "net", Role::Primary, "b", Some(7000));
    serving(&mut v, "net", 1, false);
    assert!(v.eligible("net", Role::Secondary).is_empty());
    let net_claims = |d: Vec<Action>| {
        d.into_iter().filter(|x| matches!(x, Action::ClaimSecondary { vm, .. } if vm == "net")).count()
    };
    assert_eq!(net_claims(decide("a", &v, &waited("net", Role::Secondary, 100))), 0);
    assert_eq!(protection(&v, "net"), Protection::Unprotected(Reason::NoHostForSecondary));
    // c gets a bridge: its secondary goes there
    v.hosts.get_mut("c").unwrap().net = true;
    assert_eq!(
        decide("c", &v, &waited("net", Role::Secondary, 100)),
        vec![Action::ClaimSecondary { vm: "net".into(), join: addr(7000).unwrap() }]
    );
}

#[test]
fn a_vm_with_a_history_never_gets_a_fresh_primary() {
    let mut v = view(&[("a", 2), ("b", 2)], &["vm"]);
    v.witness.insert("vm".into(), WitnessView { term: 3, sync: None, primary: None });
    assert_eq!(decide("a", &v, &waited("vm", Role::Primary, 100)), vec![]);
    assert_eq!(protection(&v, "vm"), Protection::Unprotected(Reason::Lost));
    // while the witness names a serving node or a caught-up secondary, it is failing over
    v.witness.get_mut("vm").unwrap().sync = Some(Holder { node: "s".into(), term: 3 });
    assert_eq!(protection(&v, "vm"), Protection::Unprotected(Reason::FailingOver));
}

#[test]
fn the_secondary_goes_to_another_host_and_waits_when_there_is_none() {
    let mut v = view(&[("a", 4)], &["vm"]);
    place(&mut v, "vm", Role::Primary, "a", Some(7000));
    serving(&mut v, "vm", 1, false);
    // anti-affinity: a has room, but it runs the primary
    let a = Local { children: vec![child("vm", Role::Primary)], ..waited("vm", Role::Secondary, 100) };
    assert_eq!(decide("a", &v, &a), vec![]);
    assert_eq!(protection(&v, "vm"), Protection::Unprotected(Reason::NoHostForSecondary));
    // a full host does not claim either
    v.hosts.insert("b".into(), HostInfo { capacity: 1, net: false });
    place(&mut v, "other", Role::Primary, "b", Some(7000));
    v.vms.insert("other".into(), v.vms["vm"].clone());
    serving(&mut v, "other", 1, false);
    let b = Local { children: vec![child("other", Role::Primary)], ..waited("vm", Role::Secondary, 100) };
    assert_eq!(decide("b", &v, &b), vec![]);
    assert_eq!(protection(&v, "vm"), Protection::Unprotected(Reason::NoHostForSecondary));
    // capacity appears: it is claimed, joining the primary's address
    v.hosts.insert("b".into(), HostInfo { capacity: 2, net: false });
    assert_eq!(
        decide("b", &v, &local(vec![child("other", Role::Primary)])),
        vec![Action::ClaimSecondary { vm: "vm".into(), join: addr(7000).unwrap() }]
    );
    assert_eq!(protection(&v, "vm"), Protection::Unprotected(Reason::SecondaryUnclaimed));
}

#[test]
fn no_secondary_is_claimed_before_the_primary_runs_and_holds_its_witness_key() {
    let mut v = view(&[("a", 2), ("b", 2)], &["vm"]);
    place(&mut v, "vm", Role::Primary, "a", None);
    assert_eq!(decide("b", &v, &Local::default()), vec![]);
    assert_eq!(protection(&v, "vm"), Protection::Unprotected(Reason::PrimaryStarting));
    place(&mut v, "vm", Role::Primary, "a", Some(7000));
    assert_eq!(decide("b", &v, &Local::default()), vec![], "no witness primary key yet");
    serving(&mut v, "vm", 1, false);
    assert_eq!(
        decide("b", &v, &Local::default()),
        vec![Action::ClaimSecondary { vm: "vm".into(), join: addr(7000).unwrap() }]
    );
}

#[test]
fn a_placed_node_is_started_and_its_addresses_published() {
    let mut v = view(&[("a", 2), ("b", 2)], &["vm"]);
    place(&mut v, "vm", Role::Primary, "a", None);
    assert_eq!(
        decide("a", &v, &Local::default()),
        vec![Action::Start { vm: "vm".into(), role: Role::Primary, join: None }]
    );
    assert_eq!(
        decide("a", &v, &local(vec![child("vm", Role::Primary)])),
        vec![Action::Publish { vm: "vm".into(), role: Role::Primary }]
    );
    place(&mut v, "vm", Role::Primary, "a", Some(7000));
    serving(&mut v, "vm", 1, false);
    assert_eq!(decide("a", &v, &local(vec![child("vm", Role::Primary)])), vec![]);
    place(&mut v, "vm", Role::Secondary, "b", None);
    assert_eq!(
        decide("b", &v, &Local::default()),
        vec![Action::Start { vm: "vm".into(), role: Role::Secondary, join: addr(7000) }]
    );
    assert_eq!(protection(&v, "vm"), Protection::Unprotected(Reason::SecondaryStarting));
    place(&mut v, "vm", Role::Secondary, "b", Some(7100));
    assert_eq!(protection(&v, "vm"), Protection::Unprotected(Reason::Syncing));
}

#[test]
fn an_unprotected_vm_is_recorded_once_with_its_time_and_the_record_goes_when_it_is_protected() {
    let mut v = view(&[("a", 2), ("b", 2)], &["vm", "other"]);
    // fresh, no record yet (a VM created before records existed, or whose
    // record an agent has not written yet): record both
    assert_eq!(marks(&v), vec![Mark::Unprotected { vm: "other".into() }, Mark::Unprotected { vm: "vm".into() }]);
    assert_eq!(unprotected_for(&v, "vm", 5_000), None, "no record: unknown, not zero");
    let rec = |since_ms| Unprotected { since_ms, by: "a".into() };
    v.unprotected.insert("vm".into(), rec(1_000));
    v.unprotected.insert("other".into(), rec(1_000));
    assert_eq!(marks(&v), vec![], "recorded: nothing to do while it stays unprotected");
    // its duration is from the record, whatever the reason now
    place(&mut v, "vm", Role::Primary, "a", Some(7000));
    serving(&mut v, "vm", 1, false);
    assert_eq!(protection(&v, "vm"), Protection::Unprotected(Reason::SecondaryUnclaimed));
    assert_eq!(unprotected_for(&v, "vm", 4_500), Some(Duration::from_millis(3_500)));
    assert_eq!(unprotected_for(&v, "vm", 500), Some(Duration::ZERO), "a clock behind the recorder's: 0, not negative");
    place(&mut v, "vm", Role::Secondary, "b", Some(7100));
    assert_eq!(protection(&v, "vm"), Protection::Unprotected(Reason::Syncing));
    assert_eq!(unprotected_for(&v, "vm", 6_000), Some(Duration::from_millis(5_000)));
    assert_eq!(marks(&v), vec![]);
    // caught up: protected, the record goes
    serving(&mut v, "vm", 1, true);
    assert_eq!(unprotected_for(&v, "vm", 7_000), None);
    assert_eq!(marks(&v), vec![Mark::Protected { vm: "vm".into() }]);
    v.unprotected.remove("vm");
    assert_eq!(marks(&v), vec![]);
    // the primary's host dies and the witness promotes the secondary: a
    // new stretch, recorded anew
    v.placement.get_mut("vm").unwrap().primary = None;
    v.slots.get_mut("a").unwrap().remove(&("vm".to_string(), Role::Primary));
    serving(&mut v, "vm", 2, false);
    assert_eq!(protection(&v, "vm"), Protection::Unprotected(Reason::FailingOver));
    assert_eq!(marks(&v), vec![Mark::Unprotected { vm: "vm".into() }]);
    // a deleted VM's record goes whatever its keys say
    v.vms.remove("other");
    assert_eq!(marks(&v), vec![Mark::Unprotected { vm: "vm".into() }, Mark::Protected { vm: "other".into() }]);
}

#[test]
fn a_promoted_secondary_becomes_the_placed_primary_and_the_old_one_is_stopped() {
    let mut v = view(&[("a", 2), ("b", 2), ("c", 2)], &["vm"]);
    place(&mut v, "vm", Role::Primary, "a", Some(7000));
    place(&mut v, "vm", Role::Secondary, "b", Some(7100));
    serving(&mut v, "vm", 2, false);
    let promoted = Child { serving: true, addr: addr(7100), service: addr(7101), ..child("vm", Role::Secondary) };
    assert_eq!(decide("b", &v, &local(vec![promoted])), vec![Action::Promoted { vm: "vm".into() }]);
    // after the move: b holds the primary, a's node is no longer placed
    v.placement.get_mut("vm").unwrap().secondary = None;
    v.slots.get_mut("b").unwrap().clear();
    place(&mut v, "vm", Role::Primary, "b", Some(7100));
    assert_eq!(
        decide("a", &v, &local(vec![child("vm", Role::Primary)])),
        vec![Action::Stop { vm: "vm".into(), role: Role::Primary }]
    );
    // c protects it again (a still counts its slot until it stopped its node)
    assert_eq!(
        decide("c", &v, &Local::default()),
        vec![Action::ClaimSecondary { vm: "vm".into(), join: addr(7100).unwrap() }]
    );
    let a = Local { children: vec![child("vm", Role::Primary)], ..waited("vm", Role::Secondary, 100) };
    assert_eq!(
        decide("a", &v, &a),
        vec![Action::Stop { vm: "vm".into(), role: Role::Primary }],
        "a still holds a slot of vm"
    );
    // once stopped, a gives its slot back
    assert_eq!(decide("a", &v, &Local::default()), vec![Action::Release { vm: "vm".into(), role: Role::Primary }]);
}

#[test]
fn a_host_that_lost_its_lease_stops_the_nodes_others_replaced_and_takes_back_the_others() {
    // a's lease expired: its host key, slots and placements are gone; b
    // took the primary of vm over (term 2)
    let mut v = view(&[("b", 2)], &["vm", "vm2", "vm3"]);
    place(&mut v, "vm", Role::Primary, "b", Some(7100));
    serving(&mut v, "vm", 2, false);
    let l = local(vec![child("vm", Role::Primary)]);
    assert_eq!(decide("a", &v, &l), vec![Action::Stop { vm: "vm".into(), role: Role::Primary }]);
    // vm2's primary and vm3's secondary ran on a; nobody took their places
    // (etcd was out for longer than the lease, say); the witness still names them
    let mut p2 = child("vm2", Role::Primary);
    p2.node = "a.vm2.primary".into();
    let mut s3 = child("vm3", Role::Secondary);
    s3.node = "a.vm3.secondary".into();
    v.witness.insert(
        "vm2".into(),
        WitnessView { term: 1, sync: None, primary: Some(Holder { node: "a.vm2.primary".into(), term: 1 }) },
    );
    v.witness.insert(
        "vm3".into(),
        WitnessView {
            term: 4,
            sync: Some(Holder { node: "a.vm3.secondary#77.123".into(), term: 4 }),
            primary: Some(Holder { node: "x".into(), term: 4 }),
        },
    );
    place(&mut v, "vm3", Role::Primary, "b", Some(7200));
    let l = local(vec![p2.clone(), s3.clone()]);
    // not registered again yet: nothing is stopped or started
    assert_eq!(decide("a", &v, &l), vec![]);
    v.hosts.insert("a".into(), HostInfo { capacity: 2, net: false });
    assert_eq!(
        decide("a", &v, &l),
        vec![
            Action::Adopt { vm: "vm2".into(), role: Role::Primary },
            Action::Adopt { vm: "vm3".into(), role: Role::Secondary }
        ]
    );
    // a secondary the witness no longer counts as caught up (its primary
    // ran alone) or a primary of an older term is stopped instead
    v.witness.get_mut("vm3").unwrap().sync = None;
    v.witness.get_mut("vm2").unwrap().term = 2;
    // (vm's secondary is free: a, registered and empty, may claim it)
    assert_eq!(
        decide("a", &v, &l),
        vec![
            Action::Stop { vm: "vm2".into(), role: Role::Primary },
            Action::Stop { vm: "vm3".into(), role: Role::Secondary },
            Action::ClaimSecondary { vm: "vm".into(), join: addr(7100).unwrap() }
        ]
    );
    // while the witness names a caught-up secondary, no other host claims
    // the secondary (its host may be taking it back)
    v.witness.get_mut("vm3").unwrap().sync = Some(Holder { node: "a.vm3.secondary#77.123".into(), term: 4 });
    let b = Local {
        children: vec![
            Child { addr: addr(7100), service: addr(7101), ..child("vm", Role::Primary) },
            Child { addr: addr(7200), service: addr(7201), ..child("vm3", Role::Primary) },
        ],
        ..waited("vm3", Role::Secondary, 100)
    };
    assert_eq!(decide("b", &v, &b), vec![]);
    // and nothing fresh is claimed by a host that is not registered
    v.hosts.remove("a");
    assert_eq!(decide("a", &v, &waited("vm2", Role::Primary, 100)), vec![]);
}

#[test]
fn a_deleted_vm_is_stopped_and_an_exited_node_released() {
    let mut v = view(&[("a", 2)], &[]);
    place(&mut v, "gone", Role::Primary, "a", Some(7000));
    assert_eq!(
        decide("a", &v, &local(vec![child("gone", Role::Primary)])),
        vec![Action::Stop { vm: "gone".into(), role: Role::Primary }]
    );
    let mut v = view(&[("a", 2)], &["vm"]);
    place(&mut v, "vm", Role::Primary, "a", Some(7000));
    let dead = Child { exited: true, ..child("vm", Role::Primary) };
    assert_eq!(decide("a", &v, &local(vec![dead])), vec![Action::Release { vm: "vm".into(), role: Role::Primary }]);
}

#[test]
fn a_host_claims_primaries_first_and_no_more_than_its_free_slots() {
    let mut v = view(&[("a", 1), ("b", 1)], &["vm1", "vm2", "vm3"]);
    place(&mut v, "vm1", Role::Primary, "a", Some(7000));
    serving(&mut v, "vm1", 1, false);
    // b may protect vm1 or run vm2 or vm3, one slot: it runs vm2
    assert_eq!(decide("b", &v, &Local::default()), vec![Action::ClaimPrimary { vm: "vm2".into() }]);
    v.hosts.insert("b".into(), HostInfo { capacity: 3, net: false });
    assert_eq!(
        decide("b", &v, &Local::default()),
        vec![
            Action::ClaimPrimary { vm: "vm2".into() },
            Action::ClaimPrimary { vm: "vm3".into() },
            Action::ClaimSecondary { vm: "vm1".into(), join: addr(7000).unwrap() }
        ]
    );
}

#[test]
fn a_switchover_is_asked_of_the_protected_primary_once_per_term() {
    let mut v = view(&[("a", 2), ("b", 2)], &["vm"]);
    place(&mut v, "vm", Role::Primary, "a", Some(7000));
    place(&mut v, "vm", Role::Secondary, "b", Some(7100));
    serving(&mut v, "vm", 3, true);
    let a = local(vec![child("vm", Role::Primary)]);
    assert_eq!(decide("a", &v, &a), vec![]);
    v.switchover.insert("vm".into(), 3);
    assert_eq!(decide("a", &v, &a), vec![Action::Switchover { vm: "vm".into() }]);
    let b = local(vec![Child { addr: addr(7100), service: addr(7101), ..child("vm", Role::Secondary) }]);
    assert_eq!(decide("b", &v, &b), vec![], "only the primary's agent acts");
    let mut asked = a.clone();
    asked.switched.insert(("vm".into(), 3));
    assert_eq!(decide("a", &v, &asked), vec![], "asked once");
    // a request of an older term, or of an unprotected VM, is not acted on
    v.switchover.insert("vm".into(), 2);
    assert_eq!(decide("a", &v, &a), vec![]);
    v.switchover.insert("vm".into(), 3);
    v.witness.get_mut("vm").unwrap().sync = None;
    assert_eq!(decide("a", &v, &a), vec![]);
}

#[test]
fn a_host_in_backoff_claims_nothing_for_that_vm() {
    let v = view(&[("a", 2)], &["vm"]);
    let mut l = Local::default();
    l.backoff.insert("vm".into());
    assert_eq!(decide("a", &v, &l), vec![]);
}

/// The claim transaction's compares (see `store`), as a model: the claim
/// is applied only if the slot is free, the host below capacity, and the
/// VM's other node not on this host.
fn apply(v: &mut View, host: &str, a: &Action) -> bool {
    let (vm, role) = match a {
        Action::ClaimPrimary { vm } => (vm, Role::Primary),
        Action::ClaimSecondary { vm, .. } => (vm, Role::Secondary),
        _ => return false,
    };
    let p = v.placement.get(vm).cloned().unwrap_or_default();
    let cap = v.hosts.get(host).map_or(0, |h| h.capacity) as usize;
    let other = match role {
        Role::Primary => p.secondary.as_ref(),
        Role::Secondary => p.primary.as_ref(),
    };
    if p.get(role).is_some() || v.load(host) >= cap || other.is_some_and(|o| o.host == host) {
        return false;
    }
    place(v, vm, role, host, Some(7000));
    if role == Role::Primary {
        serving(v, vm, 1, false);
    }
    true
}

fn check(v: &View) -> Result<(), TestCaseError> {
    for (vm, p) in &v.placement {
        if let (Some(a), Some(b)) = (&p.primary, &p.secondary) {
            prop_assert_ne!(&a.host, &b.host, "both nodes of {} on one host", vm);
        }
    }
    for (h, info) in &v.hosts {
        prop_assert!(v.load(h) <= info.capacity as usize, "{} over capacity", h);
    }
    Ok(())
}

proptest! {
    /// Whatever the view, no claim `decide` makes for a host would put
    /// both nodes of a VM on it or take it past its capacity.
    #[test]
    fn claims_never_break_anti_affinity_or_capacity(
        caps in proptest::collection::vec(0u32..4, 1..5),
        placed in proptest::collection::vec((0usize..6, 0usize..5, any::<bool>(), any::<bool>()), 0..10),
        waited_s in 0u64..10,
    ) {
        let hosts: Vec<(String, u32)> = caps.iter().enumerate().map(|(i, c)| (format!("h{i}"), *c)).collect();
        let names: Vec<&str> = hosts.iter().map(|(h, _)| h.as_str()).collect();
        let hs: Vec<(&str, u32)> = hosts.iter().map(|(h, c)| (h.as_str(), *c)).collect();
        let vms: Vec<String> = (0..6).map(|i| format!("vm{i}")).collect();
        let vm_refs: Vec<&str> = vms.iter().map(String::as_str).collect();
        let mut v = view(&hs, &vm_refs);
        for (vm, h, secondary, running) in placed {
            let mut trial = v.clone();
            let host = names[h % names.len()];
            if apply(&mut trial, host, &if secondary {
                Action::ClaimSecondary { vm: vms[vm].clone(), join: addr(1).unwrap() }
            } else {
                Action::ClaimPrimary { vm: vms[vm].clone() }
            }) {
                if !running {
                    if let Some(p) = trial.placement.get_mut(&vms[vm]).and_then(|p| p.primary.as_mut()) {
                        p.addr = None;
                    }
                }
                v = trial;
            }
        }
        check(&v)?;
        for me in &names {
            let mut l = Local::default();
            for vm in &vms {
                for r in [Role::Primary, Role::Secondary] {
                    l.missing_for.insert((vm.clone(), r), Duration::from_secs(waited_s));
                }
            }
            for a in decide(me, &v, &l) {
                let (vm, role) = match &a {
                    Action::ClaimPrimary { vm } => (vm, Role::Primary),
                    Action::ClaimSecondary { vm, .. } => (vm, Role::Secondary),
                    _ => continue,
                };
                let p = v.placement.get(vm).cloned().unwrap_or_default();
                prop_assert!(p.get(role).is_none());
                let other = if role == Role::Primary { p.secondary } else { p.primary };
                prop_assert!(other.is_none_or(|o| o.host != *me), "{} claims both nodes of {}", me, vm);
                prop_assert!(v.load(me) < v.hosts[*me].capacity as usize, "{} claims past capacity", me);
            }
        }
    }

    /// Agents acting in any order, with their claims decided by the
    /// transactions' compares, keep the invariants at every step, and
    /// every VM ends protected-placed when the hosts have room for it.
    #[test]
    fn agents_racing_in_any_order_keep_the_invariants_and_place_every_vm_with_room(
        caps in proptest::collection::vec(0u32..4, 2..5),
        n_vms in 1usize..5,
        order in proptest::collection::vec(0usize..5, 40..80),
    ) {
        let hosts: Vec<(String, u32)> = caps.iter().enumerate().map(|(i, c)| (format!("h{i}"), *c)).collect();
        let hs: Vec<(&str, u32)> = hosts.iter().map(|(h, c)| (h.as_str(), *c)).collect();
        let vms: Vec<String> = (0..n_vms).map(|i| format!("vm{i}")).collect();
        let vm_refs: Vec<&str> = vms.iter().map(String::as_str).collect();
        let mut v = view(&hs, &vm_refs);
        let mut l = Local::default();
        for vm in &vms {
            for r in [Role::Primary, Role::Secondary] {
                l.missing_for.insert((vm.clone(), r), Duration::from_secs(60));
            }
        }
        // every agent decides on the same stale view, then all apply: the race
        let round = |v: &mut View, who: &[usize]| -> Result<(), TestCaseError> {
            let snapshot = v.clone();
            for &i in who {
                let me = &hosts[i % hosts.len()].0;
                for a in decide(me, &snapshot, &l) {
                    apply(v, me, &a);
                    check(v)?;
                }
            }
            Ok(())
        };
        for w in order.chunks(3) {
            round(&mut v, w)?;
        }
        for _ in 0..2 * n_vms + 2 {
            round(&mut v, &(0..hosts.len()).collect::<Vec<_>>())?;
        }
        // room: as many VMs as the hosts can fit, two nodes on two hosts each
        let free: u32 = caps.iter().sum();
        let placed = v.placement.values().filter(|p| p.primary.is_some() && p.secondary.is_some()).count();
        let hosts_with_room = caps.iter().filter(|c| **c > 0).count();
        if hosts_with_room >= 2 && free as usize >= 2 * n_vms && caps.iter().all(|c| *c as usize >= n_vms) {
            prop_assert_eq!(placed, n_vms, "every VM placed on two hosts: {:?}", v.placement);
        }
    }
}
