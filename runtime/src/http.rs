//! HTTP for the control API and metrics, served by hyper: one request per
//! connection, bounded in time.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// How long one HTTP exchange may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a handler answers: status, content type, body.
pub type Answer = (u16, &'static str, String);

/// What a handler is given of a request.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: Method,
    pub path: String,
    /// The `Authorization` header, if any (and valid text).
    pub authorization: Option<String>,
}

/// Serves one HTTP/1.1 connection: `handle(request)` answers each request.
pub async fn serve_http<S, F, Fut>(stream: S, handle: F)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(HttpRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Answer> + Send,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let handle = handle.clone();
        async move {
            let r = HttpRequest {
                method: req.method().clone(),
                path: req.uri().path().to_string(),
                authorization: req
                    .headers()
                    .get(hyper::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            };
            let (code, ctype, body) = handle(r).await;
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
                resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .half_close(true)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, conn).await;
}
