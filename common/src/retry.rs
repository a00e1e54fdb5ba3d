//! Retry pauses: jittered exponential backoff (the `backon` crate), so that
//! what retries (an accept that failed, a redial, a client's next try) does
//! not spin on a lasting error nor retry in step with its peers.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder, Retryable};

/// Pauses from `min` doubling up to `max`, each with a random jitter of up
/// to itself added (so from `min` to just under `2 * max`), without end.
pub fn backoff(min: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default().with_min_delay(min).with_max_delay(max).with_jitter().without_max_times().build()
}

/// The next pause of `b` (never ends: built by [`backoff`]).
pub fn next_pause(b: &mut ExponentialBackoff) -> Duration {
    b.next().unwrap_or(Duration::from_secs(1))
}

/// First pause after a failed accept.
const ACCEPT_MIN: Duration = Duration::from_millis(5);
/// Longest pause between failed accepts.
const ACCEPT_MAX: Duration = Duration::from_millis(500);

/// The next connection `accept()` gives: a failure (out of descriptors, a
/// connection reset before it was accepted) is retried after a growing,
/// jittered pause rather than spun on.
pub async fn accept<T, F, Fut>(mut accept: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    let builder = ExponentialBuilder::default()
        .with_min_delay(ACCEPT_MIN)
        .with_max_delay(ACCEPT_MAX)
        .with_jitter()
        .without_max_times();
    loop {
        // retried without a limit: only a success comes back
        if let Ok(conn) = (&mut accept).retry(builder).await {
            return conn;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_cap_with_jitter_and_never_end() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(40));
        let mut b = backoff(min, max);
        let p: Vec<Duration> = (0..50).map(|_| next_pause(&mut b)).collect();
        assert!(p.iter().all(|d| *d >= min && *d < 2 * max), "{p:?}");
        assert!(p[10..].iter().all(|d| *d >= max), "capped at max plus jitter: {p:?}");
        assert!(p[10..].windows(2).any(|w| w[0] != w[1]), "no jitter: {p:?}");
    }

    #[tokio::test]
    async fn a_failed_accept_is_retried_until_one_succeeds() {
        let mut tries = 0;
        let got = accept(|| {
            tries += 1;
            let n = tries;
            async move {
                if n < 3 {
                    Err(std::io::Error::other("EMFILE"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(got, 3);
    }
}
