//! The pool with the networked guest (`vm create --guest redis --ip ...`):
//! three hosts whose agents put their guests' TAPs on one bridge, all in a
//! network namespace of the test's own (etcd, the agents, their nodes and
//! the clients); 64 unmodified-client shaped TCP connections (client::resp,
//! INCR on counters of their own) through the primary's host's death.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use client::resp::RespLoad;
use failover_tests::cluster::Cluster;
use failover_tests::serial;
use runtime::netns::{TestNet, BRIDGE, GUEST_IP, PREFIX_LEN};
use witness::pool::{protection, Protection};

use super::host::*;

const CLIENTS: usize = 64;

fn wait_more(l: &RespLoad, more: u64) -> bool {
    let (start, end) = (l.acked(), Instant::now() + T);
    while Instant::now() < end {
        if l.acked() >= start + more {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn a_networked_vm_keeps_its_clients_connections_when_its_primary_host_dies_and_is_protected_again() {
    let _g = serial();
    let net = TestNet::create("pool").expect("a network namespace (run as root)");
    // etcd, the agents and their nodes start inside: their sockets are the
    // namespace's, and the guest's TAPs go on its bridge
    let _inside = net.scope().expect("enter the namespace");
    let c = Cluster::new("pool-net");
    let etcd = c.etcd();
    let (rt, store) = connect(&etcd.url);
    let bridge = ["--net-bridge".to_string(), BRIDGE.to_string()];
    let mut hosts: Vec<Host> =
        ["h1", "h2", "h3"].iter().map(|n| Host::start_with(&c, &etcd.url, n, 2, &bridge)).collect();
    assert!(
        wait_view(&rt, &store, T, |v| v.hosts.len() == 3 && v.hosts.values().all(|h| h.net)).is_some(),
        "three hosts with a bridge registered:\n{}",
        logs(&hosts, &c.dir)
    );
    let ip = format!("{GUEST_IP}/{PREFIX_LEN}");
    let (code, _, err) = castor(&["vm", "create", "bad", "--witness", &etcd.url, "--ip", &ip]);
    assert_eq!(code, 2, "a kv guest has no network card: {err}");
    let (code, _, err) = castor(&["vm", "create", "bad", "--witness", &etcd.url, "--guest", "redis"]);
    assert_eq!(code, 2, "the networked guest needs --ip: {err}");
    let (code, out, err) = castor(&[
        "vm",
        "create",
        "web",
        "--witness",
        &etcd.url,
        "--guest",
        "redis",
        "--mem",
        "128M",
        "--vcpus",
        "1",
        "--ip",
        &ip,
    ]);
    assert_eq!(code, 0, "vm create: {out}{err}");
    let t0 = Instant::now();
    let Some(v) = wait_view(&rt, &store, T, |v| protection(v, "web") == Protection::Protected) else {
        panic!("web never protected: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    let p = v.placement["web"].clone();
    let (pr, se) = (p.primary.clone().unwrap(), p.secondary.clone().unwrap());
    eprintln!(
        "web protected {:.1} s after create: primary on {}, secondary on {}",
        t0.elapsed().as_secs_f64(),
        pr.host,
        se.host
    );

    let l = RespLoad::start(SocketAddr::from((GUEST_IP, 6379)), CLIENTS, "pool", || Ok(()));
    assert!(wait_more(&l, 300), "the clients get answers:\n{}", logs(&hosts, &c.dir));

    // the primary's host dies: its agent and every node it runs, kill -9
    let dead = hosts.iter().position(|h| h.name == pr.host).unwrap();
    let acked_before = l.acked();
    let killed = Instant::now();
    hosts[dead].kill_all();
    eprintln!("killed host {} (its agent and its nodes) under {CLIENTS} connections", pr.host);
    assert!(wait_more(&l, 100), "the clients carry on after the failover:\n{}", logs(&hosts, &c.dir));
    let served = killed.elapsed();
    let third = ["h1", "h2", "h3"].into_iter().find(|h| *h != pr.host && *h != se.host).unwrap();
    let Some(v) = wait_view(&rt, &store, T, |v| {
        let p = v.placement.get("web").cloned().unwrap_or_default();
        protection(v, "web") == Protection::Protected
            && p.primary.as_ref().is_some_and(|x| x.host == se.host)
            && p.secondary.as_ref().is_some_and(|x| x.host == third)
    }) else {
        panic!("web not re-protected: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    let reprotected = killed.elapsed();
    assert_eq!(v.witness["web"].term, 2, "one promotion, by the witness");
    eprintln!(
        "host {} died: web served again after {:.0} ms ({} INCRs acknowledged before), protected again on {third} after {:.0} ms",
        pr.host,
        served.as_secs_f64() * 1e3,
        acked_before,
        reprotected.as_secs_f64() * 1e3
    );
    assert!(wait_more(&l, 300), "the clients carry on, protected again");
    let rep = l.finish(|| Ok(())).expect("the counters read back");
    eprintln!(
        "{} connections: {} reset, {} reconnects; {} INCRs acknowledged, {} lost, {} applied twice; longest stall {:.0} ms",
        rep.connections, rep.connections_reset, rep.reconnects, rep.acked_ops, rep.lost_acked_ops, rep.duplicate_ops, rep.longest_stall_ms
    );
    assert_eq!((rep.connections_reset, rep.reconnects), (0, 0), "every connection survived: {:?}", rep.resets);
    assert_eq!((rep.lost_acked_ops, rep.duplicate_ops), (0, 0), "nothing acknowledged lost or applied twice");
    assert!(rep.acked_ops > 0);
    drop(hosts);
}
