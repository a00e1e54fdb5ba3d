//! Rate-limited logging: what a peer or a stranger can repeat at will (a
//! refused handshake, a misconfigured peer that redials every 100 ms) is
//! logged at most once per key and period, with the count left out since.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one message per key per `period`.
#[derive(Debug)]
pub struct LogLimiter {
    period: Duration,
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

/// Distinct keys remembered at most (a stranger cannot grow the map
/// without bound: past this, the oldest half is forgotten).
const MAX_KEYS: usize = 256;

impl LogLimiter {
    pub fn new(period: Duration) -> Self {
        LogLimiter { period, seen: Mutex::default() }
    }

    /// Whether to log `key` now: `Some(n)` with the number of messages of
    /// this key left out since the last one logged, `None` to stay quiet.
    pub fn allow(&self, key: &str) -> Option<u64> {
        let mut seen = common::sync::lock(&self.seen);
        let now = Instant::now();
        if let Some((at, skipped)) = seen.get_mut(key) {
            if now.duration_since(*at) < self.period {
                *skipped += 1;
                return None;
            }
            let n = std::mem::take(skipped);
            *at = now;
            return Some(n);
        }
        if seen.len() >= MAX_KEYS {
            let mut by_age: Vec<(Instant, String)> = seen.iter().map(|(k, (t, _))| (*t, k.clone())).collect();
            by_age.sort();
            for (_, k) in by_age.into_iter().take(MAX_KEYS / 2) {
                seen.remove(&k);
            }
        }
        seen.insert(key.to_string(), (now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_period_per_key_with_the_count_left_out() {
        let l = LogLimiter::new(Duration::from_millis(200));
        assert_eq!(l.allow("a"), Some(0));
        assert_eq!(l.allow("a"), None);
        assert_eq!(l.allow("a"), None);
        assert_eq!(l.allow("b"), Some(0), "another key is its own");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(l.allow("a"), Some(2));
        for i in 0..1000 {
            l.allow(&format!("k{i}"));
        }
        assert!(common::sync::lock(&l.seen).len() <= MAX_KEYS);
    }
}
