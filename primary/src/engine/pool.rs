//! The pool of recycled epoch buffers ([`BufPool`], [`PooledBuf`]).

use std::sync::{Arc, Mutex};

/// Recycled epoch buffers: a buffer returns to the pool when the last page
/// slice of it is dropped (after the epoch went out).
#[derive(Debug, Default, Clone)]
pub(super) struct BufPool(Arc<Mutex<Vec<Vec<u8>>>>);

/// An epoch buffer on loan from the pool.
#[derive(Debug)]
pub(super) struct PooledBuf(pub(super) Vec<u8>, BufPool);

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Bytes of buffers the pool keeps for reuse at most (it saves the page
/// faults of fresh buffers for the usual small epochs; a large epoch's
/// buffer is given back to the system, not kept).
const POOL_BYTES: usize = 64 << 20;

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let mut p = common::sync::lock(&self.1 .0);
        let kept: usize = p.iter().map(Vec::capacity).sum();
        if p.len() < 32 && kept + self.0.capacity() <= POOL_BYTES {
            p.push(std::mem::take(&mut self.0));
        }
    }
}

impl BufPool {
    pub(super) fn take(&self, len: usize) -> PooledBuf {
        let mut v = common::sync::lock(&self.0).pop().unwrap_or_default();
        v.resize(len, 0);
        PooledBuf(v, self.clone())
    }
}
