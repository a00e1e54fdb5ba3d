//! Frames the guest sent that have not left the host yet, carried in every
//! saved state ([`Unreleased`]).
//!
//! A takeover releases again the outbox of the state it restores (epoch
//! N's own frames). But the frames of an earlier epoch may not have left
//! either: the secondary can commit N (and ack it) while this node is
//! still to write N-1's frames, acked a moment before; a kill -9 then
//! loses them, and the guest, whose state says they were sent, sends them
//! again only when its TCP retransmission timer fires (smoltcp's is at
//! least 1 s). So every state this engine saves carries, ahead of its own
//! outbox, every frame produced before it that the router has not written
//! out yet. A frame written just after the save goes out twice if a
//! takeover follows; TCP drops the copy.
//!
//! The router releases frames in the order the engine produced them (epoch
//! order; the unprotected path in order too), so one counter of frames
//! written ([`super::EngineShared::frames_released`]) tells which of them
//! are out: those with an index below it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::state::Output;

/// At most this many bytes of earlier frames ride in one state (a state
/// must stay well below [`common::proto::MAX_STATE_BYTES`], and each of them
/// travels in every state until it is written); past it the oldest are
/// left out: a takeover then sends only the newest, and the guest's TCP
/// retransmits the rest. In protected operation the frames not yet written
/// are those of the epochs waiting for their ack: far less.
pub const MAX_UNRELEASED_BYTES: usize = 2 << 20;

#[derive(Debug)]
pub struct Unreleased {
    /// Frames not yet known to be written, oldest first.
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Frames produced so far (the index of the next one).
    produced: u64,
    /// Frames the router has written so far (in production order).
    released: Arc<AtomicU64>,
    /// Frames forgotten past [`MAX_UNRELEASED_BYTES`].
    pub forgotten: u64,
    /// Frames left out of states past [`MAX_UNRELEASED_BYTES`] (a frame
    /// counts once per state it missed).
    pub left_out: u64,
}

impl Unreleased {
    pub fn new(released: Arc<AtomicU64>) -> Unreleased {
        // frames the router wrote before this engine began (none: a node
        // has one engine) are not ours
        let produced = released.load(Ordering::Acquire);
        Unreleased { frames: VecDeque::new(), bytes: 0, produced, released, forgotten: 0, left_out: 0 }
    }

    /// Drops the frames the router has written.
    fn trim(&mut self) {
        let out = self.released.load(Ordering::Acquire);
        // the front frame's index is produced - len
        while !self.frames.is_empty() && self.produced - (self.frames.len() as u64) < out {
            let Some(f) = self.frames.pop_front() else { break };
            self.bytes -= f.len();
        }
    }

    /// The frames among `outputs` were produced now (in this order).
    pub fn produced(&mut self, outputs: &[Output]) {
        // (a node running alone writes at once: keep no copies of those)
        self.trim();
        for o in outputs {
            if let Output::Frame(f) = o {
                self.produced += 1;
                self.bytes += f.len();
                self.frames.push_back(f.clone());
            }
        }
        while self.bytes > MAX_UNRELEASED_BYTES {
            let Some(f) = self.frames.pop_front() else { break };
            self.bytes -= f.len();
            self.forgotten += 1;
        }
    }

