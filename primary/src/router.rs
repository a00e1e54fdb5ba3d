//! Output routing and the client service: requests from clients go into the
//! guest's device; output that output commit releases goes back to the
//! client that asked (and to the release log and console).

use std::collections::HashMap;
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

/// Routes released output to the clients that asked.
#[derive(Debug)]
pub struct Router {
    node: String,
    generation: u64,
    clients: Mutex<HashMap<u32, mpsc::Sender<NodeMsg>>>,
    log: Option<Mutex<std::fs::File>>,
    print_console: bool,
    status: Arc<NodeStatus>,
    /// Set once this node stops serving (handed over, fenced, stopped):
    /// client connections close so clients move on at once.
    closed: tokio::sync::watch::Sender<bool>,
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
            clients: Mutex::new(HashMap::new()),
            log,
            print_console,
            status,
            closed: tokio::sync::watch::channel(false).0,
        }
    }

    /// Stops serving: every client connection closes (its clients retry
    /// against the other node at once), and no new one is taken.
    pub fn close(&self) {
        self.closed.send_replace(true);
        lock(&self.clients).clear();
    }

    fn register(&self, client: u32, tx: mpsc::Sender<NodeMsg>) {
        lock(&self.clients).insert(client, tx);
    }

    /// Forgets the clients a closed connection registered (unless a newer
    /// connection of the same client took over since).
    fn unregister(&self, ids: &std::collections::HashSet<u32>, tx: &mpsc::Sender<NodeMsg>) {
        let mut c = lock(&self.clients);
        for id in ids {
            if c.get(id).is_some_and(|t| t.same_channel(tx)) {
                c.remove(id);
            }
        }
    }

    /// Releases output: it leaves castor now. `decided_us`: when the
    /// release was decided ([`wall_us`] just after the decision). A process
    /// stopped (SIGSTOP, a frozen host) between deciding and emitting
    /// finishes emitting when it resumes; the time shows it decided before.
    pub fn release(&self, outputs: Vec<Output>, decided_us: u128) {
        if outputs.is_empty() {
            return;
        }
        let clients = lock(&self.clients);
        let mut log_lines = String::new();
        let n = outputs.len() as u64;
        for o in outputs {
            match o {
                Output::Kv(resp) => {
                    if self.log.is_some() {
                        log_lines.push_str(&format!(
                            "{} {} {} {} {decided_us}\n",
                            self.node, self.generation, resp.client, resp.seq
                        ));
                    }
                    if let Some(tx) = clients.get(&resp.client) {
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
            }
        }
        if let Some(f) = &self.log {
            use std::io::Write;
            let _ = lock(f).write_all(log_lines.as_bytes());
        }
        self.status.update(|s| s.released_outputs += n);
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
    let mut ids = std::collections::HashSet::new();
    let mut closed = router.closed.subscribe();
    loop {
        let frame = tokio::select! {
            f = source.next() => f,
            _ = closed.wait_for(|c| *c) => None,
        };
        let Some(Ok(frame)) = frame else { break };
        match common::codec::decode::<ClientMsg>(&frame) {
            Ok(ClientMsg::Request(req)) => {
                ids.insert(req.client);
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
    // the connection is gone: the router must not keep its sender (the
    // writer task would wait on it forever, and the socket with it)
    router.unregister(&ids, &tx);
    drop(tx);
    // the writer ends once it has sent what was queued (no sender is left)
    let wait = if *router.closed.borrow() { Duration::from_millis(100) } else { Duration::from_secs(5) };
    if tokio::time::timeout(wait, &mut writer).await.is_err() {
        writer.abort();
    }
}

/// Serves clients on `listener` until the task is aborted.
pub async fn serve_clients(listener: Arc<TcpListener>, devices: Arc<Devices>, router: Arc<Router>) {
    let mut closed = router.closed.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = closed.wait_for(|c| *c) => return,
        };
        let Ok((s, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(serve_client(s, devices.clone(), router.clone()));
    }
}
