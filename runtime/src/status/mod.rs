//! Node status (control API `status`) and Prometheus metrics text.

mod metrics;
mod snapshot;

use std::sync::Mutex;

use common::sync::lock;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use snapshot::p50_p99;
pub use snapshot::{PhasePercentiles, Phases, Protection, Role, StatusSnapshot, WitnessStatus};

/// One latency histogram per part of the pause, by its `phase` label.
type PhaseHistograms = Family<[(&'static str, &'static str); 1], Histogram, fn() -> Histogram>;

/// Shared, updated by the node's tasks.
#[derive(Debug)]
pub struct NodeStatus {
    snap: Mutex<StatusSnapshot>,
    /// Recent values, for the percentiles in the status.
    ack_lat: Mutex<Vec<f64>>,
    /// Recent epoch boundaries (their pauses and the parts of them).
    epochs: Mutex<Vec<Phases>>,
    holds: Mutex<Vec<f64>>,
    /// Every value since start, for the metrics.
    pause_hist: Histogram,
    /// The parts of every pause, by `phase` label.
    phase_hist: PhaseHistograms,
    ack_hist: Histogram,
    hold_hist: Histogram,
}

/// Upper bounds of the latency histograms (us).
const LATENCY_BUCKETS_US: [f64; 10] = [50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 50000.0, 200000.0];

impl Default for NodeStatus {
    fn default() -> Self {
        NodeStatus {
            snap: Mutex::default(),
            ack_lat: Mutex::default(),
            epochs: Mutex::default(),
            holds: Mutex::default(),
            pause_hist: Histogram::new(LATENCY_BUCKETS_US),
            phase_hist: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS_US)),
            ack_hist: Histogram::new(LATENCY_BUCKETS_US),
            hold_hist: Histogram::new(LATENCY_BUCKETS_US),
        }
    }
}

fn push_bounded<T>(v: &mut Vec<T>, x: T) {
    if v.len() >= 4096 {
        v.drain(..2048);
    }
    v.push(x);
}

