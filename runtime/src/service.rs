//! The client service port of a node that does not serve (yet): a
//! secondary binds its service address when it starts, so the address is
//! its own from the start, and answers every request with `Unavailable` so
//! clients try the other node at once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::service::{NodeMsg, MAX_SERVICE_FRAME};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// The service protocol's framing.
pub fn service_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(MAX_SERVICE_FRAME).new_codec()
}

/// Answers every request on `listener` with `Unavailable { reason }` and
/// closes, until the task is aborted.
pub async fn serve_unavailable(listener: Arc<TcpListener>, reason: &'static str) {
    loop {
        let (s, _) = common::retry::accept(|| listener.accept()).await;
        tokio::spawn(async move {
            let mut f = Framed::new(s, service_codec());
            if let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(2), f.next()).await {
                let msg = NodeMsg::Unavailable { reason: reason.into() };
                if let Ok(b) = common::codec::encode(&msg) {
                    let _ = f.send(Bytes::from(b)).await;
                }
            }
        });
    }
}
