//! Hot-page retention, for both trackers: re-arming tracking (ring reset,
//! bitmap clear) is deferred, so pages already reported stay writable and are
//! reported, and copied, at every collection until the next re-arm.
//!
//! Why: on this project's host (KVM-PVM, nested) a tracked first write costs
//! ~30 us while copying a page costs ~0.3 us. A guest that writes the same
//! few hundred pages every epoch pays a write fault per page per epoch if
//! tracking is re-armed every epoch (the kv guest served 3.5x fewer requests
//! for exactly that reason). Retaining them trades copies for faults.
//!
//! Correctness: a page is either write-protected when written, and then KVM
//! reports it, or it is writable because it was reported since the last
//! re-arm, and then it is in the retained set that every collection reports.
//! Re-arming happens with the vCPUs stopped, so no write falls in between.
//! Nothing in the policy below can make a collection miss a page: it only
//! decides when the set is emptied (and tracking re-armed), which is always
//! safe.
//!
//! Policy (decided at each collection, after reading what KVM reported):
//! re-arm when tracking was lost; when the set would exceed
//! [`RETAIN_MAX_PAGES`] (the cap bounds what retention adds to the pause: at
//! most that many extra page copies per epoch; a streaming writer, whose
//! pages are not rewritten, reaches it quickly and then re-arms); when the
//! set has gone cold (from the [`COLD_CHECK_AFTER`]th collection since the
//! last re-arm, more than half of it unchanged for [`COLD_AFTER`]
//! collections or more); and at the latest after a number of collections
//! (default [`RETAIN_MAX_EPOCHS`]).
//!
//! Which pages changed is told by the primary's engine
//! ([`Retention::note_changed`]), which compares every copied page with the
//! copy the secondary holds. Without that feedback every retained page ages
//! and the cold rule re-arms at the [`COLD_CHECK_AFTER`]th collection, as a
//! fixed period would. With it, a set the guest keeps writing stays as long
//! as the period allows, while one swollen by a burst (the guest's boot, a
//! run of new keys) is let go early: an idle retained page costs a copy and
//! a compare, ~0.5 us an epoch, a re-arm a write fault (~30 us) for every
//! page the guest still writes.

/// Collections after which tracking is re-armed regardless (the default of
/// [`crate::MachineConfig::hot_page_epochs`]).
///
/// Why 512: each re-arm makes the guest fault on every page it keeps
/// writing (the networked guest at 64 connections: ~200 pages within 1-3
/// epochs, ~6 ms of faults, its clients' p99), while its set grows by ~1
/// page in 3 epochs beyond its hot core; docs/benchmarks.md has the sweep
/// (64 / 128 / 256 / 512) and the cold rule's measurements.
pub const RETAIN_MAX_EPOCHS: u32 = 512;
/// Largest retained set (pages); beyond it tracking is re-armed.
pub const RETAIN_MAX_PAGES: usize = 1024;
/// A retained page unchanged for this many collections is cold.
pub const COLD_AFTER: u16 = 32;
/// The cold rule is applied from this many collections after a re-arm.
pub const COLD_CHECK_AFTER: u32 = 64;

/// The retained set and the re-arm policy (see the module's doc).
#[derive(Debug)]
pub struct Retention {
    /// Collections after which tracking is re-armed regardless.
    max_epochs: u32,
    /// Sorted, unique: pages reported since the last re-arm.
    retained: Vec<u64>,
    /// Per retained page: collections since it was last reported by KVM or
    /// last changed (as [`Retention::note_changed`] said).
    idle: Vec<u16>,
    /// Collections since the last re-arm.
    since_rearm: u32,
    /// Re-arms so far.
    rearms: u64,
    /// Of which by the cold rule.
    cold_rearms: u64,
}

/// What [`Retention::decide`] concluded for one collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionDecision {
    /// Re-arm tracking now (then the retained set is emptied).
    pub rearm: bool,
    /// The pages this collection must report: the retained set united with
    /// the pages KVM reported (sorted, unique).
    pub report: Vec<u64>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention::new(RETAIN_MAX_EPOCHS)
    }
}

impl Retention {
    /// Retention that re-arms at the latest after `max_epochs` collections
    /// (at least 1).
    pub fn new(max_epochs: u32) -> Self {
        Retention {
            max_epochs: max_epochs.max(1),
            retained: Vec::new(),
            idle: Vec::new(),
            since_rearm: 0,
            rearms: 0,
            cold_rearms: 0,
        }
    }

