//! The control API: what an operator (or `castor status|failover|unprotect`)
//! asks of a node, on loopback.
//!
//! Two forms on one port. One request per line (`status`, `failover`,
//! `unprotect`, `switchover`), one JSON object per line back; or HTTP
//! (hyper): `GET /status`, `POST /failover`, `POST /unprotect`,
//! `POST /switchover`, one JSON object back. A command goes
//! to the task that owns the node's mode and is answered by it at once:
//! applied, or refused with the reason (never queued for later).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::status::NodeStatus;

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
}

/// How long a node may take to answer a command.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Sends one request line to a node's control API and returns its reply
/// line (blocking: for command-line tools and test harnesses). Waits longer
/// than a node may take to answer.
pub fn ask(control: std::net::SocketAddr, line: &str) -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect_timeout(&control, Duration::from_secs(2))?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT + Duration::from_secs(1)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    std::io::BufReader::new(s).read_line(&mut reply)?;
    Ok(reply)
}

/// Longest request line or header line read.
const MAX_LINE: usize = 4096;

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
    method: Method,
    path: String,
    status: Arc<NodeStatus>,
    commands: Option<mpsc::Sender<ControlRequest>>,
) -> crate::http::Answer {
    let (code, body) = match http_request(&method, &path) {
        Ok(req) => answer(req, &status, &commands).await,
        Err(e @ ControlError::Method(_)) => (405, serde_json::to_string(&Reply::refused(e)).unwrap_or_default()),
        Err(e) => (404, serde_json::to_string(&Reply::refused(e)).unwrap_or_default()),
    };
    (code, "application/json", body)
}

/// Reads one line of at most [`MAX_LINE`] bytes; `None` at the end or past the limit.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, buf: &mut String) -> Option<()> {
    buf.clear();
    let mut limited = (&mut *r).take(MAX_LINE as u64);
    match tokio::io::AsyncBufReadExt::read_line(&mut limited, buf).await {
        Ok(0) | Err(_) => None,
        Ok(_) if !buf.ends_with('\n') => None,
        Ok(_) => Some(()),
    }
}

/// Serves the control API until the task is dropped.
pub async fn serve_control(
    listener: TcpListener,
    status: Arc<NodeStatus>,
    commands: Option<mpsc::Sender<ControlRequest>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // out of descriptors or similar: do not spin
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (status, commands) = (status.clone(), commands.clone());
        tokio::spawn(async move {
            // HTTP requests start with an upper-case method; line commands
            // are lower case
            let mut first = [0u8; 1];
            match tokio::time::timeout(Duration::from_secs(5), stream.peek(&mut first)).await {
                Ok(Ok(1)) if first[0].is_ascii_uppercase() => {
                    let handle = move |m, p| http_answer(m, p, status.clone(), commands.clone());
                    crate::http::serve_http(stream, handle).await;
                }
                Ok(Ok(1)) => serve_lines(stream, &status, &commands).await,
                _ => {}
            }
        });
    }
}

/// The line form: one request per line, one JSON line back.
async fn serve_lines(stream: TcpStream, status: &NodeStatus, commands: &Option<mpsc::Sender<ControlRequest>>) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    while read_line(&mut r, &mut line).await.is_some() {
        let body = match line.trim().parse::<Request>() {
            Ok(req) => answer(req, status, commands).await.1,
            Err(e) => serde_json::to_string(&Reply::refused(e)).unwrap_or_default(),
        };
        if w.write_all(format!("{body}\n").as_bytes()).await.is_err() {
            break;
        }
    }
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

    #[tokio::test]
    async fn a_command_is_answered_by_its_owner_or_refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel::<ControlRequest>(1);
        let status = Arc::new(NodeStatus::default());
        tokio::spawn(serve_control(l, status, Some(tx)));
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                match r.command {
                    Command::Failover => r.answer(Ok("failover started")),
                    Command::Unprotect | Command::Switchover => r.answer(Err(Refused("not holding".into()))),
                }
            }
        });
        let ask = |req: &'static str| async move {
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (r, mut w) = s.into_split();
            w.write_all(req.as_bytes()).await.unwrap();
            w.shutdown().await.unwrap();
            let mut out = String::new();
            BufReader::new(r).read_to_string(&mut out).await.unwrap();
            out
        };
        let a = ask("failover\n").await;
        assert!(a.contains("\"ok\":true") && a.contains("failover started"), "{a}");
        let a = ask("unprotect\n").await;
        assert!(a.contains("\"ok\":false") && a.contains("not holding"), "{a}");
        let a = ask("GET /unprotect HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(a.starts_with("HTTP/1.1 405"), "{a}");
        let a = ask("POST /unprotect HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(a.starts_with("HTTP/1.1 409") && a.contains("not holding"), "{a}");
        let a = ask("GET /status HTTP/1.1\r\n\r\n").await;
        assert!(a.starts_with("HTTP/1.1 200") && a.contains("\"role\":\"secondary\""), "{a}");
        let a = ask("GET /reboot HTTP/1.1\r\n\r\n").await;
        assert!(a.starts_with("HTTP/1.1 404"), "{a}");
    }
}
