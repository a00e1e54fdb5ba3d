//! `castor demo`: a secondary and a primary on loopback with the built-in kv
//! guest and a client load; halfway a fault (`--scenario`): the primary is
//! killed, the standby dies silently, the link between them is cut, or the
//! operator switches over. The clients carry on against whichever node
//! serves; the table is read back to count lost and duplicated acknowledged
//! writes. A real etcd (Debian's etcd-server) runs on loopback as the
//! witness that decides.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use client::KvClient;
use common::state::KvOp;
use runtime::harness::{NodeProc, Spec};
use serde_json::Value;

#[path = "demo_net.rs"]
mod net;
#[path = "demo_pool.rs"]
mod pool;
#[path = "demo_steps.rs"]
mod steps;

use steps::{await_protection, inject, relay_for, serving, unprotect_when_due, Setup};

/// The demo's guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoGuest {
    /// The networked guest: a Redis-protocol server behind a virtio-net
    /// card, driven by redis-benchmark and a checking TCP load in a network
    /// namespace of the demo's own (needs root).
    Redis,
    /// The kv guest and castor's own retrying kv clients.
    Kv,
}

/// What happens halfway through the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// kill -9 the primary: the secondary takes over.
    KillPrimary,
    /// The standby freezes for good (SIGSTOP: a host that dies silently):
    /// the witness lets the primary run alone (without a witness the primary
    /// holds, and the demo types `castor unprotect` for you after 2 s).
    StandbyDies,
    /// Cut the link between the nodes both ways (both still reach etcd):
    /// exactly one of them serves.
    Partition,
    /// Planned switchover (`castor switchover`): the secondary takes over at
    /// once, the old primary exits 0.
    Switchover,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::KillPrimary => "kill-primary",
            Scenario::StandbyDies => "standby-dies",
            Scenario::Partition => "partition",
            Scenario::Switchover => "switchover",
        }
    }
}

/// `castor demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The guest: the networked redis guest, or the kv guest.
    #[arg(long, value_enum, default_value = "redis")]
    guest: DemoGuest,
    /// redis guest: persistent client connections of the checking load.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// The fault injected halfway (at --kill-primary-at).
    #[arg(long, value_enum, default_value = "kill-primary")]
    scenario: Scenario,
    /// Length of the client load.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// When the fault happens, in seconds (default: half of --seconds);
    /// the name is kept from when the only fault was kill -9.
    #[arg(long)]
    kill_primary_at: Option<f64>,
    /// kv guest: concurrent kv clients.
    #[arg(long, default_value_t = 16)]
    clients: u32,
    /// Keys per client.
    #[arg(long, default_value_t = 64)]
    keys: u64,
    /// Guest memory (K, M or G suffix).
    #[arg(long, default_value = "256M", value_parser = crate::run::parse_size)]
    mem: u64,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Epoch length (ms): how often the primary checkpoints.
    #[arg(long, default_value_t = 10)]
    epoch_ms: u64,
    /// Silence after which a node counts its peer as gone (ms); the same
    /// for both nodes [default: 100; 250 with --pool, where three agents,
    /// four nodes and the clients share the machine].
    #[arg(long)]
    heartbeat_timeout_ms: Option<u64>,
    /// Dirty tracker of both nodes.
    #[arg(long, value_enum, default_value = "ring")]
    tracker: crate::run::TrackerArg,
    /// Keep the nodes' logs and data here (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object as the last line (live lines go to stderr).
    #[arg(long)]
    json: bool,
    /// Run the pair without the etcd witness (the two-node rule). By
    /// default the demo starts a real etcd on loopback as the witness.
    #[arg(long)]
    no_witness: bool,
    /// A pool instead of a pair: this many `castor agent`s (hosts, at
    /// least 3) on this machine, two kv VMs created in it under client
    /// load; at --kill-primary-at a host holding a primary dies with
    /// everything it runs (kill -9 of its agent and its nodes); the demo
    /// waits until every VM is served and protected again and checks that
    /// nothing acknowledged was lost. --guest and --scenario do not apply.
    #[arg(long, value_name = "HOSTS")]
    pool: Option<u32>,
}

