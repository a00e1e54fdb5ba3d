//! Agents racing for one free slot, end to end: the etcd transaction, not
//! an agent's view, decides who takes it.
//!
//! Three agents (capacity 1 each) start with one fresh VM and a claim
//! barrier (the agent's hidden `--test-claim-barrier DIR`: before a claim
//! transaction it waits until `DIR/<vm>.<role>` exists). Each agent
//! decides from its own view that it may take the VM's primary (the best
//! at once, the others after the claim stagger, as the slot stays free
//! while the first waits) and stops at the barrier; once all three stand
//! there, the test opens it and their transactions go together. Then the
//! two left race the same way for the secondary, the last slot the VM
//! needs. Meanwhile a watcher reads the pool and the hosts' processes
//! every few ms: no host over its capacity, never both nodes on one host.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failover_tests::cluster::Cluster;
use failover_tests::load::Load;
use failover_tests::serial;
use witness::pool::store::Store;
use witness::pool::{protection, Protection};

use super::host::*;

/// How many of `hosts`' agent logs contain `needle`, and how often in all.
fn count(hosts: &[Host], needle: &str) -> (usize, usize) {
    let texts: Vec<String> = hosts.iter().map(|h| std::fs::read_to_string(&h.log).unwrap_or_default()).collect();
    (texts.iter().filter(|t| t.contains(needle)).count(), texts.iter().map(|t| t.matches(needle).count()).sum())
}

/// Waits until `n` agents' logs contain `needle`.
fn wait_logs(hosts: &[Host], needle: &str, n: usize) -> bool {
    let end = Instant::now() + T;
    while Instant::now() < end {
        if count(hosts, needle).0 >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Reads the pool and counts each host's processes every few ms until
/// stopped; returns how many samples it took and what it saw wrong.
struct Watcher {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<(u64, Vec<String>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(urls: &str, hosts: &[Host], capacity: usize) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new((0u64, Vec::new())));
        let groups: Vec<(String, u32)> = hosts.iter().map(|h| (h.name.clone(), h.child.id())).collect();
        let (urls, stop2, seen2) = (urls.to_string(), stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let store = rt.block_on(Store::connect(&urls, Duration::from_millis(500))).unwrap();
            while !stop2.load(Ordering::SeqCst) {
                let mut wrong = Vec::new();
                if let Ok(v) = rt.block_on(store.read()) {
                    for (h, info) in &v.hosts {
                        if v.load(h) > info.capacity as usize {
                            wrong.push(format!("{h} holds {:?} (capacity {})", v.slots[h], info.capacity));
                        }
                    }
                    for (vm, p) in &v.placement {
                        if let (Some(a), Some(b)) = (&p.primary, &p.secondary) {
                            if a.host == b.host {
                                wrong.push(format!("both nodes of {vm} on {}", a.host));
                            }
                        }
                    }
                }
                for (name, pgid) in &groups {
                    let n = group_nodes(*pgid);
                    if n.len() > capacity {
                        wrong.push(format!("{name} runs {} nodes: {n:?}", n.len()));
                    }
                }
                let mut s = seen2.lock().unwrap();
                s.0 += 1;
                if s.1.len() < 10 {
                    s.1.extend(wrong);
                }
                drop(s);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Watcher { stop, seen, thread: Some(thread) }
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.seen.lock().unwrap().clone()
    }
}

#[test]
fn agents_racing_for_the_last_slot_exactly_one_wins_each_time_and_capacity_holds() {
    let _g = serial();
    let c = Cluster::new("pool-race");
    let etcd = c.etcd();
    let (rt, store) = connect(&etcd.url);
    let barrier = c.dir.join("barrier");
    std::fs::create_dir_all(&barrier).unwrap();
    let (code, out, err) = castor(&["vm", "create", "vm1", "--witness", &etcd.url, "--mem", "64M"]);
    assert_eq!(code, 0, "vm create: {out}{err}");
    let extra = [format!("--test-claim-barrier={}", barrier.display())];
    let hosts: Vec<Host> = ["h1", "h2", "h3"].iter().map(|n| Host::start_with(&c, &etcd.url, n, 1, &extra)).collect();
    let watcher = Watcher::start(&etcd.url, &hosts, 1);

    // the primary: all three agents decided to claim it from their views
    let at = |role: &str| format!("at the claim barrier for the {role} of vm1");
    assert!(wait_logs(&hosts, &at("primary"), 3), "three agents at the barrier:\n{}", logs(&hosts, &c.dir));
    assert!(read(&rt, &store).placement.is_empty(), "nothing claimed while they wait");
    std::fs::write(barrier.join("vm1.primary"), "").unwrap();
    let (won, lost) = ("claimed the primary of vm1", "lost the claim for the primary of vm1");
    let end = Instant::now() + T;
    while count(&hosts, won).1 + count(&hosts, lost).1 < 3 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!((count(&hosts, won).1, count(&hosts, lost).1), (1, 2), "one of three wins:\n{}", logs(&hosts, &c.dir));

    // the secondary: the two left race the same way for the last slot the VM needs
    assert!(wait_logs(&hosts, &at("secondary"), 2), "two agents at the barrier:\n{}", logs(&hosts, &c.dir));
    let v = read(&rt, &store);
    let primary_host = v.placement["vm1"].primary.as_ref().map(|p| p.host.clone()).unwrap();
    assert!(v.placement["vm1"].secondary.is_none());
    assert_eq!(count(&hosts, &at("secondary")).0, 2);
    assert!(!std::fs::read_to_string(&hosts.iter().find(|h| h.name == primary_host).unwrap().log)
        .unwrap()
        .contains(&at("secondary")));
    std::fs::write(barrier.join("vm1.secondary"), "").unwrap();
    let (won, lost) = ("claimed the secondary of vm1", "lost the claim for the secondary of vm1");
    while count(&hosts, won).1 + count(&hosts, lost).1 < 2 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!((count(&hosts, won).1, count(&hosts, lost).1), (1, 1), "one of two wins:\n{}", logs(&hosts, &c.dir));

    let Some(v) = wait_view(&rt, &store, T, |v| protection(v, "vm1") == Protection::Protected) else {
        panic!("vm1 never protected: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    let (pr, se) = (v.placement["vm1"].primary.clone().unwrap(), v.placement["vm1"].secondary.clone().unwrap());
    assert_ne!(pr.host, se.host, "anti-affinity");
    assert_eq!(pr.host, primary_host);
    let idle: Vec<&String> = v.hosts.keys().filter(|h| v.load(h) == 0).collect();
    assert_eq!(idle.len(), 1, "one host left with its slot free: {:?}", v.slots);
    eprintln!("raced: primary on {}, secondary on {}, {} idle", pr.host, se.host, idle[0]);
    eprint!("{}", castor(&["vm", "list", "--witness", &etcd.url]).1);

    let load = Load::start(&rt, vec![pr.service.unwrap(), se.service.unwrap()], 4, 16, 1);
    assert!(load.wait_more(300, T), "the load runs");
    nothing_lost(&rt, load, pr.service.unwrap(), "");
    no_split_brain(&c);
    let (samples, wrong) = watcher.finish();
    eprintln!("watcher: {samples} samples of the pool and the hosts' processes");
    assert!(samples > 10, "the watcher ran");
    assert!(wrong.is_empty(), "capacity or anti-affinity broken: {wrong:?}");
    assert_eq!(hosts.iter().map(|h| h.nodes().len()).sum::<usize>(), 2, "two nodes in all");
}
