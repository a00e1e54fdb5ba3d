//! The control API: what an operator (or `castor status|failover|unprotect|
//! switchover`) asks of a node.
//!
//! Where: a Unix socket by default (`--control PATH`), created with mode
//! 0600, and every connection's peer uid checked (SO_PEERCRED): only this
//! node's uid (and root) may use it. TCP only when asked for explicitly
//! (`--control tcp:ADDR`), and then with a bearer token read from a file
//! (`--control-token FILE`) on every request.
//!
//! HTTP/1.1 on both (hyper at both ends; the client is [`ask`]):
//! `GET /status`, `POST /failover`, `POST /unprotect`, `POST /switchover`,
//! one JSON object back. A command goes to the task that owns the node's
//! mode and is answered by it at once: applied, or refused with the reason
//! (never queued for later).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use common::auth::Secret;
use hyper::Method;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};

use crate::status::NodeStatus;

mod client;
pub use client::{ask, ask_async, Answer, AskError};

/// Where a node's control API is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ControlAddr {
    /// A Unix socket (mode 0600, peer uid checked).
    Unix(PathBuf),
    /// HTTP on TCP with a bearer token (`tcp:ADDR`).
    Tcp(SocketAddr),
}

impl FromStr for ControlAddr {
    type Err = ControlError;
    fn from_str(s: &str) -> Result<Self, ControlError> {
        if let Some(a) = s.strip_prefix("tcp:") {
            return a.parse().map(ControlAddr::Tcp).map_err(|_| ControlError::Address(s.chars().take(200).collect()));
        }
        if s.is_empty() || s.parse::<SocketAddr>().is_ok() {
            // a bare address would be TCP without anyone asking for it
            return Err(ControlError::Address(s.chars().take(200).collect()));
        }
        Ok(ControlAddr::Unix(PathBuf::from(s)))
    }
}

impl TryFrom<String> for ControlAddr {
    type Error = ControlError;
    fn try_from(s: String) -> Result<Self, ControlError> {
        s.parse()
    }
}

impl From<ControlAddr> for String {
    fn from(a: ControlAddr) -> String {
        a.to_string()
    }
}

impl std::fmt::Display for ControlAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlAddr::Unix(p) => write!(f, "{}", p.display()),
            ControlAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A bound control listener (see `listen.rs` for binding).
#[derive(Debug)]
pub enum ControlListener {
    /// Connections from `uid` (this node's) or root only.
    Unix { listener: UnixListener, socket: SocketFile, uid: u32 },
    /// Requests must carry `Authorization: Bearer <token>`.
    Tcp { listener: TcpListener, token: Arc<Secret> },
}

impl ControlListener {
    /// Where it listens (the bound port for TCP port 0).
    pub fn addr(&self) -> Option<ControlAddr> {
        match self {
            ControlListener::Unix { socket, .. } => Some(ControlAddr::Unix(socket.0.clone())),
            ControlListener::Tcp { listener, .. } => listener.local_addr().ok().map(ControlAddr::Tcp),
        }
    }
}

/// The socket's file, removed when the listener goes.
#[derive(Debug)]
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Commands that change a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Secondary: take over now.
    Failover,
    /// A primary that holds: stop holding, run unprotected.
    Unprotect,
    /// A protected primary: finish the current epoch, wait for its ack and
    /// hand over to the secondary, which takes over at once.
    Switchover,
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Command::Failover => "failover",
            Command::Unprotect => "unprotect",
            Command::Switchover => "switchover",
        }
    }
}

/// One control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Status,
    Act(Command),
}

/// Errors of the control API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("unknown command '{0}' (status, failover, unprotect, switchover)")]
    Unknown(String),
    #[error("{0} needs POST")]
    Method(&'static str),
    #[error("the node did not answer in time")]
    Timeout,
    #[error("this node takes no commands now")]
    NoHandler,
    #[error(
        "control address '{0}': give a Unix socket path, or tcp:HOST:PORT (HTTP with --control-token) to ask for TCP"
    )]
    Address(String),
    #[error("uid {0} may not use this control socket")]
    Uid(u32),
    #[error("missing or wrong bearer token")]
    Token,
}

