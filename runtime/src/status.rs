//! Node status (control API `status`) and Prometheus metrics text.

use std::sync::Mutex;

use common::sync::{lock, percentile_sorted};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
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
    /// Primary: a planned switchover runs (the last epoch is on its way to
    /// the secondary; the guest is paused).
    #[serde(rename = "handing-over")]
    HandingOver,
    /// Primary: the secondary accepted the handover; this node releases
    /// nothing more and exits.
    #[serde(rename = "handed-over")]
    HandedOver,
    /// Secondary: no primary has synced it yet.
    #[default]
    Waiting,
    /// Secondary: epochs commit into the replica.
    Replicating,
    /// Secondary: the replica failed a check; a resync was asked for.
    Diverged,
    /// Secondary: applying an epoch failed halfway (an error or a panic): the
    /// replica is neither the last epoch nor the one before, so no failover
    /// runs from it until a full resync has replaced it.
    Unusable,
    /// Secondary: asking the witness to take over.
    Claiming,
    /// Secondary: taking over.
    Promoting,
}

impl Protection {
    /// The name status and logs use.
    pub fn name(self) -> &'static str {
        match self {
            Protection::Unprotected => "unprotected",
            Protection::Syncing => "syncing",
            Protection::Protected => "protected",
            Protection::Holding => "holding",
            Protection::Fenced => "fenced",
            Protection::HandingOver => "handing-over",
            Protection::HandedOver => "handed-over",
            Protection::Waiting => "waiting",
            Protection::Replicating => "replicating",
            Protection::Diverged => "diverged",
            Protection::Unusable => "unusable",
            Protection::Claiming => "claiming",
            Protection::Promoting => "promoting",
        }
    }
}

impl std::fmt::Display for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
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
    /// How long the guest ran in this epoch (from the previous boundary).
    pub len_us: f64,
    pub full: bool,
    /// Pages shipped from this epoch's pre-copy rounds (copied while the
    /// guest ran, not in the pause; not counted in `pages`).
    pub precopied: u64,
}

/// Percentiles of each part of recent epoch boundaries (the last 2048 to
/// 4096), taken part by part: the p99 of `copy_us` and the p99 of `stop_us`
/// may come from different epochs, so the parts do not add up to the pause's
/// percentile. Where a pause goes under load: `stop_us` (kick until every
/// vCPU is parked), `collect_us` (harvest), `copy_us` (the pages copied in
/// the pause: written since the last pre-copy round, plus those hot-page
/// retention keeps writable), `save_us`, `resume_us` (until every vCPU
/// thread left its park); `pages`: pages copied in the pause; `len_us`: how
/// long the guest ran in the epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PhasePercentiles {
    pub pages: f64,
    pub stop_us: f64,
    pub collect_us: f64,
    pub copy_us: f64,
    pub save_us: f64,
    pub resume_us: f64,
    pub len_us: f64,
}

impl PhasePercentiles {
    /// The median and the p99 of each part (each part sorted once).
    fn p50_p99(phases: &[Phases]) -> (Self, Self) {
        let part = |f: fn(&Phases) -> f64| p50_p99(phases.iter().map(f).collect());
        let pages = part(|p| p.pages as f64);
        let stop = part(|p| p.stop_us);
        let collect = part(|p| p.collect_us);
        let copy = part(|p| p.copy_us);
        let save = part(|p| p.save_us);
        let resume = part(|p| p.resume_us);
        let len = part(|p| p.len_us);
        let pick = |q: fn((f64, f64)) -> f64| PhasePercentiles {
            pages: q(pages),
            stop_us: q(stop),
            collect_us: q(collect),
            copy_us: q(copy),
            save_us: q(save),
            resume_us: q(resume),
            len_us: q(len),
        };
        (pick(|x| x.0), pick(|x| x.1))
    }
}

/// The median and the p99 of `v` (sorted once).
fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (percentile_sorted(&v, 0.5), percentile_sorted(&v, 0.99))
}

/// The witness as a node sees it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WitnessStatus {
    pub endpoints: Vec<String>,
    pub vm_id: String,
    /// This node's name in the witness.
    pub node: String,
    /// `ok` (its last answer was definite) or `unreachable`.
    pub state: String,
    /// Why it is unreachable.
    pub reason: Option<String>,
    /// Primary: the witness records our secondary as caught up.
    pub sync_recorded: bool,
    /// Latency of the last transaction (ms).
    pub last_txn_ms: f64,
    pub txns: u64,
}

