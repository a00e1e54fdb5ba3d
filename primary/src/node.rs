//! The primary's runtime: epoch engine thread, replication with output
//! commit, heartbeats, the client service, the control API and metrics.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::auth::Secret;
use common::proto::{Channel, Message};
use common::service::{ClientMsg, NodeMsg, MAX_SERVICE_FRAME};
use common::state::Output;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use vmm::devices::Devices;
use vmm::Machine;

use crate::engine::{Engine, EngineOptions, EngineShared, Packet};
use crate::sender::{SenderError, Session};
use crate::status::NodeStatus;

/// Errors of the node runtime.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen on {addr}: {err}")]
    Bind { addr: SocketAddr, err: std::io::Error },
    #[error("the guest failed: {0}")]
    Guest(String),
}

/// How a primary's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryExit {
    /// Asked to stop.
    Shutdown,
    /// A node of a higher generation exists: this one must not release output.
    Fenced { by: u64 },
}

/// Primary settings.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    pub node: String,
    pub secret: Secret,
    pub generation: u64,
    /// Dial this secondary (and keep re-dialing it).
    pub peer: Option<SocketAddr>,
    pub service_listen: SocketAddr,
    pub control_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub heartbeat_interval: Duration,
    /// No heartbeat reply or ack for this long: the secondary is lost.
    pub peer_timeout: Duration,
    /// After losing the secondary, hold output this long (trying to learn
    /// whether it took over) before going unprotected.
    pub fence_grace: Duration,
    pub engine: EngineOptions,
    /// First epoch number (after a failover: the committed epoch + 1).
    pub first_epoch: u64,
    /// Append every released kv response here: `node generation client seq`.
    pub release_log: Option<std::path::PathBuf>,
    /// Print released console lines on stdout.
    pub print_console: bool,
}

/// A secondary that dialed us to protect us: its data or heartbeat connection.
pub type Joiner = (TcpStream, Channel);

/// Routes released output to the clients that asked.
#[derive(Debug)]
pub struct Router {
    node: String,
    generation: AtomicU64,
    clients: Mutex<HashMap<u32, mpsc::Sender<NodeMsg>>>,
    log: Option<Mutex<std::fs::File>>,
    print_console: bool,
    status: Arc<NodeStatus>,
}

impl Router {
    fn new(cfg: &PrimaryConfig, status: Arc<NodeStatus>) -> Self {
        let log = cfg
            .release_log
            .as_ref()
            .and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).map(Mutex::new).ok());
        Router {
            node: cfg.node.clone(),
            generation: AtomicU64::new(cfg.generation),
            clients: Mutex::new(HashMap::new()),
            log,
            print_console: cfg.print_console,
            status,
        }
    }

    fn register(&self, client: u32, tx: mpsc::Sender<NodeMsg>) {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).insert(client, tx);
    }

    /// Releases output: it leaves castor now.
    pub fn release(&self, outputs: Vec<Output>) {
        if outputs.is_empty() {
            return;
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let mut log_lines = String::new();
        let n = outputs.len() as u64;
        for o in outputs {
            match o {
                Output::Kv(resp) => {
                    if self.log.is_some() {
                        log_lines.push_str(&format!("{} {} {} {}\n", self.node, generation, resp.client, resp.seq));
                    }
                    if let Some(tx) = clients.get(&resp.client) {
                        let _ = tx.try_send(NodeMsg::Response { resp, node: self.node.clone(), generation });
                    }
                }
                Output::Console { cpu, line } => {
                    if self.print_console {
                        println!("guest[{cpu}]: {line}");
                    }
                }
                Output::Done { cpu, code } => tracing::info!(cpu, code, "guest workload done"),
                Output::Mark { .. } => {}
            }
        }
        if let Some(f) = &self.log {
            use std::io::Write;
            let _ = f.lock().unwrap_or_else(|p| p.into_inner()).write_all(log_lines.as_bytes());
        }
        self.status.update(|s| s.released_outputs += n);
    }
}

fn service_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(MAX_SERVICE_FRAME).new_codec()
}