impl FromStr for Request {
    type Err = ControlError;
    fn from_str(s: &str) -> Result<Self, ControlError> {
        match s {
            "status" => Ok(Request::Status),
            "failover" => Ok(Request::Act(Command::Failover)),
            "unprotect" => Ok(Request::Act(Command::Unprotect)),
            "switchover" => Ok(Request::Act(Command::Switchover)),
            other => Err(ControlError::Unknown(other.chars().take(64).collect())),
        }
    }
}

/// Why a node refused a command, as the operator reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// A command on its way to the task that owns the node's mode, with the
/// channel for its answer: what was done, or why not.
#[derive(Debug)]
pub struct ControlRequest {
    pub command: Command,
    pub reply: oneshot::Sender<Result<&'static str, Refused>>,
}

impl ControlRequest {
    /// Answers the request (the asker may have gone: nothing to do then).
    pub fn answer(self, r: Result<&'static str, Refused>) {
        let _ = self.reply.send(r);
    }
}

/// The answer to a command, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    fn done(action: &str) -> Reply {
        Reply { ok: true, action: Some(action.into()), error: None }
    }
    fn refused(why: impl ToString) -> Reply {
        Reply { ok: false, action: None, error: Some(why.to_string()) }
    }
    /// A refusal as its JSON text.
    fn refused_json(why: impl ToString) -> String {
        serde_json::to_string(&Reply::refused(why)).unwrap_or_default()
    }
}

/// How long a node may take to answer a command.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers one request: (HTTP status, JSON body).
async fn answer(req: Request, status: &NodeStatus, commands: &Option<mpsc::Sender<ControlRequest>>) -> (u16, String) {
    let json = |r: &Reply| serde_json::to_string(r).unwrap_or_default();
    let command = match req {
        Request::Status => return (200, serde_json::to_string(&status.snapshot()).unwrap_or_default()),
        Request::Act(c) => c,
    };
    let Some(tx) = commands else { return (409, json(&Reply::refused(ControlError::NoHandler))) };
    let (reply, rx) = oneshot::channel();
    if tx.send(ControlRequest { command, reply }).await.is_err() {
        return (409, json(&Reply::refused(ControlError::NoHandler)));
    }
    match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
        Ok(Ok(Ok(done))) => (200, json(&Reply::done(done))),
        Ok(Ok(Err(Refused(why)))) => (409, json(&Reply::refused(why))),
        Ok(Err(_)) => (409, json(&Reply::refused(ControlError::NoHandler))),
        Err(_) => (503, json(&Reply::refused(ControlError::Timeout))),
    }
}

/// An HTTP request: the request and whether its method fits.
fn http_request(method: &Method, path: &str) -> Result<Request, ControlError> {
    let req: Request = path.trim_start_matches('/').parse()?;
    match (req, method) {
        (Request::Status, &Method::GET | &Method::POST) => Ok(req),
        (Request::Act(_), &Method::POST) => Ok(req),
        (Request::Act(c), _) => Err(ControlError::Method(c.name())),
        (Request::Status, _) => Err(ControlError::Method("status")),
    }
}

async fn http_answer(
    req: crate::http::HttpRequest,
    token: Option<Arc<Secret>>,
    status: Arc<NodeStatus>,
    commands: Option<mpsc::Sender<ControlRequest>>,
) -> crate::http::Answer {
    if let Some(t) = &token {
        let presented = req.authorization.as_deref().and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("");
        if !t.matches(presented.trim().as_bytes()) {
            tracing::debug!("control request without the bearer token: refused");
            let body = Reply::refused_json(ControlError::Token);
            return (401, "application/json", body);
        }
    }
    let (method, path) = (req.method, req.path);
    let (code, body) = match http_request(&method, &path) {
        Ok(req) => answer(req, &status, &commands).await,
        Err(e @ ControlError::Method(_)) => (405, Reply::refused_json(e)),
        Err(e) => (404, Reply::refused_json(e)),
    };
    (code, "application/json", body)
}