impl DemoArgs {
    /// The nodes' heartbeat timeout (ms).
    fn heartbeat_ms(&self) -> u64 {
        self.heartbeat_timeout_ms.unwrap_or(if self.pool.is_some() { 250 } else { 100 })
    }
}

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo setup: {0}")]
    Setup(String),
    #[error("a node failed: {0}")]
    Node(String),
    #[error("{0}")]
    Args(String),
    #[error("verification failed: {0}")]
    Verify(String),
    #[error("interrupted")]
    Interrupted,
}

impl DemoError {
    pub fn exit_code(&self) -> i32 {
        match self {
            DemoError::Setup(_) => 5,
            DemoError::Node(_) => 4,
            DemoError::Args(_) => 2,
            DemoError::Verify(_) => 6,
            DemoError::Interrupted => 130,
        }
    }
}

/// The arguments every node takes: (role,) secret file, and any free port
/// for its service (reported in its ready file).
pub(crate) fn node_args(role: Option<&str>, secret: &Path) -> Vec<String> {
    let mut v: Vec<String> = role.map(|r| vec![r.to_string()]).unwrap_or_default();
    v.extend([
        "--secret-file".to_string(),
        secret.display().to_string(),
        "--service-listen".into(),
        "127.0.0.1:0".into(),
    ]);
    v
}

