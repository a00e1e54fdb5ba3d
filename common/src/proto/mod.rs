//! Replication messages between primary and secondary.
//!
//! Control messages and machine state are encoded with the project codec
//! (bincode 2, [`crate::codec`]); page payloads are raw bytes:
//!
//! ```text
//! PageChunk / FullSyncChunk payload:
//!   u64 epoch | u32 count | count x u64 gfn (bit 63 set = zero page, no data;
//!   bit 62 set = a sub-page delta, protocol v7)
//!   | data, in order: 4096 bytes for a whole page, u16 length + the delta
//!     ([`delta`]) for a delta, nothing for a zero page
//! StateChunk payload (protocol v3):
//!   u64 epoch | u64 offset | u64 total | bytes of the encoded machine state
//! ```
//!
//! An epoch's machine state (vCPUs, devices, the undrained output) has no
//! fixed size: a long epoch at a high request rate holds many outputs. It
//! travels like pages, in [`StateChunk`]s of at most one frame each, before
//! the [`EpochTail`], which carries its length and CRC; the receiver puts it
//! back together with a [`StateAssembler`] (at most [`MAX_STATE_BYTES`]).

mod chunk;
pub mod delta;
mod epoch;
mod hello;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::frame::OutFrame;

pub use chunk::{
    chunk_pages, decode_chunk, encode_chunk, pages_bytes, Page, PageChunk, PageData, StateAssembler, StateChunk,
    MAX_STATE_BYTES, PAGES_PER_CHUNK, PAGE_SIZE, STATE_CHUNK_BYTES,
};
pub use epoch::{EpochChecksum, EpochEnd, EpochTail};
pub use hello::{Channel, Hello, HelloAck, PairMismatch, PairSettings, MAX_NODE_NAME};

/// Message kinds on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Kind {
    Invalid = 0,
    Hello = 1,
    // 2 and 3 were version 1's Challenge and Auth: the Noise handshake
    // (link.rs) replaced them
    HelloAck = 4,
    FullSyncChunk = 5,
    EpochBegin = 6,
    PageChunk = 7,
    EpochEnd = 8,
    EpochAck = 9,
    Heartbeat = 10,
    Fence = 11,
    Shutdown = 12,
    ResyncRequest = 13,
    Refused = 14,
    /// Planned switchover: the primary's last epoch is acknowledged; the
    /// secondary takes over at once from it (protocol v2).
    Handover = 15,
    /// A piece of an epoch's encoded machine state (protocol v3).
    StateChunk = 16,
    /// A live sync starts: its FullSyncChunks go to a fresh staging area,
    /// which replaces the replica when the next epoch commits (protocol v3).
    SyncBegin = 17,
}

impl Kind {
    pub fn from_u16(k: u16) -> Option<Kind> {
        use Kind::*;
        Some(match k {
            1 => Hello,
            4 => HelloAck,
            5 => FullSyncChunk,
            6 => EpochBegin,
            7 => PageChunk,
            8 => EpochEnd,
            9 => EpochAck,
            10 => Heartbeat,
            11 => Fence,
            12 => Shutdown,
            13 => ResyncRequest,
            14 => Refused,
            15 => Handover,
            16 => StateChunk,
            17 => SyncBegin,
            _ => return None,
        })
    }
}

/// Errors decoding a message from a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("malformed {kind:?} payload: {reason}")]
    Malformed { kind: Kind, reason: String },
}

fn malformed(kind: Kind, reason: impl Into<String>) -> ProtoError {
    ProtoError::Malformed { kind, reason: reason.into() }
}

/// Why a peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseCode {
    Version,
    Shape,
    Auth,
    StaleGeneration,
    Protocol,
    Busy,
    /// The pair's settings differ ([`PairSettings::check_peer`]).
    Pair,
    /// A handover the secondary cannot take (its machine does not build,
    /// the witness refused, the replica is not at the last epoch): the
    /// session goes on and the primary keeps the guest.
    Takeover,
    /// The secondary's host cannot run the guest's CPU
    /// ([`crate::state::CpuModel::fits`]), or a trial restore of its
    /// replica failed there.
    Cpu,
}

