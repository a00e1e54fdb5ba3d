//! Page chunks and state chunks: their raw encoding, the split of an
//! epoch's pages into chunks, and the state's reassembly.

use bytes::{BufMut, Bytes, BytesMut};

use super::{malformed, EpochEnd, EpochTail, Kind, ProtoError};
use crate::codec;
use crate::frame::MAX_PAYLOAD;

/// Guest page size.
pub const PAGE_SIZE: usize = 4096;
const ZERO_FLAG: u64 = 1 << 63;
/// The entry's data is a sub-page delta ([`super::delta`]), u16 length first.
const DELTA_FLAG: u64 = 1 << 62;
/// Pages that fit one chunk (all non-zero, the worst case).
pub const PAGES_PER_CHUNK: usize = (MAX_PAYLOAD - 12) / (8 + PAGE_SIZE);

/// What one page of a chunk carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageData {
    /// All zero (no data on the wire).
    Zero,
    /// The whole page.
    Full(Bytes),
    /// The runs that changed since the copy the receiver holds (protocol v7).
    Delta(Bytes),
}

/// One page of a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub gfn: u64,
    pub data: PageData,
}

impl Page {
    pub fn zero(gfn: u64) -> Page {
        Page { gfn, data: PageData::Zero }
    }

    pub fn full(gfn: u64, data: Bytes) -> Page {
        Page { gfn, data: PageData::Full(data) }
    }

    /// The whole content, where the page carries it.
    pub fn full_data(&self) -> Option<&Bytes> {
        match &self.data {
            PageData::Full(d) => Some(d),
            _ => None,
        }
    }

    pub fn is_zero(&self) -> bool {
        self.data == PageData::Zero
    }

    /// Bytes of data this page puts on the wire (beside its gfn).
    pub fn data_bytes(&self) -> usize {
        match &self.data {
            PageData::Zero => 0,
            PageData::Full(_) => PAGE_SIZE,
            PageData::Delta(d) => 2 + d.len(),
        }
    }
}

/// Data bytes of `pages` on the wire.
pub fn pages_bytes(pages: &[Page]) -> u64 {
    pages.iter().map(|p| p.data_bytes() as u64).sum()
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

/// Raw encoding of a chunk.
pub fn encode_chunk(c: &PageChunk) -> Bytes {
    let mut b = BytesMut::with_capacity(12 + c.pages.len() * 8 + pages_bytes(&c.pages) as usize);
    b.put_u64_le(c.epoch);
    b.put_u32_le(c.pages.len() as u32);
    for p in &c.pages {
        b.put_u64_le(match p.data {
            PageData::Zero => p.gfn | ZERO_FLAG,
            PageData::Full(_) => p.gfn,
            PageData::Delta(_) => p.gfn | DELTA_FLAG,
        });
    }
    for p in &c.pages {
        match &p.data {
            PageData::Zero => {}
            PageData::Full(d) => {
                debug_assert_eq!(d.len(), PAGE_SIZE);
                b.put_slice(d);
            }
            PageData::Delta(d) => {
                debug_assert!(d.len() <= super::delta::MAX_DELTA);
                b.put_u16_le(d.len() as u16);
                b.put_slice(d);
            }
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
        let gfn = raw & !(ZERO_FLAG | DELTA_FLAG);
        if gfn >= 1 << 52 {
            return Err(malformed(kind, format!("gfn {gfn:#x} beyond any guest")));
        }
        let data = match (raw & ZERO_FLAG != 0, raw & DELTA_FLAG != 0) {
            (true, true) => return Err(malformed(kind, format!("page {gfn:#x} both zero and a delta"))),
            (true, false) => PageData::Zero,
            (false, false) => {
                if at + PAGE_SIZE > payload.len() {
                    return Err(malformed(kind, "page data shorter than announced"));
                }
                let d = payload.slice(at..at + PAGE_SIZE);
                at += PAGE_SIZE;
                PageData::Full(d)
            }
            (false, true) => {
                let Some(len) = payload.get(at..at + 2) else {
                    return Err(malformed(kind, "a delta's length cut short"));
                };
                let len = u16::from_le_bytes([len[0], len[1]]) as usize;
                at += 2;
                if at + len > payload.len() {
                    return Err(malformed(kind, "a delta shorter than announced"));
                }
                let d = payload.slice(at..at + len);
                at += len;
                if let Err(e) = super::delta::check(&d) {
                    return Err(malformed(kind, format!("page {gfn:#x}: {e}")));
                }
                PageData::Delta(d)
            }
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
        let need = 8 + p.data_bytes();
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
