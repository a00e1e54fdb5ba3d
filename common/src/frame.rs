//! Framing on the encrypted link (protocol version 2).
//!
//! A frame is a header and a payload:
//!
//! ```text
//! offset size field
//!      0    4 magic "CSTR"
//!      4    2 protocol version
//!      6    2 message kind (0 = Invalid, never valid)
//!      8    8 sequence number (per direction, from 0, +1 per frame)
//!     16    4 payload length (at most MAX_PAYLOAD)
//!     20    n payload
//! ```
//!
//! and travels encrypted (the keys come from the Noise handshake, see
//! `link.rs`): its bytes are cut in pieces of at most [`PIECE`] bytes and
//! each piece is one sealed record,
//!
//! ```text
//!      0    8 record nonce (per direction, from 0, +1 per record)
//!      8    2 sealed length n (16..=65535)
//!     10    n AES-256-GCM of the piece, with its 16-byte tag
//! ```
//!
//! so nothing of a frame, not even its kind or length, is readable on the
//! wire. The decoder checks, in this order, and says which check failed:
//! record length, record nonce (a duplicated or reordered record, before
//! decrypting), the tag (a record altered in transit, or sealed with other
//! keys: `Corrupt`), then inside the frame magic, version, kind, length
//! (before the rest arrives) and sequence. A stream that ends inside a
//! record or frame is `Truncated`. The AEAD tag replaces the CRC and MAC of
//! version 1.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::link::{OpenKey, SealKey, Transport};

/// "CSTR".
pub const MAGIC: [u8; 4] = *b"CSTR";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 7;
/// Oldest version this build accepts in a Hello.
pub const MIN_PROTOCOL_VERSION: u16 = 7;
/// Header bytes.
pub const HEADER_LEN: usize = 20;
/// A frame's header, as it is on the wire (little-endian, no padding).
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct FrameHeader {
    magic: [u8; 4],
    version: U16,
    kind: U16,
    seq: U64,
    /// Payload bytes after the header.
    len: U32,
}
const _: () = assert!(std::mem::size_of::<FrameHeader>() == HEADER_LEN);

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Record header bytes (nonce, sealed length).
pub const RECORD_HEADER: usize = 10;
/// AEAD tag bytes.
pub const TAG_LEN: usize = 16;
/// Largest plaintext piece of one record.
pub const PIECE: usize = 65535 - TAG_LEN;
/// Largest frame on the wire.
pub const MAX_FRAME: usize =
    HEADER_LEN + MAX_PAYLOAD + (HEADER_LEN + MAX_PAYLOAD).div_ceil(PIECE) * (RECORD_HEADER + TAG_LEN);

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:02x?}: not a castor stream")]
    BadMagic([u8; 4]),
    #[error("frame of protocol version {got}, this session speaks {expected}")]
    WrongVersion { got: u16, expected: u16 },
    #[error("frame kind {0} is invalid")]
    InvalidKind(u16),
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    Oversize(usize),
    #[error("stream ended inside a frame ({0} bytes of it received)")]
    Truncated(usize),
    #[error("a record failed authentication: altered in transit, or not sealed with this session's keys")]
    Corrupt,
    #[error("duplicated frame or record: sequence {got}, expected {expected}")]
    Duplicate { got: u64, expected: u64 },
    #[error("out-of-order frame or record: sequence {got}, expected {expected}")]
    OutOfOrder { got: u64, expected: u64 },
    #[error("I/O: {0}")]
    Io(String),
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        FrameError::Io(e.to_string())
    }
}

/// One frame's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u16,
    pub seq: u64,
    pub payload: Bytes,
}

/// A frame to send (the codec assigns the sequence number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutFrame {
    pub kind: u16,
    pub payload: Bytes,
}

