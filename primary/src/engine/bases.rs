//! What the secondary holds of the pages shipped lately ([`Bases`]): a page
//! reported dirty again is compared with it, so an unchanged page is not
//! shipped and a page changed in a few bytes ships as a delta.
//!
//! How long a copy is kept is a window of recent epochs whose pages,
//! together, stay under [`WINDOW_PAGES`] (at most [`MAX_EPOCHS`] epochs; the
//! last epoch's copies always). Each copy is a slice of its epoch's buffer,
//! which lives as long as one slice of it does: the window bounds those
//! buffers to about [`WINDOW_PAGES`] pages plus the latest epoch. The window
//! once was 4 epochs whatever their size, and pages rewritten less often
//! than that went whole: the card's receive buffers, which the guest posts
//! 256 at a time and the device fills in turn, came round every ~10 epochs
//! at 64 connections, and were 56 of the 64 KiB an epoch shipped
//! (docs/benchmarks.md, seventh session).

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use common::proto::{delta, Page, PageData};

/// Pages of the epochs whose copies are kept, at most (64 MiB), unless the
/// latest epoch alone has more.
const WINDOW_PAGES: usize = 16 * 1024;
/// Epochs whose copies are kept, at most (the cost of a longer window is a
/// longer list to walk at each boundary).
const MAX_EPOCHS: usize = 64;

/// The content the secondary holds of one page: its last copy shipped (as
/// a whole page, a delta or dropped as unchanged), `age` delta epochs ago.
#[derive(Debug)]
struct Base {
    gfn: u64,
    data: Bytes,
    age: u8,
}

/// The recent delta epochs' pages as copied (sorted by gfn, the latest copy
/// of each): what the secondary holds of them, since it applies epochs in
/// order. Emptied by anything that is not a delta epoch.
#[derive(Debug, Default)]
pub(super) struct Bases {
    list: Vec<Base>,
    /// The page counts of the latest epochs, newest first.
    sizes: VecDeque<usize>,
}

/// How many epochs' copies to keep once an epoch of `pages` pages is added
/// to `sizes` (newest first): the most recent epochs whose pages sum to at
/// most [`WINDOW_PAGES`], at least the newest, at most [`MAX_EPOCHS`].
fn window(sizes: &mut VecDeque<usize>, pages: usize) -> usize {
    sizes.push_front(pages);
    sizes.truncate(MAX_EPOCHS);
    let mut sum = 0usize;
    let mut kept = 0;
    for &n in sizes.iter() {
        sum = sum.saturating_add(n);
        if kept > 0 && sum > WINDOW_PAGES {
            break;
        }
        kept += 1;
    }
    kept
}

impl Bases {
    /// Forgets every copy (the next epoch is not a delta epoch, or the
    /// secondary's copy is no longer known).
    pub(super) fn clear(&mut self) {
        self.list.clear();
        self.sizes.clear();
    }

