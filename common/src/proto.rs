//! Replication messages between primary and secondary.
//!
//! Control messages and machine state are encoded with the project codec
//! (bincode 2, [`crate::codec`]); page payloads are raw bytes:
//!
//! ```text
//! PageChunk / FullSyncChunk payload:
//!   u64 epoch | u32 count | count x u64 gfn (bit 63 set = zero page, no data)
//!   | data pages (4096 bytes each, for the non-zero entries, in order)
//! StateChunk payload (protocol v3):
//!   u64 epoch | u64 offset | u64 total | bytes of the encoded machine state
//! ```
//!
//! An epoch's machine state (vCPUs, devices, the undrained output) has no
//! fixed size: a long epoch at a high request rate holds many outputs. It
//! travels like pages, in [`StateChunk`]s of at most one frame each, before
//! the [`EpochTail`], which carries its length and CRC; the receiver puts it
//! back together with a [`StateAssembler`] (at most [`MAX_STATE_BYTES`]).

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::frame::{OutFrame, MAX_PAYLOAD};
use crate::state::{MachineState, VmShape};

/// Guest page size.
pub const PAGE_SIZE: usize = 4096;
const ZERO_FLAG: u64 = 1 << 63;
/// Pages that fit one chunk (all non-zero, the worst case).
pub const PAGES_PER_CHUNK: usize = (MAX_PAYLOAD - 12) / (8 + PAGE_SIZE);

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

/// First message, primary to secondary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub shape: VmShape,
    /// The sender's generation (fencing term).
    pub generation: u64,
    /// What this connection carries.
    pub channel: Channel,
    /// The settings both nodes must agree on (since version 5).
    pub pair: PairSettings,
    /// The CPU the guest was given: a secondary whose host cannot run it
    /// refuses (since version 5).
    pub cpu: crate::state::CpuModel,
}

/// What the two nodes of a pair must agree on, or the pair is not safe:
/// with a witness on one node only, the other promotes (or runs alone) on
/// silence without asking it, and both serve. Each side sends its own in
/// the handshake (the Hello and the HelloAck) and refuses a peer whose
/// settings differ (since version 5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairSettings {
    /// The witness's VM id when a witness decides (`--witness` with
    /// `--vm-id`); `None`: the two-node rule.
    pub witness_vm: Option<String>,
    /// Silence after which the peer counts as gone (ms).
    pub heartbeat_timeout_ms: u64,
    /// The heartbeat period (ms).
    pub heartbeat_interval_ms: u64,
}

/// How two nodes' [`PairSettings`] differ (each line names a setting, ours
/// and the peer's value, and what to change).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the pair's settings differ: {}", .0.join("; "))]
pub struct PairMismatch(pub Vec<String>);

impl PairSettings {
    /// Why a pair of `self` (this node) and `peer` is unsafe, if it is.
    /// A witness on one node only, different VM ids, different heartbeat
    /// timeouts, or a heartbeat period that does not fit the timeout at
    /// least twice.
    pub fn check_peer(&self, peer: &PairSettings) -> Result<(), PairMismatch> {
        let mut why = Vec::new();
        match (&self.witness_vm, &peer.witness_vm) {
            (Some(_), None) | (None, Some(_)) => why.push(format!(
                "witness: this node {}, the peer {} (give both nodes --witness and the same --vm-id, or neither)",
                witness_text(&self.witness_vm),
                witness_text(&peer.witness_vm)
            )),
            (Some(a), Some(b)) if a != b => why.push(format!(
                "witness vm id: this node {a:?}, the peer {b:?} (both nodes of a pair name the same --vm-id)"
            )),
            _ => {}
        }
        if self.heartbeat_timeout_ms != peer.heartbeat_timeout_ms {
            why.push(format!(
                "heartbeat timeout: this node {} ms, the peer {} ms (give both the same --heartbeat-timeout-ms)",
                self.heartbeat_timeout_ms, peer.heartbeat_timeout_ms
            ));
        }
        for (who, s) in [("this node", self), ("the peer", peer)] {
            if s.heartbeat_interval_ms.saturating_mul(2) > s.heartbeat_timeout_ms {
                why.push(format!(
                    "{who}'s heartbeat period {} ms is more than half its heartbeat timeout {} ms (a late heartbeat would look like a dead peer)",
                    s.heartbeat_interval_ms, s.heartbeat_timeout_ms
                ));
            }
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(PairMismatch(why))
        }
    }
}

