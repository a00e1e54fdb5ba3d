//! Prometheus metrics over HTTP (OpenMetrics text from prometheus-client,
//! served by hyper).

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::status::NodeStatus;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves the node's metrics (any GET gets them) until dropped.
pub async fn serve_metrics(listener: TcpListener, status: Arc<NodeStatus>) {
    loop {
        let (stream, _) = common::retry::accept(|| listener.accept()).await;
        let status = status.clone();
        tokio::spawn(crate::http::serve_http(stream, move |req: crate::http::HttpRequest| {
            let status = status.clone();
            async move {
                match req.method {
                    hyper::Method::GET | hyper::Method::HEAD => (200, OPENMETRICS, status.metrics()),
                    _ => (405, "text/plain", "metrics take GET\n".to_string()),
                }
            }
        }));
    }
}
