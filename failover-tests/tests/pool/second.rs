//! The third figure: once a VM is protected again after a host's
//! death, a second host's death loses nothing of it. Four hosts; the VM's
//! primary host dies, the pool protects it again on a third host, then the
//! new primary's host dies too: the VM is served again (term 3) with nothing
//! acknowledged lost or applied twice, and protected again on the fourth.

use std::time::Instant;

use failover_tests::cluster::Cluster;
use failover_tests::load::Load;
use failover_tests::serial;
use witness::pool::{protection, Protection, View};

use super::host::*;

/// Waits until `vm1` is protected with its primary on `primary` and its
/// secondary on neither of `not`; returns the view and the time it took.
fn protected_again(
    rt: &tokio::runtime::Runtime,
    s: &witness::pool::store::Store,
    primary: &str,
    not: &[&str],
) -> Option<View> {
    wait_view(rt, s, T, |v| {
        let p = v.placement.get("vm1").cloned().unwrap_or_default();
        protection(v, "vm1") == Protection::Protected
            && p.primary.as_ref().is_some_and(|x| x.host == primary)
            && p.secondary.as_ref().is_some_and(|x| !not.contains(&x.host.as_str()))
    })
}

#[test]
fn a_second_host_death_after_reprotection_loses_nothing() {
    let _g = serial();
    let c = Cluster::new("pool-second-fault");
    let etcd = c.etcd();
    let (rt, store) = connect(&etcd.url);
    let mut hosts: Vec<Host> = ["h1", "h2", "h3", "h4"].iter().map(|n| Host::start(&c, &etcd.url, n, 1)).collect();
    assert!(wait_view(&rt, &store, T, |v| v.hosts.len() == 4).is_some(), "{}", logs(&hosts, &c.dir));
    let (code, out, err) = castor(&["vm", "create", "vm1", "--witness", &etcd.url, "--mem", "128M"]);
    assert_eq!(code, 0, "vm create: {out}{err}");
    let Some(v) = wait_view(&rt, &store, T, |v| protection(v, "vm1") == Protection::Protected) else {
        panic!("vm1 never protected:\n{}", logs(&hosts, &c.dir));
    };
    let p = v.placement["vm1"].clone();
    let (pr, se) = (p.primary.unwrap(), p.secondary.unwrap());
    let load = Load::start(&rt, vec![pr.service.unwrap(), se.service.unwrap()], 4, 16, 1);
    assert!(load.wait_more(200, T), "the load runs");

    // first fault: the primary's host
    let kill = |hosts: &mut Vec<Host>, name: &str| {
        let i = hosts.iter().position(|h| h.name == name).unwrap();
        hosts[i].kill_all();
        Instant::now()
    };
    let t1 = kill(&mut hosts, &pr.host);
    let Some(v) = protected_again(&rt, &store, &se.host, &[&pr.host, &se.host]) else {
        panic!("vm1 not protected again after the first fault: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    let first = t1.elapsed();
    let new_sec = v.placement["vm1"].secondary.clone().unwrap();
    load.add_node(new_sec.service.unwrap());
    assert!(load.wait_more(200, T), "served, protected again");
    eprintln!(
        "first fault: host {} died; vm1 protected again (primary {}, secondary {}) after {:.0} ms",
        pr.host,
        se.host,
        new_sec.host,
        first.as_secs_f64() * 1e3
    );

    // second fault, once protected again: the new primary's host
    let acked = load.acked();
    let t2 = kill(&mut hosts, &se.host);
    assert!(load.wait_more(100, T), "vm1 served again after the second fault:\n{}", logs(&hosts, &c.dir));
    let served = t2.elapsed();
    let Some(v) = protected_again(&rt, &store, &new_sec.host, &[&pr.host, &se.host, &new_sec.host]) else {
        panic!("vm1 not protected again after the second fault: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    let second = t2.elapsed();
    assert_eq!(v.witness["vm1"].term, 3, "two promotions, each by the witness");
    let last_sec = v.placement["vm1"].secondary.clone().unwrap();
    load.add_node(last_sec.service.unwrap());
    assert!(load.wait_more(200, T), "served, protected a third time");
    eprintln!(
        "second fault: host {} died ({acked} writes acknowledged before); vm1 served again after {:.0} ms, protected again (primary {}, secondary {}) after {:.0} ms",
        se.host,
        served.as_secs_f64() * 1e3,
        new_sec.host,
        last_sec.host,
        second.as_secs_f64() * 1e3
    );
    let survivor = v.placement["vm1"].primary.clone().unwrap().service.unwrap();
    nothing_lost(&rt, load, survivor, "vm1 across two host deaths: ");
    no_split_brain(&c);
    drop(hosts);
}