impl WitnessStatus {
    /// A node's view of its witness at start: reachable until it says otherwise.
    pub fn new(endpoints: &[String], vm_id: &str, node: &str) -> Self {
        WitnessStatus {
            endpoints: endpoints.to_vec(),
            vm_id: vm_id.into(),
            node: node.into(),
            state: "ok".into(),
            ..Default::default()
        }
    }
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
    /// Primary: the parts of recent pauses, median and p99 (see
    /// [`PhasePercentiles`]).
    pub pause_phases_p50: PhasePercentiles,
    pub pause_phases_p99: PhasePercentiles,
    pub ack_latency_us_p50: f64,
    pub ack_latency_us_p99: f64,
    /// Primary: how long output waited, from the guest sending it to its
    /// release (the oldest output of each acknowledged epoch), recent epochs.
    /// What output commit adds to a response inside castor; the client also
    /// sees the guest's own time and the network's.
    pub output_hold_us_p50: f64,
    pub output_hold_us_p99: f64,
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
    /// `None` without `--witness`.
    pub witness: Option<WitnessStatus>,
    /// While holding: why, and what ends the hold.
    pub hold: Option<String>,
    /// The last peer refused because the pair's settings differ (a witness
    /// on one node only, another vm id, other heartbeat timeouts): the
    /// pair does not protect until they agree. Cleared by a session that
    /// passes the check.
    pub pair_error: Option<String>,
    /// A secondary's last trial restore of its replica (the machine built,
    /// never run, before a session's first ack): `ok at epoch N (ms)` or
    /// `failed: why`. `None` before the first.
    pub restore_check: Option<String>,
    /// A primary's page copies on their way to its secondary (bytes), the
    /// most ever, and how often the guest was paused because they passed
    /// the budget (`--max-queued-mib`).
    pub queued_bytes: u64,
    pub queued_bytes_max: u64,
    pub budget_pauses: u64,
    /// Guest output dropped for backlog (counted, never silent): console
    /// lines, marker writes.
    pub console_dropped: u64,
    pub marks_dropped: u64,
    /// Primary: the longest pause of the guest since start, us (epoch
    /// boundaries and live-sync rounds).
    pub pause_us_max: f64,
    /// Primary: the longest epoch since start, us (how long the guest ran
    /// between two boundaries: stretched while the secondary is behind).
    pub epoch_len_us_max: f64,
    /// Primary: the longest pause during the last live sync, us (from the
    /// boundary that started it until the epoch that ended it was acked).
    pub sync_max_pause_us: f64,
    /// Primary: data rate of the last live sync that completed, GiB/s.
    pub last_sync_gib_per_s: f64,
    /// Primary: live syncs completed (the initial one and every resync).
    pub live_syncs: u64,
    /// Primary: pre-copy rounds (pages re-armed and copied while the guest ran).
    pub precopy_rounds: u64,
    /// Primary: pages shipped from pre-copy rounds (not copied in a pause).
    pub precopied_pages: u64,
    /// Primary: what the acks say the link carries, MiB/s (0 until measured).
    pub link_mib_s: f64,
    /// Secondary: applies of a verified epoch that failed halfway (an error
    /// or a panic); each made the replica unusable until a full resync.
    pub apply_failures: u64,
    /// Secondary: why the replica cannot be failed over to, while it cannot.
    pub replica_unusable: Option<String>,
}

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

    /// Prometheus metrics (OpenMetrics text, prometheus-client): gauges and
    /// counters read from the status, the two latency histograms cumulative
    /// since the node started.
    pub fn metrics(&self) -> String {
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let s = self.snapshot();
        let mut r = prometheus_client::registry::Registry::with_prefix("castor");
        r.register("generation", "Fencing generation of this node", ConstGauge::new(s.generation as i64));
        r.register("epoch", "Current epoch (primary) or committed epoch (secondary)", ConstGauge::new(s.epoch as i64));
        r.register(
            "epochs_in_flight",
            "Epochs sent and not yet acknowledged",
            ConstGauge::new(s.epochs_in_flight as i64),
        );
        r.register(
            "protected",
            "1 while a secondary protects this primary",
            ConstGauge::new(i64::from(s.protection == Protection::Protected)),
        );
        r.register("held_outputs", "Outputs waiting for their epoch's ack", ConstGauge::new(s.held_outputs as i64));
        r.register("last_epoch_pages", "Pages in the last epoch", ConstGauge::new(s.last_epoch.pages as i64));
        r.register(
            "last_epoch_len_us",
            "How long the guest ran in the last epoch (us): the timer's length, or shorter when output ended it",
            ConstGauge::new(s.last_epoch.len_us),
        );
        r.register(
            "ack_latency_us_p50",
            "Median epoch ack latency (us), recent epochs",
            ConstGauge::new(s.ack_latency_us_p50),
        );
        r.register(
            "ack_latency_us_p99",
            "p99 epoch ack latency (us), recent epochs",
            ConstGauge::new(s.ack_latency_us_p99),
        );
        r.register(
            "output_hold_us_p99",
            "p99 of how long output waited for its epoch's ack (us; from the guest sending it to its release), recent epochs",
            ConstGauge::new(s.output_hold_us_p99),
        );
        r.register("epochs", "Epochs completed", ConstCounter::new(s.epochs));
        r.register("pages", "Pages shipped in epochs", ConstCounter::new(s.pages_total));
        r.register(
            "last_epoch_precopied_pages",
            "Pages of the last epoch copied by pre-copy rounds while the guest ran",
            ConstGauge::new(s.last_epoch.precopied as i64),
        );
        r.register(
            "precopy_rounds",
            "Pre-copy rounds (pages copied while the guest ran)",
            ConstCounter::new(s.precopy_rounds),
        );
        r.register(
            "precopied_pages",
            "Pages shipped from pre-copy rounds instead of being copied in a pause",
            ConstCounter::new(s.precopied_pages),
        );
        r.register(
            "pages_unchanged",
            "Pages reported dirty but not shipped (same content as in the previous epoch)",
            ConstCounter::new(s.pages_unchanged_total),
        );
        r.register("bytes", "Page bytes shipped in epochs", ConstCounter::new(s.bytes_total));
        r.register("failovers", "Failovers this node performed", ConstCounter::new(s.failovers));
        r.register(
            "tracking_lost",
            "Epochs sent as full resyncs because dirty tracking was lost",
            ConstCounter::new(s.tracking_lost),
        );
        r.register("released_outputs", "Outputs released by output commit", ConstCounter::new(s.released_outputs));
        r.register("syncs", "Secondary sessions started (initial syncs and resyncs)", ConstCounter::new(s.syncs));
        r.register("console_dropped", "Guest console lines dropped for backlog", ConstCounter::new(s.console_dropped));
        r.register("marks_dropped", "Guest marker writes dropped for backlog", ConstCounter::new(s.marks_dropped));
        if let Some(w) = &s.witness {
            r.register(
                "witness_reachable",
                "1 while the witness's last answer was definite",
                ConstGauge::new(i64::from(w.state == "ok")),
            );
            r.register(
                "witness_sync_recorded",
                "1 while the witness records this primary's secondary as caught up",
                ConstGauge::new(i64::from(w.sync_recorded)),
            );
            r.register(
                "witness_last_txn_ms",
                "Latency of the last witness transaction (ms)",
                ConstGauge::new(w.last_txn_ms),
            );
            r.register("witness_txns", "Witness transactions", ConstCounter::new(w.txns));
        }
        r.register("epoch_pause_us", "Guest pause per epoch boundary (us)", self.pause_hist.clone());
        r.register(
            "epoch_phase_us",
            "Parts of each epoch boundary's pause (us): stop (kick until parked), collect (harvest), copy, save, resume (until every vCPU thread left its park)",
            self.phase_hist.clone(),
        );
        r.register("epoch_ack_us", "Time from sending an epoch to its ack (us)", self.ack_hist.clone());
        r.register(
            "output_hold_us",
            "How long each acknowledged epoch's oldest output waited, from the guest sending it to its release (us)",
            self.hold_hist.clone(),
        );
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &r).is_err() {
            tracing::error!("metrics encoding failed");
        }
        out
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