async fn serve_client(stream: TcpStream, devices: Arc<Devices>, router: Arc<Router>) {
    let _ = stream.set_nodelay(true);
    let (tx, mut rx) = mpsc::channel::<NodeMsg>(1024);
    let framed = Framed::new(stream, service_codec());
    let (mut sink, mut source) = framed.split();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let Ok(b) = common::codec::encode(&m) else { continue };
            if sink.send(Bytes::from(b)).await.is_err() {
                break;
            }
        }
    });
    while let Some(Ok(frame)) = source.next().await {
        match common::codec::decode::<ClientMsg>(&frame) {
            Ok(ClientMsg::Request(req)) => {
                router.register(req.client, tx.clone());
                if let Err(e) = devices.submit(req) {
                    let _ = tx.try_send(NodeMsg::Unavailable { reason: e.to_string() });
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "malformed client message; closing the connection");
                break;
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Answers one control command (`status`, `failover`, `unprotect`) with a JSON
/// object and whether it was understood.
async fn control_reply(cmd: &str, status: &NodeStatus, commands: &Option<mpsc::Sender<String>>) -> (bool, String) {
    match cmd {
        "status" => (true, serde_json::to_string(&status.snapshot()).unwrap_or_default()),
        "failover" | "unprotect" => match commands {
            Some(tx) => {
                let _ = tx.send(cmd.to_string()).await;
                (true, format!("{{\"ok\":true,\"action\":\"{cmd} requested\"}}"))
            }
            None => (false, "{\"ok\":false,\"error\":\"this node takes no such command\"}".to_string()),
        },
        other => (false, format!("{{\"ok\":false,\"error\":\"unknown command '{}'\"}}", other.escape_default())),
    }
}

/// Serves the control API on loopback. Two forms: HTTP (`GET /status`,
/// `POST /failover`, `POST /unprotect`, one JSON object back), or one command
/// per line (`status`, ...), one JSON line back (what `castor status` uses).
pub async fn serve_control(listener: TcpListener, status: Arc<NodeStatus>, commands: Option<mpsc::Sender<String>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (status, commands) = (status.clone(), commands.clone());
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut words = line.split_whitespace();
                if let (Some("GET" | "POST"), Some(path)) = (words.next(), words.next()) {
                    // HTTP: skip the headers, answer once, close
                    while let Ok(Some(h)) = lines.next_line().await {
                        if h.trim().is_empty() {
                            break;
                        }
                    }
                    let (ok, body) = control_reply(path.trim_start_matches('/'), &status, &commands).await;
                    let head = if ok { "200 OK" } else { "404 Not Found" };
                    let resp = format!(
                        "HTTP/1.1 {head}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = w.write_all(resp.as_bytes()).await;
                    break;
                }
                let (_, reply) = control_reply(line.trim(), &status, &commands).await;
                if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Serves Prometheus text metrics over HTTP.
pub async fn serve_metrics(listener: TcpListener, status: Arc<NodeStatus>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let status = status.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
            let body = status.metrics();
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}

/// Binds a listener with a clear error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr).await.map_err(|err| NodeError::Bind { addr, err })
}

enum SessionEnd {
    Lost(String),
    Fenced(u64),
    Stopped,
    GuestFailed(String),
}

struct Replicator {
    cfg: PrimaryConfig,
    shape: common::state::VmShape,
    shared: Arc<EngineShared>,
    router: Arc<Router>,
    status: Arc<NodeStatus>,
    packets: mpsc::Receiver<Packet>,
    joiners: Option<mpsc::Receiver<Joiner>>,
    /// Output of epochs not yet acknowledged: epoch -> (outputs, sent at).
    held: Mutex<Held>,
    /// Output produced while holding (unsure whether we were replaced).
    held_after: Vec<Output>,
    /// Operator commands from the control API (`unprotect`).
    commands: Option<mpsc::Receiver<String>>,
    stop: watch::Receiver<bool>,
}

/// Output waiting for its epoch's ack: epoch -> (outputs, sent at).
type Held = BTreeMap<u64, (Vec<Output>, Instant)>;

/// Outputs waiting in `held` for their epoch's ack.
fn held_total(held: &Held) -> u64 {
    held.values().map(|v| v.0.len() as u64).sum()
}

async fn next_command(c: &mut Option<mpsc::Receiver<String>>) -> Option<String> {
    match c {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_joiner(j: &mut Option<mpsc::Receiver<Joiner>>) -> Option<Joiner> {
    match j {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Replicator {
    fn gen(&self) -> u64 {
        self.router.generation.load(Ordering::SeqCst)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Unprotected: output leaves at once (or is held during a fence grace).
    fn unprotected_packet(&mut self, p: Packet, grace: bool) -> Option<String> {
        let out = match p {
            Packet::Release(o) => o,
            Packet::Epoch(e) => e.outputs,
            Packet::Sync { .. } => Vec::new(),
            Packet::Failed(why) => return Some(why),
        };
        if grace {
            self.held_after.extend(out);
            let n = held_total(&self.held()) + self.held_after.len() as u64;
            self.status.update(|s| s.held_outputs = n);
        } else {
            self.router.release(out);
        }
        None
    }

    fn release_all_held(&mut self) {
        let held = std::mem::take(&mut *self.held());
        for (_, (out, _)) in held {
            self.router.release(out);
        }
        let after = std::mem::take(&mut self.held_after);
        self.router.release(after);
        self.status.update(|s| s.held_outputs = 0);
    }

    async fn handshake_joiner(&self, stream: TcpStream, channel: Channel) -> Result<Session, SenderError> {
        let v = common::frame::PROTOCOL_VERSION;
        Session::handshake(stream, &self.cfg.secret, self.shape.clone(), self.gen(), channel, v, v).await
    }

    async fn dial(&self, peer: SocketAddr) -> Result<(Session, Session), SenderError> {
        let t = Duration::from_secs(2);
        let data = tokio::time::timeout(
            t,
            Session::connect_channel(peer, &self.cfg.secret, self.shape.clone(), self.gen(), Channel::Data),
        )
        .await
        .map_err(|_| SenderError::Closed("(connect timed out)"))??;
        let hb = tokio::time::timeout(
            t,
            Session::connect_channel(peer, &self.cfg.secret, self.shape.clone(), self.gen(), Channel::Heartbeat),
        )
        .await
        .map_err(|_| SenderError::Closed("(connect timed out)"))??;
        Ok((data, hb))
    }

    fn fenced_by(e: &SenderError) -> Option<u64> {
        match e {
            SenderError::Refused { code: common::proto::RefuseCode::StaleGeneration, .. } => Some(u64::MAX),
            _ => None,
        }
    }

    /// Stops holding: output leaves again (we may run alone).
    fn go_unprotected(&mut self, why: &str) {
        tracing::warn!(%why, "running unprotected");
        self.shared.hold.store(false, Ordering::SeqCst);
        self.status.update(|s| s.protection = "unprotected".into());
        self.release_all_held();
    }

    /// Main loop: find a secondary, protect, and survive its loss.
    ///
    /// Losing the secondary cannot tell a dead secondary from a partitioned
    /// one that is taking over. So the primary *holds*: no output leaves, the
    /// guest is paused. It keeps dialing the peer: a higher generation there
    /// fences it; a refused connection for the whole fence grace (the peer
    /// process is gone, its port closed) lets it run unprotected; a new
    /// session re-protects it and releases what it held with the first ack.
    /// Without a peer to dial (after a failover) only a joining secondary or
    /// the control command `unprotect` ends the hold.
    async fn run(mut self) -> Result<PrimaryExit, NodeError> {
        let mut next_dial = Instant::now();
        let mut pending: (Option<Session>, Option<Session>) = (None, None);
        let mut holding = false;
        let mut refused_since: Option<Instant> = None;
        loop {
            if *self.stop.borrow() {
                return Ok(PrimaryExit::Shutdown);
            }
            if holding && refused_since.is_some_and(|t| t.elapsed() >= self.cfg.fence_grace) {
                holding = false;
                refused_since = None;
                self.go_unprotected("the secondary's port has refused connections for the whole fence grace");
            }
            let dial_at = tokio::time::Instant::from_std(next_dial);
            let mut session: Option<(Session, Session)> = None;
            tokio::select! {
                p = self.packets.recv() => match p {
                    Some(p) => {
                        if let Some(why) = self.unprotected_packet(p, holding) {
                            return Err(NodeError::Guest(why));
                        }
                    }
                    None => return Ok(PrimaryExit::Shutdown),
                },
                j = next_joiner(&mut self.joiners) => {
                    if let Some((stream, channel)) = j {
                        match self.handshake_joiner(stream, channel).await {
                            Ok(s) if channel == Channel::Data => pending.0 = Some(s),
                            Ok(s) => pending.1 = Some(s),
                            Err(e) => tracing::warn!(error = %e, "a joining secondary failed the handshake"),
                        }
                        if pending.0.is_some() && pending.1.is_some() {
                            session = Some((pending.0.take().expect("data"), pending.1.take().expect("hb")));
                        }
                    }
                }
                c = next_command(&mut self.commands) => {
                    if c.as_deref() == Some("unprotect") && holding {
                        holding = false;
                        self.go_unprotected("operator command");
                    }
                }
                _ = tokio::time::sleep_until(dial_at), if self.cfg.peer.is_some() => {
                    let peer = self.cfg.peer.expect("peer");
                    match self.dial(peer).await {
                        Ok(pair) => session = Some(pair),
                        Err(e) => {
                            if Self::fenced_by(&e).is_some() {
                                tracing::error!(%peer, "the peer has a higher generation: this primary is fenced");
                                self.held().clear();
                                return Ok(PrimaryExit::Fenced { by: u64::MAX });
                            }
                            let refused = matches!(&e, SenderError::Connect { err, .. } if err.kind() == std::io::ErrorKind::ConnectionRefused);
                            if refused {
                                refused_since.get_or_insert_with(Instant::now);
                            } else {
                                refused_since = None;
                            }
                            tracing::debug!(%peer, error = %e, "secondary not reachable");
                            next_dial = Instant::now() + Duration::from_millis(100);
                        }
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(50)), if holding => {}
                _ = self.stop.changed() => {}
            }
            let Some((data, hb)) = session else { continue };
            refused_since = None;
            // output held while we were alone goes out with the first acked epoch
            let next = self.shared.next_epoch.load(Ordering::SeqCst);
            let after = std::mem::take(&mut self.held_after);
            if !after.is_empty() {
                self.held()
                    .entry(next.saturating_sub(1))
                    .or_insert_with(|| (Vec::new(), Instant::now()))
                    .0
                    .extend(after);
            }
            self.shared.acked.store(next, Ordering::SeqCst);
            // an empty replica gets a live sync; one that holds an older
            // epoch of ours gets a full-memory epoch (it stays at its
            // committed epoch until that one verifies)
            let resync_full = data.ack.committed_epoch.is_some();
            if resync_full {
                self.shared.force_full.store(true, Ordering::SeqCst);
            } else {
                self.shared.sync_request.store(true, Ordering::SeqCst);
            }
            self.shared.hold.store(false, Ordering::SeqCst);
            self.shared.protected.store(true, Ordering::SeqCst);
            self.status.update(|s| {
                s.protection = "syncing".into();
                s.syncs += 1;
            });
            tracing::info!(resync_full, "secondary connected: sync starts");
            let end = self.run_session(data, hb).await;
            self.shared.protected.store(false, Ordering::SeqCst);
            match end {
                SessionEnd::Stopped => return Ok(PrimaryExit::Shutdown),
                SessionEnd::GuestFailed(why) => return Err(NodeError::Guest(why)),
                SessionEnd::Fenced(by) => {
                    tracing::error!(by, "fenced by a newer generation: output of unacknowledged epochs is discarded");
                    self.held().clear();
                    return Ok(PrimaryExit::Fenced { by });
                }
                SessionEnd::Lost(why) => {
                    tracing::warn!(%why, "lost the secondary: holding output (guest paused) until we know more");
                    self.shared.hold.store(true, Ordering::SeqCst);
                    holding = true;
                    self.status.update(|s| s.protection = "holding".into());
                    next_dial = Instant::now();
                }
            }
        }
    }

    async fn run_session(&mut self, data: Session, hb: Session) -> SessionEnd {
        let (mut dr, mut dw) = data.into_halves();
        let (mut hr, mut hw) = hb.into_halves();
        let mut stop = self.stop.clone();
        let gen = self.gen();
        let (cfg, shared, router, status) =
            (self.cfg.clone(), self.shared.clone(), self.router.clone(), self.status.clone());
        let held = &self.held;
        let packets = &mut self.packets;

        let writer = async {
            loop {
                let Some(p) = packets.recv().await else { return SessionEnd::Stopped };
                let res = match p {
                    Packet::Sync { pages, .. } => dw.send_full_sync(pages).await,
                    Packet::Epoch(e) => {
                        let e = *e;
                        let bytes = e.pages.iter().filter(|p| p.data.is_some()).count() as u64 * 4096;
                        status.update(|s| {
                            s.epoch = e.epoch;
                            s.last_epoch = e.phases;
                            s.pages_total += e.pages.len() as u64;
                            s.pages_unchanged_total += e.phases.unchanged;
                            s.bytes_total += bytes;
                            s.epochs += 1;
                        });
                        status.record_pause(e.phases.pause_us);
                        let n = {
                            let mut h = held.lock().unwrap_or_else(|p| p.into_inner());
                            h.insert(e.epoch, (e.outputs, Instant::now()));
                            held_total(&h)
                        };
                        status.update(|s| s.held_outputs = n);
                        dw.send_epoch(e.epoch, e.full, e.pages, e.state, e.digest).await
                    }
                    Packet::Release(o) => {
                        router.release(o);
                        Ok(())
                    }
                    Packet::Failed(why) => return SessionEnd::GuestFailed(why),
                };
                if let Err(e) = res {
                    return SessionEnd::Lost(format!("sending: {e}"));
                }
            }
        };
        let acker = async {
            loop {
                match dr.recv().await {
                    Ok(Some(Message::EpochAck { epoch })) => {
                        shared.record_ack(epoch);
                        let (ready, still_held): (Held, u64) = {
                            let mut h = held.lock().unwrap_or_else(|p| p.into_inner());
                            let later = h.split_off(&(epoch + 1));
                            let ready = std::mem::replace(&mut *h, later);
                            (ready, held_total(&h))
                        };
                        common::crashpoint::hit("primary.after_ack");
                        for (e, (out, sent)) in ready {
                            if e == epoch {
                                status.record_ack_latency(sent.elapsed().as_secs_f64() * 1e6);
                            }
                            router.release(out);
                        }
                        common::crashpoint::hit("primary.after_release");
                        status.update(|s| {
                            s.protection = "protected".into();
                            s.acked_epoch = Some(epoch);
                            s.held_outputs = still_held;
                        });
                    }
                    Ok(Some(Message::ResyncRequest { reason })) => {
                        tracing::error!(%reason, "secondary asks for a full resync");
                        shared.force_full.store(true, Ordering::SeqCst);
                    }
                    Ok(Some(Message::Fence { generation, .. })) => return SessionEnd::Fenced(generation),
                    Ok(Some(Message::Refused { code, reason })) => {
                        if code == common::proto::RefuseCode::StaleGeneration {
                            return SessionEnd::Fenced(gen + 1);
                        }
                        return SessionEnd::Lost(format!("refused: {reason}"));
                    }
                    Ok(Some(other)) => return SessionEnd::Lost(format!("unexpected {:?}", other.kind())),
                    Ok(None) => return SessionEnd::Lost("secondary closed the data channel".into()),
                    Err(e) => return SessionEnd::Lost(format!("data channel: {e}")),
                }
            }
        };
        let heartbeat = async {
            let mut tick = tokio::time::interval(cfg.heartbeat_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seq = 0u64;
            let mut last_reply = Instant::now();
            let start = Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let time_us = start.elapsed().as_micros() as u64;
                        if hw.send(&Message::Heartbeat { generation: gen, seq, time_us }).await.is_err() {
                            return SessionEnd::Lost("heartbeat channel closed".into());
                        }
                        seq += 1;
                        if last_reply.elapsed() > cfg.peer_timeout {
                            return SessionEnd::Lost(format!("no heartbeat reply for {:?}", last_reply.elapsed()));
                        }
                        let oldest = held.lock().unwrap_or_else(|p| p.into_inner()).values().next().map(|v| v.1);
                        if let Some(t) = oldest {
                            if t.elapsed() > cfg.peer_timeout * 4 {
                                return SessionEnd::Lost(format!("no ack for {:?}", t.elapsed()));
                            }
                        }
                    }
                    m = hr.recv() => match m {
                        Ok(Some(Message::Heartbeat { generation, .. })) => {
                            if generation > gen {
                                return SessionEnd::Fenced(generation);
                            }
                            last_reply = Instant::now();
                        }
                        Ok(Some(other)) => return SessionEnd::Lost(format!("unexpected {:?} on the heartbeat channel", other.kind())),
                        Ok(None) => return SessionEnd::Lost("heartbeat channel closed".into()),
                        Err(e) => return SessionEnd::Lost(format!("heartbeat channel: {e}")),
                    }
                }
            }
        };
        tokio::select! {
            e = writer => e,
            e = acker => e,
            e = heartbeat => e,
            _ = stop.changed() => SessionEnd::Stopped,
        }
    }
}

/// Runs `machine` as the primary until stopped or fenced. `joiners` delivers
/// secondaries that dial us (after a failover, or with `--listen`).
pub async fn run_primary(
    machine: Machine,
    cfg: PrimaryConfig,
    joiners: Option<mpsc::Receiver<Joiner>>,
    status: Arc<NodeStatus>,
    stop: watch::Receiver<bool>,
) -> Result<PrimaryExit, NodeError> {
    run_primary_with(machine, cfg, joiners, None, status, stop).await
}

/// [`run_primary`] with an external command channel (a promoted secondary
/// keeps its own control server and forwards commands here).
pub async fn run_primary_with(
    mut machine: Machine,
    cfg: PrimaryConfig,
    joiners: Option<mpsc::Receiver<Joiner>>,
    commands: Option<mpsc::Receiver<String>>,
    status: Arc<NodeStatus>,
    stop: watch::Receiver<bool>,
) -> Result<PrimaryExit, NodeError> {
    status.update(|s| {
        s.role = "primary".into();
        s.generation = cfg.generation;
        s.protection = "unprotected".into();
        s.peer = cfg.peer.map(|p| p.to_string());
    });
    let service = bind(cfg.service_listen).await?;
    let mut tasks = Vec::new();
    let (cmd_tx, cmd_rx) = mpsc::channel::<String>(4);
    if let Some(a) = cfg.control_listen {
        tasks.push(tokio::spawn(serve_control(bind(a).await?, status.clone(), Some(cmd_tx.clone()))));
    }
    if let Some(a) = cfg.metrics_listen {
        tasks.push(tokio::spawn(serve_metrics(bind(a).await?, status.clone())));
    }
    let router = Arc::new(Router::new(&cfg, status.clone()));
    let devices = machine.devices().clone();
    let shape = machine.shape().clone();
    {
        let (devices, router) = (devices.clone(), router.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((s, _)) = service.accept().await else { continue };
                tokio::spawn(serve_client(s, devices.clone(), router.clone()));
            }
        }));
    }
    let shared = Arc::new(EngineShared::default());
    shared.next_epoch.store(cfg.first_epoch.max(1), Ordering::SeqCst);
    let (ptx, prx) = mpsc::channel(cfg.engine.max_in_flight as usize + 8);
    machine.resume().map_err(|e| NodeError::Guest(e.to_string()))?;
    let engine = Engine::new(machine, cfg.engine, shared.clone(), ptx);
    let engine_thread = std::thread::Builder::new()
        .name("epoch-engine".into())
        .spawn(move || engine.run())
        .map_err(|e| NodeError::Guest(format!("cannot start the epoch engine: {e}")))?;
    {
        let (status, shared) = (status.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let next = shared.next_epoch.load(Ordering::SeqCst);
                let acked = shared.acked_epoch();
                status.update(|s| {
                    s.epoch = next.saturating_sub(1);
                    s.epochs_in_flight = next.saturating_sub(shared.acked.load(Ordering::SeqCst));
                    s.lag_epochs = s.epochs_in_flight;
                    s.acked_epoch = acked;
                    s.tracking_lost = shared.tracking_lost.load(Ordering::Relaxed);
                    s.ring_full_exits = shared.ring_full_exits.load(Ordering::Relaxed);
                });
            }
        }));
    }
    let rep = Replicator {
        cfg: cfg.clone(),
        shape,
        shared: shared.clone(),
        router: router.clone(),
        status: status.clone(),
        packets: prx,
        joiners,
        held: Mutex::new(BTreeMap::new()),
        held_after: Vec::new(),
        commands: commands.or(Some(cmd_rx)),
        stop,
    };
    let exit = rep.run().await;
    shared.stop.store(true, Ordering::SeqCst);
    let machine = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    if let Ok(Ok(mut m)) = machine {
        m.shutdown();
    }
    for t in tasks {
        t.abort();
    }
    status.update(|s| {
        s.role = match &exit {
            Ok(PrimaryExit::Fenced { .. }) => "fenced".into(),
            _ => "stopped".into(),
        }
    });
    exit
}
