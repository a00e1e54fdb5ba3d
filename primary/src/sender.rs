//! The primary's side of a replication connection: handshake, full sync, epochs.

use std::net::SocketAddr;

use bytes::Bytes;
use common::auth::Secret;
use common::frame::{FrameError, FrameOpener, FrameSealer, OutFrame, PROTOCOL_VERSION};
use common::link::LinkError;
use common::proto::{
    self, Channel, EpochChecksum, EpochEnd, Hello, HelloAck, Message, Page, PairMismatch, PairSettings, ProtoError,
    RefuseCode,
};
use common::state::{CpuModel, MachineState, VmShape};
use futures::{SinkExt, StreamExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::{FramedRead, FramedWrite};

/// Errors of the sending side.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    #[error("connect to {addr}: {err}")]
    Connect { addr: SocketAddr, err: std::io::Error },
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("message: {0}")]
    Proto(#[from] ProtoError),
    #[error("the secondary refused us: {reason}")]
    Refused { code: RefuseCode, reason: String },
    #[error("the link handshake failed: {0}")]
    Link(#[from] LinkError),
    #[error("secondary closed the connection {0}")]
    Closed(&'static str),
    #[error("{0} timed out")]
    TimedOut(&'static str),
    #[error("unexpected {0:?} from the secondary")]
    Unexpected(proto::Kind),
    #[error("no randomness: {0}")]
    Random(String),
    #[error("the secondary's settings do not fit ours, refused: {0}")]
    PairMismatch(#[from] PairMismatch),
}

type Rx = FramedRead<OwnedReadHalf, FrameOpener>;
type Tx = FramedWrite<OwnedWriteHalf, FrameSealer>;

/// An authenticated replication session. Sending goes through its
/// [`SessionWriter`] (the session dereferences to it).
#[derive(Debug)]
pub struct Session {
    reader: SessionReader,
    writer: SessionWriter,
    /// The secondary's answer to the handshake.
    pub ack: HelloAck,
}

fn refused(m: Message) -> SenderError {
    match m {
        Message::Refused { code, reason } => SenderError::Refused { code, reason },
        other => SenderError::Unexpected(other.kind()),
    }
}

/// Receives one message (`None` when the peer closed cleanly), from a
/// session's reader or a moved one's ([`attach_halves`]).
pub(crate) async fn recv<R: tokio::io::AsyncRead + Unpin>(
    rx: &mut FramedRead<R, FrameOpener>,
) -> Result<Option<Message>, SenderError> {
    match rx.next().await {
        None => Ok(None),
        Some(f) => {
            let f = f?;
            Ok(Some(Message::decode(f.kind, f.payload)?))
        }
    }
}

async fn send_full_sync(tx: &mut Tx, first: bool, pages: Vec<Page>) -> Result<(), SenderError> {
    if first {
        tx.feed(Message::SyncBegin.to_frame()).await?;
    }
    for c in proto::chunk_pages(0, pages) {
        tx.feed(Message::FullSyncChunk(c).to_frame()).await?;
        // sealing a MiB takes milliseconds, and a loopback socket is always
        // writable: without a yield this task ran for 100+ ms, the runtime
        // polled no timer meanwhile, and heartbeats went out late enough
        // to end the session (see yield_between_frames)
        yield_between_frames().await;
    }
    tx.flush().await?;
    Ok(())
}

/// Lets the runtime poll its timers and sockets between two frames of a
/// long send. A task that never has to wait runs until the runtime's
/// cooperative budget stops it (128 socket writes, here 128 sealed MiB):
/// on this 2-core host that kept timers unpolled for a tenth of a second
/// and more (docs/benchmarks.md, "Figures once kept in comments"), the
/// heartbeat task fired that late and the session ended as if the
/// secondary were gone. `yield_now` wakes this task again only after the
/// runtime has polled its driver.
pub(crate) async fn yield_between_frames() {
    tokio::task::yield_now().await;
}

async fn send_epoch(
    tx: &mut Tx,
    epoch: u64,
    full: bool,
    pages: Vec<Page>,
    state: MachineState,
    digest: Option<u64>,
) -> Result<(), SenderError> {
    let mut sum = EpochChecksum::default();
    for p in &pages {
        sum.add(p);
    }
    let page_count = pages.len() as u64;
    tx.send(Message::EpochBegin { epoch, page_count, full }.to_frame()).await?;
    common::crashpoint::hit("primary.after_epoch_begin");
    let chunks = proto::chunk_pages(epoch, pages);
    let half = chunks.len() / 2;
    for (i, c) in chunks.into_iter().enumerate() {
        tx.feed(Message::PageChunk(c).to_frame()).await?;
        yield_between_frames().await;
        if i + 1 == half.max(1) {
            tx.flush().await?;
            common::crashpoint::hit("primary.mid_chunks");
        }
    }
    // the state travels in chunks too: a long epoch's undrained output can
    // be larger than one frame
    let end = EpochEnd { epoch, page_count, checksum: sum.value(), digest, state };
    for m in end.into_messages()? {
        tx.feed(m.to_frame()).await?;
    }
    tx.flush().await?;
    common::crashpoint::hit("primary.after_epoch_end");
    Ok(())
}

/// What a primary offers in its Hello: the VM's shape and CPU, its
/// generation, and the settings its secondary must share.
#[derive(Debug, Clone)]
pub struct Offer {
    pub shape: VmShape,
    /// The CPU the guest was given (the secondary checks that its host can
    /// run it).
    pub cpu: CpuModel,
    pub generation: u64,
    pub pair: PairSettings,
}

impl Session {
    /// Connects a data channel and authenticates (both ways) with the shared secret.
    pub async fn connect(addr: SocketAddr, secret: &Secret, offer: &Offer) -> Result<Session, SenderError> {
        Self::connect_channel(addr, secret, offer, Channel::Data).await
    }

    /// Connects a data or heartbeat channel.
    pub async fn connect_channel(
        addr: SocketAddr,
        secret: &Secret,
        offer: &Offer,
        channel: Channel,
    ) -> Result<Session, SenderError> {
        let stream = TcpStream::connect(addr).await.map_err(|err| SenderError::Connect { addr, err })?;
        Self::handshake(stream, secret, offer, channel, PROTOCOL_VERSION, PROTOCOL_VERSION).await
    }

    /// The handshake on an open stream (whoever dialed), offering versions
    /// `min..=max`: the Noise handshake (`common::link`: both sides prove
    /// they hold the secret, and get their own keys), then the Hello and
    /// its answer, encrypted. Settings that do not fit the secondary's
    /// (`pair`, see [`PairSettings::check_peer`]) end it, whichever side
    /// finds them.
    pub async fn handshake(
        mut stream: TcpStream,
        secret: &Secret,
        offer: &Offer,
        channel: Channel,
        min: u16,
        max: u16,
    ) -> Result<Session, SenderError> {
        let _ = stream.set_nodelay(true);
        let link = common::link::initiate(&mut stream, secret).await?;
        let (r, w) = stream.into_split();
        let (sealer, opener) = common::frame::codecs(max, PROTOCOL_VERSION, link);
        let mut rx = FramedRead::with_capacity(r, opener, 1 << 16);
        let mut tx = FramedWrite::new(w, sealer);
        let hello = Hello {
            min_version: min,
            max_version: max,
            shape: offer.shape.clone(),
            generation: offer.generation,
            channel,
            pair: offer.pair.clone(),
            cpu: offer.cpu.clone(),
        };
        tx.send(Message::Hello(hello).to_frame()).await?;
        let ack = match recv(&mut rx).await?.ok_or(SenderError::Closed("during the handshake"))? {
            Message::HelloAck(a) => a,
            other => return Err(refused(other)),
        };
        if let Err(e) = offer.pair.check_peer(&ack.pair) {
            // the secondary accepted, we do not: tell it why before closing
            let reason = format!("the primary refused the pair: {e}");
            let _ = tx.send(Message::Refused { code: RefuseCode::Pair, reason }.to_frame()).await;
            return Err(e.into());
        }
        Ok(Session { reader: SessionReader { rx }, writer: SessionWriter { tx }, ack })
    }

    /// Receives one message (`None` when the secondary closed cleanly).
    pub async fn recv(&mut self) -> Result<Option<Message>, SenderError> {
        self.reader.recv().await
    }

    /// Waits for the ack of `epoch` (other messages are returned as errors).
    pub async fn wait_ack(&mut self, epoch: u64) -> Result<(), SenderError> {
        match self.recv().await? {
            Some(Message::EpochAck { epoch: e }) if e == epoch => Ok(()),
            Some(other) => Err(refused(other)),
            None => Err(SenderError::Closed("before acknowledging")),
        }
    }

    /// For fault-injection tests: takes the session apart (after sending
    /// whatever it buffered) into its sending direction's sealer, the one
    /// that seals with this connection's key and the record nonces the
    /// session would use next, and the raw connection. The session is gone,
    /// so nothing else can seal with those nonces: frames built with the
    /// sealer may be sent damaged, twice or out of order, never sealed twice.
    pub async fn into_raw(self) -> Result<RawSession, SenderError> {
        let Session { reader, writer, .. } = self;
        let mut tx = writer.tx;
        tx.flush().await?;
        let parts = tx.into_parts();
        debug_assert!(parts.write_buf.is_empty(), "flushed above");
        Ok(RawSession { sealer: parts.codec, stream: parts.io, reader })
    }

    /// Sends a pre-built frame (tests).
    pub async fn send_frame(&mut self, f: OutFrame) -> Result<(), SenderError> {
        self.writer.tx.send(f).await?;
        Ok(())
    }

    /// Splits the session so acks can be read while epochs are sent.
    pub fn into_halves(self) -> (SessionReader, SessionWriter) {
        (self.reader, self.writer)
    }
}

impl std::ops::Deref for Session {
    type Target = SessionWriter;
    fn deref(&self) -> &SessionWriter {
        &self.writer
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut SessionWriter {
        &mut self.writer
    }
}

/// A session taken apart by [`Session::into_raw`] (fault-injection tests):
/// frames are sealed by hand with its one sealer and written as raw bytes.
#[derive(Debug)]
pub struct RawSession {
    /// The session's sealer (not `Clone`: the only one of this direction).
    pub sealer: FrameSealer,
    stream: OwnedWriteHalf,
    reader: SessionReader,
}

impl RawSession {
    /// Seals `m` as the next frame (next sequence number, next record
    /// nonces) into a buffer of its own, to be sent (or not) as the test
    /// chooses.
    pub fn seal(&mut self, m: &Message) -> Result<bytes::BytesMut, SenderError> {
        use tokio_util::codec::Encoder;
        let mut b = bytes::BytesMut::new();
        self.sealer.encode(m.to_frame(), &mut b)?;
        Ok(b)
    }

    /// Writes raw bytes to the connection.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), SenderError> {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.map_err(FrameError::from)?;
        self.stream.flush().await.map_err(FrameError::from)?;
        Ok(())
    }

    /// Half-closes the connection (a stream that ends here).
    pub async fn shutdown_write(&mut self) -> Result<(), SenderError> {
        use tokio::io::AsyncWriteExt;
        self.stream.shutdown().await.map_err(FrameError::from)?;
        Ok(())
    }

    /// Receives one message (`None` when the peer closed cleanly).
    pub async fn recv(&mut self) -> Result<Option<Message>, SenderError> {
        self.reader.recv().await
    }
}

/// Takes a session's two halves off the runtime they were made on, to be
/// opened again on the heartbeat thread ([`attach_halves`]).
pub fn detach_halves(r: SessionReader, w: SessionWriter) -> Result<common::beats::Moved, common::beats::BeatsError> {
    common::beats::Moved::detach(r.rx, w.tx)
}

/// Opens a moved session again on the runtime this runs in.
pub fn attach_halves(
    m: common::beats::Moved,
) -> Result<(common::beats::BeatRx, SessionWriter), common::beats::BeatsError> {
    let (rx, tx) = m.attach()?;
    Ok((rx, SessionWriter { tx }))
}

/// The receiving half of a session.
#[derive(Debug)]
pub struct SessionReader {
    rx: Rx,
}

impl SessionReader {
    /// Receives one message (`None` when the peer closed cleanly).
    pub async fn recv(&mut self) -> Result<Option<Message>, SenderError> {
        recv(&mut self.rx).await
    }
}

/// The sending half of a session.
#[derive(Debug)]
pub struct SessionWriter {
    tx: Tx,
}

impl SessionWriter {
    /// Sends one message.
    pub async fn send(&mut self, m: &Message) -> Result<(), SenderError> {
        self.tx.send(m.to_frame()).await?;
        Ok(())
    }

    /// Sends live-sync pages; `first` opens a new sync (SyncBegin first).
    pub async fn send_sync(&mut self, first: bool, pages: Vec<Page>) -> Result<(), SenderError> {
        send_full_sync(&mut self.tx, first, pages).await
    }

    /// Sends one whole epoch (begin, chunks, end).
    pub async fn send_epoch(
        &mut self,
        epoch: u64,
        full: bool,
        pages: Vec<Page>,
        state: MachineState,
        digest: Option<u64>,
    ) -> Result<(), SenderError> {
        send_epoch(&mut self.tx, epoch, full, pages, state, digest).await
    }
}

/// Makes a page from a 4096-byte buffer (all-zero pages travel without data).
pub fn page_from(gfn: u64, data: &[u8]) -> Page {
    if data.iter().all(|&b| b == 0) {
        Page::zero(gfn)
    } else {
        Page::full(gfn, Bytes::copy_from_slice(data))
    }
}