    /// Forgets the retained set (tracking was re-armed by other means: every
    /// page is write-protected again).
    pub fn clear(&mut self) {
        self.retained.clear();
        self.idle.clear();
        self.since_rearm = 0;
    }

    /// Decides whether to re-arm now, given the pages KVM reported in this
    /// collection (any order, duplicates allowed); `must` forces a re-arm
    /// (tracking was lost, or a ring is filling up with deferred entries).
    pub fn decide(&mut self, reported: &[u64], must: bool) -> RetentionDecision {
        let mut new: Vec<u64> = reported.to_vec();
        new.sort_unstable();
        new.dedup();
        let mut report = Vec::with_capacity(self.retained.len() + new.len());
        let mut idle = Vec::with_capacity(report.capacity());
        merge_aged(&self.retained, &self.idle, &new, &mut report, &mut idle);
        // pages reported now that were not retained
        let fresh = report.len() - self.retained.len();
        let cold = idle.iter().filter(|&&i| i >= COLD_AFTER).count();
        let cold_rule = self.since_rearm + 1 >= COLD_CHECK_AFTER && 2 * cold > report.len();
        let rearm = must || self.since_rearm + 1 >= self.max_epochs || report.len() > RETAIN_MAX_PAGES || cold_rule;
        tracing::debug!(
            must,
            since = self.since_rearm,
            retained = self.retained.len(),
            fresh,
            cold,
            report = report.len(),
            rearm,
            "retention"
        );
        if rearm {
            self.cold_rearms += u64::from(cold_rule && !must);
            self.retained.clear();
            self.idle.clear();
            self.since_rearm = 0;
            self.rearms += 1;
        } else {
            self.retained.clone_from(&report);
            self.idle = idle;
            self.since_rearm += 1;
        }
        RetentionDecision { rearm, report }
    }

    /// Feedback from the replicator: these pages (sorted ascending; any may
    /// be outside the set) changed in the epoch last collected, so retained
    /// ones among them are not idle. Advisory only: it moves re-arms, never
    /// what a collection reports.
    pub fn note_changed(&mut self, changed: impl IntoIterator<Item = u64>) {
        let mut i = 0;
        for g in changed {
            while i < self.retained.len() && self.retained[i] < g {
                i += 1;
            }
            if i == self.retained.len() {
                break;
            }
            if self.retained[i] == g {
                self.idle[i] = 0;
            }
        }
    }

    /// Pages currently retained (writable, reported every collection).
    pub fn retained(&self) -> usize {
        self.retained.len()
    }

    /// Re-arms so far.
    pub fn rearms(&self) -> u64 {
        self.rearms
    }

    /// Re-arms so far made by the cold rule.
    pub fn cold_rearms(&self) -> u64 {
        self.cold_rearms
    }
}

