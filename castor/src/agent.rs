//! `castor agent`: one per host of a pool (issue 31). It registers the host
//! in etcd under a lease, reads the pool every `--poll-ms`, and does what
//! [`witness::pool::decide`] says for this host: claims placements (each an
//! etcd transaction that may lose), starts and supervises the castor nodes
//! placed here (children, their output in the state dir), publishes their
//! addresses, follows a promotion the witness granted to one of its
//! secondaries, and stops nodes etcd no longer places here.
//!
//! It never promotes: the witness's term transactions, made by the nodes
//! themselves, stay the only authority over who serves. An agent that
//! cannot read etcd keeps its nodes running and starts nothing; one that
//! finds its lease lost re-registers holding nothing, so the nodes it ran
//! are stopped (other hosts have taken their places).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use runtime::harness::{NodeProc, Spec};
use witness::pool::store::{Store, StoreError};
use witness::pool::{decide, marks, unix_ms, Action, Child, HostInfo, Local, Placed, Role, View};

/// `castor agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The witness: etcd client URLs (`http://HOST:PORT[,...]`), the same
    /// the nodes use.
    #[arg(long, value_name = "URL[,URL...]")]
    witness: String,
    /// This host's name in the pool (unique; 1-64 of [A-Za-z0-9._-]).
    #[arg(long)]
    host: String,
    /// How many castor nodes (primaries and secondaries) this host may run.
    #[arg(long)]
    capacity: u32,
    /// Where the nodes' logs, ready files and control sockets go.
    #[arg(long)]
    state_dir: PathBuf,
    /// The link key every node of the pool uses (`castor keygen`), the same
    /// file on every host.
    #[arg(long)]
    secret_file: PathBuf,
    /// The address this host's nodes listen on (their ports are chosen by
    /// the nodes and published in etcd).
    #[arg(long, default_value = "127.0.0.1")]
    bind: std::net::IpAddr,
    /// TTL of the host's lease: the time from a host's death to its
    /// placements being freed.
    #[arg(long, default_value_t = 5)]
    lease_ttl_s: u64,
    /// How often the pool is read.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// Deadline of one etcd request.
    #[arg(long, default_value_t = 500)]
    witness_timeout_ms: u64,
    /// An option passed to every node this agent starts (repeat it), e.g.
    /// `--node-arg=--heartbeat-timeout-ms=250`. Every agent of a pool must
    /// pass the same (the nodes of a pair check their settings agree).
    #[arg(long, allow_hyphen_values = true)]
    node_arg: Vec<String>,
    /// The bridge this host puts its guests' TAPs on (it must exist, e.g.
    /// enslaving the NIC that faces the clients; the same L2 segment on
    /// every host). Without it the host runs no VM with a network card.
    #[arg(long, value_name = "BR")]
    net_bridge: Option<String>,
    /// The network namespace the bridge lives in, if not the agent's (the
    /// TAP is moved there; the nodes' own sockets stay in the agent's).
    #[arg(long, value_name = "NS", requires = "net_bridge")]
    net_netns: Option<String>,
    /// Test hook: before each claim transaction, wait (at most 60 s) until
    /// the file `<vm>.<role>` exists in this directory, so a test can line
    /// agents up on one free slot and let their transactions go at once.
    #[arg(long, hide = true, value_name = "DIR")]
    test_claim_barrier: Option<PathBuf>,
}

/// Errors of `castor agent`.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("state dir {path}: {err}")]
    StateDir { path: PathBuf, err: std::io::Error },
    #[error("{0}")]
    Usage(String),
}

impl AgentError {
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Store(StoreError::Config(_)) | AgentError::Usage(_) => 2,
            AgentError::Store(_) => 9,
            AgentError::StateDir { .. } => 5,
        }
    }
}

/// The `--net` of `vm`'s `role` node here: a TAP of its own (at most 15
/// characters: `c`, a hash of host and VM, the role and the start's
/// number, so a node started again never meets its predecessor's TAP, and
/// the hosts of one machine in the tests never share one), the VM's MAC,
/// and its address on the primary (a secondary takes the guest's from its
/// state).
fn net_arg(
    host: &str,
    vm: &str,
    role: Role,
    seq: u64,
    n: &witness::pool::VmNet,
    bridge: &str,
    netns: Option<&str>,
) -> String {
    let h = format!("{host}/{vm}").bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    let r = match role {
        Role::Primary => 'p',
        Role::Secondary => 's',
    };
    let mut s = format!("tap=c{h:08x}{r}{:02x},mac={},bridge={bridge}", seq % 256, n.mac);
    if role == Role::Primary {
        s += &format!(",ip={}", n.ip);
        if let Some(g) = &n.gw {
            s += &format!(",gw={g}");
        }
    }
    if let Some(ns) = netns {
        s += &format!(",netns={ns}");
    }
    s
}