/// A replication message.
#[derive(Debug, Clone)]
pub enum Message {
    Hello(Hello),
    HelloAck(HelloAck),
    FullSyncChunk(PageChunk),
    EpochBegin {
        epoch: u64,
        page_count: u64,
        full: bool,
    },
    PageChunk(PageChunk),
    StateChunk(StateChunk),
    EpochEnd(EpochTail),
    EpochAck {
        epoch: u64,
    },
    Heartbeat {
        generation: u64,
        seq: u64,
        time_us: u64,
        /// Secondary's replies: bytes it has read from its data
        /// connections so far (since version 4). A slow link shows progress
        /// here long before an epoch's ack: the primary ends a session for
        /// a missing ack only once this has stopped growing. Primaries send 0.
        received: u64,
    },
    Fence {
        generation: u64,
        reason: String,
    },
    Shutdown {
        reason: String,
    },
    ResyncRequest {
        reason: String,
    },
    Refused {
        code: RefuseCode,
        reason: String,
    },
    /// The primary stopped after `epoch` (acknowledged) and hands over: the
    /// secondary, whose committed epoch it must be, takes over now.
    Handover {
        epoch: u64,
    },
    /// A live sync starts (see [`Kind::SyncBegin`]).
    SyncBegin,
}

#[derive(Serialize, Deserialize)]
struct EpochBeginWire {
    epoch: u64,
    page_count: u64,
    full: bool,
}

#[derive(Serialize, Deserialize)]
struct HeartbeatWire {
    generation: u64,
    seq: u64,
    time_us: u64,
    received: u64,
}

#[derive(Serialize, Deserialize)]
struct GenReason {
    generation: u64,
    reason: String,
}

#[derive(Serialize, Deserialize)]
struct RefusedWire {
    code: RefuseCode,
    reason: String,
}

fn enc<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(codec::encode(v).expect("control messages always encode"))
}