/// Merges the retained set (sorted, unique, with each page's idle count)
/// with the pages KVM reported (sorted, unique) into `out` / `out_idle`: a
/// reported page is idle 0, a retained page not reported one older.
fn merge_aged(a: &[u64], a_idle: &[u16], b: &[u64], out: &mut Vec<u64>, out_idle: &mut Vec<u16>) {
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let take_a = j == b.len() || (i < a.len() && a[i] < b[j]);
        if take_a {
            out.push(a[i]);
            out_idle.push(a_idle[i].saturating_add(1));
            i += 1;
        } else {
            if i < a.len() && a[i] == b[j] {
                i += 1;
            }
            out.push(b[j]);
            out_idle.push(0);
            j += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_a_stable_working_set_and_rearms_on_schedule() {
        const EPOCHS: u32 = 40;
        let mut r = Retention::new(EPOCHS);
        let ws: Vec<u64> = (100..400).collect();
        let d = r.decide(&ws, false);
        assert!(!d.rearm);
        assert_eq!(d.report, ws);
        // the same pages are no longer reported by KVM (writable), yet reported
        for i in 1..EPOCHS - 1 {
            let d = r.decide(&[5, 5, 1000], false);
            assert!(!d.rearm, "collection {i}");
            assert_eq!(d.report.len(), 300 + 2);
            assert_eq!(r.retained(), 302);
        }
        let d = r.decide(&[7], false);
        assert!(d.rearm, "re-armed after EPOCHS collections");
        assert_eq!(d.report.len(), 303, "the re-arming collection still reports everything retained");
        assert_eq!(r.retained(), 0);
        assert_eq!(r.rearms(), 1);
    }

    #[test]
    fn retention_rearms_on_loss_cap_and_streaming_writers() {
        let mut r = Retention::default();
        assert!(r.decide(&[1, 2, 3], true).rearm);
        let big: Vec<u64> = (0..RETAIN_MAX_PAGES as u64 + 1).collect();
        assert!(r.decide(&big, false).rearm, "cap");
        // streaming: every collection brings 300 new pages: re-armed at the cap
        for k in 0..3u64 {
            assert!(!r.decide(&(k * 300..k * 300 + 300).collect::<Vec<_>>(), false).rearm, "collection {k}");
        }
        assert!(r.decide(&(900..1200).collect::<Vec<_>>(), false).rearm, "cap");
        // a filling working set: 100 new pages a few times, then few
        for k in 0..3u64 {
            assert!(!r.decide(&(k * 100..k * 100 + 100).collect::<Vec<_>>(), false).rearm);
        }
        let d = r.decide(&(295..330).collect::<Vec<_>>(), false);
        assert!(!d.rearm);
        assert_eq!(d.report, (0..330).collect::<Vec<_>>());
        assert_eq!(r.cold_rearms(), 0);
    }

    /// Runs collections of a guest whose hot pages 0..hot change every
    /// epoch (the engine says so) and whose other retained pages never
    /// change; returns the collection that re-armed (1-based), if any.
    fn first_rearm(r: &mut Retention, first: &[u64], hot: u64, feedback: bool, limit: u32) -> Option<u32> {
        if r.decide(first, false).rearm {
            return Some(1);
        }
        for n in 2..=limit {
            if feedback {
                r.note_changed(0..hot);
            }
            if r.decide(&[], false).rearm {
                return Some(n);
            }
        }
        None
    }

    #[test]
    fn a_set_the_guest_keeps_writing_stays_until_the_period() {
        let mut r = Retention::default();
        let first: Vec<u64> = (0..300).collect();
        // 200 of 300 pages changing: never more than half cold
        assert_eq!(first_rearm(&mut r, &first, 200, true, 1000), Some(RETAIN_MAX_EPOCHS));
        assert_eq!(r.cold_rearms(), 0);
    }

    #[test]
    fn a_set_swollen_by_a_burst_goes_at_the_cold_check() {
        let mut r = Retention::default();
        // a boot: 900 pages written once, 100 hot ones
        let first: Vec<u64> = (0..1000).collect();
        assert_eq!(first_rearm(&mut r, &first, 100, true, 1000), Some(COLD_CHECK_AFTER));
        assert_eq!(r.cold_rearms(), 1);
    }

    #[test]
    fn without_feedback_the_set_goes_at_the_cold_check() {
        let mut r = Retention::default();
        let first: Vec<u64> = (0..300).collect();
        assert_eq!(first_rearm(&mut r, &first, 300, false, 1000), Some(COLD_CHECK_AFTER));
    }

    #[test]
    fn pages_kvm_reports_again_are_not_idle_and_feedback_outside_the_set_is_ignored() {
        let mut r = Retention::default();
        r.decide(&[10, 20, 30], false);
        r.decide(&[], false);
        assert_eq!(r.idle, vec![1, 1, 1]);
        r.note_changed([1, 20, 25, 99]);
        assert_eq!(r.idle, vec![1, 0, 1]);
        // 10 and 30 idle 1 -> 2; 20 was changed -> 1; 15 new -> 0
        let d = r.decide(&[15], false);
        assert_eq!(d.report, vec![10, 15, 20, 30]);
        assert_eq!(r.idle, vec![2, 0, 1, 2]);
        r.decide(&[30, 40], false);
        assert_eq!(r.idle, vec![3, 1, 2, 0, 0]);
    }

    #[test]
    fn merge_aged_unites_and_ages() {
        let (mut out, mut idle) = (Vec::new(), Vec::new());
        merge_aged(&[1, 3, 5], &[0, 4, u16::MAX], &[2, 3, 6, 7], &mut out, &mut idle);
        assert_eq!(out, vec![1, 2, 3, 5, 6, 7]);
        assert_eq!(idle, vec![1, 0, 0, u16::MAX, 0, 0]);
    }
}
