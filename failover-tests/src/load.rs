//! A kv client load that records every acknowledged write, and the
//! read-back check of guarantee G1 (nothing acknowledged lost, nothing
//! applied twice).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client::KvClient;
use common::state::KvOp;

#[derive(Debug, Default)]
struct Shared {
    acked: AtomicU64,
    counts: Mutex<HashMap<u64, u64>>,
    uncertain: Mutex<HashSet<u64>>,
    ack_times: Mutex<Vec<Instant>>,
    /// (node, generation) pairs seen in responses.
    sources: Mutex<HashSet<(String, u64)>>,
    /// Nodes added after the start (clients pick them up before their next call).
    added: Mutex<Vec<SocketAddr>>,
}

/// A running load: `clients` clients each ADDing 1 to its own keys.
#[derive(Debug)]
pub struct Load {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
    pub started: Instant,
}

/// What the read-back found.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub acked: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub keys_checked: u64,
    pub uncertain: u64,
    /// Longest time without any acknowledged write (G4).
    pub max_gap: Duration,
    pub sources: HashSet<(String, u64)>,
}

impl Load {
    pub fn start(rt: &tokio::runtime::Runtime, nodes: Vec<SocketAddr>, clients: u32, keys: u64, first_id: u32) -> Load {
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for id in first_id..first_id + clients {
            let (shared, stop, nodes) = (shared.clone(), stop.clone(), nodes.clone());
            handles.push(rt.spawn(async move {
                let mut c = KvClient::new(id, nodes);
                c.deadline = Duration::from_secs(45);
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    for a in common::sync::lock(&shared.added).iter() {
                        c.add_node(*a);
                    }
                    let k = (u64::from(id) << 32) | (i % keys);
                    match c.call(KvOp::Add, k, 1).await {
                        Ok(r) => {
                            *common::sync::lock(&shared.counts).entry(k).or_insert(0) += 1;
                            shared.acked.fetch_add(1, Ordering::SeqCst);
                            common::sync::lock(&shared.ack_times).push(Instant::now());
                            common::sync::lock(&shared.sources).insert((r.node, r.generation));
                        }
                        Err(_) => {
                            common::sync::lock(&shared.uncertain).insert(k);
                            return;
                        }
                    }
                    i += 1;
                }
            }));
        }
        Load { shared, stop, handles, started: Instant::now() }
    }

    /// A node started later (a new secondary): clients fail over to it too.
    pub fn add_node(&self, addr: SocketAddr) {
        common::sync::lock(&self.shared.added).push(addr);
    }

    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::SeqCst)
    }

    /// Waits until `n` more writes are acknowledged (false on timeout).
    pub fn wait_more(&self, n: u64, t: Duration) -> bool {
        let target = self.acked() + n;
        let end = Instant::now() + t;
        while Instant::now() < end {
            if self.acked() >= target {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Stops the clients and reads the table back from `survivor`.
    pub fn finish(self, rt: &tokio::runtime::Runtime, survivor: SocketAddr) -> Verdict {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles {
            let _ = rt.block_on(h);
        }
        let counts = common::sync::lock(&self.shared.counts).clone();
        let uncertain = common::sync::lock(&self.shared.uncertain).clone();
        let mut times = common::sync::lock(&self.shared.ack_times).clone();
        times.sort();
        let mut max_gap = Duration::ZERO;
        let mut prev = self.started;
        for t in &times {
            max_gap = max_gap.max(t.saturating_duration_since(prev));
            prev = *t;
        }
        let (lost, duplicated, checked) = rt.block_on(async {
            let mut c = KvClient::new(0x7fff_0000 + (std::process::id() & 0xfff), vec![survivor]);
            c.deadline = Duration::from_secs(30);
            let (mut lost, mut dup, mut checked) = (0, 0, 0);
            for (k, n) in &counts {
                if uncertain.contains(k) {
                    continue;
                }
                let r = c.call(KvOp::Get, *k, 0).await.expect("reading the table back from the survivor");
                let v = if r.resp.status == 0 { r.resp.value } else { 0 };
                lost += n.saturating_sub(v);
                dup += v.saturating_sub(*n);
                checked += 1;
            }
            (lost, dup, checked)
        });
        Verdict {
            acked: self.shared.acked.load(Ordering::SeqCst),
            lost,
            duplicated,
            keys_checked: checked,
            uncertain: uncertain.len() as u64,
            max_gap,
            sources: common::sync::lock(&self.shared.sources).clone(),
        }
    }
}

/// G3: every released response is logged as `node generation client seq`;
/// each generation must have been released by one node only.
pub fn split_brain(release_log: &std::path::Path) -> Vec<(u64, Vec<String>)> {
    let text = std::fs::read_to_string(release_log).unwrap_or_default();
    let mut by_gen: HashMap<u64, HashSet<String>> = HashMap::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if let (Some(node), Some(g)) = (it.next(), it.next().and_then(|g| g.parse::<u64>().ok())) {
            by_gen.entry(g).or_default().insert(node.to_string());
        }
    }
    let mut bad: Vec<(u64, Vec<String>)> =
        by_gen.into_iter().filter(|(_, n)| n.len() > 1).map(|(g, n)| (g, n.into_iter().collect())).collect();
    bad.sort();
    bad
}
