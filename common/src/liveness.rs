//! How a node judges its peer's silence, on both sides of a pair: one
//! check ([`judge_silence`]) that refuses to judge when the check itself
//! ran late, because then this process was stalled (a frozen or saturated
//! host, a busy runtime, a long `munmap`) and the peer's frames may be
//! waiting in its sockets, unread.

use std::time::Duration;

/// A silence check that ran later than this past its due time found this
/// process stalled: it judges nothing and the next check (one period later)
/// judges, after the frames that arrived meanwhile were read, even if it
/// runs late too (a host slow at every check must still find a dead peer).
/// A real silence is then found at most one period late.
pub const SELF_STALL: Duration = Duration::from_millis(25);

/// What one silence check concludes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// The check itself came late: this process was stalled and the
    /// peer's frames may wait in its sockets, unread. Nothing is judged
    /// this round.
    Stalled,
    /// The peer was heard once and not for longer than the timeout.
    Silent,
    /// Heard recently, or never heard yet (nothing to judge).
    Heard,
}

/// One silence check: `check_late`, how late the check ran (the
/// secondary's 5 ms check counts its whole wait, the primary's heartbeat
/// tick its delay past the tick); whether the check before it concluded
/// [`Silence::Stalled`] (then this one judges, however late); whether the
/// peer was ever heard; for how long it has not been; and the timeout.
pub fn judge_silence(
    check_late: Duration,
    stalled_last: bool,
    heard: bool,
    since: Duration,
    timeout: Duration,
) -> Silence {
    if check_late > SELF_STALL && !stalled_last {
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
        assert_eq!(judge_silence(ms(5), false, true, ms(101), timeout), Silence::Silent);
        assert_eq!(judge_silence(ms(5), false, true, ms(100), timeout), Silence::Heard);
        assert_eq!(judge_silence(ms(5), false, false, ms(5000), timeout), Silence::Heard);
        // a check that ran late (this process stalled) judges nothing,
        // however long the peer seems silent: its frames may be unread
        assert_eq!(judge_silence(SELF_STALL + ms(1), false, true, ms(500), timeout), Silence::Stalled);
        assert_eq!(judge_silence(SELF_STALL, false, true, ms(500), timeout), Silence::Silent);
        // but never twice in a row: a host late at every check still
        // finds a dead peer, one check later
        assert_eq!(judge_silence(SELF_STALL + ms(1), true, true, ms(500), timeout), Silence::Silent);
        assert_eq!(judge_silence(SELF_STALL + ms(1), true, true, ms(50), timeout), Silence::Heard);
    }
}
