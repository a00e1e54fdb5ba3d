//! Whether the primary is alive, as the secondary sees it: when it was last
//! heard ([`Liveness`]) and what one silence check concludes from that
//! ([`judge_silence`], shared with the primary's heartbeats: `common::liveness`).

use std::time::{Duration, Instant};

pub(crate) use common::liveness::{judge_silence, Silence};

/// When the primary was last heard (any frame of a session), and whether it
/// was heard at all since the last refused claim.
#[derive(Debug)]
pub(crate) struct Liveness {
    pub(crate) last_heard: Instant,
    pub(crate) heard: bool,
}

impl Liveness {
    pub(crate) fn new() -> Self {
        Liveness { last_heard: Instant::now(), heard: false }
    }

    /// The primary was heard just now.
    pub(crate) fn heard_now(&mut self) {
        self.last_heard = Instant::now();
        self.heard = true;
    }

    /// One silence check, `check_waited` after it was armed (and whether
    /// the check before it found this process stalled), at `timeout`: what
    /// it concludes and how long the primary has not been heard.
    pub(crate) fn judge(&self, check_waited: Duration, stalled_last: bool, timeout: Duration) -> (Silence, Duration) {
        let since = self.last_heard.elapsed();
        (judge_silence(check_waited, stalled_last, self.heard, since, timeout), since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_liveness_never_heard_is_never_silent() {
        let mut l = Liveness::new();
        assert_eq!(l.judge(Duration::ZERO, false, Duration::ZERO).0, Silence::Heard);
        l.heard_now();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(l.judge(Duration::ZERO, false, Duration::from_millis(1)).0, Silence::Silent);
    }
}
