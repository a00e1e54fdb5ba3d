//! Output routing and the client service: requests from clients go into the
//! guest's device; output that output commit releases goes back to the
//! client that asked (and to the release log and console).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::service::{ClientMsg, NodeMsg};
use common::state::Output;
use common::sync::lock;
use futures::{SinkExt, StreamExt};
use runtime::service::service_codec;
use runtime::status::NodeStatus;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use vmm::devices::Devices;

/// A request waiting for its response: (client id, sequence number).
type Key = (u32, u32);

/// Connections that may wait on one request: the one that sent it and a few
/// that retried it (a client that reconnected).
const MAX_WAITERS: usize = 4;

/// Client connections served at once; more are closed at accept.
pub const MAX_CLIENT_CONNECTIONS: usize = 4096;

/// Routes released output to the connections that asked.
///
/// A response goes to every connection that sent its (client, sequence)
/// request: the first, and a retry on a new connection (the exactly-once
/// rule needs the retry answered). A connection that declares another's
/// client id gets at most a copy of what it asked for itself; it cannot
/// take responses away from the connection that sent the request.
#[derive(Debug)]
pub struct Router {
    node: String,
    generation: u64,
    waiting: Mutex<HashMap<Key, Vec<mpsc::Sender<NodeMsg>>>>,
    log: Option<Mutex<std::fs::File>>,
    print_console: bool,
    status: Arc<NodeStatus>,
    /// Set once this node stops serving (handed over, fenced, stopped):
    /// client connections close so clients move on at once.
    closed: tokio::sync::watch::Sender<bool>,
    /// Where released frames of the guest's network card go.
    tap: std::sync::OnceLock<Arc<vmm::net::tap::Tap>>,
    /// Frames released so far (written, or dropped with no TAP), counted
    /// once a release has written them all (the engine's
    /// [`crate::engine::EngineShared::frames_released`]).
    frames_out: Arc<AtomicU64>,
    /// Test hook (`CASTOR_TEST_UNWRITTEN_FRAMES_WHILE=PATH`, with
    /// `--test-hooks`): while PATH exists, released frames are counted as
    /// released but neither written nor counted as written, as if every
    /// release then were cut short by a crash.
    unwritten_while: Option<std::path::PathBuf>,
}

impl Router {
    /// `release_log`: append `node generation client seq decided_us` for
    /// every released kv response (`decided_us`: wall clock, microseconds
    /// since the Unix epoch, read just after the release was decided; a file
    /// that cannot be opened is reported and skipped).
    pub fn new(
        node: &str,
        generation: u64,
        release_log: Option<&std::path::Path>,
        print_console: bool,
        status: Arc<NodeStatus>,
    ) -> Self {
        let log = release_log.and_then(|p| match std::fs::OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Some(Mutex::new(f)),
            Err(e) => {
                tracing::error!(path = %p.display(), error = %e, "cannot open the release log; releases are not logged");
                None
            }
        });
        Router {
            node: node.into(),
            generation,
            waiting: Mutex::new(HashMap::new()),
            log,
            print_console,
            status,
            closed: tokio::sync::watch::channel(false).0,
            tap: std::sync::OnceLock::new(),
            frames_out: Arc::new(AtomicU64::new(0)),
            unwritten_while: std::env::var_os("CASTOR_TEST_UNWRITTEN_FRAMES_WHILE")
                .filter(|_| common::crashpoint::test_hooks_enabled())
                .map(std::path::PathBuf::from),
        }
    }

    /// Released frames go to `tap` from now on (set once; frames released
    /// before have nowhere to go and are counted as released).
    pub fn attach_tap(&self, tap: Arc<vmm::net::tap::Tap>) {
        let _ = self.tap.set(tap);
    }

    /// The count of frames written out so far, in the order released.
    pub fn frames_written(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.frames_out)
    }

    /// Stops serving: every client connection closes (its clients retry
    /// against the other node at once), and no new one is taken.
    pub fn close(&self) {
        self.closed.send_replace(true);
        lock(&self.waiting).clear();
    }

    /// `tx`'s connection waits for the response to `key`.
    fn register(&self, key: Key, tx: &mpsc::Sender<NodeMsg>) {
        let mut w = lock(&self.waiting);
        let v = w.entry(key).or_default();
        v.retain(|t| !t.is_closed());
        if v.iter().any(|t| t.same_channel(tx)) {
            return;
        }
        if v.len() >= MAX_WAITERS {
            // the first (the sender) always stays; the newest retry replaces
            // the last one
            v.pop();
        }
        v.push(tx.clone());
    }

    /// `tx`'s connection no longer waits on `keys` (it closed).
    fn unregister(&self, keys: &std::collections::HashSet<Key>, tx: &mpsc::Sender<NodeMsg>) {
        let mut w = lock(&self.waiting);
        for k in keys {
            if let Some(v) = w.get_mut(k) {
                v.retain(|t| !t.same_channel(tx));
                if v.is_empty() {
                    w.remove(k);
                }
            }
        }
    }

    /// Drops from `keys` those `tx` no longer waits on (answered).
    fn prune(&self, keys: &mut std::collections::HashSet<Key>, tx: &mpsc::Sender<NodeMsg>) {
        let w = lock(&self.waiting);
        keys.retain(|k| w.get(k).is_some_and(|v| v.iter().any(|t| t.same_channel(tx))));
    }

    /// Releases output: it leaves castor now. `decided_us`: when the
    /// release was decided ([`wall_us`] just after the decision). A process
    /// stopped (SIGSTOP, a frozen host) between deciding and emitting
    /// finishes emitting when it resumes; the time shows it decided before.
    pub fn release(&self, outputs: Vec<Output>, decided_us: u128) {
        if outputs.is_empty() {
            return;
        }
        let mut waiting = lock(&self.waiting);
        let mut log_lines = String::new();
        let n = outputs.len() as u64;
        let (mut frames, mut written) = (0u64, 0u64);
        let unwritten = self.unwritten_while.as_deref().is_some_and(std::path::Path::exists);
        for o in outputs {
            match o {
                Output::Kv(resp) => {
                    if self.log.is_some() {
                        log_lines.push_str(&format!(
                            "{} {} {} {} {decided_us}\n",
                            self.node, self.generation, resp.client, resp.seq
                        ));
                    }
                    for tx in waiting.remove(&(resp.client, resp.seq)).unwrap_or_default() {
                        let _ = tx.try_send(NodeMsg::Response {
                            resp,
                            node: self.node.clone(),
                            generation: self.generation,
                        });
                    }
                }
                Output::Console { cpu, line } => {
                    if self.print_console {
                        println!("guest[{cpu}]: {line}");
                    }
                }
                Output::Done { cpu, code } => tracing::info!(cpu, code, "guest workload done"),
                Output::Mark { .. } => {}
                Output::Frame(f) => {
                    frames += 1;
                    if unwritten {
                        continue;
                    }
                    written += 1;
                    // a node that stopped serving (handed over, fenced)
                    // emits no frame
                    if let Some(t) = self.tap.get().filter(|_| !*self.closed.borrow()) {
                        t.send(&f);
                    }
                }
            }
        }
        if let Some(f) = &self.log {
            use std::io::Write;
            let _ = lock(f).write_all(log_lines.as_bytes());
        }
        if written > 0 {
            self.frames_out.fetch_add(written, Ordering::Release);
        }
        self.status.update(|s| {
            s.released_outputs += n;
            s.released_frames += frames;
        });
    }
}