fn witness_text(w: &Option<String>) -> String {
    match w {
        Some(vm) => format!("uses a witness (vm id {vm:?})"),
        None => "has no witness".into(),
    }
}

/// The two connections of a primary/secondary pair: epochs and heartbeats
/// travel separately so a large epoch cannot delay a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Channel {
    Data,
    Heartbeat,
}

/// The secondary's answer to the Hello: the session is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub version: u16,
    /// The replica's committed epoch, if any.
    pub committed_epoch: Option<u64>,
    /// The secondary's generation.
    pub generation: u64,
    /// The secondary's name in the witness (unique per process), at most
    /// [`MAX_NODE_NAME`] bytes.
    pub node: String,
    /// The secondary's settings (the primary checks them too).
    pub pair: PairSettings,
}

/// Longest node name a HelloAck may carry.
pub const MAX_NODE_NAME: usize = 160;

/// One page of a chunk: `None` data means all zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub gfn: u64,
    pub data: Option<Bytes>,
}

/// Pages of an epoch (or of the initial sync).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageChunk {
    pub epoch: u64,
    pub pages: Vec<Page>,
}

/// Largest encoded machine state an epoch may carry (the codec's decode
/// limit); a receiver refuses more.
pub const MAX_STATE_BYTES: u64 = codec::DECODE_LIMIT as u64;
/// State bytes in one [`StateChunk`] (its frame stays within [`MAX_PAYLOAD`]).
pub const STATE_CHUNK_BYTES: usize = MAX_PAYLOAD - 24;

/// A piece of an epoch's encoded machine state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChunk {
    pub epoch: u64,
    /// Where `data` starts in the encoded state.
    pub offset: u64,
    /// Length of the whole encoded state.
    pub total: u64,
    pub data: Bytes,
}

/// The last message of an epoch (after its pages and state chunks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochTail {
    pub epoch: u64,
    /// Pages sent in this epoch's chunks.
    pub page_count: u64,
    /// [`EpochChecksum`] over the epoch's pages in send order.
    pub checksum: u32,
    /// Optional digest of all guest memory after this epoch (verification mode).
    pub digest: Option<u64>,
    /// Length and CRC-32 of the encoded machine state sent in StateChunks.
    pub state_len: u64,
    pub state_crc: u32,
}

/// End of an epoch: everything needed to verify and commit it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochEnd {
    pub epoch: u64,
    /// Pages sent in this epoch's chunks.
    pub page_count: u64,
    /// [`EpochChecksum`] over the epoch's pages in send order.
    pub checksum: u32,
    /// Optional digest of all guest memory after this epoch (verification mode).
    pub digest: Option<u64>,
    pub state: MachineState,
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

/// Raw encoding of a chunk.
pub fn encode_chunk(c: &PageChunk) -> Bytes {
    let data_pages = c.pages.iter().filter(|p| p.data.is_some()).count();
    let mut b = BytesMut::with_capacity(12 + c.pages.len() * 8 + data_pages * PAGE_SIZE);
    b.put_u64_le(c.epoch);
    b.put_u32_le(c.pages.len() as u32);
    for p in &c.pages {
        b.put_u64_le(if p.data.is_some() { p.gfn } else { p.gfn | ZERO_FLAG });
    }
    for p in &c.pages {
        if let Some(d) = &p.data {
            debug_assert_eq!(d.len(), PAGE_SIZE);
            b.put_slice(d);
        }
    }
    b.freeze()
}

