//! Sub-page deltas (protocol v7): a page that changed in only a few bytes
//! since the copy the secondary already holds travels as the runs of bytes
//! that changed, not as 4096 bytes.
//!
//! A networked guest rewrites the same few hundred pages every epoch (socket
//! buffers, descriptor rings, the frames' buffers) and changes ~100 bytes of
//! each; shipping them whole made an epoch ~600 KB where ~40 KB changed.
//!
//! ```text
//! delta: u32 crc32 of the base page | runs: u16 offset | u16 len | len bytes
//! ```
//!
//! Runs are in increasing offset order, do not overlap, are not empty and stay
//! inside the page. The base CRC names the content the delta applies to: a
//! receiver whose page differs (it missed an epoch, or holds another sync's
//! copy) refuses the epoch instead of making a page the primary never had.
//! The primary sends a delta only against the content it last shipped for
//! that page (see `primary::engine`), and the secondary checks every base of
//! an epoch before it writes the first page.

use bytes::{BufMut, BytesMut};

use super::PAGE_SIZE;

/// A delta larger than this is not worth it: the page goes whole.
pub const MAX_DELTA: usize = PAGE_SIZE / 2;
/// Unchanged bytes between two changed ones that are sent anyway rather than
/// starting a new run (a run header is 4 bytes).
const GAP: usize = 8;
const HEADER: usize = 4;

/// Why a delta cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("a delta of {0} bytes (at most {MAX_DELTA})")]
    TooLong(usize),
    #[error("a delta shorter than its base CRC")]
    NoHeader,
    #[error("a run header cut short at byte {0}")]
    CutHeader(usize),
    #[error("an empty run at offset {0}")]
    EmptyRun(usize),
    #[error("a run at {offset}+{len} outside the page or before the previous run's end {prev_end}")]
    BadRun { offset: usize, len: usize, prev_end: usize },
    #[error("a run's bytes cut short at byte {0}")]
    CutRun(usize),
    #[error("the page is not the delta's base (CRC {have:#010x}, the delta is against {want:#010x})")]
    BaseMismatch { have: u32, want: u32 },
}

/// Appends the delta that turns `base` into `new` to `out` and returns true,
/// or appends nothing and returns false when the delta would be longer than
/// [`MAX_DELTA`] (send the page whole). Both are [`PAGE_SIZE`] bytes.
pub fn encode(base: &[u8], new: &[u8], out: &mut BytesMut) -> bool {
    assert!(base.len() == PAGE_SIZE && new.len() == PAGE_SIZE, "delta of a partial page");
    let start = out.len();
    out.put_u32_le(crc32fast::hash(base));
    let mut i = 0;
    while i < PAGE_SIZE {
        // skip equal 8-byte words fast, then find the first differing byte
        while i + 8 <= PAGE_SIZE && base[i..i + 8] == new[i..i + 8] {
            i += 8;
        }
        while i < PAGE_SIZE && base[i] == new[i] {
            i += 1;
        }
        if i == PAGE_SIZE {
            break;
        }
        // a run: extend while the next GAP bytes hold another difference
        let run = i;
        let mut end = i + 1;
        let mut j = end;
        while j < PAGE_SIZE && j < end + GAP {
            if base[j] != new[j] {
                end = j + 1;
            }
            j += 1;
        }
        if out.len() - start + HEADER + (end - run) > MAX_DELTA {
            out.truncate(start);
            return false;
        }
        out.put_u16_le(run as u16);
        out.put_u16_le((end - run) as u16);
        out.put_slice(&new[run..end]);
        i = end;
    }
    true
}

/// The runs of a delta: (offset in the page, bytes to write there).
pub type Runs<'a> = Vec<(usize, &'a [u8])>;

/// The base CRC and the runs of a delta, checked (order, bounds); the base
/// itself is not checked.
pub fn parse(delta: &[u8]) -> Result<(u32, Runs<'_>), DeltaError> {
    if delta.len() > MAX_DELTA {
        return Err(DeltaError::TooLong(delta.len()));
    }
    let crc = u32::from_le_bytes(delta.get(..4).ok_or(DeltaError::NoHeader)?.try_into().expect("4"));
    let mut at = 4;
    let mut prev_end = 0;
    let mut out = Vec::new();
    while at < delta.len() {
        let h = delta.get(at..at + HEADER).ok_or(DeltaError::CutHeader(at))?;
        let offset = u16::from_le_bytes([h[0], h[1]]) as usize;
        let len = u16::from_le_bytes([h[2], h[3]]) as usize;
        if len == 0 {
            return Err(DeltaError::EmptyRun(offset));
        }
        if offset < prev_end || offset + len > PAGE_SIZE {
            return Err(DeltaError::BadRun { offset, len, prev_end });
        }
        at += HEADER;
        let bytes = delta.get(at..at + len).ok_or(DeltaError::CutRun(at))?;
        out.push((offset, bytes));
        at += len;
        prev_end = offset + len;
    }
    Ok((crc, out))
}