/// Wall-clock time in microseconds since the Unix epoch (release log).
pub fn wall_us() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros())
}

async fn serve_client(stream: TcpStream, devices: Arc<Devices>, router: Arc<Router>) {
    let _ = stream.set_nodelay(true);
    let (tx, mut rx) = mpsc::channel::<NodeMsg>(1024);
    let framed = Framed::new(stream, service_codec());
    let (mut sink, mut source) = framed.split();
    let mut writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let Ok(b) = common::codec::encode(&m) else { continue };
            if sink.send(Bytes::from(b)).await.is_err() {
                break;
            }
        }
    });
    let mut keys = std::collections::HashSet::new();
    let mut closed = router.closed.subscribe();
    loop {
        let frame = tokio::select! {
            f = source.next() => f,
            _ = closed.wait_for(|c| *c) => None,
        };
        let Some(Ok(frame)) = frame else { break };
        match common::codec::decode::<ClientMsg>(&frame) {
            Ok(ClientMsg::Request(req)) => {
                let key = (req.client, req.seq);
                if keys.len() >= 4096 {
                    router.prune(&mut keys, &tx);
                }
                keys.insert(key);
                router.register(key, &tx);
                if let Err(e) = devices.submit(req) {
                    router.unregister(&std::iter::once(key).collect(), &tx);
                    let _ = tx.try_send(NodeMsg::Unavailable { reason: e.to_string() });
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "malformed client message; closing the connection");
                break;
            }
        }
    }
    // the connection is gone: the router must not keep its sender (the
    // writer task would wait on it forever, and the socket with it)
    router.unregister(&keys, &tx);
    drop(tx);
    // the writer ends once it has sent what was queued (no sender is left)
    let wait = if *router.closed.borrow() { Duration::from_millis(100) } else { Duration::from_secs(5) };
    if tokio::time::timeout(wait, &mut writer).await.is_err() {
        writer.abort();
    }
}

/// Serves clients on `listener` until the task is aborted.
/// At most [`MAX_CLIENT_CONNECTIONS`] at once; a connection past that is
/// closed at once (its client tries again or the other node).
pub async fn serve_clients(listener: Arc<TcpListener>, devices: Arc<Devices>, router: Arc<Router>) {
    let mut closed = router.closed.subscribe();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENT_CONNECTIONS));
    loop {
        let (s, _) = tokio::select! {
            a = common::retry::accept(|| listener.accept()) => a,
            _ = closed.wait_for(|c| *c) => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("too many client connections: closed one");
            continue;
        };
        let (devices, router) = (devices.clone(), router.clone());
        tokio::spawn(async move {
            let _slot = slot;
            serve_client(s, devices, router).await;
        });
    }
}
