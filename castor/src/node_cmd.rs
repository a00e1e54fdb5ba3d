//! `castor primary`, `castor secondary`, `castor status`, `castor failover`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use common::auth::Secret;
use primary::engine::{EngineOptions, UnprotectedPolicy};
use primary::node::{run_primary, PrimaryConfig, PrimaryExit, PrimaryIo};
use runtime::listen::Listeners;
use runtime::status::{NodeStatus, Role};
use secondary::node::{run_secondary, SecondaryConfig, SecondaryExit};
use tokio::sync::watch;
use vmm::{Machine, TrackerKind};

use crate::node_rt::runtime;
use crate::run::{parse_size, GuestArg, TrackerArg};

/// Settings shared by both roles.
#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// File holding the link key, the same on both nodes: 32 random bytes
    /// made by `castor keygen FILE` (or 64+ hex digits); a passphrase is
    /// refused.
    #[arg(long)]
    secret_file: PathBuf,
    /// Where clients of the kv service connect (the primary serves; a
    /// secondary answers `unavailable` until it takes over). Port 0: any free
    /// port, reported in the ready file.
    #[arg(long)]
    service_listen: SocketAddr,
    /// Control API: a Unix socket path (created mode 0600; only this uid
    /// and root may connect), or `tcp:HOST:PORT` for HTTP with
    /// --control-token (port 0 allowed). `castor status --control ADDR`.
    #[arg(long)]
    control: Option<runtime::control::ControlAddr>,
    /// Bearer token file (mode 0600, at least 16 printable bytes) that every
    /// request to a TCP control address must carry.
    #[arg(long)]
    control_token: Option<PathBuf>,
    /// Prometheus metrics over HTTP. Port 0 allowed.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// The guest's network card and the host TAP device behind it:
    /// `tap=NAME,mac=MAC[,ip=A.B.C.D/P][,gw=A.B.C.D][,bridge=BR]`. Both nodes
    /// of a pair give the guest's MAC (checked when they meet); `ip` is the
    /// address of the guest a primary boots; `bridge` puts the TAP on an
    /// existing bridge. The guest's frames leave on the TAP only once their
    /// epoch is acknowledged; a secondary drains its TAP and sends nothing
    /// until it takes over (docs/operations.md).
    #[arg(long, value_name = "tap=NAME,mac=MAC[,...]")]
    pub net: Option<crate::net_arg::NetArg>,
    /// Once every listener is bound, write their addresses here as one JSON
    /// object (`{"pid","service","replication","control","metrics"}`),
    /// atomically: start nodes on port 0 and read the ports from this file.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Node name in status, logs and released responses.
    #[arg(long)]
    name: Option<String>,
    /// Epoch length.
    #[arg(long, default_value_t = 10)]
    epoch_ms: u64,
    /// Output-driven epochs: once the guest has sent output (held until
    /// its epoch is acknowledged), end the epoch when it is this old instead
    /// of at --epoch-ms. 0: the timer alone decides. The default was chosen
    /// by measurement (docs/benchmarks.md: 300-2000 us tried).
    #[arg(long, default_value_t = 1000)]
    min_epoch_us: u64,
    /// With output-driven epochs: end the epoch sooner, once the guest's
    /// output (held frames and port writes) has stopped growing for this
    /// many microseconds: the guest answered what it had and its clients
    /// wait for this epoch's ack. 0: off (the epoch waits for
    /// --min-epoch-us).
    #[arg(long, default_value_t = 200)]
    output_quiet_us: u64,
    /// With output-driven epochs and a network card: end the epoch as soon
    /// as the guest has handled every frame it received (it posted every
    /// receive buffer again and none waits) and has output held, without
    /// waiting for --output-quiet-us.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    end_when_settled: bool,
    /// End an epoch early past this many dirty pages.
    #[arg(long, default_value_t = 16384)]
    max_epoch_pages: u64,
    /// Pre-copy: once this many pages wait in the dirty rings during an
    /// epoch, re-arm their tracking and copy them while the guest runs, so
    /// the epoch's pause copies only what was written since. 0: off (every
    /// page is copied in the pause). Ring tracker only. The default was
    /// chosen by measurement (docs/benchmarks.md).
    #[arg(long, default_value_t = 256)]
    precopy_min_pages: u64,
    /// Epochs sent but not acknowledged before epochs are stretched.
    #[arg(long, default_value_t = 4)]
    max_in_flight: u64,
    /// Page copies the primary may hold for a slow link (MiB); past it the
    /// guest is paused until the link drains. 0: the guest's memory size,
    /// at least 64 MiB and at most 1024 MiB.
    #[arg(long, default_value_t = 0, value_name = "MIB")]
    max_queued_mib: u64,
    /// Heartbeat period.
    #[arg(long, default_value_t = 20)]
    heartbeat_interval_ms: u64,
    /// Silence after which the peer counts as gone (failover on the secondary).
    #[arg(long, default_value_t = 100)]
    heartbeat_timeout_ms: u64,
    /// With no secondary: keep running (continue) or keep the guest paused (pause).
    #[arg(long, value_enum, default_value = "continue")]
    unprotected: UnprotectedArg,
    /// Verification mode: send a digest of all guest memory with every epoch.
    #[arg(long)]
    verify_digest: bool,
    /// Append every released kv response (`node generation client seq decided_us`) to this file.
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
    /// Dirty ring entries per vCPU (a power of two, 2048 to 65536; smaller
    /// rings are refused, exit 2: they overflow on most epochs of a guest
    /// writing at CPL0, and each overflow costs a full resync; see
    /// docs/machine.md).
    #[arg(long, default_value_t = vmm::tracker::DEFAULT_RING_ENTRIES)]
    ring_entries: u32,
    /// Hot-page retention (both trackers): defer re-arming dirty tracking so
    /// pages the guest keeps writing stay writable; they are copied every
    /// epoch (and shipped only when changed) instead of taking a write fault
    /// per page per epoch. `--hot-pages false` re-arms every epoch.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    hot_pages: bool,
    /// Where the node keeps what it must not forget across a restart (its
    /// generation, fsynced on every change, and its node id). Without it a
    /// restarted node starts at generation 0 under a new name.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The witness: etcd client URLs (`http://HOST:PORT[,...]`). With it,
    /// only the witness decides whether a primary that lost its secondary
    /// runs alone and whether a secondary takes over (see docs/operations.md).
    #[arg(long, value_name = "URL[,URL...]", requires = "vm_id")]
    witness: Option<String>,
    /// The guest's name in the witness (its keys are under /castor/<vm-id>/).
    #[arg(long, requires = "witness")]
    vm_id: Option<String>,
    /// Deadline of one witness request.
    #[arg(long, default_value_t = 500)]
    witness_timeout_ms: u64,
    /// Let the test hooks act (`CASTOR_CRASH_AT`, `CASTOR_FORCE_TRACKING_LOST_EVERY`);
    /// without this flag they are ignored.
    #[arg(long, hide = true)]
    test_hooks: bool,
}