/// How long a VM whose node failed here is not claimed here again.
const BACKOFF: Duration = Duration::from_secs(10);

/// A node this agent runs.
struct Running {
    child: Child,
    proc: NodeProc,
}

struct Agent {
    a: AgentArgs,
    exe: PathBuf,
    store: Store,
    rt: tokio::runtime::Runtime,
    lease: Option<i64>,
    lost: Arc<AtomicBool>,
    keeper: Option<tokio::task::JoinHandle<()>>,
    nodes: Vec<Running>,
    missing_since: BTreeMap<(String, Role), Instant>,
    backoff: BTreeMap<String, Instant>,
    /// Switchovers asked of our primaries: (vm, term).
    switched: BTreeSet<(String, u64)>,
    seq: u64,
    /// When etcd last answered (for the rate of the warning).
    unreachable_since: Option<Instant>,
}

pub fn agent(a: AgentArgs) -> Result<(), AgentError> {
    witness::pool::store::check_name("host", &a.host)?;
    if a.capacity == 0 {
        return Err(AgentError::Usage("--capacity must be at least 1".into()));
    }
    std::fs::create_dir_all(&a.state_dir).map_err(|err| AgentError::StateDir { path: a.state_dir.clone(), err })?;
    let exe = std::env::current_exe().map_err(|err| AgentError::StateDir { path: "castor".into(), err })?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let store = rt.block_on(Store::connect(&a.witness, Duration::from_millis(a.witness_timeout_ms.max(10))))?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        rt.spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            stop.store(true, Ordering::SeqCst);
        });
    }
    let mut agent = Agent {
        a,
        exe,
        store,
        rt,
        lease: None,
        lost: Arc::new(AtomicBool::new(false)),
        keeper: None,
        nodes: Vec::new(),
        missing_since: BTreeMap::new(),
        backoff: BTreeMap::new(),
        switched: BTreeSet::new(),
        seq: 0,
        unreachable_since: None,
    };
    // the first registration must succeed within a few lease TTLs: an
    // earlier agent of this host may still hold its lease
    let end = Instant::now() + Duration::from_secs(agent.a.lease_ttl_s * 3 + 5);
    loop {
        match agent.register() {
            Ok(()) => break,
            Err(e) if Instant::now() > end || stop.load(Ordering::SeqCst) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "registering the host, trying again");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    eprintln!("castor agent: host {} registered (capacity {})", agent.a.host, agent.a.capacity);
    // registered: any earlier agent of this host is gone (its lease expired)
    stop_orphans(&agent.a.state_dir);
    while !stop.load(Ordering::SeqCst) {
        let acted = agent.tick();
        if !acted {
            std::thread::sleep(Duration::from_millis(agent.a.poll_ms.max(10)));
        }
    }
    agent.shutdown();
    Ok(())
}

