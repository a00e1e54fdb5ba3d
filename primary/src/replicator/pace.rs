//! The link's pace: the ack deadline that follows the bytes ahead
//! ([`LinkPace`]) and what the writer counts ([`LinkMeter`]).

use std::time::{Duration, Instant};

use crate::engine::EpochPacket;

/// The ack deadline follows the bytes ahead: the oldest unacknowledged
/// epoch must be acknowledged within a base (4 x the peer timeout) plus the
/// time for every byte ahead of that ack (queued for the writer, or written
/// and not yet acknowledged) at [`DEADLINE_LINK_RATE`]. A fixed deadline
/// counted from when an epoch is queued failed large epochs, epochs behind a
/// large live sync, and a flooding guest's epochs on a link that was merely
/// slow. The rate the acks measure (ack-clocked, [`LinkPace::rate`]) is not
/// used to shorten it: a link can slow down at once (the console-flood test
/// throttles it), and a dead secondary is found by the heartbeats,
/// not by this deadline. Past the deadline the session is lost only if the
/// link has stopped moving too: no heartbeat reply for [`DATA_STALL`] (or
/// the base, if longer) counted more bytes read by the secondary (a link slower than the assumed
/// rate, where an epoch's ack takes seconds, keeps its session; a secondary
/// that reads nothing, or has read everything and acknowledges nothing, loses
/// it).
#[derive(Debug, Default)]
pub(crate) struct LinkPace {
    /// Written epochs not yet acknowledged: (epoch, bytes).
    unacked: std::collections::VecDeque<(u64, u64)>,
    /// Ack-clocked rate, bytes/s (EWMA over windows of 256 KiB or more).
    rate: f64,
    window: u64,
    window_start: Option<Instant>,
}

/// How long no byte of the data connection may be read by the secondary
/// (at least; the base deadline if longer) before a missing ack ends the
/// session. A slow link forwards in bursts (a retransmission alone can
/// stall it for a second); the heartbeats find a dead secondary sooner.
const DATA_STALL: Duration = Duration::from_secs(2);

/// The rate the deadline assumes for the bytes ahead, bytes/s.
const DEADLINE_LINK_RATE: f64 = 1048576.0;
/// At most this much is added to the base deadline.
const MAX_LINK_WAIT: Duration = Duration::from_secs(60);

impl LinkPace {
    pub(crate) fn written(&mut self, epoch: u64, bytes: u64) {
        self.unacked.push_back((epoch, bytes));
    }

    pub(crate) fn acked(&mut self, epoch: u64, now: Instant) {
        while let Some(&(e, b)) = self.unacked.front() {
            if e > epoch {
                break;
            }
            self.window += b;
            self.unacked.pop_front();
        }
        let start = *self.window_start.get_or_insert(now);
        if self.window >= 256 << 10 && now > start {
            let sample = self.window as f64 / (now - start).as_secs_f64();
            self.rate = if self.rate > 0.0 { 0.8 * self.rate + 0.2 * sample } else { sample };
            self.window = 0;
            self.window_start = Some(now);
        }
    }

    /// What the acks say the link carries, bytes/s (0 until measured).
    pub(crate) fn rate(&self) -> f64 {
        self.rate
    }

    /// The deadline for the oldest unacknowledged epoch, with `queued` bytes
    /// still waiting for the writer.
    pub(crate) fn deadline(&self, base: Duration, queued: u64) -> Duration {
        let ahead = queued + self.unacked.iter().map(|&(_, b)| b).sum::<u64>();
        base + Duration::from_secs_f64(ahead as f64 / DEADLINE_LINK_RATE).min(MAX_LINK_WAIT)
    }

    /// The oldest unacknowledged epoch has `waited` for its ack, and the
    /// secondary has read no byte of the data connection for `still`: is
    /// the session lost? Only past the deadline *and* with the link still.
    pub(crate) fn overdue(&self, base: Duration, queued: u64, waited: Duration, still: Duration) -> bool {
        waited > self.deadline(base, queued) && still > base.max(DATA_STALL)
    }
}