/// The sending direction of a connection: seals frames with this side's
/// key, record nonces from 0, +1 per record. There is one per connection
/// and side, made from the link's [`Transport`] (consumed), and it is not
/// `Clone`: two sealers would use the same nonce twice under one key
/// (AES-GCM's keystream reused, its authentication key given away).
///
/// ```compile_fail
/// fn copies<T: Clone>() {}
/// copies::<common::frame::FrameSealer>();
/// ```
pub struct FrameSealer {
    version: u16,
    key: SealKey,
    next_seq: u64,
    nonce: u64,
    /// One piece's plaintext.
    scratch: Vec<u8>,
}

/// The receiving direction of a connection: opens the peer's records and
/// reassembles its frames. Cloning it is harmless (it seals nothing).
///
/// ```
/// fn copies<T: Clone>() {}
/// copies::<common::frame::FrameOpener>();
/// ```
#[derive(Clone)]
pub struct FrameOpener {
    version: u16,
    key: OpenKey,
    next_seq: u64,
    nonce: u64,
    /// Plaintext of the frame being received, and its total size once its
    /// header is in.
    partial: BytesMut,
    want: Option<usize>,
}

impl std::fmt::Debug for FrameSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSealer")
            .field("version", &self.version)
            .field("next_seq", &self.next_seq)
            .field("nonce", &self.nonce)
            .finish()
    }
}

impl std::fmt::Debug for FrameOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameOpener")
            .field("version", &self.version)
            .field("next_seq", &self.next_seq)
            .field("nonce", &self.nonce)
            .finish()
    }
}

/// Both directions of one side of a connection: `(sealer, opener)`, the
/// sealer speaking `send_version`, the opener expecting `recv_version`.
pub fn codecs(send_version: u16, recv_version: u16, link: Transport) -> (FrameSealer, FrameOpener) {
    let (seal, open) = link.split();
    (FrameSealer::with_key(send_version, seal), FrameOpener::with_key(recv_version, open))
}

impl FrameSealer {
    /// The sending direction only, over the link's keys (an initiator's
    /// sealer seals with the initiator's key): tests and benches that make
    /// both ends of a link in memory. A session uses [`codecs`].
    pub fn new(version: u16, link: Transport) -> Self {
        Self::with_key(version, link.split().0)
    }

    fn with_key(version: u16, key: SealKey) -> Self {
        FrameSealer { version, key, next_seq: 0, nonce: 0, scratch: Vec::new() }
    }

    /// Switches the spoken version (after negotiation).
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// Sequence number of the next frame.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Seals `plain` as one record (tests build bad streams with it).
    pub fn seal_record(&mut self, plain: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
        if plain.len() > PIECE {
            return Err(FrameError::Oversize(plain.len()));
        }
        let sealed = plain.len() + TAG_LEN;
        dst.reserve(RECORD_HEADER + sealed);
        dst.put_u64_le(self.nonce);
        dst.put_u16_le(sealed as u16);
        let start = dst.len();
        dst.resize(start + sealed, 0);
        let n = self.key.seal(self.nonce, plain, &mut dst[start..]).map_err(|_| FrameError::Corrupt)?;
        debug_assert_eq!(n, sealed);
        self.nonce += 1;
        Ok(())
    }

    /// Encodes one frame with an explicit sequence number (tests use this
    /// to build bad streams; normal senders use the `Encoder` impl).
    pub fn encode_raw(&mut self, kind: u16, seq: u64, payload: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
        let header = FrameHeader {
            magic: MAGIC,
            version: self.version.into(),
            kind: kind.into(),
            seq: seq.into(),
            len: (payload.len() as u32).into(),
        };
        let header = header.as_bytes();
        let total = HEADER_LEN + payload.len();
        dst.reserve(total + total.div_ceil(PIECE) * (RECORD_HEADER + TAG_LEN));
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut off = 0;
        while off < total {
            let n = PIECE.min(total - off);
            scratch.clear();
            if off < HEADER_LEN {
                scratch.extend_from_slice(&header[off..]);
                scratch.extend_from_slice(&payload[..n - (HEADER_LEN - off)]);
            } else {
                scratch.extend_from_slice(&payload[off - HEADER_LEN..off - HEADER_LEN + n]);
            }
            let r = self.seal_record(&scratch, dst);
            if r.is_err() {
                self.scratch = scratch;
                return r;
            }
            off += n;
        }
        self.scratch = scratch;
        Ok(())
    }
}

