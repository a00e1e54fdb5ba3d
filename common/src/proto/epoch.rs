//! The end of an epoch: its tail, the whole epoch end and its messages,
//! and the checksum of its pages.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{malformed, Kind, Message, Page, ProtoError, StateChunk, MAX_STATE_BYTES, STATE_CHUNK_BYTES};
use crate::codec;
use crate::state::MachineState;

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
            super::PageData::Full(d) => self.h.update(d),
            super::PageData::Zero => self.h.update(b"Z"),
            super::PageData::Delta(d) => {
                self.h.update(b"D");
                self.h.update(d);
            }
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