/// What the writer saw: bytes queued and not yet written, and the epochs it
/// wrote (for the session loop's [`LinkPace`]).
#[derive(Debug, Default)]
pub(super) struct LinkMeter {
    pub(super) queued: std::sync::atomic::AtomicU64,
    pub(super) written: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl LinkMeter {
    pub(super) fn sent(&self, bytes: u64) {
        let q = &self.queued;
        let _ = q.fetch_update(std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed, |v| {
            Some(v.saturating_sub(bytes))
        });
    }
}

pub(super) fn page_bytes(pages: &[common::proto::Page]) -> u64 {
    common::proto::pages_bytes(pages)
}

/// What an epoch puts on the link, estimated before it is encoded: its
/// pages, and its state, whose size is mostly the undrained output (a
/// flooding guest's console lines).
pub(super) fn epoch_bytes(e: &EpochPacket) -> u64 {
    page_bytes(&e.pages) + e.state.devices.outbox.len() as u64 * 64 + (16 << 10)
}

#[cfg(test)]
mod pace_tests {
    use super::*;

    #[test]
    fn a_missing_ack_ends_the_session_only_once_the_link_stands_still() {
        let base = Duration::from_millis(400);
        let mut p = LinkPace::default();
        p.written(1, 1 << 20);
        let deadline = p.deadline(base, 0);
        let (late, moving) = (deadline + Duration::from_secs(10), Duration::from_millis(300));
        assert!(!p.overdue(base, 0, late, moving), "a slow link that moves keeps its session");
        assert!(!p.overdue(base, 0, deadline / 2, DATA_STALL * 10), "before the deadline: kept");
        assert!(p.overdue(base, 0, late, DATA_STALL + Duration::from_millis(1)), "late and still: lost");
        assert!(!p.overdue(base, 0, late, DATA_STALL), "still for exactly the stall window: kept");
        let long = Duration::from_secs(5);
        assert!(!p.overdue(long, 0, p.deadline(long, 0) + base, long), "a base longer than the window rules");
        assert!(p.overdue(long, 0, p.deadline(long, 0) + base, long + base));
    }

    #[test]
    fn the_ack_deadline_grows_with_the_bytes_ahead() {
        let base = Duration::from_millis(400);
        let mib = 1048576u64;
        let mut p = LinkPace::default();
        assert_eq!(p.deadline(base, 0), base, "nothing ahead: the base");
        assert_eq!(p.deadline(base, 3 * mib), base + Duration::from_secs(3), "queued bytes at 1 MiB/s");
        // written epochs count until acknowledged
        p.written(5, 2 * mib);
        p.written(6, mib);
        assert_eq!(p.deadline(base, 0), base + Duration::from_secs(3));
        let t0 = Instant::now();
        p.acked(5, t0);
        assert_eq!(p.deadline(base, 0), base + Duration::from_secs(1));
        p.acked(9, t0 + Duration::from_millis(500));
        assert_eq!(p.deadline(base, 0), base);
        // a stuck link is not waited for forever
        assert_eq!(p.deadline(base, u64::MAX / 2), base + MAX_LINK_WAIT);
    }

    #[test]
    fn acks_measure_the_link_rate() {
        let mib = 1048576u64;
        let mut p = LinkPace::default();
        let t0 = Instant::now();
        p.acked(0, t0); // opens the window
        p.written(1, 4 * mib);
        p.acked(1, t0 + Duration::from_secs(2));
        assert!((p.rate() - 2.0 * mib as f64).abs() < 1.0, "{}", p.rate());
        let m = LinkMeter::default();
        m.queued.store(10, std::sync::atomic::Ordering::Relaxed);
        m.sent(25);
        assert_eq!(m.queued.load(std::sync::atomic::Ordering::Relaxed), 0, "never below zero");
    }
}
