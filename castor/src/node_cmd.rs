//! `castor primary`, `castor secondary`, `castor status`, `castor failover`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use common::auth::Secret;
use primary::engine::{EngineOptions, UnprotectedPolicy};
use primary::node::{run_primary, PrimaryConfig, PrimaryExit};
use primary::status::NodeStatus;
use secondary::node::{run_secondary, SecondaryConfig};
use tokio::sync::watch;
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};

use crate::run::{parse_size, GuestArg, TrackerArg};

/// Settings shared by both roles.
#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// File holding the shared secret (at least 16 bytes).
    #[arg(long)]
    secret_file: PathBuf,
    /// Where clients of the kv service connect (the primary serves; a secondary after failover).
    #[arg(long)]
    service_listen: SocketAddr,
    /// Control API (loopback): `castor status --control ADDR`.
    #[arg(long)]
    control: Option<SocketAddr>,
    /// Prometheus metrics over HTTP.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Node name in status, logs and released responses.
    #[arg(long)]
    name: Option<String>,
    /// Epoch length.
    #[arg(long, default_value_t = 10)]
    epoch_ms: u64,
    /// End an epoch early past this many dirty pages.
    #[arg(long, default_value_t = 16384)]
    max_epoch_pages: u64,
    /// Epochs sent but not acknowledged before epochs are stretched.
    #[arg(long, default_value_t = 4)]
    max_in_flight: u64,
    /// Heartbeat period.
    #[arg(long, default_value_t = 20)]
    heartbeat_interval_ms: u64,
    /// Silence after which the peer counts as gone (failover on the secondary).
    #[arg(long, default_value_t = 100)]
    heartbeat_timeout_ms: u64,
    /// After losing its secondary, a primary holds output this long before running unprotected.
    #[arg(long, default_value_t = 300)]
    fence_grace_ms: u64,
    /// With no secondary: keep running (continue) or keep the guest paused (pause).
    #[arg(long, default_value = "continue")]
    unprotected: String,
    /// Verification mode: send a digest of all guest memory with every epoch.
    #[arg(long)]
    verify_digest: bool,
    /// Append every released kv response (node generation client seq) to this file.
    #[arg(long)]
    release_log: Option<PathBuf>,
    /// Print the guest's released console lines.
    #[arg(long)]
    console: bool,
    /// Benchmark baseline: while unprotected, run without epochs or dirty
    /// tracking and release output at once.
    #[arg(long, hide = true)]
    no_epochs: bool,
    /// Dirty tracker of the VM this node runs.
    #[arg(long, value_enum, default_value = "ring")]
    tracker: TrackerArg,
    /// Dirty ring entries per vCPU.
    #[arg(long, default_value_t = vmm::tracker::DEFAULT_RING_ENTRIES)]
    ring_entries: u32,
    /// Hot-page retention (both trackers): defer re-arming dirty tracking so
    /// pages the guest keeps writing stay writable; they are copied every
    /// epoch (and shipped only when changed) instead of taking a write fault
    /// per page per epoch. `--hot-pages false` re-arms every epoch.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    hot_pages: bool,
}

/// `castor primary`.
#[derive(Debug, Args)]
pub struct PrimaryArgs {
    /// The secondary to protect this guest (dialed, and re-dialed).
    #[arg(long)]
    peer: Option<SocketAddr>,
    /// Also accept secondaries that join (`castor secondary --join`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    #[arg(long, value_enum, default_value = "kv")]
    guest: GuestArg,
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Generation (fencing term) to start with.
    #[arg(long, default_value_t = 0)]
    generation: u64,
    #[command(flatten)]
    common: CommonArgs,
}

/// `castor secondary`.
#[derive(Debug, Args)]
pub struct SecondaryArgs {
    /// Replication address: primaries dial it; after a failover new secondaries join it.
    #[arg(long)]
    listen: SocketAddr,
    /// Join (protect) the primary listening here.
    #[arg(long)]
    join: Option<SocketAddr>,
    #[command(flatten)]
    common: CommonArgs,
}

/// Errors of the node commands, with exit codes.
#[derive(Debug, thiserror::Error)]
pub enum NodeCmdError {
    #[error("{0}")]
    Usage(String),
    #[error("secret: {0}")]
    Secret(String),
    #[error("cannot build the machine: {0}")]
    Build(String),
    #[error("{0}")]
    Node(String),
    #[error("fenced: a node of a newer generation ({}) replaced this one", if *.0 == u64::MAX { "unknown".to_string() } else { .0.to_string() })]
    Fenced(u64),
    #[error("control {addr}: {err}")]
    Control { addr: SocketAddr, err: String },
}

impl NodeCmdError {
    pub fn exit_code(&self) -> i32 {
        match self {
            NodeCmdError::Usage(_) => 2,
            NodeCmdError::Build(_) => 3,
            NodeCmdError::Node(_) => 4,
            NodeCmdError::Secret(_) | NodeCmdError::Control { .. } => 5,
            NodeCmdError::Fenced(_) => 7,
        }
    }
}

fn engine_opts(c: &CommonArgs) -> Result<EngineOptions, NodeCmdError> {
    let unprotected = match c.unprotected.as_str() {
        "continue" => UnprotectedPolicy::Continue,
        "pause" => UnprotectedPolicy::Pause,
        other => return Err(NodeCmdError::Usage(format!("--unprotected must be continue or pause, not '{other}'"))),
    };
    Ok(EngineOptions {
        epoch: Duration::from_millis(c.epoch_ms.max(1)),
        max_epoch_pages: c.max_epoch_pages,
        max_in_flight: c.max_in_flight.max(1),
        digest: c.verify_digest,
        unprotected,
        tracking_off: c.no_epochs,
    })
}