/// Decodes a raw chunk; page data are zero-copy slices of `payload`.
pub fn decode_chunk(kind: Kind, payload: Bytes) -> Result<PageChunk, ProtoError> {
    if payload.len() < 12 {
        return Err(malformed(kind, "shorter than its header"));
    }
    let epoch = u64::from_le_bytes(payload[0..8].try_into().expect("8"));
    let count = u32::from_le_bytes(payload[8..12].try_into().expect("4")) as usize;
    let gfns_end = count.checked_mul(8).and_then(|n| n.checked_add(12)).filter(|&e| e <= payload.len());
    let Some(gfns_end) = gfns_end else {
        return Err(malformed(kind, format!("{count} pages announced, payload too short")));
    };
    let mut pages = Vec::with_capacity(count);
    let mut at = gfns_end;
    for i in 0..count {
        let raw = u64::from_le_bytes(payload[12 + i * 8..20 + i * 8].try_into().expect("8"));
        let gfn = raw & !ZERO_FLAG;
        if gfn >= 1 << 52 {
            return Err(malformed(kind, format!("gfn {gfn:#x} beyond any guest")));
        }
        let data = if raw & ZERO_FLAG != 0 {
            None
        } else {
            if at + PAGE_SIZE > payload.len() {
                return Err(malformed(kind, "page data shorter than announced"));
            }
            let d = payload.slice(at..at + PAGE_SIZE);
            at += PAGE_SIZE;
            Some(d)
        };
        pages.push(Page { gfn, data });
    }
    if at != payload.len() {
        return Err(malformed(kind, format!("{} trailing bytes", payload.len() - at)));
    }
    Ok(PageChunk { epoch, pages })
}

/// Splits an epoch's pages into chunks whose frames respect [`MAX_PAYLOAD`].
pub fn chunk_pages(epoch: u64, pages: Vec<Page>) -> Vec<PageChunk> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = 12;
    for p in pages {
        let need = 8 + if p.data.is_some() { PAGE_SIZE } else { 0 };
        if size + need > MAX_PAYLOAD {
            out.push(PageChunk { epoch, pages: std::mem::take(&mut cur) });
            size = 12;
        }
        size += need;
        cur.push(p);
    }
    if !cur.is_empty() {
        out.push(PageChunk { epoch, pages: cur });
    }
    out
}

impl EpochEnd {
    /// The messages that end an epoch: its state in chunks, then the tail.
    pub fn into_messages(self) -> Result<Vec<Message>, ProtoError> {
        let bytes =
            Bytes::from(codec::encode(&self.state).map_err(|e| malformed(Kind::StateChunk, format!("encoding: {e}")))?);
        let total = bytes.len() as u64;
        if total > MAX_STATE_BYTES {
            return Err(malformed(Kind::StateChunk, format!("a state of {total} bytes (at most {MAX_STATE_BYTES})")));
        }
        let mut out = Vec::with_capacity(bytes.len() / STATE_CHUNK_BYTES + 2);
        let mut offset = 0;
        while offset < bytes.len() {
            let end = (offset + STATE_CHUNK_BYTES).min(bytes.len());
            out.push(Message::StateChunk(StateChunk {
                epoch: self.epoch,
                offset: offset as u64,
                total,
                data: bytes.slice(offset..end),
            }));
            offset = end;
        }
        out.push(Message::EpochEnd(EpochTail {
            epoch: self.epoch,
            page_count: self.page_count,
            checksum: self.checksum,
            digest: self.digest,
            state_len: total,
            state_crc: crc32fast::hash(&bytes),
        }));
        Ok(out)
    }
}

/// Puts an epoch's state back together from its [`StateChunk`]s, in order,
/// and checks it against the [`EpochTail`]. Refuses a gap, an overlap,
/// another epoch's chunk, a length or CRC that differs from the tail's.
#[derive(Debug, Default)]
pub struct StateAssembler {
    epoch: Option<u64>,
    total: u64,
    buf: BytesMut,
}

impl StateAssembler {
    /// Forgets a partly received state (the epoch it belonged to was dropped).
    pub fn reset(&mut self) {
        *self = StateAssembler::default();
    }

