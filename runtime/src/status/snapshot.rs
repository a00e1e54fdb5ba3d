//! What `castor status` shows: the snapshot and the types in it, and the
//! percentiles of recent pauses.

use common::sync::percentile_sorted;
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
    /// Of those, pages not shipped: same content as the copy last shipped.
    pub unchanged: u64,
    /// Pages shipped as sub-page deltas against the copy last shipped.
    pub deltas: u64,
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
    pub(super) fn p50_p99(phases: &[Phases]) -> (Self, Self) {
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
pub(super) fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
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
    /// Pages shipped as sub-page deltas (in `pages_total`; `bytes_total`
    /// counts their delta bytes).
    pub pages_delta_total: u64,
    pub bytes_total: u64,
    pub epochs_in_flight: u64,
    pub tracking_lost: u64,
    pub ring_full_exits: u64,
    pub failovers: u64,
    pub last_failover_ms: Option<f64>,
    pub released_outputs: u64,
    /// Of the released outputs: the guest's network frames.
    pub released_frames: u64,
    /// Frames this node sent again when it took the guest over: those of
    /// the restored state's outbox (its epoch's, and any earlier epoch's
    /// the old primary had not written out when that state was saved).
    pub resent_frames: u64,
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
    /// The network card (a primary's guest with one): frames received and
    /// handed to the guest, dropped (no buffer, backlog full, bad buffer),
    /// sent by the guest, and the interrupts it raised.
    pub net_rx_frames: u64,
    pub net_rx_dropped: u64,
    pub net_tx_frames: u64,
    pub net_interrupts: u64,
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