/// Kills the nodes an earlier agent of this host left running (it crashed
/// or was killed alone), once this agent is registered (so the earlier
/// one's lease has expired and etcd places nothing here): this agent
/// cannot supervise them. A node is recognised by its ready file in the
/// state dir and by its command line naming that file, so a pid reused by
/// another process is never signalled. The witness then fails their VMs
/// over and the pool re-protects them.
fn stop_orphans(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "ready") {
            continue;
        }
        if let Some(r) = runtime::listen::Ready::read(&path) {
            let cmdline = std::fs::read(format!("/proc/{}/cmdline", r.pid)).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let ours = args.iter().any(|a| *a == path.as_os_str().as_encoded_bytes());
            if ours && r.pid > 1 {
                // SAFETY: kill(2) takes no pointers.
                unsafe {
                    libc::kill(r.pid as i32, libc::SIGKILL);
                }
                eprintln!("castor agent: killed pid {} left by an earlier agent ({})", r.pid, path.display());
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}

impl Agent {
    fn register(&mut self) -> Result<(), StoreError> {
        let ttl = Duration::from_secs(self.a.lease_ttl_s.max(1));
        let lease = self.rt.block_on(self.store.lease(ttl))?;
        let info = HostInfo { capacity: self.a.capacity, net: self.a.net_bridge.is_some() };
        if let Err(e) = self.rt.block_on(self.store.register(&self.a.host, &info, lease)) {
            self.rt.block_on(self.store.revoke(lease));
            return Err(e);
        }
        self.lost.store(false, Ordering::SeqCst);
        let (store, lost) = (self.store.clone(), self.lost.clone());
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
        self.keeper = Some(self.rt.spawn(async move {
            store.keep_alive(lease, ttl).await;
            lost.store(true, Ordering::SeqCst);
        }));
        self.lease = Some(lease);
        tracing::info!(host = %self.a.host, lease, "registered in the pool");
        Ok(())
    }

    /// One round: read the pool, decide, act. True if it acted (the next
    /// round follows at once).
    fn tick(&mut self) -> bool {
        if self.lost.load(Ordering::SeqCst) {
            tracing::warn!(host = %self.a.host, "the host's lease was lost; registering again, holding nothing");
            self.lease = None;
            if let Err(e) = self.register() {
                tracing::warn!(error = %e, "registering again");
            }
        }
        // the clock an unprotected VM's record is dated by: when the view was asked for
        let read_at = unix_ms();
        let view = match self.rt.block_on(self.store.read()) {
            Ok(v) => {
                if let Some(t) = self.unreachable_since.take() {
                    tracing::warn!(secs = t.elapsed().as_secs_f64(), "etcd answers again");
                }
                v
            }
            Err(e) => {
                // keep what runs running, start nothing
                if self.unreachable_since.is_none() {
                    tracing::warn!(error = %e, "etcd is unreachable: the nodes run on, nothing is started");
                    self.unreachable_since = Some(Instant::now());
                }
                return false;
            }
        };
        if !view.hosts.contains_key(&self.a.host) {
            // the host key lives on our lease: without it the lease is gone
            // (expired while etcd or this host was out), whatever the
            // keep-alive has seen so far
            tracing::warn!(host = %self.a.host, "this host is not registered (its lease expired); registering again");
            match self.register() {
                Ok(()) => return true,
                Err(e) => tracing::warn!(error = %e, "registering again"),
            }
        }
        let local = self.local(&view);
        let actions = decide(&self.a.host, &view, &local);
        let acted = !actions.is_empty();
        for action in actions {
            if let Err(e) = self.act(&view, &action) {
                tracing::warn!(?action, error = %e, "the action failed; the next round decides again");
            }
        }
        if view.hosts.contains_key(&self.a.host) {
            // since when each VM is unprotected: recorded by whichever agent
            // reads the change first (the transaction compares the view)
            for m in marks(&view) {
                match self.rt.block_on(self.store.mark(&view, &m, read_at, &self.a.host)) {
                    Ok(won) => tracing::debug!(?m, won, "unprotected record"),
                    Err(e) => tracing::warn!(?m, error = %e, "recording a VM's protection"),
                }
            }
        }
        acted
    }

    /// What this agent knows beside the view.
    fn local(&mut self, view: &View) -> Local {
        let mut children = Vec::new();
        for n in &mut self.nodes {
            n.child.exited = !n.proc.running();
            if !n.child.exited && n.child.role == Role::Secondary && !n.child.serving {
                n.child.serving = n.proc.status().is_some_and(|s| s["role"] == "primary");
            }
            children.push(n.child.clone());
        }
        let now = Instant::now();
        let mut missing = BTreeSet::new();
        for vm in view.vms.keys() {
            let p = view.placement.get(vm).cloned().unwrap_or_default();
            for role in [Role::Primary, Role::Secondary] {
                if p.get(role).is_none() {
                    missing.insert((vm.clone(), role));
                }
            }
        }
        self.missing_since.retain(|k, _| missing.contains(k));
        for k in missing {
            self.missing_since.entry(k).or_insert(now);
        }
        self.backoff.retain(|_, until| *until > now);
        self.switched.retain(|(vm, t)| view.switchover.get(vm) == Some(t));
        Local {
            children,
            missing_for: self.missing_since.iter().map(|(k, t)| (k.clone(), now - *t)).collect(),
            backoff: self.backoff.keys().cloned().collect(),
            switched: self.switched.clone(),
        }
    }

    fn lease(&self) -> Result<i64, StoreError> {
        self.lease.ok_or_else(|| StoreError::Unreachable("not registered".into()))
    }

    fn node(&mut self, vm: &str, role: Role) -> Option<&mut Running> {
        self.nodes.iter_mut().find(|n| n.child.vm == vm && n.child.role == role)
    }

    fn act(&mut self, view: &View, action: &Action) -> Result<(), AgentError> {
        let host = self.a.host.clone();
        match action {
            Action::ClaimPrimary { vm } | Action::ClaimSecondary { vm, .. } => {
                let role = if matches!(action, Action::ClaimPrimary { .. }) { Role::Primary } else { Role::Secondary };
                self.claim_barrier(vm, role);
                let won = self.rt.block_on(self.store.claim(&host, self.lease()?, self.a.capacity, view, vm, role))?;
                tracing::info!(vm, role = role.as_str(), won, "claimed");
                if won {
                    eprintln!("castor agent {host}: claimed the {} of {vm}", role.as_str());
                } else {
                    eprintln!(
                        "castor agent {host}: lost the claim for the {} of {vm} (the pool changed since it was read)",
                        role.as_str()
                    );
                }
            }
            Action::Start { vm, role, join } => {
                let Some(spec) = view.vms.get(vm) else { return Ok(()) };
                match self.start(vm, *role, spec, *join) {
                    Ok(proc) => {
                        let child = Child {
                            vm: vm.clone(),
                            node: self.node_name(vm, *role),
                            role: *role,
                            exited: false,
                            serving: false,
                            addr: proc.listen,
                            service: Some(proc.service),
                        };
                        eprintln!(
                            "castor agent {host}: started the {} of {vm} (pid {}, replication {:?}, service {})",
                            role.as_str(),
                            proc.child.id(),
                            proc.listen,
                            proc.service
                        );
                        self.nodes.push(Running { child, proc });
                    }
                    Err(e) => {
                        tracing::warn!(vm, role = role.as_str(), error = %e, "the node did not start; giving its slot back");
                        self.backoff.insert(vm.clone(), Instant::now() + BACKOFF);
                        self.rt.block_on(self.store.release(&host, self.lease()?, vm, *role))?;
                    }
                }
            }
            Action::Publish { vm, role } => {
                let Some(n) = self.node(vm, *role) else { return Ok(()) };
                let (addr, service) = (n.child.addr, n.child.service);
                let lease = self.lease()?;
                let me = Placed { host: host.clone(), addr, service };
                self.rt.block_on(self.store.publish(lease, view, vm, *role, me))?;
            }
            Action::Promoted { vm } => {
                let Some(n) = self.node(vm, Role::Secondary) else { return Ok(()) };
                let (addr, service) = (n.child.addr, n.child.service);
                let lease = self.lease()?;
                let me = Placed { host: host.clone(), addr, service };
                if self.rt.block_on(self.store.promoted(lease, view, vm, me))? {
                    eprintln!(
                        "castor agent {host}: the witness promoted our secondary of {vm}: it is the placed primary"
                    );
                    if let Some(n) = self.node(vm, Role::Secondary) {
                        n.child.role = Role::Primary;
                    }
                }
            }
            Action::Adopt { vm, role } => {
                let Some(n) = self.nodes.iter().find(|n| n.child.vm == *vm) else { return Ok(()) };
                let (addr, service) = (n.child.addr, n.child.service);
                let lease = self.lease()?;
                let me = Placed { host: host.clone(), addr, service };
                let won = self.rt.block_on(self.store.adopt(lease, self.a.capacity, view, vm, *role, me))?;
                if won {
                    eprintln!(
                        "castor agent {host}: took back the {} of {vm} (its place was free and the witness names it)",
                        role.as_str()
                    );
                    if let Some(n) = self.nodes.iter_mut().find(|n| n.child.vm == *vm) {
                        n.child.role = *role;
                    }
                }
            }
            Action::Switchover { vm } => {
                let term = view.switchover.get(vm).copied().unwrap_or(0);
                self.switched.insert((vm.clone(), term));
                let Some(n) = self.node(vm, Role::Primary) else { return Ok(()) };
                // the node answers once the handover is decided (or refused)
                let answer = n.proc.command("switchover");
                eprintln!("castor agent {host}: switchover of {vm} (term {term}) asked of its primary: {answer:?}");
            }
            Action::Stop { vm, role } => {
                if let Some(i) = self.nodes.iter().position(|n| n.child.vm == *vm && n.child.role == *role) {
                    let mut n = self.nodes.remove(i);
                    n.proc.kill9();
                    eprintln!("castor agent {host}: stopped the {} of {vm} (no longer placed here)", role.as_str());
                }
                if let Some(lease) = self.lease {
                    self.rt.block_on(self.store.release(&host, lease, vm, *role))?;
                }
            }
            Action::Release { vm, role } => {
                if let Some(i) = self.nodes.iter().position(|n| n.child.vm == *vm && n.child.role == *role) {
                    let mut n = self.nodes.remove(i);
                    // it exited (seen by `local`): its status is kept by the child
                    let code = n.proc.child.try_wait().ok().flatten().map(|st| st.code().unwrap_or(-1));
                    eprintln!(
                        "castor agent {host}: the {} of {vm} exited ({}); giving its slot back; its log ends:\n{}",
                        role.as_str(),
                        runtime::harness::waited_text(code),
                        n.proc.log_tail()
                    );
                    // exit 0: it handed over (a switchover), it did not fail
                    if code != Some(0) {
                        self.backoff.insert(vm.clone(), Instant::now() + BACKOFF);
                    }
                }
                self.rt.block_on(self.store.release(&host, self.lease()?, vm, *role))?;
            }
        }
        Ok(())
    }

    /// The test hook `--test-claim-barrier`: waits until `<dir>/<vm>.<role>`
    /// exists (at most 60 s; then the claim goes on as without the hook).
    fn claim_barrier(&self, vm: &str, role: Role) {
        let Some(dir) = &self.a.test_claim_barrier else { return };
        let gate = dir.join(format!("{vm}.{}", role.as_str()));
        eprintln!("castor agent {}: test hook: at the claim barrier for the {} of {vm}", self.a.host, role.as_str());
        let end = Instant::now() + Duration::from_secs(60);
        while !gate.exists() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts the node of `vm` placed here (waits until it has bound its
    /// listeners, at most the harness's ready timeout).
    fn start(
        &mut self,
        vm: &str,
        role: Role,
        spec: &witness::pool::VmSpec,
        join: Option<std::net::SocketAddr>,
    ) -> Result<NodeProc, runtime::harness::HarnessError> {
        self.seq += 1;
        // the agent's pid too: a restarted agent's nodes do not overwrite
        // the logs of the nodes it found left over
        let name = format!("{vm}.{}.{}-{}", role.as_str(), std::process::id(), self.seq);
        let any = std::net::SocketAddr::new(self.a.bind, 0).to_string();
        let mut args: Vec<String> = match role {
            Role::Primary => vec![
                "primary".into(),
                "--listen".into(),
                any.clone(),
                "--guest".into(),
                spec.guest.clone(),
                "--mem".into(),
                spec.mem.to_string(),
                "--vcpus".into(),
                spec.vcpus.to_string(),
            ],
            Role::Secondary => {
                let mut v = vec!["secondary".to_string(), "--listen".into(), any.clone()];
                if let Some(j) = join {
                    v.extend(["--join".into(), j.to_string()]);
                }
                v
            }
        };
        args.extend([
            "--name".into(),
            self.node_name(vm, role),
            "--secret-file".into(),
            self.a.secret_file.display().to_string(),
            "--service-listen".into(),
            any,
            "--control".into(),
            self.a.state_dir.join(format!("{name}.ctl")).display().to_string(),
            "--witness".into(),
            self.a.witness.clone(),
            "--vm-id".into(),
            vm.into(),
        ]);
        if let Some(n) = &spec.net {
            let Some(bridge) = &self.a.net_bridge else {
                // (decide places a VM with a card only on a host with a bridge)
                let err = std::io::Error::other(format!("{vm} has a network card and this agent has no --net-bridge"));
                return Err(runtime::harness::HarnessError::Spawn { name, err });
            };
            args.extend([
                "--net".into(),
                net_arg(&self.a.host, vm, role, self.seq, n, bridge, self.a.net_netns.as_deref()),
            ]);
        }
        args.extend(self.a.node_arg.iter().cloned());
        let spec = Spec { exe: self.exe.clone(), name, args, dir: self.a.state_dir.clone(), env: Vec::new() };
        spec.start()
    }

    /// A node's `--name` (the witness knows a primary by it, a secondary
    /// by it and `#` and its instance).
    fn node_name(&self, vm: &str, role: Role) -> String {
        format!("{}.{vm}.{}", self.a.host, role.as_str())
    }

    /// An orderly stop: the nodes are killed and the lease given back, so
    /// the other hosts take over at once.
    fn shutdown(&mut self) {
        for mut n in self.nodes.drain(..) {
            n.proc.kill9();
        }
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
        if let Some(lease) = self.lease.take() {
            self.rt.block_on(self.store.revoke(lease));
        }
        eprintln!("castor agent {}: stopped", self.a.host);
    }
}