impl Encoder<OutFrame> for FrameSealer {
    type Error = FrameError;

    fn encode(&mut self, item: OutFrame, dst: &mut BytesMut) -> Result<(), FrameError> {
        if item.payload.len() > MAX_PAYLOAD {
            return Err(FrameError::Oversize(item.payload.len()));
        }
        let seq = self.next_seq;
        self.encode_raw(item.kind, seq, &item.payload, dst)?;
        self.next_seq += 1;
        Ok(())
    }
}

impl FrameOpener {
    /// The receiving direction only, over the link's keys (an initiator's
    /// opener opens what the responder sealed): tests, benches and fuzzing
    /// that make both ends of a link in memory. A session uses [`codecs`].
    pub fn new(version: u16, link: Transport) -> Self {
        Self::with_key(version, link.split().1)
    }

    fn with_key(version: u16, key: OpenKey) -> Self {
        FrameOpener { version, key, next_seq: 0, nonce: 0, partial: BytesMut::new(), want: None }
    }

    /// Checks a frame header (the first 20 plaintext bytes); returns the
    /// frame's total plaintext size.
    fn header(&self, h: &[u8]) -> Result<usize, FrameError> {
        let h = FrameHeader::ref_from_bytes(h).map_err(|_| FrameError::Corrupt)?;
        if h.magic != MAGIC {
            return Err(FrameError::BadMagic(h.magic));
        }
        let version = h.version.get();
        if version != self.version {
            return Err(FrameError::WrongVersion { got: version, expected: self.version });
        }
        let kind = h.kind.get();
        if kind == 0 {
            return Err(FrameError::InvalidKind(kind));
        }
        let len = h.len.get() as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::Oversize(len));
        }
        Ok(HEADER_LEN + len)
    }
}