impl NodeStatus {
    pub fn new(node: &str, role: Role, generation: u64) -> Self {
        let s = NodeStatus::default();
        {
            let mut g = s.lock();
            g.node = node.into();
            g.role = role;
            g.generation = generation;
        }
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusSnapshot> {
        lock(&self.snap)
    }

    /// Applies `f` to the snapshot.
    pub fn update(&self, f: impl FnOnce(&mut StatusSnapshot)) {
        f(&mut self.lock());
    }

    pub fn record_ack_latency(&self, us: f64) {
        self.ack_hist.observe(us);
        push_bounded(&mut lock(&self.ack_lat), us);
    }

    /// An acknowledged epoch's oldest output waited `us` until its release.
    pub fn record_output_hold(&self, us: f64) {
        self.hold_hist.observe(us);
        push_bounded(&mut lock(&self.holds), us);
    }

    /// An epoch boundary: its pause and the parts of it.
    pub fn record_boundary(&self, p: &Phases) {
        self.pause_hist.observe(p.pause_us);
        for (phase, us) in [
            ("stop", p.stop_us),
            ("collect", p.collect_us),
            ("copy", p.copy_us),
            ("save", p.save_us),
            ("resume", p.resume_us),
        ] {
            self.phase_hist.get_or_create(&[("phase", phase)]).observe(us);
        }
        push_bounded(&mut lock(&self.epochs), *p);
    }

    /// A consistent copy with percentiles filled in.
    pub fn snapshot(&self) -> StatusSnapshot {
        let mut s = self.lock().clone();
        (s.ack_latency_us_p50, s.ack_latency_us_p99) = p50_p99(lock(&self.ack_lat).clone());
        let e = lock(&self.epochs).clone();
        (s.pause_us_p50, s.pause_us_p99) = p50_p99(e.iter().map(|p| p.pause_us).collect());
        (s.pause_phases_p50, s.pause_phases_p99) = PhasePercentiles::p50_p99(&e);
        (s.output_hold_us_p50, s.output_hold_us_p99) = p50_p99(lock(&self.holds).clone());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protection_names_match_the_status_json() {
        for p in [
            Protection::Unprotected,
            Protection::Syncing,
            Protection::Protected,
            Protection::Holding,
            Protection::Fenced,
            Protection::HandingOver,
            Protection::HandedOver,
            Protection::Waiting,
            Protection::Replicating,
            Protection::Diverged,
            Protection::Unusable,
            Protection::Claiming,
            Protection::Promoting,
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.name());
        }
    }

    #[test]
    fn metrics_histograms_never_count_down() {
        let st = NodeStatus::default();
        for i in 0..5000 {
            st.record_boundary(&Phases { pause_us: f64::from(i % 300), ..Default::default() });
        }
        let count = |text: &str| -> u64 {
            let line = text.lines().find(|l| l.starts_with("castor_epoch_pause_us_count")).expect("count line");
            line.split_whitespace().last().unwrap().parse().unwrap()
        };
        let a = st.metrics();
        assert_eq!(count(&a), 5000, "{a}");
        // the status keeps a window of recent values; the histogram keeps all
        for _ in 0..3000 {
            st.record_boundary(&Phases { pause_us: 10.0, ..Default::default() });
        }
        for i in 0..100 {
            st.record_output_hold(f64::from(1000 + i));
        }
        let snap = st.snapshot();
        assert_eq!((snap.output_hold_us_p50, snap.output_hold_us_p99), (1050.0, 1098.0), "{snap:?}");
        let b = st.metrics();
        assert_eq!(count(&b), 8000);
        for needle in [
            "castor_epochs_total",
            "castor_bytes_total",
            "castor_failovers_total",
            "castor_epochs_in_flight",
            "castor_ack_latency_us_p99",
            "castor_output_hold_us_p99",
            "castor_output_hold_us_bucket{le=\"50.0\"}",
            "castor_epoch_pause_us_bucket{le=\"50.0\"}",
            "castor_epoch_phase_us_count{phase=\"copy\"} 8000",
            "castor_epoch_phase_us_bucket{le=\"50.0\",phase=\"resume\"}",
            "# EOF",
        ] {
            assert!(b.contains(needle), "{needle} missing:\n{b}");
        }
    }

    #[test]
    fn pause_parts_have_their_own_percentiles() {
        let st = NodeStatus::default();
        for i in 0..101u32 {
            let x = f64::from(i);
            // parts rank differently: the epoch with the longest copy has
            // the shortest stop
            st.record_boundary(&Phases {
                pages: u64::from(i) * 2,
                stop_us: 100.0 - x,
                collect_us: 1.0,
                copy_us: 10.0 * x,
                save_us: 2.0,
                resume_us: x,
                pause_us: 200.0 + 11.0 * x,
                len_us: 1000.0,
                ..Default::default()
            });
        }
        let s = st.snapshot();
        let want50 = PhasePercentiles {
            pages: 100.0,
            stop_us: 50.0,
            collect_us: 1.0,
            copy_us: 500.0,
            save_us: 2.0,
            resume_us: 50.0,
            len_us: 1000.0,
        };
        assert_eq!(s.pause_phases_p50, want50);
        assert_eq!(
            (s.pause_phases_p99.copy_us, s.pause_phases_p99.stop_us, s.pause_phases_p99.pages),
            (990.0, 99.0, 198.0)
        );
        assert_eq!((s.pause_us_p50, s.pause_us_p99), (750.0, 1289.0));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["pause_phases_p50"]["copy_us"], 500.0, "{json}");
        // the window keeps recent epochs only
        for _ in 0..4096 {
            st.record_boundary(&Phases { copy_us: 7.0, ..Default::default() });
        }
        assert_eq!(st.snapshot().pause_phases_p99.copy_us, 7.0);
    }
}
