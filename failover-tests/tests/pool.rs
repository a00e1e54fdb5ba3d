//! The pool of hosts (issue 31), end to end: a real etcd, three real
//! `castor agent` processes (each a "host" with its own directory and its
//! own process group), one kv VM created with `castor vm create`, a
//! recorded client load. A host dies (kill -9 of its agent and every node
//! it runs): the witness fails the VM over, the agents re-protect it on
//! the remaining host, nothing acknowledged is lost.

use std::time::{Duration, Instant};

use failover_tests::cluster::Cluster;
use failover_tests::load::{split_brain, Load};
use failover_tests::serial;
use witness::pool::{protection, Protection, View};

#[path = "pool/host.rs"]
mod host;
use host::*;
#[path = "pool/demo.rs"]
mod demo;
#[path = "pool/net.rs"]
mod net;
#[path = "pool/race.rs"]
mod race;
#[path = "pool/second.rs"]
mod second;

#[test]
fn a_host_dies_its_vm_is_served_by_the_witness_and_reprotected_on_the_remaining_host() {
    let _g = serial();
    let c = Cluster::new("pool-host-dies");
    let etcd = c.etcd();
    let (rt, store) = connect(&etcd.url);
    let mut hosts: Vec<Host> = ["h1", "h2", "h3"].iter().map(|n| Host::start(&c, &etcd.url, n, 2)).collect();
    assert!(
        wait_view(&rt, &store, T, |v| v.hosts.len() == 3).is_some(),
        "three hosts registered:\n{}",
        logs(&hosts, &c.dir)
    );

    let (code, out, err) = castor(&["vm", "create", "vm1", "--witness", &etcd.url, "--mem", "128M"]);
    assert_eq!(code, 0, "vm create: {out}{err}");
    let (code, _, err) = castor(&["vm", "create", "vm1", "--witness", &etcd.url]);
    assert_eq!(code, 8, "a second create is refused: {err}");

    let t0 = Instant::now();
    let Some(v) = wait_view(&rt, &store, T, |v| protection(v, "vm1") == Protection::Protected) else {
        panic!("vm1 never protected: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    let p = v.placement["vm1"].clone();
    let (pr, se) = (p.primary.clone().unwrap(), p.secondary.clone().unwrap());
    assert_ne!(pr.host, se.host, "anti-affinity");
    eprintln!(
        "vm1 protected {:.1} s after create: primary on {}, secondary on {}",
        t0.elapsed().as_secs_f64(),
        pr.host,
        se.host
    );
    let (_, list, _) = castor(&["vm", "list", "--witness", &etcd.url]);
    eprint!("{list}");

    let load = Load::start(&rt, vec![pr.service.unwrap(), se.service.unwrap()], 4, 16, 1);
    assert!(load.wait_more(200, T), "the load runs");

    // the primary's host dies: its agent and every node it runs, kill -9
    let dead = hosts.iter().position(|h| h.name == pr.host).unwrap();
    let acked_before = load.acked();
    let killed = Instant::now();
    hosts[dead].kill_all();
    eprintln!("killed host {} (its agent and its nodes) with {acked_before} writes acknowledged", pr.host);

    // served again: the witness promoted the secondary (term 2) and clients carry on
    let mut served = None;
    while killed.elapsed() < T {
        if load.acked() > acked_before + 10 {
            served = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let Some(served) = served else { panic!("vm1 not served again:\n{}", logs(&hosts, &c.dir)) };
    let third = ["h1", "h2", "h3"].into_iter().find(|h| *h != pr.host && *h != se.host).unwrap();
    // re-protected: the promoted node is the placed primary on the old
    // secondary's host, a new secondary on the third host is caught up
    let Some(v) = wait_view(&rt, &store, T, |v| {
        let p = v.placement.get("vm1").cloned().unwrap_or_default();
        protection(v, "vm1") == Protection::Protected
            && p.primary.as_ref().is_some_and(|x| x.host == se.host)
            && p.secondary.as_ref().is_some_and(|x| x.host == third)
    }) else {
        panic!("vm1 not re-protected: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    let reprotected = killed.elapsed();
    let w = v.witness["vm1"].clone();
    assert_eq!(w.term, 2, "one promotion, by the witness");
    eprintln!(
        "host {} died: vm1 served again after {:.0} ms (first acks on the new primary), re-protected on {} after {:.0} ms (term {})",
        pr.host,
        served.as_secs_f64() * 1e3,
        third,
        reprotected.as_secs_f64() * 1e3,
        w.term
    );
    let (_, list, _) = castor(&["vm", "list", "--witness", &etcd.url]);
    eprint!("{list}");
    // the dead host's registration ends with its lease
    assert!(
        wait_view(&rt, &store, Duration::from_secs(10), |v| !v.hosts.contains_key(&pr.host)).is_some(),
        "the dead host's lease expired"
    );

    let new_sec = v.placement["vm1"].secondary.clone().unwrap();
    load.add_node(new_sec.service.unwrap());
    assert!(load.wait_more(200, T), "clients carry on, protected again");
    let verdict = load.finish(&rt, v.placement["vm1"].primary.clone().unwrap().service.unwrap());
    eprintln!(
        "acked {} writes, {} keys checked, lost {}, duplicated {}, longest gap {:.0} ms",
        verdict.acked,
        verdict.keys_checked,
        verdict.lost,
        verdict.duplicated,
        verdict.max_gap.as_secs_f64() * 1e3
    );
    assert_eq!((verdict.lost, verdict.duplicated), (0, 0), "nothing acknowledged lost or applied twice");
    assert!(verdict.keys_checked > 0);
    no_split_brain(&c);

    // delete: the agents stop its nodes; its history is cleared
    let (code, out, err) = castor(&["vm", "delete", "vm1", "--witness", &etcd.url, "--wait-s", "30"]);
    assert_eq!(code, 0, "vm delete: {out}{err}\n{}", logs(&hosts, &c.dir));
    let v = read(&rt, &store);
    assert!(v.placement.is_empty() && v.witness.is_empty(), "nothing left of vm1: {v:?}");
    assert!(v.slots.values().all(|s| s.is_empty()), "every slot given back: {:?}", v.slots);
    drop(hosts);
}

/// Capacity: two hosts of capacity 1 run one primary each and no
/// secondary (never both nodes on one host): both VMs wait unprotected and
/// say why; a host with room joins and both are protected; a fourth host
/// joins and nothing moves.
#[test]
fn capacity_exhausted_waits_with_its_reason_and_protects_once_a_host_joins_and_a_fourth_moves_nothing() {
    let _g = serial();
    let c = Cluster::new("pool-capacity");
    let etcd = c.etcd();
    let (rt, store) = connect(&etcd.url);
    // both VMs exist before the hosts: a host claims a primary before a
    // secondary (with the VMs created one by one, the second could find
    // every slot taken by the first's nodes, and wait for a host)
    for vm in ["vm1", "vm2"] {
        let (code, out, err) = castor(&["vm", "create", vm, "--witness", &etcd.url, "--mem", "64M"]);
        assert_eq!(code, 0, "vm create: {out}{err}");
    }
    let rows = vm_list(&etcd.url);
    assert!(rows.iter().all(|r| r["reason"] == "no_host_for_primary"), "no host yet: {rows:?}");
    let mut hosts = vec![Host::start(&c, &etcd.url, "h1", 1), Host::start(&c, &etcd.url, "h2", 1)];
    let both_primaries = |v: &View| {
        ["vm1", "vm2"]
            .iter()
            .all(|vm| v.placement.get(*vm).and_then(|p| p.primary.as_ref()).is_some_and(|p| p.addr.is_some()))
    };
    let Some(v) = wait_view(&rt, &store, T, both_primaries) else {
        panic!("two primaries not placed: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    assert_ne!(v.placement["vm1"].primary.as_ref().unwrap().host, v.placement["vm2"].primary.as_ref().unwrap().host);
    std::thread::sleep(Duration::from_secs(3)); // past the stagger: still nothing
    let rows = vm_list(&etcd.url);
    let table = castor(&["vm", "list", "--witness", &etcd.url]).1;
    eprintln!("{table}");
    for r in &rows {
        assert_eq!(r["protection"], "unprotected", "{r}");
        assert_eq!(r["reason"], "no_host_for_secondary", "{r}");
        assert!(r["secondary"].is_null(), "{r}");
        // unprotected since its creation (recorded in etcd by `vm create`),
        // which was more than the 3 s waited above ago
        assert!(r["unprotected_for_ms"].as_u64().is_some_and(|ms| ms >= 3000), "{r}");
        assert_eq!(r["unprotected_recorded_by"], "castor vm create", "{r}");
    }
    for vm in ["vm1", "vm2"] {
        let line = table.lines().find(|l| l.starts_with(vm)).unwrap_or_default();
        assert!(line.contains("no host with capacity for its secondary") && line.contains('s'), "{table}");
        let (code, out, _) = castor(&["vm", "show", vm, "--witness", &etcd.url]);
        let shown: serde_json::Value = serde_json::from_str(out.trim()).expect("vm show");
        assert_eq!((code, &shown["reason"]), (0, &serde_json::json!("no_host_for_secondary")));
        assert!(shown["unprotected_for_ms"].as_u64().is_some_and(|ms| ms >= 3000), "{shown}");
    }
    let v = read(&rt, &store);
    assert!(v.hosts.keys().all(|h| v.load(h) == 1), "capacity 1 each: {:?}", v.slots);

    let t = Instant::now();
    hosts.push(Host::start(&c, &etcd.url, "h3", 2));
    let Some(v) =
        wait_view(&rt, &store, T, |v| ["vm1", "vm2"].iter().all(|vm| protection(v, vm) == Protection::Protected))
    else {
        panic!("not protected once h3 joined: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    eprintln!("h3 joined: both VMs protected {:.0} ms later", t.elapsed().as_secs_f64() * 1e3);
    // the record goes with the first agent that reads them protected
    assert!(
        wait_view(&rt, &store, Duration::from_secs(10), |v| v.unprotected.is_empty()).is_some(),
        "the unprotected records are removed: {:?}",
        read(&rt, &store).unprotected
    );
    assert!(vm_list(&etcd.url).iter().all(|r| r["unprotected_for_ms"].is_null() && r["reason"].is_null()));
    for vm in ["vm1", "vm2"] {
        assert_eq!(v.placement[vm].secondary.as_ref().unwrap().host, "h3");
    }
    let before = v.placement.clone();
    hosts.push(Host::start(&c, &etcd.url, "h4", 2));
    assert!(wait_view(&rt, &store, T, |v| v.hosts.contains_key("h4")).is_some());
    std::thread::sleep(Duration::from_secs(3));
    let v = read(&rt, &store);
    assert_eq!(v.placement, before, "a fourth host joined: nothing moved");
    assert_eq!(v.load("h4"), 0);
    for vm in ["vm1", "vm2"] {
        let (code, out, err) = castor(&["vm", "delete", vm, "--witness", &etcd.url]);
        assert_eq!(code, 0, "vm delete: {out}{err}");
    }
    assert!(
        wait_view(&rt, &store, Duration::from_secs(10), |_| hosts.iter().all(|h| h.nodes().is_empty())).is_some(),
        "every node stopped after delete"
    );
}

/// A host frozen past its lease (SIGSTOP of its agent and its nodes): the
/// VM fails over by the witness and is re-protected elsewhere; thawed, the
/// agent registers again holding nothing, stops the nodes it lost, and
/// they decided no release after the freeze.
#[test]
fn a_host_frozen_past_its_lease_and_thawed_stops_the_nodes_it_lost() {
    let _g = serial();
    let c = Cluster::new("pool-frozen-host");
    let etcd = c.etcd();
    let (rt, store) = connect(&etcd.url);
    let hosts: Vec<Host> = ["h1", "h2", "h3"].iter().map(|n| Host::start(&c, &etcd.url, n, 2)).collect();
    let (code, out, err) = castor(&["vm", "create", "vm1", "--witness", &etcd.url, "--mem", "64M"]);
    assert_eq!(code, 0, "vm create: {out}{err}");
    let Some(v) = wait_view(&rt, &store, T, |v| protection(v, "vm1") == Protection::Protected) else {
        panic!("vm1 never protected: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    let (pr, se) = (v.placement["vm1"].primary.clone().unwrap(), v.placement["vm1"].secondary.clone().unwrap());
    let load = Load::start(&rt, vec![pr.service.unwrap(), se.service.unwrap()], 4, 16, 1);
    assert!(load.wait_more(100, T), "the load runs");
    let frozen = hosts.iter().find(|h| h.name == pr.host).unwrap();
    let old_nodes = frozen.nodes();
    assert_eq!(old_nodes.len(), 1, "the frozen host runs the primary");
    frozen.signal_all(libc::SIGSTOP);
    let frozen_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros();
    let t = Instant::now();
    eprintln!("froze host {} (its agent and its primary)", pr.host);
    let Some(v) = wait_view(&rt, &store, T, |v| {
        protection(v, "vm1") == Protection::Protected
            && !v.hosts.contains_key(&pr.host)
            && v.placement["vm1"].primary.as_ref().is_some_and(|p| p.host == se.host)
    }) else {
        frozen.signal_all(libc::SIGCONT);
        panic!("vm1 not re-protected while {} was frozen: {:?}\n{}", pr.host, read(&rt, &store), logs(&hosts, &c.dir));
    };
    eprintln!(
        "re-protected on {} {:.0} ms after the freeze, the frozen host's lease expired",
        v.placement["vm1"].secondary.as_ref().unwrap().host,
        t.elapsed().as_secs_f64() * 1e3
    );
    frozen.signal_all(libc::SIGCONT);
    let t = Instant::now();
    while t.elapsed() < T && !frozen.nodes().is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(frozen.nodes().is_empty(), "the thawed host still runs {:?}:\n{}", frozen.nodes(), frozen.log_tail());
    assert!(
        wait_view(&rt, &store, Duration::from_secs(10), |v| v.hosts.contains_key(&pr.host) && v.load(&pr.host) == 0)
            .is_some(),
        "the thawed host registered again, holding nothing"
    );
    eprintln!(
        "thawed: {} stopped its node within {:.0} ms and registered again",
        pr.host,
        t.elapsed().as_secs_f64() * 1e3
    );
    assert!(frozen.log_tail().contains("stopped the primary of vm1"), "{}", frozen.log_tail());
    // the old primary decided no release after the freeze
    let old = format!("{}.vm1.primary", pr.host);
    let late: Vec<String> = std::fs::read_to_string(c.release_log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(old.as_str()))
        .filter(|l| {
            l.split_whitespace().nth(4).and_then(|t| t.parse::<u128>().ok()).is_none_or(|t| t > frozen_at + 1000)
        })
        .map(str::to_string)
        .collect();
    assert!(late.is_empty(), "the frozen primary decided releases after the freeze: {:?}", &late[..late.len().min(3)]);
    assert!(load.wait_more(100, T), "clients carry on");
    nothing_lost(&rt, load, v.placement["vm1"].primary.clone().unwrap().service.unwrap(), "");
    no_split_brain(&c);
}

/// etcd frozen (SIGSTOP) for twice the hosts' lease TTL: the agents keep
/// their nodes running and start nothing; when etcd answers again, an agent
/// whose lease was lost registers again and takes back the places of its
/// nodes that the witness still names: the same processes run the VM,
/// protected, nothing lost.
#[test]
fn an_etcd_outage_longer_than_the_lease_stops_nothing() {
    let _g = serial();
    let c = Cluster::new("pool-etcd-outage");
    let etcd = c.etcd();
    let (rt, store) = connect(&etcd.url);
    let hosts: Vec<Host> = ["h1", "h2", "h3"].iter().map(|n| Host::start(&c, &etcd.url, n, 2)).collect();
    let (code, out, err) = castor(&["vm", "create", "vm1", "--witness", &etcd.url, "--mem", "64M"]);
    assert_eq!(code, 0, "vm create: {out}{err}");
    let Some(v) = wait_view(&rt, &store, T, |v| protection(v, "vm1") == Protection::Protected) else {
        panic!("vm1 never protected: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    let before = v.placement["vm1"].clone();
    let (pr, se) = (before.primary.clone().unwrap(), before.secondary.clone().unwrap());
    let load = Load::start(&rt, vec![pr.service.unwrap(), se.service.unwrap()], 4, 16, 1);
    assert!(load.wait_more(100, T), "the load runs");
    let nodes: Vec<Vec<u32>> = hosts.iter().map(Host::nodes).collect();
    etcd.signal(libc::SIGSTOP);
    eprintln!("froze etcd for 4 s (the hosts' lease TTL is 2 s)");
    let acked = load.acked();
    std::thread::sleep(Duration::from_secs(4));
    assert!(load.acked() > acked + 50, "the guest served while etcd was frozen");
    assert_eq!(
        hosts.iter().map(Host::nodes).collect::<Vec<_>>(),
        nodes,
        "nothing stopped or started while etcd was out"
    );
    etcd.signal(libc::SIGCONT);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let Some(v) = wait_view(&rt, &store, T, |v| {
        v.hosts.len() == 3
            && protection(v, "vm1") == Protection::Protected
            && v.placement.get("vm1").is_some_and(|p| p.primary == before.primary && p.secondary == before.secondary)
    }) else {
        panic!("vm1 not placed as before: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    assert_eq!(hosts.iter().map(Host::nodes).collect::<Vec<_>>(), nodes, "the same nodes run");
    let lost_leases = hosts.iter().filter(|h| h.log_tail().contains("registering again")).count();
    eprintln!(
        "etcd back: {lost_leases} of 3 agents had lost their lease; vm1 placed as before and protected {:.0} ms later",
        t.elapsed().as_secs_f64() * 1e3
    );
    nothing_lost(&rt, load, v.placement["vm1"].primary.clone().unwrap().service.unwrap(), "");
}

/// `castor vm switchover`: the primary's agent asks its node to hand over,
/// the witness promotes the secondary, the placement follows, and the
/// third host protects the VM again; nothing acknowledged is lost.
#[test]
fn a_switchover_moves_the_primary_and_the_pool_protects_the_vm_again() {
    let _g = serial();
    let c = Cluster::new("pool-switchover");
    let etcd = c.etcd();
    let (rt, store) = connect(&etcd.url);
    let hosts: Vec<Host> = ["h1", "h2", "h3"].iter().map(|n| Host::start(&c, &etcd.url, n, 2)).collect();
    let (code, out, err) = castor(&["vm", "create", "vm1", "--witness", &etcd.url, "--mem", "64M"]);
    assert_eq!(code, 0, "vm create: {out}{err}");
    let Some(v) = wait_view(&rt, &store, T, |v| protection(v, "vm1") == Protection::Protected) else {
        panic!("vm1 never protected: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    let (pr, se) = (v.placement["vm1"].primary.clone().unwrap(), v.placement["vm1"].secondary.clone().unwrap());
    let load = Load::start(&rt, vec![pr.service.unwrap(), se.service.unwrap()], 4, 16, 1);
    assert!(load.wait_more(100, T), "the load runs");
    let t = Instant::now();
    let (code, out, err) = castor(&["vm", "switchover", "vm1", "--witness", &etcd.url]);
    assert_eq!(code, 0, "vm switchover: {out}{err}\n{}", logs(&hosts, &c.dir));
    eprintln!("switchover: {} in {:.0} ms", out.trim(), t.elapsed().as_secs_f64() * 1e3);
    let Some(v) = wait_view(&rt, &store, T, |v| {
        let p = v.placement.get("vm1").cloned().unwrap_or_default();
        protection(v, "vm1") == Protection::Protected
            && p.primary.as_ref().is_some_and(|x| x.host == se.host)
            && p.secondary.as_ref().is_some_and(|x| x.host != se.host)
    }) else {
        panic!("vm1 not protected again after the switchover: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    eprintln!(
        "protected again (secondary on {}) {:.0} ms after the switchover was asked",
        v.placement["vm1"].secondary.as_ref().unwrap().host,
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(v.witness["vm1"].term, 2);
    assert!(v.switchover.is_empty(), "the request is removed");
    // the old primary handed over and exited 0 (it exited 7 in about 1 run
    // of 8 while a heartbeat channel the new primary closed could end the
    // session before the data connection brought the acceptance; fixed in
    // the primary's heartbeat task)
    let old = hosts.iter().find(|h| h.name == pr.host).unwrap().log_tail();
    let exit = ["exit code 0", "exit code 7"].into_iter().find(|c| old.contains(&format!("exited ({c})")));
    assert_eq!(exit, Some("exit code 0"), "the old primary did not exit 0:\n{}", logs(&hosts, &c.dir));
    eprintln!("the old primary exited ({})", exit.unwrap());
    let (code, _, err) = castor(&["vm", "switchover", "nope", "--witness", &etcd.url]);
    assert_eq!(code, 8, "no such vm: {err}");
    load.add_node(v.placement["vm1"].secondary.clone().unwrap().service.unwrap());
    assert!(load.wait_more(100, T), "clients carry on");
    nothing_lost(&rt, load, v.placement["vm1"].primary.clone().unwrap().service.unwrap(), "");
    no_split_brain(&c);
}

/// A 3-member etcd, one member killed: the agents and the nodes go on
/// through the other two; nothing moves, nothing stops, nothing is lost.
#[test]
fn one_etcd_member_of_three_killed_changes_nothing() {
    let _g = serial();
    let c = Cluster::new("pool-etcd-member");
    let mut members = c.etcd_cluster();
    let urls = members.iter().map(|m| m.url.clone()).collect::<Vec<_>>().join(",");
    let (rt, store) = connect(&urls);
    let hosts: Vec<Host> = ["h1", "h2", "h3"].iter().map(|n| Host::start(&c, &urls, n, 2)).collect();
    let (code, out, err) = castor(&["vm", "create", "vm1", "--witness", &urls, "--mem", "64M"]);
    assert_eq!(code, 0, "vm create: {out}{err}");
    let Some(v) = wait_view(&rt, &store, T, |v| protection(v, "vm1") == Protection::Protected) else {
        panic!("vm1 never protected: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    let before = v.placement["vm1"].clone();
    let (pr, se) = (before.primary.clone().unwrap(), before.secondary.clone().unwrap());
    let load = Load::start(&rt, vec![pr.service.unwrap(), se.service.unwrap()], 4, 16, 1);
    assert!(load.wait_more(100, T), "the load runs");
    let nodes: Vec<Vec<u32>> = hosts.iter().map(Host::nodes).collect();
    members[0].kill();
    eprintln!("killed etcd member {}", members[0].name);
    std::thread::sleep(Duration::from_secs(5));
    assert!(load.wait_more(100, T), "clients carry on");
    let Some(v) = wait_view(&rt, &store, T, |v| v.hosts.len() == 3 && protection(v, "vm1") == Protection::Protected)
    else {
        panic!("the pool changed: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    assert_eq!(v.placement["vm1"], before, "nothing moved");
    assert_eq!(v.witness["vm1"].term, 1, "no failover");
    assert_eq!(hosts.iter().map(Host::nodes).collect::<Vec<_>>(), nodes, "the same nodes run");
    let verdict = load.finish(&rt, pr.service.unwrap());
    eprintln!("one member of three killed: nothing changed; acked {}, lost {}", verdict.acked, verdict.lost);
    assert_eq!((verdict.lost, verdict.duplicated), (0, 0));
}

/// An agent killed alone (its nodes run on without it) and restarted on the
/// same state dir: the new agent kills the nodes it finds left over (it
/// cannot supervise them and etcd no longer places them on it once the old
/// lease expired); the witness fails the VM over, the pool re-protects it,
/// nothing acknowledged is lost.
#[test]
fn an_agent_killed_alone_and_restarted_stops_the_nodes_it_left() {
    let _g = serial();
    let c = Cluster::new("pool-agent-restart");
    let etcd = c.etcd();
    let (rt, store) = connect(&etcd.url);
    let mut hosts: Vec<Host> = ["h1", "h2", "h3"].iter().map(|n| Host::start(&c, &etcd.url, n, 2)).collect();
    let (code, out, err) = castor(&["vm", "create", "vm1", "--witness", &etcd.url, "--mem", "64M"]);
    assert_eq!(code, 0, "vm create: {out}{err}");
    let Some(v) = wait_view(&rt, &store, T, |v| protection(v, "vm1") == Protection::Protected) else {
        panic!("vm1 never protected: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    let (pr, se) = (v.placement["vm1"].primary.clone().unwrap(), v.placement["vm1"].secondary.clone().unwrap());
    let load = Load::start(&rt, vec![pr.service.unwrap(), se.service.unwrap()], 4, 16, 1);
    assert!(load.wait_more(100, T), "the load runs");
    let i = hosts.iter().position(|h| h.name == pr.host).unwrap();
    let orphans = hosts[i].nodes();
    hosts[i].kill_agent();
    eprintln!("killed the agent of {} alone; its nodes {orphans:?} run on", pr.host);
    assert!(load.wait_more(100, T), "the orphaned primary serves");
    let t = Instant::now();
    let restarted = Host::start(&c, &etcd.url, &pr.host, 2);
    let Some(v) = wait_view(&rt, &store, T, |v| {
        protection(v, "vm1") == Protection::Protected
            && v.placement["vm1"].primary.as_ref().is_some_and(|p| p.host == se.host)
    }) else {
        panic!("vm1 not re-protected: {:?}\n{}\n{}", read(&rt, &store), logs(&hosts, &c.dir), restarted.log_tail());
    };
    eprintln!(
        "restarted {}: it killed the nodes left over, vm1 failed over and was protected again (secondary on {}) {:.0} ms later",
        pr.host,
        v.placement["vm1"].secondary.as_ref().unwrap().host,
        t.elapsed().as_secs_f64() * 1e3
    );
    assert!(restarted.log_tail().contains("left by an earlier agent"), "{}", restarted.log_tail());
    // gone, or a zombie its new parent has not reaped yet
    let alive = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().next()).map(|st| st != "Z"))
            .unwrap_or(false)
    };
    for pid in &orphans {
        assert!(!alive(pid), "node {pid} left running");
    }
    assert_eq!(v.witness["vm1"].term, 2, "one failover");
    load.add_node(v.placement["vm1"].secondary.clone().unwrap().service.unwrap());
    assert!(load.wait_more(100, T), "clients carry on");
    nothing_lost(&rt, load, v.placement["vm1"].primary.clone().unwrap().service.unwrap(), "");
    no_split_brain(&c);
    drop(restarted);
}

/// The scenario with two VMs under load: three hosts, the host
/// holding vm1's primary (and, by placement, vm2's secondary) dies with
/// everything it runs. vm1 fails over by the witness, vm2's primary runs
/// alone by the witness; both are protected again on the two hosts left,
/// nothing acknowledged lost in either.
#[test]
fn a_host_dies_under_two_vms_and_both_are_served_and_protected_again() {
    let _g = serial();
    let c = Cluster::new("pool-two-vms");
    let etcd = c.etcd();
    let (rt, store) = connect(&etcd.url);
    let mut hosts: Vec<Host> = ["h1", "h2", "h3"].iter().map(|n| Host::start(&c, &etcd.url, n, 2)).collect();
    for vm in ["vm1", "vm2"] {
        let (code, out, err) = castor(&["vm", "create", vm, "--witness", &etcd.url, "--mem", "64M"]);
        assert_eq!(code, 0, "vm create: {out}{err}");
    }
    let both = |v: &View| ["vm1", "vm2"].iter().all(|vm| protection(v, vm) == Protection::Protected);
    let Some(v) = wait_view(&rt, &store, T, both) else {
        panic!("not protected: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    eprint!("{}", castor(&["vm", "list", "--witness", &etcd.url]).1);
    let loads: Vec<Load> = ["vm1", "vm2"]
        .iter()
        .enumerate()
        .map(|(i, vm)| {
            let p = &v.placement[*vm];
            let nodes =
                vec![p.primary.as_ref().unwrap().service.unwrap(), p.secondary.as_ref().unwrap().service.unwrap()];
            Load::start(&rt, nodes, 4, 16, 1 + 100 * i as u32)
        })
        .collect();
    for l in &loads {
        assert!(l.wait_more(100, T), "the load runs");
    }
    let dead = v.placement["vm1"].primary.as_ref().unwrap().host.clone();
    let i = hosts.iter().position(|h| h.name == dead).unwrap();
    let killed = Instant::now();
    hosts[i].kill_all();
    eprintln!("killed host {dead} (its agent and its nodes)");
    let Some(v) = wait_view(&rt, &store, T, |v| {
        both(v)
            && ["vm1", "vm2"].iter().all(|vm| {
                let p = &v.placement[*vm];
                p.primary.as_ref().is_some_and(|x| x.host != dead)
                    && p.secondary.as_ref().is_some_and(|x| x.host != dead)
            })
    }) else {
        panic!("not protected again: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    eprintln!("both VMs protected again without {dead} {:.0} ms after the kill", killed.elapsed().as_secs_f64() * 1e3);
    eprint!("{}", castor(&["vm", "list", "--witness", &etcd.url]).1);
    for (l, vm) in loads.into_iter().zip(["vm1", "vm2"]) {
        let p = &v.placement[vm];
        l.add_node(p.secondary.as_ref().unwrap().service.unwrap());
        l.add_node(p.primary.as_ref().unwrap().service.unwrap());
        assert!(l.wait_more(100, T), "{vm}: clients carry on");
        nothing_lost(&rt, l, p.primary.as_ref().unwrap().service.unwrap(), &format!("{vm}: "));
    }
    // one release log for both VMs: each VM's generations apart (a node's
    // name is <host>.<vm>.<role>)
    let text = std::fs::read_to_string(c.release_log()).unwrap_or_default();
    for vm in ["vm1", "vm2"] {
        let path = c.dir.join(format!("released-{vm}.log"));
        let mine: String = text
            .lines()
            .filter(|l| l.split_whitespace().next().and_then(|n| n.split('.').nth(1)) == Some(vm))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, mine).unwrap();
        let sb = split_brain(&path);
        assert!(sb.is_empty(), "{vm}: generations released by two nodes: {sb:?}");
    }
}