impl Decoder for FrameOpener {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        loop {
            if src.len() < RECORD_HEADER {
                return Ok(None);
            }
            let nonce = u64::from_le_bytes(src[..8].try_into().expect("8 bytes"));
            let sealed = u16::from_le_bytes([src[8], src[9]]) as usize;
            if sealed < TAG_LEN {
                return Err(FrameError::Corrupt);
            }
            if nonce < self.nonce {
                return Err(FrameError::Duplicate { got: nonce, expected: self.nonce });
            }
            if nonce > self.nonce {
                return Err(FrameError::OutOfOrder { got: nonce, expected: self.nonce });
            }
            if src.len() < RECORD_HEADER + sealed {
                src.reserve(RECORD_HEADER + sealed - src.len());
                return Ok(None);
            }
            let start = self.partial.len();
            self.partial.resize(start + sealed - TAG_LEN, 0);
            let opened = self.key.open(nonce, &src[RECORD_HEADER..RECORD_HEADER + sealed], &mut self.partial[start..]);
            if opened.is_err() {
                return Err(FrameError::Corrupt);
            }
            self.nonce += 1;
            src.advance(RECORD_HEADER + sealed);
            if self.want.is_none() {
                if self.partial.len() < HEADER_LEN {
                    return Err(FrameError::Corrupt);
                }
                let total = self.header(&self.partial[..HEADER_LEN])?;
                self.partial.reserve(total.saturating_sub(self.partial.len()));
                self.want = Some(total);
            }
            let want = self.want.expect("set above");
            if self.partial.len() > want {
                // a record never holds the end of one frame and the start of
                // the next
                return Err(FrameError::Corrupt);
            }
            if self.partial.len() < want {
                continue;
            }
            let (h, _) = FrameHeader::ref_from_prefix(&self.partial).map_err(|_| FrameError::Corrupt)?;
            let (kind, seq) = (h.kind.get(), h.seq.get());
            if seq < self.next_seq {
                return Err(FrameError::Duplicate { got: seq, expected: self.next_seq });
            }
            if seq > self.next_seq {
                return Err(FrameError::OutOfOrder { got: seq, expected: self.next_seq });
            }
            self.next_seq += 1;
            self.want = None;
            let mut frame = self.partial.split_to(want);
            frame.advance(HEADER_LEN);
            return Ok(Some(Frame { kind, seq, payload: frame.freeze() }));
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(f) => Ok(Some(f)),
            None if src.is_empty() && self.partial.is_empty() => Ok(None),
            None => Err(FrameError::Truncated(src.len() + self.partial.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Secret;

    /// The initiator's sealer and the responder's opener, and the
    /// initiator's own opener (to try a frame reflected back to it).
    fn pair() -> (FrameSealer, FrameOpener, FrameOpener) {
        let (i, r) = crate::link::pair(&Secret::generate().expect("secret")).expect("link");
        let (tx, own) = codecs(PROTOCOL_VERSION, PROTOCOL_VERSION, i);
        (tx, FrameOpener::new(PROTOCOL_VERSION, r), own)
    }

    #[test]
    fn round_trip_and_each_check() {
        let (mut tx, rx, own) = pair();
        let mut buf = BytesMut::new();
        tx.encode(OutFrame { kind: 3, payload: Bytes::from_static(b"hello") }, &mut buf).expect("encode");
        assert!(!buf.windows(5).any(|w| w == b"hello"), "the payload is not on the wire");
        assert!(!buf.windows(4).any(|w| w == MAGIC), "nor the header");
        let good = buf.clone();
        let mut r = rx.clone();
        let f = r.decode(&mut buf).expect("decode").expect("frame");
        assert_eq!((f.kind, f.seq, &f.payload[..]), (3, 0, &b"hello"[..]));
        // the same record again
        assert!(matches!(r.clone().decode(&mut good.clone()), Err(FrameError::Duplicate { got: 0, expected: 1 })));
        // one byte flipped in the sealed part
        let mut c = good.clone();
        c[RECORD_HEADER + 3] ^= 1;
        assert_eq!(rx.clone().decode(&mut c), Err(FrameError::Corrupt));
        // other keys (another session)
        let (_, other, _) = pair();
        assert_eq!(other.clone().decode(&mut good.clone()), Err(FrameError::Corrupt));
        // reflected to its sender
        assert_eq!(own.clone().decode(&mut good.clone()), Err(FrameError::Corrupt));
        // truncated at EOF
        let mut t = good.clone();
        t.truncate(good.len() - 1);
        assert_eq!(rx.clone().decode_eof(&mut t), Err(FrameError::Truncated(good.len() - 1)));
        // a sealed header announcing more than the frame limit, refused
        // before the payload arrives
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        h[6..8].copy_from_slice(&3u16.to_le_bytes());
        h[16..20].copy_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes());
        let (mut tx2, mut rx2, _) = pair();
        let mut o = BytesMut::new();
        tx2.seal_record(&h, &mut o).expect("seal");
        assert_eq!(rx2.decode(&mut o), Err(FrameError::Oversize(MAX_PAYLOAD + 1)));
    }

    #[test]
    fn a_megabyte_frame_crosses_records_and_arrives_whole() {
        let (mut tx, mut rx, _) = pair();
        let payload: Vec<u8> = (0..MAX_PAYLOAD).map(|i| (i % 251) as u8).collect();
        let mut buf = BytesMut::new();
        tx.encode(OutFrame { kind: 7, payload: Bytes::from(payload.clone()) }, &mut buf).expect("encode");
        tx.encode(OutFrame { kind: 8, payload: Bytes::from_static(b"next") }, &mut buf).expect("encode");
        assert!(buf.len() <= MAX_FRAME + RECORD_HEADER + TAG_LEN + 24);
        // fed in odd slices, as TCP delivers
        let mut inbox = BytesMut::new();
        let mut got = Vec::new();
        for chunk in buf.chunks(7777) {
            inbox.extend_from_slice(chunk);
            while let Some(f) = rx.decode(&mut inbox).expect("decode") {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0].payload[..], &payload[..]);
        assert_eq!((got[1].kind, got[1].seq, &got[1].payload[..]), (8, 1, &b"next"[..]));
    }
}