/// Checks that `delta` is well formed (what a receiver can check before it
/// knows the base).
pub fn check(delta: &[u8]) -> Result<(), DeltaError> {
    parse(delta).map(|_| ())
}

/// Checks that `page` is the delta's base (its header's CRC only: the
/// runs are [`check`]ed where the delta is decoded).
pub fn check_base(page: &[u8], delta: &[u8]) -> Result<(), DeltaError> {
    let want = u32::from_le_bytes(delta.get(..4).ok_or(DeltaError::NoHeader)?.try_into().expect("4"));
    let have = crc32fast::hash(page);
    if have != want {
        return Err(DeltaError::BaseMismatch { have, want });
    }
    Ok(())
}

/// Applies `delta` to `page` in place (base and runs checked first: an
/// error changes nothing).
pub fn apply(page: &mut [u8], delta: &[u8]) -> Result<(), DeltaError> {
    let (_, runs) = parse(delta)?;
    check_base(page, delta)?;
    for (off, bytes) in runs {
        page[off..off + bytes.len()].copy_from_slice(bytes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(f: impl Fn(usize) -> u8) -> Vec<u8> {
        (0..PAGE_SIZE).map(f).collect()
    }

    #[test]
    fn round_trip_of_a_few_changed_bytes() {
        let base = page(|i| (i * 7) as u8);
        let mut new = base.clone();
        new[0] ^= 1;
        new[100..110].fill(9);
        new[4095] ^= 0xff;
        let mut d = BytesMut::new();
        assert!(encode(&base, &new, &mut d));
        assert!(d.len() < 40, "{}", d.len());
        let mut got = base.clone();
        apply(&mut got, &d).unwrap();
        assert_eq!(got, new);
    }

    #[test]
    fn identical_pages_make_an_empty_delta() {
        let base = page(|i| i as u8);
        let mut d = BytesMut::new();
        assert!(encode(&base, &base, &mut d));
        assert_eq!(d.len(), 4);
    }

    #[test]
    fn a_page_that_changed_everywhere_goes_whole() {
        let base = page(|i| i as u8);
        let new = page(|i| !(i as u8));
        let mut d = BytesMut::from(&b"keep"[..]);
        assert!(!encode(&base, &new, &mut d));
        assert_eq!(&d[..], b"keep", "nothing appended");
    }

    #[test]
    fn the_wrong_base_is_refused_and_nothing_written() {
        let base = page(|_| 1);
        let mut new = base.clone();
        new[5] = 2;
        let mut d = BytesMut::new();
        assert!(encode(&base, &new, &mut d));
        let mut other = page(|_| 3);
        let before = other.clone();
        assert!(matches!(apply(&mut other, &d), Err(DeltaError::BaseMismatch { .. })));
        assert_eq!(other, before);
    }

    #[test]
    fn malformed_deltas_are_refused() {
        let crc = crc32fast::hash(&page(|_| 0)).to_le_bytes();
        let with = |rest: &[u8]| [&crc[..], rest].concat();
        assert_eq!(check(&[1, 2]), Err(DeltaError::NoHeader));
        assert_eq!(check(&with(&[0, 0, 1])), Err(DeltaError::CutHeader(4)));
        assert_eq!(check(&with(&[0, 0, 0, 0])), Err(DeltaError::EmptyRun(0)));
        assert!(matches!(check(&with(&[0xff, 0x0f, 2, 0, 1, 1])), Err(DeltaError::BadRun { .. })));
        assert_eq!(check(&with(&[0, 0, 4, 0, 1])), Err(DeltaError::CutRun(8)));
        // a run before the previous one's end
        assert!(matches!(check(&with(&[8, 0, 2, 0, 1, 1, 9, 0, 1, 0, 1])), Err(DeltaError::BadRun { .. })));
        assert!(matches!(check(&vec![0u8; MAX_DELTA + 1]), Err(DeltaError::TooLong(_))));
    }

    proptest::proptest! {
        #[test]
        fn apply_of_encode_is_the_new_page(
            seed in proptest::prelude::any::<u8>(),
            edits in proptest::collection::vec((0usize..PAGE_SIZE, 1usize..64, proptest::prelude::any::<u8>()), 0..40),
        ) {
            let base = page(|i| (i as u8).wrapping_mul(seed));
            let mut new = base.clone();
            for (at, len, v) in edits {
                let end = (at + len).min(PAGE_SIZE);
                new[at..end].fill(v);
            }
            let mut d = BytesMut::new();
            if encode(&base, &new, &mut d) {
                proptest::prop_assert!(d.len() <= MAX_DELTA);
                check(&d).unwrap();
                let mut got = base.clone();
                apply(&mut got, &d).unwrap();
                proptest::prop_assert_eq!(got, new);
            } else {
                proptest::prop_assert!(d.is_empty());
            }
        }
    }
}