fn tracker(c: &CommonArgs) -> TrackerKind {
    match c.tracker {
        TrackerArg::Ring => TrackerKind::Ring { entries: c.ring_entries },
        TrackerArg::Bitmap => TrackerKind::Bitmap,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

/// Stops on SIGINT/SIGTERM.
fn stop_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = tx.send(true);
    });
    rx
}

fn exit_of(r: Result<PrimaryExit, String>) -> Result<(), NodeCmdError> {
    match r {
        Ok(PrimaryExit::Shutdown) => Ok(()),
        Ok(PrimaryExit::Fenced { by }) => Err(NodeCmdError::Fenced(by)),
        Err(e) => Err(NodeCmdError::Node(e)),
    }
}

pub fn primary(a: PrimaryArgs) -> Result<(), NodeCmdError> {
    let c = &a.common;
    let secret = Secret::from_file(&c.secret_file).map_err(|e| NodeCmdError::Secret(e.to_string()))?;
    let workload = match a.guest {
        GuestArg::Kv => WorkloadConfig::kv(),
        GuestArg::Dirty => WorkloadConfig::dirty(4096, vmm::abi::Pattern::Random, 20000),
        GuestArg::Idle => WorkloadConfig::idle(),
    };
    let mut machine = Machine::new(MachineConfig::new(a.mem, a.vcpus, tracker(c), workload))
        .map_err(|e| NodeCmdError::Build(e.to_string()))?;
    machine.set_hot_pages(c.hot_pages);
    let name = c.name.clone().unwrap_or_else(|| format!("primary-{}", std::process::id()));
    let cfg = PrimaryConfig {
        node: name.clone(),
        secret,
        generation: a.generation,
        peer: a.peer,
        service_listen: c.service_listen,
        control_listen: c.control,
        metrics_listen: c.metrics_listen,
        heartbeat_interval: Duration::from_millis(c.heartbeat_interval_ms.max(1)),
        peer_timeout: Duration::from_millis(c.heartbeat_timeout_ms.max(10)),
        fence_grace: Duration::from_millis(c.fence_grace_ms),
        engine: engine_opts(c)?,
        first_epoch: 1,
        release_log: c.release_log.clone(),
        print_console: c.console,
    };
    let listen = a.listen;
    runtime().block_on(async move {
        let stop = stop_signal();
        let status = Arc::new(NodeStatus::new(&name, "primary", cfg.generation));
        let joiners = match listen {
            Some(l) => Some(accept_joiners(l).await?),
            None => None,
        };
        exit_of(run_primary(machine, cfg, joiners, status, stop).await.map_err(|e| e.to_string()))
    })
}

/// Accepts joining secondaries on `listen` for a primary started with --listen.
async fn accept_joiners(
    listen: SocketAddr,
) -> Result<tokio::sync::mpsc::Receiver<primary::node::Joiner>, NodeCmdError> {
    let l = primary::node::bind(listen).await.map_err(|e| NodeCmdError::Node(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if tokio::io::AsyncReadExt::read_exact(&mut s, &mut b).await.is_err() {
                    return;
                }
                let ch = match b[0] {
                    secondary::node::JOIN_DATA => common::proto::Channel::Data,
                    secondary::node::JOIN_HEARTBEAT => common::proto::Channel::Heartbeat,
                    _ => return,
                };
                let _ = tx.send((s, ch)).await;
            });
        }
    });
    Ok(rx)
}

pub fn secondary(a: SecondaryArgs) -> Result<(), NodeCmdError> {
    let c = &a.common;
    let secret = Secret::from_file(&c.secret_file).map_err(|e| NodeCmdError::Secret(e.to_string()))?;
    let name = c.name.clone().unwrap_or_else(|| format!("secondary-{}", std::process::id()));
    let cfg = SecondaryConfig {
        node: name.clone(),
        secret,
        listen: a.listen,
        join: a.join,
        service_listen: c.service_listen,
        control_listen: c.control,
        metrics_listen: c.metrics_listen,
        heartbeat_timeout: Duration::from_millis(c.heartbeat_timeout_ms.max(10)),
        tracker: tracker(c),
        hot_pages: c.hot_pages,
        heartbeat_interval: Duration::from_millis(c.heartbeat_interval_ms.max(1)),
        fence_grace: Duration::from_millis(c.fence_grace_ms),
        engine: engine_opts(c)?,
        release_log: c.release_log.clone(),
        print_console: c.console,
    };
    runtime().block_on(async move {
        let stop = stop_signal();
        let status = Arc::new(NodeStatus::new(&name, "secondary", 0));
        exit_of(run_secondary(cfg, status, stop).await.map_err(|e| e.to_string()))
    })
}

/// Sends one control command and returns the JSON line.
pub fn control(addr: SocketAddr, cmd: &str) -> Result<String, NodeCmdError> {
    use std::io::{BufRead, BufReader, Write};
    let err = |e: std::io::Error| NodeCmdError::Control { addr, err: e.to_string() };
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(err)?;
    s.write_all(format!("{cmd}\n").as_bytes()).map_err(err)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(err)?;
    Ok(line.trim().to_string())
}