/// What a primary does while no secondary protects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UnprotectedArg {
    Continue,
    Pause,
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
    /// The built-in guest to run.
    #[arg(long, value_enum, default_value = "kv")]
    guest: GuestArg,
    /// Guest memory (K, M or G suffix).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    #[command(flatten)]
    workload: crate::run::WorkloadArgs,
    /// With a witness: take over a VM id that already has a term. This is
    /// your statement that every earlier node of this VM is dead (a frozen
    /// one cannot be told from a dead one); without it castor refuses.
    #[arg(long, requires = "witness")]
    replace: bool,
    /// Generation (fencing term) to start with (without a witness; with
    /// one, the witness gives the term).
    #[arg(long, default_value_t = 0, conflicts_with = "witness")]
    generation: u64,
    #[command(flatten)]
    common: CommonArgs,
}

/// `castor secondary`.
#[derive(Debug, Args)]
#[command(after_help = "The guest's shape (memory, vCPUs, guest) comes from the primary. The options that run \
a guest (--epoch-ms, --min-epoch-us, --max-epoch-pages, --precopy-min-pages, --max-in-flight, \
--max-queued-mib, --unprotected, --tracker, --ring-entries, --hot-pages, --verify-digest, --console, \
--release-log) apply once this node takes over and runs it as a primary.")]
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
    #[error("secret: {0}")]
    Secret(#[from] common::auth::AuthError),
    #[error("cannot build the machine: {0}")]
    Build(#[from] vmm::MachineError),
    #[error(transparent)]
    Listen(#[from] runtime::listen::ListenError),
    #[error(transparent)]
    Primary(#[from] primary::node::NodeError),
    #[error(transparent)]
    Secondary(#[from] secondary::node::SecondaryError),
    /// The generation that fenced this node (at least: see `PrimaryExit::Fenced`).
    #[error("fenced: a node of a newer generation (at least {0}) replaced this one")]
    Fenced(u64),
    #[error("control {addr}: {err}")]
    Control { addr: runtime::control::ControlAddr, err: runtime::control::AskError },
    #[error("control {addr}: not a JSON reply ({err}): {body}")]
    ControlReply { addr: runtime::control::ControlAddr, err: serde_json::Error, body: String },
    #[error("the node refused: {0}")]
    Refused(String),
    #[error("witness: {0}")]
    Witness(#[from] witness::WitnessError),
    #[error(transparent)]
    StateDir(#[from] runtime::state_dir::StateDirError),
    #[error("bad settings: {0}")]
    Settings(common::proto::PairMismatch),
    #[error(transparent)]
    Net(#[from] crate::net_arg::NetArgError),
    #[error("{0}")]
    Usage(String),
}

impl NodeCmdError {
    pub fn exit_code(&self) -> i32 {
        match self {
            NodeCmdError::Build(_) => 3,
            NodeCmdError::Listen(_)
            | NodeCmdError::Primary(_)
            | NodeCmdError::Secondary(_)
            | NodeCmdError::StateDir(_)
            | NodeCmdError::Net(_) => 4,
            NodeCmdError::Secret(_) | NodeCmdError::Control { .. } | NodeCmdError::ControlReply { .. } => 5,
            NodeCmdError::Fenced(_) => 7,
            NodeCmdError::Refused(_) => 8,
            NodeCmdError::Witness(_) => 9,
            NodeCmdError::Settings(_) | NodeCmdError::Usage(_) => 2,
        }
    }
}

/// `--max-queued-mib` in bytes; 0: sized to the guest's memory (64 MiB to
/// 1 GiB).
fn queued_budget(c: &CommonArgs, guest_mem: u64) -> u64 {
    match c.max_queued_mib {
        0 => guest_mem.clamp(64 << 20, 1 << 30),
        mib => mib << 20,
    }
}

fn engine_opts(c: &CommonArgs, guest_mem: u64) -> Result<EngineOptions, NodeCmdError> {
    let unprotected = match c.unprotected {
        UnprotectedArg::Continue => UnprotectedPolicy::Continue,
        UnprotectedArg::Pause => UnprotectedPolicy::Pause,
    };
    Ok(EngineOptions {
        epoch: Duration::from_millis(c.epoch_ms.max(1)),
        max_epoch_pages: c.max_epoch_pages,
        max_in_flight: c.max_in_flight.max(1),
        digest: c.verify_digest,
        unprotected,
        tracking_off: c.no_epochs,
        min_epoch: (c.min_epoch_us > 0).then(|| Duration::from_micros(c.min_epoch_us)),
        output_quiet: (c.output_quiet_us > 0).then(|| Duration::from_micros(c.output_quiet_us)),
        end_when_settled: c.end_when_settled,
        precopy_min_pages: (c.precopy_min_pages > 0).then_some(c.precopy_min_pages),
        max_queued_bytes: queued_budget(c, guest_mem),
    })
}

fn tracker(c: &CommonArgs) -> TrackerKind {
    match c.tracker {
        TrackerArg::Ring => TrackerKind::Ring { entries: c.ring_entries },
        TrackerArg::Bitmap => TrackerKind::Bitmap,
    }
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

fn exit_of(r: Result<PrimaryExit, primary::node::NodeError>) -> Result<(), NodeCmdError> {
    match r? {
        PrimaryExit::Shutdown => Ok(()),
        PrimaryExit::HandedOver { epoch } => {
            eprintln!("castor: handed over to the secondary after epoch {epoch}; it runs the guest now");
            Ok(())
        }
        PrimaryExit::Fenced { by } => Err(NodeCmdError::Fenced(by)),
    }
}

/// Turns the test hooks on when the command line asks for them.
fn hooks(c: &CommonArgs) {
    if c.test_hooks {
        common::crashpoint::enable_test_hooks();
        tracing::warn!("test hooks enabled (--test-hooks)");
    }
}

/// Smallest dirty ring a node runs outside tests: smaller rings overflow on
/// most epochs of a guest writing at CPL0 on KVM-PVM, and every overflow is
/// a lost collection, so a full resync (docs/machine.md "Ring overflow").
pub const MIN_SAFE_RING_ENTRIES: u32 = 2048;

/// Refuses a ring so small that it overflows all the time, unless the test
/// hooks are on (the failover suite's tiny-ring scenario).
fn check_ring(c: &CommonArgs) -> Result<(), NodeCmdError> {
    if matches!(c.tracker, TrackerArg::Ring) && c.ring_entries < MIN_SAFE_RING_ENTRIES && !c.test_hooks {
        return Err(NodeCmdError::Usage(format!(
            "--ring-entries {}: rings under {MIN_SAFE_RING_ENTRIES} entries overflow on most epochs of a guest \
             writing at CPL0, each overflow a full resync (docs/machine.md); use {MIN_SAFE_RING_ENTRIES} or more \
             (the default is {})",
            c.ring_entries,
            vmm::tracker::DEFAULT_RING_ENTRIES
        )));
    }
    Ok(())
}

pub fn primary(a: PrimaryArgs) -> Result<(), NodeCmdError> {
    let c = &a.common;
    hooks(c);
    check_ring(c)?;
    let secret = Secret::from_file(&c.secret_file)?;
    let mut mcfg = a.workload.machine_config(a.guest, a.mem, a.vcpus, tracker(c));
    mcfg.net = c.net.as_ref().map(|n| vmm::net::NetConfig { mac: n.mac });
    if matches!(a.guest, GuestArg::Redis) {
        let Some((ipv4, prefix)) = c.net.as_ref().and_then(|n| n.ip) else {
            return Err(NodeCmdError::Usage(
                "--guest redis needs --net tap=NAME,mac=MAC,ip=A.B.C.D/P (the guest's card and address)".into(),
            ));
        };
        mcfg.workload.net = vmm::machine::NetAddr {
            ipv4,
            prefix,
            gateway: c.net.as_ref().and_then(|n| n.gateway),
            port: vmm::abi::NET_DEFAULT_PORT,
        };
    }
    let mut machine = Machine::new(mcfg)?;
    machine.set_hot_pages(c.hot_pages);
    let name = c.name.clone().unwrap_or_else(|| format!("primary-{}", std::process::id()));
    let state = c.state_dir.as_deref().map(runtime::state_dir::StateDir::open).transpose()?;
    // without a witness: never below the generation this node last stored
    let generation = match &state {
        Some(sd) => sd.raise_generation(a.generation)?,
        None => a.generation,
    };
    let mut cfg = PrimaryConfig { generation, peer: a.peer, ..primary_config(c, &name, secret, a.mem)? };
    cfg.net = c.net.as_ref().map(|n| n.open()).transpose()?;
    let (listen, c) = (a.listen, a.common.clone());
    runtime(c.net.is_some()).block_on(async move {
        let stop = stop_signal();
        let _lease = match witness_of(&c, &name).await? {
            Some(w) => {
                // a new primary claims the next term, unless one is alive
                let (term, lease) = w.claim_primary(a.replace).await?;
                tracing::info!(term, vm = %w.config().vm_id, "the witness gave this primary its term");
                cfg.generation = term;
                if let Some(sd) = &state {
                    sd.raise_generation(term)?;
                }
                cfg.witness = Some(w.clone());
                Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(w.keep_alive(lease))))
            }
            None => None,
        };
        let status = Arc::new(NodeStatus::new(&name, Role::Primary, cfg.generation));
        let l = bind_all(&c, listen).await?;
        let io = PrimaryIo {
            service: Arc::new(l.service),
            control: l.control,
            metrics: l.metrics,
            joiners: l.replication.map(runtime::join::accept_joiners),
            commands: None,
        };
        exit_of(run_primary(machine, cfg, io, status, stop).await)
    })
}

/// The primary settings the command line gives (generation 0, no peer,
/// first epoch 1): a primary's, or the one a promoted secondary becomes.
/// `guest_mem`: the guest's memory size where it is known (a secondary
/// learns it from its primary: its promoted config is sized at promotion).
fn primary_config(c: &CommonArgs, node: &str, secret: Secret, guest_mem: u64) -> Result<PrimaryConfig, NodeCmdError> {
    Ok(PrimaryConfig {
        node: node.to_string(),
        secret,
        generation: 0,
        peer: None,
        heartbeat_interval: Duration::from_millis(c.heartbeat_interval_ms.max(1)),
        peer_timeout: Duration::from_millis(c.heartbeat_timeout_ms.max(10)),
        engine: engine_opts(c, guest_mem)?,
        first_epoch: 1,
        release_log: c.release_log.clone(),
        print_console: c.console,
        witness: None,
        pair: pair_settings(c)?,
        net: None,
        announce: false,
    })
}

/// What this node's peer must agree on: the witness (by vm id) and the
/// heartbeat timing. A period of more than half the timeout is refused here
/// already (exit code 2).
fn pair_settings(c: &CommonArgs) -> Result<common::proto::PairSettings, NodeCmdError> {
    let pair = common::proto::PairSettings {
        witness_vm: c.witness.as_ref().and(c.vm_id.clone()),
        heartbeat_timeout_ms: c.heartbeat_timeout_ms.max(10),
        heartbeat_interval_ms: c.heartbeat_interval_ms.max(1),
        net_mac: c.net.as_ref().map(|n| n.mac),
    };
    pair.check_peer(&pair).map_err(NodeCmdError::Settings)?;
    Ok(pair)
}

/// Connects to the witness the command line names (`name`: this node's
/// name in it).
async fn witness_of(c: &CommonArgs, name: &str) -> Result<Option<witness::Witness>, NodeCmdError> {
    let (Some(urls), Some(vm)) = (&c.witness, &c.vm_id) else { return Ok(None) };
    let mut cfg = witness::WitnessConfig::new(urls, vm, name)?;
    cfg.timeout = Duration::from_millis(c.witness_timeout_ms.max(10));
    Ok(Some(witness::Witness::connect(cfg).await?))
}

/// A name unique to this process, for the witness's sync record: a
/// restarted secondary is never taken for the one that was caught up.
fn instance_name(name: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{name}#{}.{nanos:09}", std::process::id())
}

/// Binds every listener of a node and writes its ready file.
async fn bind_all(c: &CommonArgs, replication: Option<SocketAddr>) -> Result<Listeners, NodeCmdError> {
    let control = c.control.as_ref().map(|a| (a, c.control_token.as_deref()));
    if control.is_none() && c.control_token.is_some() {
        return Err(runtime::listen::ListenError::TokenWithoutTcp.into());
    }
    let l = Listeners::bind(c.service_listen, replication, control, c.metrics_listen).await?;
    if let Some(p) = &c.ready_file {
        l.ready().write(p)?;
    }
    Ok(l)
}

pub fn secondary(a: SecondaryArgs) -> Result<(), NodeCmdError> {
    let c = &a.common;
    hooks(c);
    check_ring(c)?;
    let secret = Secret::from_file(&c.secret_file)?;
    let name = c.name.clone().unwrap_or_else(|| format!("secondary-{}", std::process::id()));
    let promoted = primary_config(c, &name, secret.clone(), 0)?;
    let mut cfg = SecondaryConfig {
        node: name,
        secret,
        join: a.join,
        heartbeat_timeout: promoted.peer_timeout,
        tracker: tracker(c),
        hot_pages: c.hot_pages,
        witness: None,
        node_id: String::new(),
        state: None,
        pair: promoted.pair.clone(),
    };
    let (listen, c) = (a.listen, a.common.clone());
    runtime(c.net.is_some()).block_on(async move {
        let stop = stop_signal();
        let state = c.state_dir.as_deref().map(runtime::state_dir::StateDir::open).transpose()?;
        cfg.node_id = match &state {
            Some(sd) => sd.node_id(&cfg.node)?,
            None => instance_name(&cfg.node),
        };
        cfg.state = state.map(Arc::new);
        cfg.witness = witness_of(&c, &cfg.node_id).await?;
        let promoted = PrimaryConfig { witness: cfg.witness.clone(), ..promoted };
        // a secondary drains its TAP (the bridge floods it the guest's
        // frames) and sends nothing until it takes the guest over
        let tap = c.net.as_ref().map(|n| n.open()).transpose()?;
        let drain = tap
            .as_ref()
            .map(|t| vmm::net::tap::RxPump::start(Arc::clone(t), vmm::net::tap::RxSink::Drop))
            .transpose()
            .map_err(crate::net_arg::NetArgError::from)?;
        let status = Arc::new(NodeStatus::new(&cfg.node, Role::Secondary, 0));
        let l = bind_all(&c, Some(listen)).await?;
        let p = match run_secondary(cfg, l, status.clone(), stop.clone()).await {
            Ok(SecondaryExit::Shutdown) => return Ok(()),
            Ok(SecondaryExit::Promoted(p)) => *p,
            Err(e) => return Err(e.into()),
        };
        // the promoted node runs as a primary, unprotected until a new
        // secondary joins it on its replication address
        drop(drain);
        let mut pcfg = PrimaryConfig { generation: p.generation, first_epoch: p.first_epoch, ..promoted };
        (pcfg.net, pcfg.announce) = (tap, true);
        pcfg.engine.max_queued_bytes = queued_budget(&c, p.machine.shape().mem_bytes);
        let io = PrimaryIo {
            service: p.service,
            control: None,
            metrics: None,
            joiners: Some(p.joiners),
            commands: Some(p.commands),
        };
        let _tasks = p.tasks;
        exit_of(run_primary(p.machine, pcfg, io, status, stop).await)
    })
}

/// How `castor status|failover|unprotect|switchover` reach a node.
#[derive(Debug, Args, Clone)]
pub struct ControlArgs {
    /// The node's control address: its socket path, or tcp:HOST:PORT.
    #[arg(long)]
    control: runtime::control::ControlAddr,
    /// The bearer token file of a TCP control address.
    #[arg(long)]
    control_token: Option<PathBuf>,
}

/// Sends one control command and returns the JSON reply.
pub fn control(a: &ControlArgs, cmd: &str) -> Result<String, NodeCmdError> {
    let addr = a.control.clone();
    let token = a.control_token.as_deref().map(Secret::token_from_file).transpose()?;
    let answer = runtime::control::ask(&addr, cmd, token.as_ref())
        .map_err(|err| NodeCmdError::Control { addr: addr.clone(), err })?;
    let line = answer.body.trim().to_string();
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|err| NodeCmdError::ControlReply {
        addr: addr.clone(),
        err,
        body: line.clone(),
    })?;
    // a command the node refused (or a request it did not take: another
    // uid, no token; every such answer is a 4xx or 5xx) is an error (exit
    // code 8), with its reason
    if !answer.status.is_success() || v["ok"] == false || (cmd != "status" && v["ok"] != true) {
        return Err(NodeCmdError::Refused(v["error"].as_str().unwrap_or("no reason given").to_string()));
    }
    Ok(line)
}
