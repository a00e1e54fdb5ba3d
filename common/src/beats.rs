//! The heartbeat thread: one tokio runtime of a single thread, apart from
//! the node's runtime, on which both sides of a pair send, answer and read
//! heartbeats.
//!
//! Heartbeats are the one traffic whose lateness is taken for death. On the
//! node's runtime they waited behind whatever its workers did: sealing or
//! opening a sync's megabytes, an epoch's frames. With one worker a loaded
//! host lost its session that way (2 of 8 runs of the 1 GiB sync test under
//! two busy loops, docs/benchmarks.md), so nodes ran two workers, and every
//! hand-off of the data path between the two cost a cross-thread wake. Here
//! nothing but heartbeats runs, so a reply waits at most for the thread to
//! get a core, and the data path can run on one worker.
//!
//! A connection is moved here after its handshake ([`Moved`]): its socket
//! leaves the node runtime's reactor and joins this thread's, with the
//! framing state (keys, sequence numbers, buffered bytes) carried over.

use std::future::Future;
use std::sync::OnceLock;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::frame::{FrameOpener, FrameSealer};

/// Errors of moving a connection to the heartbeat thread.
#[derive(Debug, thiserror::Error)]
pub enum BeatsError {
    #[error("the two halves are not of one connection")]
    NotOneConnection,
    #[error("cannot move the connection to the heartbeat thread: {0}")]
    Move(std::io::Error),
}

/// A moved connection's read half: the bytes its old reader had buffered,
/// then the socket.
pub type BeatRead = tokio::io::Chain<std::io::Cursor<BytesMut>, OwnedReadHalf>;
/// A heartbeat connection's read side on this thread.
pub type BeatRx = FramedRead<BeatRead, FrameOpener>;
/// A heartbeat connection's write side on this thread.
pub type BeatTx = FramedWrite<OwnedWriteHalf, FrameSealer>;

/// The heartbeat thread's runtime, started on first use.
fn handle() -> &'static Handle {
    static HANDLE: OnceLock<Handle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("heartbeat runtime");
        let handle = rt.handle().clone();
        std::thread::Builder::new()
            .name("castor-beats".into())
            // runs for the life of the process: its tasks end with their
            // sessions (their owners abort them)
            .spawn(move || rt.block_on(std::future::pending::<()>()))
            .expect("heartbeat thread");
        handle
    })
}

/// Runs `fut` on the heartbeat thread. The handle can be awaited (and
/// aborted) from any runtime.
pub fn spawn<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    handle().spawn(fut)
}

/// A framed connection taken off the runtime it was made on, to be opened
/// again on the heartbeat thread ([`Moved::attach`], called in a task
/// [`spawn`] runs).
#[derive(Debug)]
pub struct Moved {
    stream: std::net::TcpStream,
    opener: FrameOpener,
    /// What the reader had buffered beyond the last frame it returned.
    read_buf: BytesMut,
    sealer: FrameSealer,
    /// What the writer had not written yet.
    write_buf: BytesMut,
}

impl Moved {
    /// Takes a connection's framed halves off their runtime (between
    /// frames: what the reader buffered beyond the last frame goes along).
    pub fn detach(
        rx: FramedRead<OwnedReadHalf, FrameOpener>,
        tx: FramedWrite<OwnedWriteHalf, FrameSealer>,
    ) -> Result<Moved, BeatsError> {
        Self::detach_mapped(rx, |r| r, tx)
    }

    /// As [`Moved::detach`], for a reader that wraps the read half
    /// (`inner` unwraps it).
    pub fn detach_mapped<R>(
        rx: FramedRead<R, FrameOpener>,
        inner: impl FnOnce(R) -> OwnedReadHalf,
        tx: FramedWrite<OwnedWriteHalf, FrameSealer>,
    ) -> Result<Moved, BeatsError> {
        let r = rx.into_parts();
        let w = tx.into_parts();
        let stream = inner(r.io).reunite(w.io).map_err(|_| BeatsError::NotOneConnection)?;
        let stream = stream.into_std().map_err(BeatsError::Move)?;
        Ok(Moved { stream, opener: r.codec, read_buf: r.read_buf, sealer: w.codec, write_buf: w.write_buf })
    }

