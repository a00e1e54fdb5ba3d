//! Node status (control API `status`) and Prometheus metrics text.

use std::sync::Mutex;

use common::sync::{lock, percentile};
use serde::Serialize;

/// A node's role.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    #[default]
    Secondary,
    /// A former primary that a newer generation replaced.
    Fenced,
    Stopped,
}

/// Protection as status and metrics show it: the primary's mode, or the
/// secondary's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protection {
    /// Primary: no secondary, output leaves at once.
    Unprotected,
    /// Primary: a secondary session is up, not yet acknowledged.
    Syncing,
    /// Primary: the secondary acknowledges epochs.
    Protected,
    /// Primary: the secondary was lost and may be taking over; nothing is released.
    Holding,
    /// Primary: a newer generation exists.
    Fenced,
    /// Secondary: no primary has synced it yet.
    #[default]
    Waiting,
    /// Secondary: epochs commit into the replica.
    Replicating,
    /// Secondary: the replica failed a check; a resync was asked for.
    Diverged,
    /// Secondary: taking over.
    Promoting,
}

/// Time spent in each phase of one epoch boundary, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Phases {
    pub epoch: u64,
    /// Pages reported dirty (copied in the pause).
    pub pages: u64,
    /// Of those, pages not shipped: same content as in the previous epoch.
    pub unchanged: u64,
    pub stop_us: f64,
    pub collect_us: f64,
    pub copy_us: f64,
    pub save_us: f64,
    pub resume_us: f64,
    pub pause_us: f64,
    pub full: bool,
}

/// What `castor status` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusSnapshot {
    pub node: String,
    pub role: Role,
    pub generation: u64,
    pub protection: Protection,
    pub peer: Option<String>,
    /// Primary: next epoch number; secondary: last committed epoch.
    pub epoch: u64,
    pub acked_epoch: Option<u64>,
    pub committed_epoch: Option<u64>,
    pub lag_epochs: u64,
    pub last_epoch: Phases,
    pub pause_us_p50: f64,
    pub pause_us_p99: f64,
    pub ack_latency_us_p50: f64,
    pub ack_latency_us_p99: f64,
    pub epochs: u64,
    pub pages_total: u64,
    /// Pages reported dirty but not shipped: unchanged since the previous epoch.
    pub pages_unchanged_total: u64,
    pub bytes_total: u64,
    pub epochs_in_flight: u64,
    pub tracking_lost: u64,
    pub ring_full_exits: u64,
    pub failovers: u64,
    pub last_failover_ms: Option<f64>,
    pub released_outputs: u64,
    pub held_outputs: u64,
    pub syncs: u64,
}

/// Shared, updated by the node's tasks.
#[derive(Debug, Default)]
pub struct NodeStatus {
    snap: Mutex<StatusSnapshot>,
    ack_lat: Mutex<Vec<f64>>,
    pauses: Mutex<Vec<f64>>,
}

fn push_bounded(v: &mut Vec<f64>, x: f64) {
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
        push_bounded(&mut lock(&self.ack_lat), us);
    }

    pub fn record_pause(&self, us: f64) {
        push_bounded(&mut lock(&self.pauses), us);
    }

    /// A consistent copy with percentiles filled in.
    pub fn snapshot(&self) -> StatusSnapshot {
        let mut s = self.lock().clone();
        let a = lock(&self.ack_lat).clone();
        let p = lock(&self.pauses).clone();
        s.ack_latency_us_p50 = percentile(&a, 0.5);
        s.ack_latency_us_p99 = percentile(&a, 0.99);
        s.pause_us_p50 = percentile(&p, 0.5);
        s.pause_us_p99 = percentile(&p, 0.99);
        s
    }

    /// All recorded pause times (us).
    pub fn pauses(&self) -> Vec<f64> {
        lock(&self.pauses).clone()
    }

    /// Prometheus text exposition.
    pub fn metrics(&self) -> String {
        let s = self.snapshot();
        let p = self.pauses();
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, v: f64| {
            out.push_str(&format!("# HELP castor_{name} {help}\n# TYPE castor_{name} gauge\ncastor_{name} {v}\n"));
        };
        gauge("generation", "Fencing generation of this node.", s.generation as f64);
        gauge("epoch", "Current epoch (primary) or committed epoch (secondary).", s.epoch as f64);
        gauge("epochs_in_flight", "Epochs sent and not yet acknowledged.", s.epochs_in_flight as f64);
        gauge(
            "protected",
            "1 while a secondary protects this primary.",
            f64::from(u8::from(s.protection == Protection::Protected)),
        );
        gauge("last_epoch_pages", "Pages in the last epoch.", s.last_epoch.pages as f64);
        gauge("ack_latency_us_p50", "Median epoch ack latency (us).", s.ack_latency_us_p50);
        gauge("ack_latency_us_p99", "p99 epoch ack latency (us).", s.ack_latency_us_p99);
        let mut counter = |name: &str, help: &str, v: u64| {
            out.push_str(&format!("# HELP castor_{name} {help}\n# TYPE castor_{name} counter\ncastor_{name} {v}\n"));
        };
        counter("epochs_total", "Epochs completed.", s.epochs);
        counter("pages_total", "Pages shipped in epochs.", s.pages_total);
        counter(
            "pages_unchanged_total",
            "Pages reported dirty but not shipped (same content as in the previous epoch).",
            s.pages_unchanged_total,
        );
        counter("bytes_total", "Page bytes shipped in epochs.", s.bytes_total);
        counter("failovers_total", "Failovers this node performed.", s.failovers);
        counter("tracking_lost_total", "Epochs sent as full resyncs because dirty tracking was lost.", s.tracking_lost);
        counter("released_outputs_total", "Outputs released by output commit.", s.released_outputs);
        out.push_str("# HELP castor_epoch_pause_us Guest pause per epoch boundary (us).\n# TYPE castor_epoch_pause_us histogram\n");
        let bounds = [50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0];
        for b in bounds {
            let n = p.iter().filter(|&&x| x <= b).count();
            out.push_str(&format!("castor_epoch_pause_us_bucket{{le=\"{b}\"}} {n}\n"));
        }
        out.push_str(&format!("castor_epoch_pause_us_bucket{{le=\"+Inf\"}} {}\n", p.len()));
        out.push_str(&format!(
            "castor_epoch_pause_us_sum {}\ncastor_epoch_pause_us_count {}\n",
            p.iter().sum::<f64>(),
            p.len()
        ));
        out
    }
}