    /// Compares each page with the copy the secondary holds of it: an equal
    /// page is not shipped, a page that changed in a few bytes ships as a
    /// sub-page delta. Returns the pages to ship, how many were dropped and
    /// how many are deltas. `pages` are sorted by frame number.
    pub(super) fn against(&mut self, pages: Vec<Page>) -> (Vec<Page>, u64, u64) {
        let keep_epochs = window(&mut self.sizes, pages.len());
        let prev = std::mem::take(&mut self.list);
        let mut next = Vec::with_capacity(pages.len() + prev.len());
        let mut ship = Vec::with_capacity(pages.len());
        // one buffer for the epoch's deltas (at most MAX_DELTA each)
        let mut buf = BytesMut::with_capacity(pages.len().min(4096) * 256);
        let (mut unchanged, mut deltas) = (0, 0);
        let mut older = prev.into_iter().peekable();
        // a copy from `age` epochs back is kept while its epoch is in the window
        let age = |b: Base, next: &mut Vec<Base>| {
            if usize::from(b.age) + 1 < keep_epochs {
                next.push(Base { age: b.age + 1, ..b });
            }
        };
        for p in pages {
            let mut base = None;
            while let Some(b) = older.next_if(|b| b.gfn <= p.gfn) {
                if b.gfn == p.gfn {
                    base = Some(b);
                } else {
                    age(b, &mut next);
                }
            }
            let Some(data) = p.full_data().cloned() else {
                ship.push(p);
                continue;
            };
            match base {
                Some(b) if b.data == data => unchanged += 1,
                Some(b) if b.data.len() == data.len() && delta::encode(&b.data, &data, &mut buf) => {
                    deltas += 1;
                    ship.push(Page { gfn: p.gfn, data: PageData::Delta(buf.split().freeze()) });
                }
                _ => ship.push(p.clone()),
            }
            next.push(Base { gfn: p.gfn, data, age: 0 });
        }
        for b in older {
            age(b, &mut next);
        }
        self.list = next;
        (ship, unchanged, deltas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::abi::PAGE_SIZE;

    fn page(gfn: u64, fill: u8) -> Page {
        Page::full(gfn, Bytes::from(vec![fill; PAGE_SIZE as usize]))
    }

    fn changed(gfn: u64, fill: u8, at: usize) -> Page {
        let mut v = vec![fill; PAGE_SIZE as usize];
        v[at] ^= 0xff;
        Page::full(gfn, Bytes::from(v))
    }

    fn is_delta(p: &Page) -> bool {
        matches!(p.data, PageData::Delta(_))
    }

    #[test]
    fn the_window_is_the_recent_epochs_under_the_page_bound() {
        let mut s = VecDeque::new();
        // small epochs: up to MAX_EPOCHS of them
        for i in 1..=MAX_EPOCHS + 5 {
            assert_eq!(window(&mut s, 10), i.min(MAX_EPOCHS));
        }
        // an epoch past the bound alone keeps only itself
        assert_eq!(window(&mut s, WINDOW_PAGES + 1), 1);
        assert_eq!(window(&mut s, 10), 1, "with the large epoch, the two pass the bound");
        let mut s = VecDeque::new();
        for _ in 0..10 {
            window(&mut s, WINDOW_PAGES / 4);
        }
        assert_eq!(window(&mut s, WINDOW_PAGES / 4), 4);
        assert_eq!(window(&mut s, 0), 5);
    }

    #[test]
    fn a_page_rewritten_ten_epochs_later_ships_as_a_delta() {
        let mut b = Bases::default();
        let (ship, _, _) = b.against(vec![page(7, 1)]);
        assert!(!is_delta(&ship[0]), "no copy yet: whole");
        // ten epochs of other pages (as the card's receive buffers come round)
        for i in 0..10u64 {
            let (ship, _, _) = b.against(vec![page(100 + i, 2)]);
            assert_eq!(ship.len(), 1);
        }
        let (ship, unchanged, deltas) = b.against(vec![changed(7, 1, 40)]);
        assert_eq!((ship.len(), unchanged, deltas), (1, 0, 1));
        assert!(is_delta(&ship[0]));
        // and an unchanged page is not shipped
        let (ship, unchanged, deltas) = b.against(vec![changed(7, 1, 40), page(100, 2)]);
        assert_eq!((ship.len(), unchanged, deltas), (0, 2, 0));
    }

    #[test]
    fn copies_leave_the_window_and_a_clear_forgets_them() {
        let mut b = Bases::default();
        b.against(vec![page(7, 1)]);
        for i in 0..MAX_EPOCHS as u64 {
            b.against(vec![page(1000 + i, 2)]);
        }
        let (ship, _, deltas) = b.against(vec![changed(7, 1, 40)]);
        assert_eq!((deltas, is_delta(&ship[0])), (0, false), "past MAX_EPOCHS: whole");
        // a large epoch pushes the older copies out at once
        b.against(vec![page(7, 1)]);
        let big: Vec<Page> = (0..WINDOW_PAGES as u64 + 1).map(|g| page(1_000_000 + g, 3)).collect();
        b.against(big);
        let (_, unchanged, _) = b.against(vec![page(7, 1)]);
        assert_eq!(unchanged, 0, "dropped by the large epoch");
        b.clear();
        let (_, unchanged, deltas) = b.against(vec![page(7, 1)]);
        assert_eq!((unchanged, deltas), (0, 0));
    }
}