    /// Puts every frame produced before and not yet written ahead of a
    /// saved outbox, oldest first; `earlier` (output held from before the
    /// save, not in the outbox, not yet [`Unreleased::produced`]) goes
    /// between them.
    ///
    /// At most [`MAX_UNRELEASED_BYTES`] of them, the newest.
    pub fn prepend(&mut self, earlier: &[Output], outbox: &mut Vec<Output>) {
        self.trim();
        let early = earlier.iter().filter_map(|o| match o {
            Output::Frame(f) => Some(f),
            _ => None,
        });
        let all: Vec<&Vec<u8>> = self.frames.iter().chain(early).collect();
        if all.is_empty() {
            return;
        }
        // the newest that fit
        let (mut bytes, mut first) = (0usize, all.len());
        while first > 0 && bytes + all[first - 1].len() <= MAX_UNRELEASED_BYTES {
            first -= 1;
            bytes += all[first].len();
        }
        self.left_out += first as u64;
        let mut v: Vec<Output> = all[first..].iter().map(|f| Output::Frame((*f).clone())).collect();
        v.append(outbox);
        *outbox = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(b: u8) -> Output {
        Output::Frame(vec![b; 60])
    }

    fn frames_of(v: &[Output]) -> Vec<u8> {
        v.iter()
            .filter_map(|o| match o {
                Output::Frame(f) => Some(f[0]),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_state_carries_the_frames_not_yet_written_oldest_first() {
        let out = Arc::new(AtomicU64::new(0));
        let mut u = Unreleased::new(Arc::clone(&out));
        // epoch 1: frames 1 2 (and a console line, not a frame)
        u.produced(&[frame(1), Output::Console { cpu: 0, line: "x".into() }, frame(2)]);
        // epoch 2's state: 1 and 2 are not out yet
        let mut outbox = vec![frame(3)];
        u.prepend(&[], &mut outbox);
        assert_eq!(frames_of(&outbox), vec![1, 2, 3]);
        u.produced(&[frame(3)]);
        // the router wrote 1: epoch 3's state carries 2 and 3, then its own
        out.store(1, Ordering::Release);
        let mut outbox = vec![frame(4)];
        u.prepend(&[], &mut outbox);
        assert_eq!(frames_of(&outbox), vec![2, 3, 4]);
        u.produced(&[frame(4)]);
        // everything written: nothing carried
        out.store(4, Ordering::Release);
        let mut outbox = vec![frame(5)];
        u.prepend(&[], &mut outbox);
        assert_eq!(frames_of(&outbox), vec![5]);
        assert_eq!(u.frames.len(), 0);
    }

    #[test]
    fn output_held_from_before_the_save_goes_between() {
        let out = Arc::new(AtomicU64::new(0));
        let mut u = Unreleased::new(Arc::clone(&out));
        u.produced(&[frame(1)]);
        let mut outbox = vec![frame(3)];
        u.prepend(&[frame(2), Output::Mark { cpu: 0, value: 1 }], &mut outbox);
        assert_eq!(frames_of(&outbox), vec![1, 2, 3]);
        assert_eq!(outbox.len(), 3, "only frames are carried");
    }

    #[test]
    fn frames_written_before_the_engine_began_are_not_counted_as_ours() {
        let out = Arc::new(AtomicU64::new(7));
        let mut u = Unreleased::new(Arc::clone(&out));
        u.produced(&[frame(1)]);
        let mut outbox = Vec::new();
        u.prepend(&[], &mut outbox);
        assert_eq!(frames_of(&outbox), vec![1]);
        out.store(8, Ordering::Release);
        let mut outbox = Vec::new();
        u.prepend(&[], &mut outbox);
        assert!(outbox.is_empty());
    }

    #[test]
    fn a_state_carries_at_most_the_cap_the_newest_first() {
        let out = Arc::new(AtomicU64::new(0));
        let mut u = Unreleased::new(out);
        let n = MAX_UNRELEASED_BYTES >> 16;
        for i in 0..n {
            u.produced(&[Output::Frame(vec![(i % 250) as u8; 1 << 16])]);
        }
        // n frames kept; two more held from before the save: the two oldest
        // kept are left out of the state
        let earlier = [Output::Frame(vec![251; 1 << 16]), Output::Frame(vec![252; 1 << 16])];
        let mut outbox = vec![frame(253)];
        u.prepend(&earlier, &mut outbox);
        let got = frames_of(&outbox);
        assert_eq!(got.len(), n + 1);
        assert_eq!(&got[got.len() - 3..], &[251, 252, 253]);
        assert_eq!(got[0], 2, "the oldest two left out");
        assert_eq!(u.left_out, 2);
    }

    #[test]
    fn a_node_running_alone_keeps_no_copies_of_what_it_wrote() {
        let out = Arc::new(AtomicU64::new(0));
        let mut u = Unreleased::new(Arc::clone(&out));
        for i in 0..100u8 {
            u.produced(&[frame(i)]);
            out.fetch_add(1, Ordering::Release);
        }
        u.produced(&[frame(100)]);
        assert_eq!(u.frames.len(), 1, "only the frame not yet written");
    }

    #[test]
    fn what_is_kept_is_bounded() {
        let out = Arc::new(AtomicU64::new(0));
        let mut u = Unreleased::new(out);
        let big = Output::Frame(vec![0; 1 << 16]);
        for _ in 0..(MAX_UNRELEASED_BYTES >> 16) + 10 {
            u.produced(std::slice::from_ref(&big));
        }
        assert_eq!(u.forgotten, 10);
        assert_eq!(u.frames.len(), MAX_UNRELEASED_BYTES >> 16);
    }
}
