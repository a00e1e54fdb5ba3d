//! The witness's transactions against a real etcd on loopback.

use super::*;
use crate::server::Etcd;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("castor-witness-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

async fn node(etcd: &Etcd, vm: &str, name: &str) -> Witness {
    let mut cfg = WitnessConfig::new(&etcd.url, vm, name).unwrap();
    cfg.lease_ttl = Duration::from_secs(2);
    Witness::connect(cfg).await.unwrap()
}

#[test]
fn config_is_checked() {
    assert!(WitnessConfig::new("", "vm", "n").is_err());
    assert!(WitnessConfig::new("127.0.0.1:2379", "vm", "n").is_err());
    assert!(WitnessConfig::new("http://a:1,http://b:2", "vm/../x", "n").is_err());
    let c = WitnessConfig::new("http://a:1, http://b:2", "vm-1", "n").unwrap();
    assert_eq!(c.endpoints, vec!["http://a:1", "http://b:2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_and_running_alone_exclude_each_other() {
    let dir = tmp("txn");
    let etcd = Etcd::start(&dir).unwrap();
    let p = node(&etcd, "vm1", "p").await;
    let s = node(&etcd, "vm1", "s").await;

    let (g, _lease) = p.claim_primary(false).await.unwrap();
    assert_eq!(g, 1);
    // a second primary of the same VM is refused while the first lives
    let other = node(&etcd, "vm1", "p2").await;
    assert!(matches!(other.claim_primary(false).await, Err(WitnessError::PrimaryAlive { .. })));
    // a VM id with a history needs --replace, and never while its primary lives
    assert!(matches!(other.claim_primary(true).await, Err(WitnessError::PrimaryAlive { .. })));
    // another VM is independent
    assert_eq!(node(&etcd, "vm2", "q").await.claim_primary(false).await.unwrap().0, 1);

    // not recorded as caught up: no promotion
    assert!(matches!(s.promote(g).await.unwrap().0, Decision::Refused { term: 1, .. }));
    assert_eq!(p.record_sync(g, "s").await.unwrap(), Decision::Granted);
    assert_eq!(p.read().await.unwrap(), (1, Some(Holder { node: "s".into(), term: 1 })));

    // the secondary wins: the term moves on, the primary is fenced
    assert_eq!(s.promote(g).await.unwrap().0, Decision::Granted);
    // a retry after a lost answer finds its own win
    assert_eq!(s.promote(g).await.unwrap().0, Decision::Granted);
    assert_eq!(p.read().await.unwrap(), (2, None));
    assert!(matches!(p.run_alone(g).await.unwrap(), Decision::Refused { term: 2, .. }));
    assert!(matches!(p.record_sync(g, "s").await.unwrap(), Decision::Refused { term: 2, .. }));

    // the other order: running alone first denies the promotion
    let s2 = node(&etcd, "vm1", "s2").await;
    let new_primary = &s; // now of term 2
    assert_eq!(new_primary.record_sync(2, "s2").await.unwrap(), Decision::Granted);
    assert_eq!(new_primary.run_alone(2).await.unwrap(), Decision::Granted);
    assert!(matches!(s2.promote(2).await.unwrap().0, Decision::Refused { term: 2, .. }));
    assert_eq!(p.read().await.unwrap(), (2, None));
    // a stale secondary of term 1 never promotes
    assert!(matches!(s2.promote(1).await.unwrap().0, Decision::Refused { term: 2, .. }));
    // with every primary gone (leases revoked by expiry), a fresh primary
    // needs --replace; with it, it gets the next term
    let mut c = Client::connect([&etcd.url], None).await.unwrap();
    c.delete("/castor/vm1/primary", None).await.unwrap();
    let fresh = node(&etcd, "vm1", "p3").await;
    assert!(matches!(fresh.claim_primary(false).await, Err(WitnessError::HasHistory { term: 2, .. })));
    assert_eq!(fresh.claim_primary(true).await.unwrap().0, 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_witness_is_unreachable_and_decides_nothing() {
    let dir = tmp("frozen");
    let etcd = Etcd::start(&dir).unwrap();
    let p = node(&etcd, "vm", "p").await;
    let (g, _) = p.claim_primary(false).await.unwrap();
    p.record_sync(g, "s").await.unwrap();
    etcd.signal(libc::SIGSTOP);
    let t = Instant::now();
    assert!(matches!(p.run_alone(g).await, Err(WitnessError::Unreachable(_))));
    assert!(t.elapsed() < Duration::from_secs(3), "a request waits at most its deadline: {:?}", t.elapsed());
    etcd.signal(libc::SIGCONT);
    // the request that timed out may still land (it waited in the frozen
    // server's socket): "unreachable" means "unknown", and a retry gets a
    // definite answer
    let mut r = p.run_alone(g).await;
    for _ in 0..20 {
        if r.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        r = p.run_alone(g).await;
    }
    assert_eq!(r.unwrap(), Decision::Granted);
    assert_eq!(p.read().await.unwrap(), (1, None));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_request_cannot_land_after_a_later_one() {
    let dir = tmp("order");
    let etcd = Etcd::start(&dir).unwrap();
    let p = node(&etcd, "vm", "p").await;
    let (g, _) = p.claim_primary(false).await.unwrap();
    // record_sync #1 is delayed; run_alone #2 lands first
    assert_eq!(p.run_alone_at(g, 2).await.unwrap(), Decision::Granted);
    assert_eq!(p.record_sync_at(g, "s", 1).await.unwrap(), Decision::Superseded);
    assert_eq!(p.read().await.unwrap(), (1, None), "the delayed sync record changed nothing");
    let s = node(&etcd, "vm", "s").await;
    assert!(matches!(s.promote(g).await.unwrap().0, Decision::Refused { .. }));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_term_is_an_error_not_a_decision() {
    let dir = tmp("corrupt");
    let etcd = Etcd::start(&dir).unwrap();
    let p = node(&etcd, "vm", "p").await;
    let mut c = Client::connect([&etcd.url], None).await.unwrap();
    c.put("/castor/vm/term", "seven", None).await.unwrap();
    assert!(matches!(p.run_alone(7).await, Err(WitnessError::Corrupt { .. })));
    assert!(matches!(p.claim_primary(false).await, Err(WitnessError::Corrupt { .. })));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_three_member_cluster_starts_on_unix_peer_sockets() {
    let dir = tmp("cluster");
    let mut members = Etcd::cluster(&dir, 3).unwrap();
    let urls: Vec<String> = members.iter().map(|m| m.url.clone()).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let w = Witness::connect(WitnessConfig::new(&urls.join(","), "vm", "p").unwrap()).await.unwrap();
        let (g, _) = w.claim_primary(false).await.unwrap();
        members[0].kill();
        // a majority is left: decisions go on
        let mut d = w.record_sync(g, "s").await;
        for _ in 0..30 {
            if d.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            d = w.record_sync(g, "s").await;
        }
        assert_eq!(d.unwrap(), Decision::Granted);
    });
    drop(members);
    let _ = std::fs::remove_dir_all(&dir);
}