    pub fn push(&mut self, c: StateChunk) -> Result<(), ProtoError> {
        let k = Kind::StateChunk;
        match self.epoch {
            Some(e) if e != c.epoch => {
                return Err(malformed(k, format!("a chunk of epoch {} while assembling epoch {e}", c.epoch)))
            }
            Some(_) if c.total != self.total => {
                return Err(malformed(k, format!("total {} after {}", c.total, self.total)))
            }
            Some(_) => {}
            None => {
                self.epoch = Some(c.epoch);
                self.total = c.total;
            }
        }
        if c.offset != self.buf.len() as u64 {
            return Err(malformed(k, format!("a chunk at {} after {} bytes", c.offset, self.buf.len())));
        }
        if c.total > MAX_STATE_BYTES || self.buf.len() as u64 + c.data.len() as u64 > c.total {
            return Err(malformed(k, format!("more than the {} bytes announced", c.total)));
        }
        self.buf.extend_from_slice(&c.data);
        Ok(())
    }

    /// The whole epoch end, once every chunk of its state has arrived.
    pub fn finish(&mut self, tail: EpochTail) -> Result<EpochEnd, ProtoError> {
        let k = Kind::EpochEnd;
        let got = std::mem::take(self);
        if got.epoch != Some(tail.epoch) {
            return Err(malformed(k, format!("epoch {} ends with state of {:?}", tail.epoch, got.epoch)));
        }
        if got.buf.len() as u64 != tail.state_len || got.total != tail.state_len {
            return Err(malformed(k, format!("{} state bytes received, {} announced", got.buf.len(), tail.state_len)));
        }
        if crc32fast::hash(&got.buf) != tail.state_crc {
            return Err(malformed(k, "the state's CRC does not match"));
        }
        let state = codec::decode(&got.buf).map_err(|e| malformed(k, format!("state: {e}")))?;
        Ok(EpochEnd {
            epoch: tail.epoch,
            page_count: tail.page_count,
            checksum: tail.checksum,
            digest: tail.digest,
            state,
        })
    }
}

/// Order-sensitive checksum of an epoch's pages as sent.
#[derive(Debug, Clone, Default)]
pub struct EpochChecksum {
    h: crc32fast::Hasher,
    pages: u64,
}

impl EpochChecksum {
    pub fn add(&mut self, p: &Page) {
        self.h.update(&p.gfn.to_le_bytes());
        match &p.data {
            Some(d) => self.h.update(d),
            None => self.h.update(b"Z"),
        }
        self.pages += 1;
    }
    pub fn pages(&self) -> u64 {
        self.pages
    }
    pub fn value(&self) -> u32 {
        self.h.clone().finalize()
    }
}

#[cfg(test)]
mod pair_tests {
    use super::*;

    fn base() -> PairSettings {
        PairSettings { witness_vm: Some("vm-1".into()), heartbeat_timeout_ms: 100, heartbeat_interval_ms: 20 }
    }

    #[test]
    fn a_pair_agrees_only_on_the_same_witness_and_timing() {
        assert_eq!(base().check_peer(&base()), Ok(()));
        let none = PairSettings { witness_vm: None, ..base() };
        assert_eq!(none.check_peer(&none), Ok(()), "the two-node rule on both sides is a pair");
        // a witness on one node only: refused whichever side has it
        for (a, b) in [(&base(), &none), (&none, &base())] {
            let e = a.check_peer(b).unwrap_err();
            assert_eq!(e.0.len(), 1, "{e}");
            assert!(e.0[0].contains("--witness"), "{e}");
        }
        let other_vm = PairSettings { witness_vm: Some("vm-2".into()), ..base() };
        assert!(base().check_peer(&other_vm).unwrap_err().to_string().contains("vm id"));
        let slower = PairSettings { heartbeat_timeout_ms: 300, ..base() };
        assert!(base().check_peer(&slower).unwrap_err().to_string().contains("heartbeat timeout"));
        // a period that does not fit twice in the timeout, on either side
        let lazy = PairSettings { heartbeat_interval_ms: 60, ..base() };
        assert!(lazy.check_peer(&lazy).is_err());
        assert!(base().check_peer(&lazy).unwrap_err().to_string().contains("the peer's heartbeat period"));
        // every difference is named at once
        let all = PairSettings { witness_vm: None, heartbeat_timeout_ms: 30, heartbeat_interval_ms: 20 };
        assert_eq!(base().check_peer(&all).unwrap_err().0.len(), 3);
    }
}
