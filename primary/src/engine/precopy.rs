//! Pre-copy: pages copied while the guest runs ([`PreCopy`]), and their
//! merge with the boundary's copies.

use std::sync::atomic::Ordering;

use common::proto::Page;
use vmm::abi::PAGE_SIZE;

use super::pool::PooledBuf;
use super::Engine;

/// The current epoch's pre-copy rounds: each round's pages (sorted) and
/// their copies, made while the guest ran after the round re-armed their
/// tracking. A later round's copy of a page replaces an earlier one; the
/// boundary's copy replaces both.
#[derive(Debug, Default)]
pub(super) struct PreCopy {
    pub(super) rounds: Vec<(Vec<u64>, PooledBuf)>,
}

impl PreCopy {
    pub(super) fn clear(&mut self) {
        self.rounds.clear();
    }

    /// Pages copied by this epoch's rounds (a page copied twice counts twice).
    pub(super) fn pages(&self) -> u64 {
        self.rounds.iter().map(|(g, _)| g.len() as u64).sum()
    }

    /// The latest copy of every pre-copied page the boundary did not
    /// collect (`collected`: sorted), sorted by gfn.
    pub(super) fn take_uncollected(&mut self, collected: &[u64]) -> Vec<Page> {
        let rounds = std::mem::take(&mut self.rounds);
        let mut latest: std::collections::HashMap<u64, (usize, usize)> = std::collections::HashMap::new();
        for (r, (gfns, _)) in rounds.iter().enumerate() {
            for (i, &g) in gfns.iter().enumerate() {
                latest.insert(g, (r, i));
            }
        }
        let mut keep: Vec<(u64, (usize, usize))> =
            latest.into_iter().filter(|(g, _)| collected.binary_search(g).is_err()).collect();
        keep.sort_unstable_by_key(|k| k.0);
        let ps = PAGE_SIZE as usize;
        let bufs: Vec<bytes::Bytes> = rounds.into_iter().map(|(_, b)| bytes::Bytes::from_owner(b)).collect();
        keep.into_iter().map(|(gfn, (r, i))| Page::full(gfn, bufs[r].slice(i * ps..(i + 1) * ps))).collect()
    }
}

/// Merges two page lists sorted by gfn with no gfn in both.
pub(super) fn merge_pages(a: Vec<Page>, b: Vec<Page>) -> Vec<Page> {
    if b.is_empty() {
        return a;
    }
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.gfn < y.gfn,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return out,
        };
        out.extend(if take_a { a.next() } else { b.next() });
    }
}

impl Engine {
    /// One pre-copy round: re-arm the pages waiting in the rings and copy
    /// them while the guest runs.
    pub(super) fn precopy_round(&mut self) -> Result<(), vmm::MachineError> {
        let Some(gfns) = self.machine.precopy_round()? else {
            // tracking is in doubt: the boundary's collection says so
            return Ok(());
        };
        if gfns.is_empty() {
            return Ok(());
        }
        let mut buf = self.pool.take(gfns.len() * PAGE_SIZE as usize);
        self.machine.copy_pages_running(&gfns, &mut buf.0)?;
        self.pre.rounds.push((gfns, buf));
        self.shared.precopy_rounds.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::pool::BufPool;

    fn round(pool: &BufPool, gfns: &[u64], fill: u8) -> (Vec<u64>, PooledBuf) {
        let mut b = pool.take(gfns.len() * PAGE_SIZE as usize);
        b.0.fill(fill);
        (gfns.to_vec(), b)
    }

    fn summary(pages: &[Page]) -> Vec<(u64, u8)> {
        pages.iter().map(|p| (p.gfn, p.full_data().map_or(0, |d| d[0]))).collect()
    }

    #[test]
    fn the_latest_round_copy_of_each_uncollected_page_is_shipped() {
        let pool = BufPool::default();
        let mut pre = PreCopy::default();
        pre.rounds.push(round(&pool, &[1, 3, 5, 9], b'a'));
        pre.rounds.push(round(&pool, &[3, 7], b'b'));
        assert_eq!(pre.pages(), 6);
        // the boundary collected 5 and 9 again: its copies win
        let got = pre.take_uncollected(&[5, 9]);
        assert_eq!(summary(&got), vec![(1, b'a'), (3, b'b'), (7, b'b')]);
        assert!(pre.rounds.is_empty() && pre.pages() == 0);
        assert!(pre.take_uncollected(&[]).is_empty());
    }

    #[test]
    fn boundary_pages_and_round_pages_merge_in_gfn_order() {
        let page = |gfn: u64, b: u8| Page::full(gfn, bytes::Bytes::from(vec![b; 8]));
        let a = vec![page(2, b'x'), page(5, b'x'), page(8, b'x')];
        let b = vec![page(1, b'y'), page(3, b'y'), page(9, b'y')];
        let m = merge_pages(a, b);
        assert_eq!(summary(&m), vec![(1, b'y'), (2, b'x'), (3, b'y'), (5, b'x'), (8, b'x'), (9, b'y')]);
        assert_eq!(summary(&merge_pages(Vec::new(), vec![page(4, b'z')])), vec![(4, b'z')]);
    }
}