    /// Opens the connection again on the runtime this runs in (the
    /// heartbeat thread's, in a task [`spawn`] runs).
    pub fn attach(self) -> Result<(BeatRx, BeatTx), BeatsError> {
        let stream = TcpStream::from_std(self.stream).map_err(BeatsError::Move)?;
        let (r, w) = stream.into_split();
        // (the buffered bytes are read first, as if from the socket: a new
        // reader decodes nothing before its first read returns)
        let rx = FramedRead::new(std::io::Cursor::new(self.read_buf).chain(r), self.opener);
        let mut tx = FramedWrite::new(w, self.sealer);
        tx.write_buffer_mut().extend_from_slice(&self.write_buf);
        Ok((rx, tx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{codecs, PROTOCOL_VERSION};
    use crate::proto::Message;
    use futures::{SinkExt, StreamExt};

    fn beat(seq: u64) -> Message {
        Message::Heartbeat { generation: 1, seq, time_us: seq, received: 0 }
    }

    fn seq_of(f: crate::frame::Frame) -> u64 {
        match Message::decode(f.kind, f.payload).unwrap() {
            Message::Heartbeat { seq, .. } => seq,
            other => panic!("{:?}", other.kind()),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_moved_connection_keeps_its_keys_sequence_and_buffered_frames() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (client, server) = (client.unwrap(), server.unwrap().0);
        let (ti, tr) = crate::link::pair(&crate::auth::Secret::generate().unwrap()).unwrap();
        let (c_seal, c_open) = codecs(PROTOCOL_VERSION, PROTOCOL_VERSION, ti);
        let (s_seal, s_open) = codecs(PROTOCOL_VERSION, PROTOCOL_VERSION, tr);
        let (cr, cw) = client.into_split();
        let (mut crx, mut ctx) = (FramedRead::new(cr, c_open), FramedWrite::new(cw, c_seal));
        let (sr, sw) = server.into_split();
        let (mut srx, mut stx) = (FramedRead::new(sr, s_open), FramedWrite::new(sw, s_seal));
        // one exchange before the move: both sides' sequence numbers moved on
        ctx.send(beat(0).to_frame()).await.unwrap();
        assert_eq!(seq_of(srx.next().await.unwrap().unwrap()), 0);
        stx.send(beat(100).to_frame()).await.unwrap();
        assert_eq!(seq_of(crx.next().await.unwrap().unwrap()), 100);
        // two frames in one write: the server's reader takes both in one
        // read, opens one here and leaves the other in its buffer
        ctx.feed(beat(1).to_frame()).await.unwrap();
        ctx.feed(beat(2).to_frame()).await.unwrap();
        ctx.flush().await.unwrap();
        assert_eq!(seq_of(srx.next().await.unwrap().unwrap()), 1);
        assert!(!srx.read_buffer().is_empty(), "the second frame waits in the reader's buffer");
        let moved = Moved::detach(srx, stx).unwrap();
        let moved_side = spawn(async move {
            let (mut rx, mut tx) = moved.attach().unwrap();
            let buffered = seq_of(rx.next().await.unwrap().unwrap());
            tx.send(beat(101).to_frame()).await.unwrap();
            let read_here = seq_of(rx.next().await.unwrap().unwrap());
            (buffered, read_here, std::thread::current().name().map(str::to_owned))
        });
        // the moved side's answer opens with the client's keys (its sealer
        // carried its sequence over), and it reads what comes next
        assert_eq!(seq_of(crx.next().await.unwrap().unwrap()), 101);
        ctx.send(beat(3).to_frame()).await.unwrap();
        let (buffered, read_here, thread) = moved_side.await.unwrap();
        assert_eq!((buffered, read_here), (2, 3));
        assert_eq!(thread.as_deref(), Some("castor-beats"));
    }
}