/// Serves the control API until the task is dropped.
pub async fn serve_control(
    listener: ControlListener,
    status: Arc<NodeStatus>,
    commands: Option<mpsc::Sender<ControlRequest>>,
) {
    match listener {
        ControlListener::Unix { listener, socket, uid } => {
            let _socket = socket; // removed when this task ends
            loop {
                let (stream, _) = common::retry::accept(|| listener.accept()).await;
                let peer = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
                let (status, commands) = (status.clone(), commands.clone());
                tokio::spawn(async move {
                    if peer != uid && peer != 0 {
                        // a stranger on the host: told why (403), nothing done
                        tracing::debug!(peer, "control connection from another uid: refused");
                        let body = Reply::refused_json(ControlError::Uid(peer));
                        let refuse = move |_| std::future::ready((403, "application/json", body.clone()));
                        crate::http::serve_http(stream, refuse).await;
                        return;
                    }
                    serve_one(stream, None, status, commands).await;
                });
            }
        }
        ControlListener::Tcp { listener, token } => loop {
            let (stream, _) = common::retry::accept(|| listener.accept()).await;
            let (status, commands, token) = (status.clone(), commands.clone(), token.clone());
            tokio::spawn(serve_one(stream, Some(token), status, commands));
        },
    }
}

/// One control connection (HTTP; with a token on TCP).
async fn serve_one<S>(
    stream: S,
    token: Option<Arc<Secret>>,
    status: Arc<NodeStatus>,
    commands: Option<mpsc::Sender<ControlRequest>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handle = move |req| http_answer(req, token.clone(), status.clone(), commands.clone());
    crate::http::serve_http(stream, handle).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_http_methods_are_checked() {
        assert_eq!("status".parse::<Request>(), Ok(Request::Status));
        assert_eq!("unprotect".parse::<Request>(), Ok(Request::Act(Command::Unprotect)));
        assert!(matches!("reboot".parse::<Request>(), Err(ControlError::Unknown(_))));
        assert_eq!(http_request(&Method::GET, "/status"), Ok(Request::Status));
        assert_eq!(http_request(&Method::POST, "/failover"), Ok(Request::Act(Command::Failover)));
        // a GET (a browser's <img src=...>) must not act
        assert_eq!(http_request(&Method::GET, "/failover"), Err(ControlError::Method("failover")));
        assert_eq!(http_request(&Method::GET, "/unprotect"), Err(ControlError::Method("unprotect")));
    }

    #[test]
    fn replies_are_json() {
        let r = Reply::refused("a \"quoted\"\nreason");
        let v: serde_json::Value = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"], "a \"quoted\"\nreason");
        assert!(v.get("action").is_none());
    }

    fn owner(mut rx: mpsc::Receiver<ControlRequest>) {
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                match r.command {
                    Command::Failover => r.answer(Ok("failover started")),
                    _ => r.answer(Err(Refused("not holding".into()))),
                }
            }
        });
    }

    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: S, req: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
        let (r, mut w) = tokio::io::split(s);
        w.write_all(req.as_bytes()).await.unwrap();
        w.shutdown().await.unwrap();
        let mut out = String::new();
        BufReader::new(r).read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn a_command_is_answered_by_its_owner_or_refused() {
        let dir = std::env::temp_dir().join(format!("castor-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let addr = ControlAddr::Unix(dir.join("c.ctl"));
        let l = crate::listen::bind_control(&addr, None).await.unwrap();
        let (tx, rx) = mpsc::channel::<ControlRequest>(1);
        owner(rx);
        tokio::spawn(serve_control(l, Arc::new(NodeStatus::default()), Some(tx)));
        let ControlAddr::Unix(path) = addr.clone() else { unreachable!() };
        let ask = |req: &'static str| {
            let path = path.clone();
            async move { exchange(tokio::net::UnixStream::connect(&path).await.unwrap(), req).await }
        };
        // the client the CLI uses: the status and the body, whatever the status
        let a = ask_async(&addr, "failover", None).await.unwrap();
        assert_eq!(a.status, hyper::StatusCode::OK);
        assert!(a.body.contains("\"ok\":true") && a.body.contains("failover started"), "{a:?}");
        let a = ask_async(&addr, "unprotect", None).await.unwrap();
        assert_eq!(a.status, hyper::StatusCode::CONFLICT);
        assert!(a.body.contains("\"ok\":false") && a.body.contains("not holding"), "{a:?}");
        let a = ask_async(&addr, "reboot", None).await.unwrap();
        assert_eq!(a.status, hyper::StatusCode::NOT_FOUND, "{a:?}");
        // the line form is gone: not HTTP, so no JSON answer
        let a = ask("failover\n").await;
        assert!(a.is_empty() || a.starts_with("HTTP/1.1 400"), "{a}");
        let a = ask("GET /unprotect HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(a.starts_with("HTTP/1.1 405"), "{a}");
        let a = ask("POST /unprotect HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(a.starts_with("HTTP/1.1 409") && a.contains("not holding"), "{a}");
        let a = ask("GET /status HTTP/1.1\r\n\r\n").await;
        assert!(a.starts_with("HTTP/1.1 200") && a.contains("\"role\":\"secondary\""), "{a}");
        let a = ask("GET /reboot HTTP/1.1\r\n\r\n").await;
        assert!(a.starts_with("HTTP/1.1 404"), "{a}");
        // the blocking client, from a thread without a runtime and from
        // inside another runtime
        let a2 = addr.clone();
        let st = tokio::task::spawn_blocking(move || super::ask(&a2, "status", None)).await.unwrap().unwrap();
        assert!(st.status.is_success() && st.body.contains("\"role\""), "{st:?}");
        let inside = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async { super::ask(&addr, "status", None) })
        });
        let st = tokio::task::spawn_blocking(move || inside.join().unwrap()).await.unwrap().unwrap();
        assert!(st.body.contains("\"role\""), "{st:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn tcp_needs_the_bearer_token_on_every_request() {
        let dir = std::env::temp_dir().join(format!("castor-control-tcp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        common::auth::write_secret_file(&token, b"0123456789abcdef-token").unwrap();
        let l = crate::listen::bind_control(&"tcp:127.0.0.1:0".parse().unwrap(), Some(&token)).await.unwrap();
        let Some(ControlAddr::Tcp(addr)) = l.addr() else { panic!("not tcp") };
        let (tx, rx) = mpsc::channel::<ControlRequest>(1);
        owner(rx);
        tokio::spawn(serve_control(l, Arc::new(NodeStatus::default()), Some(tx)));
        let ask =
            |req: String| async move { exchange(tokio::net::TcpStream::connect(addr).await.unwrap(), &req).await };
        let post = |auth: &str| format!("POST /failover HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n");
        let a = ask(post("")).await;
        assert!(a.starts_with("HTTP/1.1 401"), "{a}");
        let a = ask(post("Authorization: Bearer 0123456789abcdef-tokeX\r\n")).await;
        assert!(a.starts_with("HTTP/1.1 401"), "{a}");
        let a = ask("GET /status HTTP/1.1\r\n\r\n".into()).await;
        assert!(a.starts_with("HTTP/1.1 401"), "even status needs the token: {a}");
        let a = ask(post("Authorization: Bearer 0123456789abcdef-token\r\n")).await;
        assert!(a.starts_with("HTTP/1.1 200") && a.contains("failover started"), "{a}");
        // not HTTP: nothing done, no JSON answer
        let a = ask("failover\n".into()).await;
        assert!(a.is_empty() || a.starts_with("HTTP/1.1 400"), "{a}");
        let a = ask_async(&ControlAddr::Tcp(addr), "failover", None).await.unwrap();
        assert_eq!(a.status, hyper::StatusCode::UNAUTHORIZED);
        assert!(a.body.contains("bearer token"), "{a:?}");
        // the blocking client with the token
        let secret = Secret::token_from_file(&token).unwrap();
        let a = tokio::task::spawn_blocking(move || super::ask(&ControlAddr::Tcp(addr), "status", Some(&secret)))
            .await
            .unwrap()
            .unwrap();
        assert!(a.status.is_success() && a.body.contains("\"role\""), "{a:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn control_addresses_say_what_they_are() {
        assert_eq!("/run/castor/a.ctl".parse::<ControlAddr>(), Ok(ControlAddr::Unix("/run/castor/a.ctl".into())));
        assert_eq!(
            "tcp:127.0.0.1:7300".parse::<ControlAddr>(),
            Ok(ControlAddr::Tcp("127.0.0.1:7300".parse().unwrap()))
        );
        // a bare address is not taken as TCP without asking
        assert!(matches!("127.0.0.1:7300".parse::<ControlAddr>(), Err(ControlError::Address(_))));
        assert!(matches!("tcp:nonsense".parse::<ControlAddr>(), Err(ControlError::Address(_))));
        for a in ["x.ctl", "tcp:[::1]:9"] {
            assert_eq!(a.parse::<ControlAddr>().unwrap().to_string(), a);
        }
    }
}
