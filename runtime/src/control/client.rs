//! The control API's client: one HTTP/1.1 request (hyper's client) over
//! the node's Unix socket or TCP, for command-line tools and test harnesses.

use std::time::Duration;

use common::auth::Secret;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{ControlAddr, ANSWER_TIMEOUT};

/// Longest reply body read (a status object is a few KiB).
const MAX_REPLY: usize = 1 << 20;

/// How long connecting over TCP may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A node's answer: the HTTP status and its JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    pub body: String,
}

/// Why a control request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("cannot start the client: {0}")]
    Runtime(std::io::Error),
    #[error("'{0}' is not a control request")]
    Request(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("unreadable reply: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    #[error("the reply is not UTF-8 text")]
    Utf8,
    #[error("no answer within {} s", .0.as_secs())]
    Timeout(Duration),
}

/// Sends one request (`status`, `failover`, ...) to a node's control API
/// and returns its answer, whatever its status (a refusal is a 4xx with the
/// reason in the JSON body). `status` is a GET, a command a POST; TCP
/// carries the bearer `token`. Blocking: it runs its own small runtime (on
/// a thread of its own when called from inside one). Waits longer than a
/// node may take to answer.
pub fn ask(control: &ControlAddr, request: &str, token: Option<&Secret>) -> Result<Answer, AskError> {
    let run = || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(AskError::Runtime)?;
        rt.block_on(ask_async(control, request, token))
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        // block_on inside a runtime would panic: a thread without one
        std::thread::scope(|s| s.spawn(run).join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    } else {
        run()
    }
}

/// [`ask`] for async callers.
pub async fn ask_async(control: &ControlAddr, request: &str, token: Option<&Secret>) -> Result<Answer, AskError> {
    let wait = ANSWER_TIMEOUT + Duration::from_secs(1);
    let method = if request == "status" { Method::GET } else { Method::POST };
    let mut req =
        hyper::Request::builder().method(method).uri(format!("/{request}")).header(hyper::header::HOST, "castor");
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {}", t.as_text()));
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|_| AskError::Request(request.chars().take(64).collect()))?;
    let exchange = async {
        match control {
            ControlAddr::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path).await.map_err(AskError::Connect)?;
                exchange(s, req).await
            }
            ControlAddr::Tcp(addr) => {
                let s = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| AskError::Timeout(CONNECT_TIMEOUT))?
                    .map_err(AskError::Connect)?;
                exchange(s, req).await
            }
        }
    };
    tokio::time::timeout(wait, exchange).await.map_err(|_| AskError::Timeout(wait))?
}

/// One request on a fresh connection, and its whole answer.
async fn exchange<S>(stream: S, req: hyper::Request<Empty<Bytes>>) -> Result<Answer, AskError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // the connection is driven beside the request; it ends with the answer
    let conn = tokio::spawn(conn);
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_REPLY).collect().await.map_err(AskError::Body)?.to_bytes();
    conn.abort();
    let body = String::from_utf8(body.to_vec()).map_err(|_| AskError::Utf8)?;
    Ok(Answer { status, body })
}
