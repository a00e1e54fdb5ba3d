//! Framing: every message travels in one frame
//!
//! ```text
//! offset size field
//!      0    4 magic "CSTR"
//!      4    2 protocol version
//!      6    2 message kind (0 = Invalid, never valid)
//!      8    8 sequence number (per direction, from 0, +1 per frame)
//!     16    4 payload length (at most MAX_PAYLOAD)
//!     20    n payload
//!   20+n    4 CRC32 of bytes 0..20+n
//!   24+n   32 MAC (BLAKE3 keyed hash) of bytes 0..20+n under the current key
//! ```
//!
//! The decoder checks, in this order, and says which check failed: magic,
//! version, kind, length (before buffering the payload), CRC (accidental
//! corruption), MAC (tampering or a peer without the secret), sequence
//! (duplicated or reordered frames). A stream that ends inside a frame is
//! `Truncated`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::auth::{self, Key, MAC_LEN};

/// "CSTR".
pub const MAGIC: [u8; 4] = *b"CSTR";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Oldest version this build accepts in a Hello.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Header bytes.
pub const HEADER_LEN: usize = 20;
/// CRC + MAC bytes.
pub const TRAILER_LEN: usize = 4 + MAC_LEN;
/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Largest frame.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD + TRAILER_LEN;

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
    #[error("frame checksum mismatch: corrupted in transit")]
    Corrupt,
    #[error("frame authentication failed: peer lacks the shared secret or the frame was altered")]
    BadMac,
    #[error("duplicated frame: sequence {got}, expected {expected}")]
    Duplicate { got: u64, expected: u64 },
    #[error("out-of-order frame: sequence {got}, expected {expected}")]
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

/// Stateful codec for one direction of a connection.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    version: u16,
    key: Key,
    next_seq: u64,
}

impl FrameCodec {
    /// A codec speaking `version`, MACing with `key`.
    pub fn new(version: u16, key: Key) -> Self {
        FrameCodec { version, key, next_seq: 0 }
    }

    /// Switches to the session key (after the handshake).
    pub fn set_key(&mut self, key: Key) {
        self.key = key;
    }

    /// Switches the spoken version (after negotiation).
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// Sequence number of the next frame.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Encodes one frame with an explicit sequence number (tests use this to
    /// build bad streams; normal senders use the `Encoder` impl).
    pub fn encode_raw(version: u16, kind: u16, seq: u64, payload: &[u8], key: &Key, dst: &mut BytesMut) {
        let start = dst.len();
        dst.reserve(HEADER_LEN + payload.len() + TRAILER_LEN);
        dst.put_slice(&MAGIC);
        dst.put_u16_le(version);
        dst.put_u16_le(kind);
        dst.put_u64_le(seq);
        dst.put_u32_le(payload.len() as u32);
        dst.put_slice(payload);
        let crc = crc32fast::hash(&dst[start..]);
        let mac = auth::frame_mac(key, &dst[start..]);
        dst.put_u32_le(crc);
        dst.put_slice(&mac);
    }
}

impl Encoder<OutFrame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: OutFrame, dst: &mut BytesMut) -> Result<(), FrameError> {
        if item.payload.len() > MAX_PAYLOAD {
            return Err(FrameError::Oversize(item.payload.len()));
        }
        Self::encode_raw(self.version, item.kind, self.next_seq, &item.payload, &self.key, dst);
        self.next_seq += 1;
        Ok(())
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < HEADER_LEN {
            // check what we can early, so garbage is refused without waiting
            if src.len() >= 4 && src[..4] != MAGIC {
                return Err(FrameError::BadMagic(src[..4].try_into().expect("4 bytes")));
            }
            return Ok(None);
        }
        let magic: [u8; 4] = src[..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([src[4], src[5]]);
        if version != self.version {
            return Err(FrameError::WrongVersion { got: version, expected: self.version });
        }
        let kind = u16::from_le_bytes([src[6], src[7]]);
        if kind == 0 {
            return Err(FrameError::InvalidKind(kind));
        }
        let seq = u64::from_le_bytes(src[8..16].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(src[16..20].try_into().expect("4 bytes")) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::Oversize(len));
        }
        let total = HEADER_LEN + len + TRAILER_LEN;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let body = HEADER_LEN + len;
        let crc = u32::from_le_bytes(src[body..body + 4].try_into().expect("4 bytes"));
        if crc32fast::hash(&src[..body]) != crc {
            return Err(FrameError::Corrupt);
        }
        let mac = auth::frame_mac(&self.key, &src[..body]);
        if !auth::verify(&mac, &src[body + 4..total]) {
            return Err(FrameError::BadMac);
        }
        if seq < self.next_seq {
            return Err(FrameError::Duplicate { got: seq, expected: self.next_seq });
        }
        if seq > self.next_seq {
            return Err(FrameError::OutOfOrder { got: seq, expected: self.next_seq });
        }
        self.next_seq += 1;
        let mut frame = src.split_to(total);
        frame.advance(HEADER_LEN);
        frame.truncate(len);
        Ok(Some(Frame { kind, seq, payload: frame.freeze() }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(f) => Ok(Some(f)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated(src.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        [7u8; 32]
    }

    #[test]
    fn round_trip_and_each_check() {
        let mut tx = FrameCodec::new(1, key());
        let mut rx = FrameCodec::new(1, key());
        let mut buf = BytesMut::new();
        tx.encode(OutFrame { kind: 3, payload: Bytes::from_static(b"hello") }, &mut buf).expect("encode");
        let good = buf.clone();
        let f = rx.decode(&mut buf).expect("decode").expect("frame");
        assert_eq!((f.kind, f.seq, &f.payload[..]), (3, 0, &b"hello"[..]));
        // duplicate of frame 0
        assert!(matches!(rx.clone().decode(&mut good.clone()), Err(FrameError::Duplicate { got: 0, expected: 1 })));
        // corrupt payload byte
        let mut c = good.clone();
        c[HEADER_LEN] ^= 1;
        assert_eq!(FrameCodec::new(1, key()).decode(&mut c), Err(FrameError::Corrupt));
        // wrong key
        assert_eq!(FrameCodec::new(1, [8; 32]).decode(&mut good.clone()), Err(FrameError::BadMac));
        // wrong version
        assert!(matches!(FrameCodec::new(2, key()).decode(&mut good.clone()), Err(FrameError::WrongVersion { .. })));
        // truncated at EOF
        let mut t = good.clone();
        t.truncate(good.len() - 1);
        assert_eq!(FrameCodec::new(1, key()).decode_eof(&mut t), Err(FrameError::Truncated(good.len() - 1)));
        // oversize header, refused before the payload arrives
        let mut o = BytesMut::from(&good[..HEADER_LEN]);
        o[16..20].copy_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes());
        assert_eq!(FrameCodec::new(1, key()).decode(&mut o), Err(FrameError::Oversize(MAX_PAYLOAD + 1)));
    }
}
