//! The read half that counts an authenticated data session's bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A connection's read half that, once armed (the peer authenticated on a
/// data channel), counts every byte read into the node's counter: bytes,
/// not frames, since one frame can take seconds on a slow link.
pub(super) struct CountingRead<R> {
    pub(super) inner: R,
    pub(super) count: Arc<AtomicU64>,
    pub(super) armed: bool,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountingRead<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.armed {
            self.count.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        }
        r
    }
}
