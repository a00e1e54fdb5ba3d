//! Whether the primary is alive, as the secondary sees it: when it was last
//! heard ([`Liveness`]) and what one silence check concludes from that
//! ([`judge_silence`]).

use std::time::{Duration, Instant};

/// A silence check (5 ms after the node's loop last went round) that comes
/// later than this after it was armed found this process stalled: it waits
/// one more check, so the heartbeats that arrived meanwhile are read before
/// the primary is judged silent (a failover then comes at most one check
/// later).
pub(crate) const SELF_STALL: Duration = Duration::from_millis(25);

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

    /// One silence check, `check_waited` after it was armed, at `timeout`:
    /// what it concludes and how long the primary has not been heard.
    pub(crate) fn judge(&self, check_waited: Duration, timeout: Duration) -> (Silence, Duration) {
        let since = self.last_heard.elapsed();
        (judge_silence(check_waited, self.heard, since, timeout), since)
    }
}

/// What one silence check concludes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Silence {
    /// The check itself came late: this process was stalled (a frozen
    /// host, a blocked runtime) and heartbeats may wait in its socket,
    /// unread. Nothing is judged this round.
    Stalled,
    /// The primary was heard once and not for longer than the timeout.
    Silent,
    /// Heard recently, or never heard yet (nothing to fail over from).
    Heard,
}

/// The secondary's silence check: `check_waited` since the check was armed
/// (5 ms nominal), whether the primary was ever heard, for how long not,
/// and the heartbeat timeout.
pub(crate) fn judge_silence(check_waited: Duration, heard: bool, since: Duration, timeout: Duration) -> Silence {
    if check_waited > SELF_STALL {
        Silence::Stalled
    } else if heard && since > timeout {
        Silence::Silent
    } else {
        Silence::Heard
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_check_judges_nothing_and_an_on_time_one_judges_the_timeout() {
        let ms = Duration::from_millis;
        let timeout = ms(100);
        // on time: silent only once heard and past the timeout
        assert_eq!(judge_silence(ms(5), true, ms(101), timeout), Silence::Silent);
        assert_eq!(judge_silence(ms(5), true, ms(100), timeout), Silence::Heard);
        assert_eq!(judge_silence(ms(5), false, ms(5000), timeout), Silence::Heard);
        // a check that fired late (this process stalled) judges nothing,
        // however long the primary seems silent: its heartbeats may be unread
        assert_eq!(judge_silence(SELF_STALL + ms(1), true, ms(500), timeout), Silence::Stalled);
        assert_eq!(judge_silence(SELF_STALL, true, ms(500), timeout), Silence::Silent);
    }

    #[test]
    fn a_liveness_never_heard_is_never_silent() {
        let mut l = Liveness::new();
        assert_eq!(l.judge(Duration::ZERO, Duration::ZERO).0, Silence::Heard);
        l.heard_now();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(l.judge(Duration::ZERO, Duration::from_millis(1)).0, Silence::Silent);
    }
}
