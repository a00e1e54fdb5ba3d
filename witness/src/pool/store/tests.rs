//! The pool's transactions against a real etcd on loopback.

use super::*;
use crate::server::Etcd;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("castor-pool-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn spec() -> VmSpec {
    VmSpec { guest: "kv".into(), mem: 128 << 20, vcpus: 2, net: None }
}

async fn host(s: &Store, name: &str, cap: u32, ttl: u64) -> i64 {
    let lease = s.lease(Duration::from_secs(ttl)).await.unwrap();
    s.register(name, &HostInfo { capacity: cap, net: false }, lease).await.unwrap();
    lease
}

fn addr(p: u16) -> Option<std::net::SocketAddr> {
    Some(std::net::SocketAddr::from(([127, 0, 0, 1], p)))
}

/// A node of `host` at replication port `p` (service `p + 1`).
fn at(host: &str, p: u16) -> Placed {
    Placed { host: host.into(), addr: addr(p), service: addr(p + 1) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_racing_for_one_slot_one_wins_and_capacity_and_anti_affinity_hold() {
    let dir = tmp("race");
    let etcd = Etcd::start(&dir).unwrap();
    let s = Store::connect(&etcd.url, Duration::from_millis(500)).await.unwrap();
    let (la, lb, lc) = (host(&s, "a", 1, 30).await, host(&s, "b", 2, 30).await, host(&s, "c", 2, 30).await);
    // a second agent of the same host name is refused
    let l2 = s.lease(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        s.register("a", &HostInfo { capacity: 1, net: false }, l2).await,
        Err(StoreError::HostTaken("a".into()))
    );
    s.create_vm("vm1", &spec()).await.unwrap();
    s.create_vm("vm2", &spec()).await.unwrap();
    assert_eq!(s.create_vm("vm1", &spec()).await, Err(StoreError::VmExists("vm1".into())));
    assert!(s.create_vm("pool", &spec()).await.is_err());

    // a (capacity 1) claims both primaries from one view at once: the
    // transactions let exactly one through
    let v = s.read().await.unwrap();
    let (r1, r2) =
        tokio::join!(s.claim("a", la, 1, &v, "vm1", Role::Primary), s.claim("a", la, 1, &v, "vm2", Role::Primary));
    assert_eq!([r1.unwrap(), r2.unwrap()].iter().filter(|w| **w).count(), 1, "capacity 1: one claim wins");
    let v = s.read().await.unwrap();
    assert_eq!(v.load("a"), 1);
    let (won, lost) = if v.placement.contains_key("vm1") { ("vm1", "vm2") } else { ("vm2", "vm1") };
    assert!(!s.claim("a", la, 1, &v, lost, Role::Primary).await.unwrap(), "a is full");
    // anti-affinity: a cannot take the secondary of its own primary (it is
    // full too; the same holds for a host with room, checked by b below)
    assert!(s.publish(la, &v, won, Role::Primary, at("a", 7000)).await.unwrap());

    // b and c race for the one secondary of `won`, from the same view
    let v = s.read().await.unwrap();
    let (rb, rc) =
        tokio::join!(s.claim("b", lb, 2, &v, won, Role::Secondary), s.claim("c", lc, 2, &v, won, Role::Secondary));
    assert_eq!([rb.unwrap(), rc.unwrap()].iter().filter(|w| **w).count(), 1, "one secondary");
    let v = s.read().await.unwrap();
    let sec = v.placement[won].secondary.clone().unwrap();
    assert_ne!(sec.host, "a");
    // the secondary's host claims the primary of the other VM: fine; but
    // never the primary of a VM whose secondary it holds
    let sec_lease = if sec.host == "b" { lb } else { lc };
    assert!(!s.claim(&sec.host, sec_lease, 2, &v, won, Role::Primary).await.unwrap());
    // the other VM's primary: one claim from this view wins, a second
    // from the same (now stale) view is refused
    assert!(s.claim(&sec.host, sec_lease, 2, &v, lost, Role::Primary).await.unwrap());
    let other = if sec.host == "b" { ("c", lc) } else { ("b", lb) };
    assert!(!s.claim(other.0, other.1, 2, &v, lost, Role::Primary).await.unwrap(), "taken since this view");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_lease_expires_loses_its_placements_and_a_promoted_secondary_moves_in() {
    let dir = tmp("lease");
    let etcd = Etcd::start(&dir).unwrap();
    let s = Store::connect(&etcd.url, Duration::from_millis(500)).await.unwrap();
    let la = host(&s, "a", 2, 1).await;
    let lb = host(&s, "b", 2, 30).await;
    s.create_vm("vm", &spec()).await.unwrap();
    let v = s.read().await.unwrap();
    assert!(s.claim("a", la, 2, &v, "vm", Role::Primary).await.unwrap());
    let v = s.read().await.unwrap();
    assert!(s.publish(la, &v, "vm", Role::Primary, at("a", 7000)).await.unwrap());
    let v = s.read().await.unwrap();
    assert!(s.claim("b", lb, 2, &v, "vm", Role::Secondary).await.unwrap());
    // a's lease expires (its agent stopped keeping it alive): its host key,
    // slots and placement vanish together
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let v = s.read().await.unwrap();
    assert!(!v.hosts.contains_key("a") && !v.slots.contains_key("a"));
    assert_eq!(v.placement["vm"].primary, None);
    assert_eq!(v.placement["vm"].secondary.as_ref().unwrap().host, "b");
    // b's node was promoted by the witness: it becomes the placed primary
    assert!(s.promoted(lb, &v, "vm", at("b", 7100)).await.unwrap());
    assert!(!s.promoted(lb, &v, "vm", at("b", 7100)).await.unwrap(), "only once, from the view seen");
    let v = s.read().await.unwrap();
    assert_eq!(
        v.placement["vm"],
        VmPlacement {
            primary: Some(Placed { host: "b".into(), addr: addr(7100), service: addr(7101) }),
            secondary: None
        }
    );
    assert_eq!(v.slots["b"], [("vm".to_string(), Role::Primary)].into_iter().collect());
    // the expired agent comes back: it registers anew, holding nothing
    let la2 = host(&s, "a", 2, 30).await;
    let v = s.read().await.unwrap();
    assert_eq!(v.load("a"), 0);
    // a node of a's that still ran takes its free place back (once)
    assert!(s.adopt(la2, 2, &v, "vm", Role::Secondary, at("a", 7300)).await.unwrap());
    assert!(!s.adopt(la2, 2, &v, "vm", Role::Secondary, at("a", 7300)).await.unwrap());
    let v = s.read().await.unwrap();
    assert_eq!(v.placement["vm"].secondary, Some(Placed { host: "a".into(), addr: addr(7300), service: addr(7301) }));
    assert_eq!(v.load("a"), 1);
    // never the primary's place of a VM whose secondary it holds
    assert!(!s.adopt(la2, 2, &v, "vm", Role::Primary, at("a", 7400)).await.unwrap());
    // deleting the VM: b and a release; the history is cleared once nothing runs
    s.release("b", lb, "vm", Role::Primary).await.unwrap();
    s.release("a", la2, "vm", Role::Secondary).await.unwrap();
    s.delete_vm("vm", Duration::from_secs(5)).await.unwrap();
    let v = s.read().await.unwrap();
    assert!(!v.vms.contains_key("vm") && !v.placement.contains_key("vm") && v.load("b") == 0);
    assert_eq!(s.delete_vm("vm", Duration::from_secs(1)).await, Err(StoreError::NoVm("vm".into())));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_with_a_witness_history_is_not_created_again_until_deleted() {
    let dir = tmp("history");
    let etcd = Etcd::start(&dir).unwrap();
    let s = Store::connect(&etcd.url, Duration::from_millis(500)).await.unwrap();
    let mut c = Client::connect([&etcd.url], None).await.unwrap();
    c.put("/castor/old/term", "4", None).await.unwrap();
    assert_eq!(s.create_vm("old", &spec()).await, Err(StoreError::VmHasHistory { vm: "old".into(), term: 4 }));
    // a serving primary's key keeps the history
    c.put("/castor/old/primary", r#"{"node":"p","term":4}"#, None).await.unwrap();
    assert!(matches!(s.delete_vm("old", Duration::from_millis(600)).await, Err(StoreError::StillRunning { .. })));
    c.delete("/castor/old/primary", None).await.unwrap();
    s.delete_vm("old", Duration::from_secs(2)).await.unwrap();
    s.create_vm("old", &spec()).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprotected_record_is_written_by_create_and_a_stale_view_cannot_undo_it() {
    let dir = tmp("unprotected");
    let etcd = Etcd::start(&dir).unwrap();
    let s = Store::connect(&etcd.url, Duration::from_millis(500)).await.unwrap();
    let la = host(&s, "a", 2, 30).await;
    let lb = host(&s, "b", 2, 30).await;
    let before = crate::pool::unix_ms();
    s.create_vm("vm", &spec()).await.unwrap();
    let v = s.read().await.unwrap();
    let rec = v.unprotected.get("vm").cloned().expect("create records the VM unprotected");
    assert_eq!(rec.by, "castor vm create");
    assert!(rec.since_ms >= before && rec.since_ms <= crate::pool::unix_ms(), "{rec:?}");
    assert_eq!(super::super::marks(&v), vec![], "recorded once");
    // primary and secondary placed and caught up: protected
    assert!(s.claim("a", la, 2, &v, "vm", Role::Primary).await.unwrap());
    let v = s.read().await.unwrap();
    assert!(s.publish(la, &v, "vm", Role::Primary, at("a", 7000)).await.unwrap());
    let mut c = Client::connect([&etcd.url], None).await.unwrap();
    c.put("/castor/vm/term", "1", None).await.unwrap();
    c.put("/castor/vm/primary", r#"{"node":"p","term":1}"#, None).await.unwrap();
    let v = s.read().await.unwrap();
    assert!(s.claim("b", lb, 2, &v, "vm", Role::Secondary).await.unwrap());
    let v = s.read().await.unwrap();
    assert!(s.publish(lb, &v, "vm", Role::Secondary, at("b", 7100)).await.unwrap());
    let unprotected_view = s.read().await.unwrap();
    c.put("/castor/vm/sync", r#"{"node":"s","term":1}"#, None).await.unwrap();
    let v = s.read().await.unwrap();
    let m = super::super::marks(&v);
    assert_eq!(m, vec![Mark::Protected { vm: "vm".into() }]);
    assert!(s.mark(&v, &m[0], 1, "a").await.unwrap());
    assert!(!s.mark(&v, &m[0], 1, "b").await.unwrap(), "of two agents racing, one writes");
    // an agent that read the VM unprotected before it caught up (and saw
    // no record: say one it read earlier still) cannot record it again
    let mut stale = unprotected_view.clone();
    stale.unprotected.clear();
    let m = Mark::Unprotected { vm: "vm".into() };
    assert!(!s.mark(&stale, &m, 2, "b").await.unwrap(), "a stale view writes nothing");
    assert!(s.read().await.unwrap().unprotected.is_empty());
    // the primary runs alone (the witness's sync deleted): a new record
    c.delete("/castor/vm/sync", None).await.unwrap();
    let v = s.read().await.unwrap();
    assert_eq!(super::super::marks(&v), vec![m.clone()]);
    assert!(s.mark(&v, &m, 1234, "b").await.unwrap());
    assert_eq!(s.read().await.unwrap().unprotected["vm"], Unprotected { since_ms: 1234, by: "b".into() });
    // delete clears it with the history
    c.delete("/castor/vm/primary", None).await.unwrap();
    s.release("a", la, "vm", Role::Primary).await.unwrap();
    s.release("b", lb, "vm", Role::Secondary).await.unwrap();
    s.delete_vm("vm", Duration::from_secs(2)).await.unwrap();
    let v = s.read().await.unwrap();
    assert!(v.unprotected.is_empty() && v.witness.is_empty(), "{v:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