fn dec<T: serde::de::DeserializeOwned>(kind: Kind, b: &[u8]) -> Result<T, ProtoError> {
    codec::decode(b).map_err(|e: CodecError| malformed(kind, e.to_string()))
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::HelloAck(_) => Kind::HelloAck,
            Message::FullSyncChunk(_) => Kind::FullSyncChunk,
            Message::EpochBegin { .. } => Kind::EpochBegin,
            Message::PageChunk(_) => Kind::PageChunk,
            Message::StateChunk(_) => Kind::StateChunk,
            Message::SyncBegin => Kind::SyncBegin,
            Message::EpochEnd(_) => Kind::EpochEnd,
            Message::EpochAck { .. } => Kind::EpochAck,
            Message::Heartbeat { .. } => Kind::Heartbeat,
            Message::Fence { .. } => Kind::Fence,
            Message::Shutdown { .. } => Kind::Shutdown,
            Message::ResyncRequest { .. } => Kind::ResyncRequest,
            Message::Refused { .. } => Kind::Refused,
            Message::Handover { .. } => Kind::Handover,
        }
    }

    /// The payload bytes of this message.
    pub fn payload(&self) -> Bytes {
        match self {
            Message::Hello(h) => enc(h),
            Message::HelloAck(a) => enc(a),
            Message::FullSyncChunk(c) | Message::PageChunk(c) => encode_chunk(c),
            Message::EpochBegin { epoch, page_count, full } => {
                enc(&EpochBeginWire { epoch: *epoch, page_count: *page_count, full: *full })
            }
            Message::StateChunk(c) => {
                let mut b = BytesMut::with_capacity(24 + c.data.len());
                b.put_u64_le(c.epoch);
                b.put_u64_le(c.offset);
                b.put_u64_le(c.total);
                b.put_slice(&c.data);
                b.freeze()
            }
            Message::EpochEnd(t) => enc(t),
            Message::SyncBegin => Bytes::new(),
            Message::EpochAck { epoch } | Message::Handover { epoch } => enc(epoch),
            Message::Heartbeat { generation, seq, time_us, received } => {
                enc(&HeartbeatWire { generation: *generation, seq: *seq, time_us: *time_us, received: *received })
            }
            Message::Fence { generation, reason } => {
                enc(&GenReason { generation: *generation, reason: reason.clone() })
            }
            Message::Shutdown { reason } | Message::ResyncRequest { reason } => enc(reason),
            Message::Refused { code, reason } => enc(&RefusedWire { code: *code, reason: reason.clone() }),
        }
    }

    /// The frame to send.
    pub fn to_frame(&self) -> OutFrame {
        OutFrame { kind: self.kind() as u16, payload: self.payload() }
    }

    /// Decodes a message from a frame's kind and payload.
    pub fn decode(kind: u16, payload: Bytes) -> Result<Message, ProtoError> {
        let k = Kind::from_u16(kind).ok_or(ProtoError::UnknownKind(kind))?;
        Ok(match k {
            Kind::Invalid => return Err(ProtoError::UnknownKind(0)),
            Kind::Hello => Message::Hello(dec(k, &payload)?),
            Kind::HelloAck => {
                let a: HelloAck = dec(k, &payload)?;
                if a.node.len() > MAX_NODE_NAME {
                    return Err(malformed(k, format!("node name of {} bytes", a.node.len())));
                }
                Message::HelloAck(a)
            }
            Kind::FullSyncChunk => Message::FullSyncChunk(decode_chunk(k, payload)?),
            Kind::PageChunk => Message::PageChunk(decode_chunk(k, payload)?),
            Kind::EpochBegin => {
                let w: EpochBeginWire = dec(k, &payload)?;
                Message::EpochBegin { epoch: w.epoch, page_count: w.page_count, full: w.full }
            }
            Kind::StateChunk => {
                if payload.len() < 24 {
                    return Err(malformed(k, "shorter than its header"));
                }
                let u = |i: usize| u64::from_le_bytes(payload[i..i + 8].try_into().expect("8"));
                let (epoch, offset, total) = (u(0), u(8), u(16));
                let data = payload.slice(24..);
                if total > MAX_STATE_BYTES {
                    return Err(malformed(k, format!("a state of {total} bytes (at most {MAX_STATE_BYTES})")));
                }
                if offset.checked_add(data.len() as u64).is_none_or(|end| end > total) {
                    return Err(malformed(k, format!("{} bytes at {offset} in a state of {total}", data.len())));
                }
                Message::StateChunk(StateChunk { epoch, offset, total, data })
            }
            Kind::SyncBegin => {
                if !payload.is_empty() {
                    return Err(malformed(k, format!("{} bytes of payload", payload.len())));
                }
                Message::SyncBegin
            }
            Kind::EpochEnd => {
                let t: EpochTail = dec(k, &payload)?;
                if t.state_len > MAX_STATE_BYTES {
                    return Err(malformed(k, format!("a state of {} bytes (at most {MAX_STATE_BYTES})", t.state_len)));
                }
                Message::EpochEnd(t)
            }
            Kind::EpochAck => Message::EpochAck { epoch: dec(k, &payload)? },
            Kind::Handover => Message::Handover { epoch: dec(k, &payload)? },
            Kind::Heartbeat => {
                let w: HeartbeatWire = dec(k, &payload)?;
                Message::Heartbeat { generation: w.generation, seq: w.seq, time_us: w.time_us, received: w.received }
            }
            Kind::Fence => {
                let w: GenReason = dec(k, &payload)?;
                Message::Fence { generation: w.generation, reason: w.reason }
            }
            Kind::Shutdown => Message::Shutdown { reason: dec(k, &payload)? },
            Kind::ResyncRequest => Message::ResyncRequest { reason: dec(k, &payload)? },
            Kind::Refused => {
                let w: RefusedWire = dec(k, &payload)?;
                Message::Refused { code: w.code, reason: w.reason }
            }
        })
    }
}
