//! HTTP for the control API and metrics, served by hyper: one request per
//! connection, bounded in time.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long one HTTP exchange may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a handler answers: status, content type, body.
pub type Answer = (u16, &'static str, String);

/// Serves one HTTP/1.1 connection: `handle(method, path)` answers each request.
pub async fn serve_http<F, Fut>(stream: TcpStream, handle: F)
where
    F: Fn(Method, String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Answer> + Send,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let handle = handle.clone();
        async move {
            let (code, ctype, body) = handle(req.method().clone(), req.uri().path().to_string()).await;
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