/// Starts this binary as node `name` (log `<dir>/<name>.log`, control
/// socket `<dir>/<name>.ctl`) and waits until it has bound its listeners.
pub(crate) fn start_node(name: &str, args: &[String], dir: &Path) -> Result<NodeProc, DemoError> {
    let exe = std::env::current_exe().map_err(|e| DemoError::Setup(e.to_string()))?;
    let mut args = args.to_vec();
    args.extend(["--control".into(), dir.join(format!("{name}.ctl")).display().to_string()]);
    let level = std::env::var("CASTOR_LOG").unwrap_or_else(|_| "warn".into());
    let spec = Spec { exe, name: name.into(), args, dir: dir.to_path_buf(), env: vec![("CASTOR_LOG".into(), level)] };
    spec.start().map_err(|e| DemoError::Node(e.to_string()))
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

/// What the demo's kv clients did.
#[derive(Default)]
pub(crate) struct Load {
    acked: AtomicU64,
    /// When each acknowledgement arrived and the generation of the node
    /// that released it (the pool demo finds each VM's failover in them).
    acked_at: Mutex<Vec<(Instant, u64)>>,
    /// (client, key) -> acknowledged ADDs
    counts: Mutex<HashMap<u64, u64>>,
    /// keys whose last request never got an answer (excluded from the check)
    uncertain: Mutex<Vec<u64>>,
    latencies_us: Mutex<Vec<f64>>,
    failed_calls: AtomicU64,
}

/// Starts the kv clients `ids` against `nodes` (tried in order): each
/// ADDs 1 to keys of its own (`id << 32 | i % keys`) until `stop`, counting
/// every acknowledged write in `load`; a client whose request got no answer
/// stops, its key uncertain.
pub(crate) fn spawn_clients(
    rt: &tokio::runtime::Runtime,
    load: &Arc<Load>,
    stop: &Arc<AtomicBool>,
    nodes: Vec<std::net::SocketAddr>,
    ids: std::ops::RangeInclusive<u32>,
    keys: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut handles = Vec::new();
    for id in ids {
        let (load, stop, nodes) = (load.clone(), stop.clone(), nodes.clone());
        handles.push(rt.spawn(async move {
            let mut c = KvClient::new(id, nodes);
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let k = (u64::from(id) << 32) | (i % keys);
                let t = Instant::now();
                match c.call(KvOp::Add, k, 1).await {
                    Ok(r) => {
                        common::sync::lock(&load.latencies_us).push(t.elapsed().as_secs_f64() * 1e6);
                        common::sync::lock(&load.acked_at).push((Instant::now(), r.generation));
                        *common::sync::lock(&load.counts).entry(k).or_insert(0) += 1;
                        load.acked.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => {
                        load.failed_calls.fetch_add(1, Ordering::SeqCst);
                        common::sync::lock(&load.uncertain).push(k);
                        break;
                    }
                }
                i += 1;
            }
        }));
    }
    handles
}

/// Reads every key the clients of `load` wrote back from the node at `svc`
/// (keys whose last request went unanswered aside): acknowledged ADDs
/// missing (lost), applied more often than acknowledged (duplicated), and
/// how many keys were checked.
pub(crate) fn read_back(
    rt: &tokio::runtime::Runtime,
    load: &Load,
    svc: std::net::SocketAddr,
) -> Result<(u64, u64, u64), DemoError> {
    let counts = common::sync::lock(&load.counts).clone();
    let uncertain: std::collections::HashSet<u64> = common::sync::lock(&load.uncertain).iter().copied().collect();
    rt.block_on(async {
        let mut c = KvClient::new(0x7fff_fff0, vec![svc]);
        let (mut lost, mut dup, mut checked) = (0u64, 0u64, 0u64);
        for (k, n) in &counts {
            if uncertain.contains(k) {
                continue;
            }
            match c.call(KvOp::Get, *k, 0).await {
                Ok(r) => {
                    checked += 1;
                    let v = if r.resp.status == 0 { r.resp.value } else { 0 };
                    lost += n.saturating_sub(v);
                    dup += v.saturating_sub(*n);
                }
                Err(e) => return Err(DemoError::Node(format!("reading the table back: {e}"))),
            }
        }
        Ok((lost, dup, checked))
    })
}

pub fn demo(a: DemoArgs) -> Result<(), DemoError> {
    if !(a.seconds > 0.0 && a.seconds.is_finite()) {
        return Err(DemoError::Args(format!("--seconds must be more than 0 (got {})", a.seconds)));
    }
    let tmp;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| DemoError::Setup(e.to_string()))?;
            d.clone()
        }
        None => {
            tmp = std::env::temp_dir().join(format!("castor-demo-{}", std::process::id()));
            std::fs::create_dir_all(&tmp).map_err(|e| DemoError::Setup(e.to_string()))?;
            tmp.clone()
        }
    };
    let live = |s: String| {
        if a.json {
            eprintln!("{s}");
        } else {
            println!("{s}");
        }
    };
    if let Some(hosts) = a.pool {
        // every process it started is gone when it returns, on error too;
        // so is its temporary directory (--dir keeps the logs)
        let r = pool::demo(&a, hosts, &dir, &live);
        if a.dir.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let (report, verdict) = r?;
        if a.json {
            println!("{report}");
        }
        return verdict;
    }
    if a.guest == DemoGuest::Redis {
        let report = net::demo(&a, &dir, &live)?;
        if a.json {
            println!("{report}");
        }
        if a.dir.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return Ok(());
    }
    let (setup, secondary, repl_s) = Setup::start(&a, &dir, &live, Vec::new())?;
    let etcd = &setup.etcd;
    let common = || setup.common(&a);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let relay = relay_for(&a, &rt, repl_s)?;
    let peer = relay.as_ref().map_or(repl_s, |r| r.addr);
    let mut pargs: Vec<String> = vec![
        "primary".into(),
        "--peer".into(),
        peer.to_string(),
        "--guest".into(),
        "kv".into(),
        "--mem".into(),
        a.mem.to_string(),
        "--vcpus".into(),
        a.vcpus.to_string(),
        "--name".into(),
        "node-a".into(),
    ];
    pargs.extend(common());
    let primary_node = start_node("primary", &pargs, &dir)?;
    let (svc_p, svc_s) = (primary_node.service, secondary.service);
    let mut primary = Some(primary_node);
    live(format!(
        "castor demo: primary node-a (service {svc_p}), secondary node-b (service {svc_s}), logs in {}{}",
        dir.display(),
        if a.dir.is_none() { " (removed at the end unless the demo fails)" } else { "" }
    ));

    await_protection(primary.as_mut(), &a, etcd.is_some(), &dir, &live)?;

    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let nodes = vec![svc_p, svc_s];
    let handles = spawn_clients(&rt, &load, &stop, nodes, 1..=a.clients, a.keys);

    let start = Instant::now();
    let kill_at = Duration::from_secs_f64(a.kill_primary_at.unwrap_or(a.seconds / 2.0).max(0.0));
    let end_at = Duration::from_secs_f64(a.seconds);
    let mut last_status: Option<Value> = None;
    let mut prev: (f64, f64, f64, f64, u64) = (0.0, 0.0, 0.0, 0.0, 0);
    let mut killed_at: Option<Instant> = None;
    let mut unprotect_at: Option<Instant> = None;
    let mut frozen = false;
    let mut pre_kill: Option<Value> = None;
    let mut next_tick = Duration::from_secs(1);
    let mut protected_epochs_rate = Vec::new();
    while start.elapsed() < end_at {
        std::thread::sleep(Duration::from_millis(20));
        if killed_at.is_none() && start.elapsed() >= kill_at {
            pre_kill = primary.as_ref().and_then(NodeProc::status).or(last_status.clone());
            killed_at = Some(Instant::now());
            let at = start.elapsed().as_secs_f64();
            let f = inject(a.scenario, at, &mut primary, &secondary, relay.as_ref(), etcd.is_none(), &live);
            (frozen, unprotect_at) = (f.frozen, f.unprotect_at);
        }
        unprotect_when_due(&mut unprotect_at, primary.as_ref(), start, &live);
        if start.elapsed() >= next_tick {
            next_tick += Duration::from_secs(1);
            let Some(st) = serving(primary.as_ref(), Some(&secondary).filter(|_| !frozen)) else { continue };
            let acked = load.acked.load(Ordering::SeqCst);
            let (epochs, pages, bytes) = (f(&st, "epoch"), f(&st, "pages_total"), f(&st, "bytes_total"));
            let same_node = last_status.as_ref().is_some_and(|l| l["node"] == st["node"] && l["role"] == st["role"]);
            let (de, dp, db) =
                if same_node { (epochs - prev.0, pages - prev.1, bytes - prev.2) } else { (0.0, 0.0, 0.0) };
            if same_node && st["protection"] == "protected" {
                protected_epochs_rate.push(de);
            }
            live(format!(
                "t={:>2.0}s {} ({}, gen {}): epochs/s={:.0} pause {} pages/epoch={:.0} MB/s={:.1} acked ops={} (+{})",
                start.elapsed().as_secs_f64(),
                st["node"].as_str().unwrap_or("?"),
                st["protection"].as_str().unwrap_or("?"),
                st["generation"],
                de,
                // the pause figures are of checkpoints shipped to a secondary:
                // while none is, they would be the last protected ones
                if st["protection"] == "protected" {
                    format!("p50={:.0}us p99={:.0}us", f(&st, "pause_us_p50"), f(&st, "pause_us_p99"))
                } else {
                    "-".to_string()
                },
                if de > 0.0 { dp / de } else { 0.0 },
                db / 1e6,
                acked,
                acked - prev.4,
            ));
            prev = (epochs, pages, bytes, 0.0, acked);
            last_status = Some(st);
        }
    }
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        let _ = rt.block_on(h);
    }

    // read the table back from the node that serves
    let (survivor, svc) = match serving(primary.as_ref(), Some(&secondary).filter(|_| !frozen)) {
        Some(st) if st["node"] == "node-a" => (st, svc_p),
        Some(st) => (st, svc_s),
        None => return Err(DemoError::Node(format!("no node serves at the end; logs in {}", dir.display()))),
    };
    let (lost, dup, checked) = read_back(&rt, &load, svc)?;
    let uncertain = common::sync::lock(&load.uncertain).iter().copied().collect::<std::collections::HashSet<u64>>();
    let failover = survivor["node"] == "node-b" && survivor["failovers"].as_u64().unwrap_or(0) > 0;
    let failover_ms = survivor["last_failover_ms"].as_f64();
    let pk = pre_kill.unwrap_or(Value::Null);
    let lat = common::sync::lock(&load.latencies_us).clone();
    let epochs_per_s = if protected_epochs_rate.is_empty() {
        0.0
    } else {
        protected_epochs_rate.iter().sum::<f64>() / protected_epochs_rate.len() as f64
    };
    let acked = load.acked.load(Ordering::SeqCst);
    // epochs of the whole run: the old primary's until the fault, then the
    // new one's since the epoch it took over from; a surviving old primary
    // counted them all itself
    let epochs = if failover {
        f(&pk, "epochs") + f(&survivor, "epoch") - f(&survivor, "committed_epoch").min(f(&survivor, "epoch"))
    } else {
        f(&survivor, "epochs")
    }
    .round() as u64;
    let r1 = |x: f64| (x * 10.0).round() / 10.0;
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    let report = serde_json::json!({
        // the guest, as the networked demo reports it
        "guest": "kv",
        "scenario": a.scenario.name(),
        "serving": survivor["node"],
        "failover": failover,
        "failover_ms": failover_ms.map(r1),
        "acked_ops": acked,
        "lost_acked_ops": lost,
        "duplicate_ops": dup,
        "keys_checked": checked,
        "uncertain_keys": uncertain.len(),
        "epochs": epochs,
        "epochs_per_s": r1(epochs_per_s),
        "pause_us_p50": r1(f(&pk, "pause_us_p50")),
        "pause_us_p99": r1(f(&pk, "pause_us_p99")),
        "ack_latency_us_p50": r1(f(&pk, "ack_latency_us_p50")),
        "output_delay_ms_p50": r2(common::sync::percentile(&lat, 0.5) / 1e3),
        "output_delay_ms_p99": r2(common::sync::percentile(&lat, 0.99) / 1e3),
        "survivor": survivor["node"],
        "survivor_generation": survivor["generation"],
        "witness": etcd.as_ref().map(|e| e.url.clone()),
        // the promotion's transaction, when there was one
        "witness_promote_txn_ms": if failover && etcd.is_some() { survivor["witness"]["last_txn_ms"].as_f64().map(r2) } else { None },
        "host": runtime::host::Host::detect().describe(),
    });
    let failover_text = match (failover, failover_ms) {
        (true, Some(ms)) => format!("failover in {ms:.0} ms"),
        (true, None) => "failover".to_string(),
        (false, _) => "no failover".to_string(),
    };
    live(format!(
        "summary: {}: {} serves; {}; {} acked ops, {} lost, {} duplicated ({} keys checked); {:.0} epochs/s protected, pause p50 {:.0}us p99 {:.0}us; client-observed output delay p99 {:.1} ms",
        a.scenario.name(),
        survivor["node"].as_str().unwrap_or("?"),
        failover_text,
        acked,
        lost,
        dup,
        checked,
        epochs_per_s,
        f(&pk, "pause_us_p50"),
        f(&pk, "pause_us_p99"),
        common::sync::percentile(&lat, 0.99) / 1e3
    ));
    if a.json {
        println!("{report}");
    }
    drop(secondary);
    drop(primary);
    drop(relay);
    drop(setup);
    if a.dir.is_none() {
        // nothing went wrong: the logs go (a failing demo keeps them and
        // names the directory in its error)
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
