//! The heartbeat channel: every heartbeat is answered on the heartbeat
//! thread (`common::beats`), so a reply waits for nothing the node's
//! runtime does (a sync's frames being opened and stored, an epoch's
//! apply). The thread marks each heartbeat in the node's liveness record
//! at once (`ReceiverConfig::liveness`), so the node's silence check sees it
//! even while the node's runtime is busy.

use std::sync::atomic::Ordering;

use common::beats::Moved;
use common::frame::{FrameOpener, FrameSealer};
use common::proto::Message;
use futures::{SinkExt, StreamExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::task::AbortOnDropHandle;

use super::counting::CountingRead;
use super::{ReceiverConfig, ReceiverError, SessionEnd};

/// Answers the heartbeats of an authenticated heartbeat channel until it
/// ends. Each reply carries our generation (it tells a fenced primary that
/// it has been replaced) and how many bytes of data sessions we have read.
pub(super) async fn answer(
    rx: FramedRead<CountingRead<OwnedReadHalf>, FrameOpener>,
    tx: FramedWrite<OwnedWriteHalf, FrameSealer>,
    cfg: &ReceiverConfig,
) -> Result<SessionEnd, ReceiverError> {
    let moved = Moved::detach_mapped(rx, |c| c.inner, tx)?;
    let (generation, received, liveness) = (cfg.generation.clone(), cfg.data_received.clone(), cfg.liveness.clone());
    let replies = AbortOnDropHandle::new(common::beats::spawn(async move {
        let (mut rx, mut tx) = moved.attach()?;
        loop {
            let Some(frame) = rx.next().await else {
                return Ok(SessionEnd::Closed);
            };
            let frame = frame.map_err(ReceiverError::Frame)?;
            match Message::decode(frame.kind, frame.payload)? {
                Message::Heartbeat { seq, time_us, .. } => {
                    common::sync::lock(&liveness).heard_now();
                    let reply = Message::Heartbeat {
                        generation: generation.load(Ordering::SeqCst),
                        seq,
                        time_us,
                        received: received.load(Ordering::Relaxed),
                    };
                    tx.send(reply.to_frame()).await.map_err(ReceiverError::Frame)?;
                }
                Message::Shutdown { .. } => return Ok(SessionEnd::Shutdown),
                Message::Refused { code, reason } => return Err(ReceiverError::RefusedByPrimary { code, reason }),
                other => return Err(ReceiverError::Unexpected(other.kind(), "on the heartbeat channel")),
            }
        }
    }));
    replies.await.unwrap_or_else(|e| Err(ReceiverError::BeatsTask(e.to_string())))
}
