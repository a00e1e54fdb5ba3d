//! `castor run`: a built-in guest, unprotected, with the dirty set collected
//! every epoch and live statistics.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use common::sync::percentile;
use vmm::abi::{Pattern, WorkloadKind};
use vmm::devices::Output;
use vmm::snapshot::{self, Snapshot, SnapshotError};
use vmm::{Machine, MachineConfig, MachineError, TrackerKind, WorkloadConfig};

use crate::kvload::{KvExpectation, KvLoad};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GuestArg {
    Dirty,
    Kv,
    Idle,
    /// The networked guest: a Redis-protocol server behind a virtio-net
    /// card (needs `--net ...,ip=A.B.C.D/P` on `castor primary`).
    Redis,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TrackerArg {
    Ring,
    Bitmap,
}

impl TrackerArg {
    /// The option's spelling on a command line.
    pub fn name(self) -> &'static str {
        match self {
            TrackerArg::Ring => "ring",
            TrackerArg::Bitmap => "bitmap",
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PatternArg {
    Seq,
    Random,
    Hotcold,
}

/// Arguments of `castor run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Built-in guest workload.
    #[arg(long, value_enum, default_value = "dirty")]
    guest: GuestArg,
    /// Guest memory (K, M, G suffixes), 64M to 60G.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// Number of vCPUs (1 to 8).
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Dirty tracker.
    #[arg(long, value_enum, default_value = "ring")]
    tracker: TrackerArg,
    /// Dirty ring entries per vCPU (power of two, 256 to 65536).
    #[arg(long, default_value_t = vmm::tracker::DEFAULT_RING_ENTRIES)]
    ring_entries: u32,
    /// How long to run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Dirty-set collection period.
    #[arg(long, default_value_t = 10)]
    epoch_ms: u64,
    #[command(flatten)]
    workload: WorkloadArgs,
    /// kv: number of load clients (0 = no load).
    #[arg(long, default_value_t = 8)]
    kv_clients: u32,
    /// kv: requests each client keeps in flight.
    #[arg(long, default_value_t = 4)]
    kv_window: usize,
    /// kv: keys per client.
    #[arg(long, default_value_t = 512)]
    kv_keys: u64,
    /// Print the guest's console lines.
    #[arg(long)]
    console: bool,
    /// At the end: quiesce the kv load, pause, and write a snapshot here
    /// (the kv expectation goes beside it, as FILE.kv.json).
    #[arg(long)]
    snapshot_out: Option<PathBuf>,
    /// Start from this snapshot instead of booting (the guest options come from it).
    #[arg(long)]
    restore: Option<PathBuf>,
    /// kv: after restore, GET every key of this expectation file and compare;
    /// the load then continues the same clients.
    #[arg(long)]
    kv_verify: Option<PathBuf>,
    /// Print one JSON object as the last line of stdout (live lines go to stderr).
    #[arg(long)]
    json: bool,
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size '{s}' (examples: 256M, 16G)"))
}

/// Errors of `castor run`, each with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot build the machine: {0}")]
    Build(MachineError),
    #[error("the guest failed: {0}")]
    Guest(String),
    #[error(transparent)]
    Snapshot(SnapshotError),
    #[error("{path}: {err}")]
    File { path: String, err: String },
    #[error("verification failed: {0}")]
    Verify(String),
    #[error("{0}")]
    Usage(String),
}

impl RunError {
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Usage(_) => 2,
            RunError::Build(_) => 3,
            RunError::Guest(_) => 4,
            RunError::Snapshot(SnapshotError::Io { .. }) | RunError::File { .. } => 5,
            RunError::Snapshot(SnapshotError::Machine(_)) => 3,
            RunError::Snapshot(_) => 5,
            RunError::Verify(_) => 6,
        }
    }
}

fn guest_err(e: MachineError) -> RunError {
    RunError::Guest(e.to_string())
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn expectation_path(snap: &std::path::Path) -> PathBuf {
    let mut p = snap.as_os_str().to_owned();
    p.push(".kv.json");
    PathBuf::from(p)
}

struct Stats {
    epochs: u64,
    dirty_total: u64,
    lost: u64,
    stop_us: Vec<f64>,
    resume_us: Vec<f64>,
    collect_us: Vec<f64>,
    console_lines: u64,
}

pub fn run(a: RunArgs) -> Result<(), RunError> {
    let tracker = match a.tracker {
        TrackerArg::Ring => TrackerKind::Ring { entries: a.ring_entries },
        TrackerArg::Bitmap => TrackerKind::Bitmap,
    };
    let mut machine = if let Some(path) = &a.restore {
        let snap = Snapshot::read(path).map_err(RunError::Snapshot)?;
        snap.restore(tracker).map_err(RunError::Snapshot)?
    } else {
        if matches!(a.guest, GuestArg::Redis) {
            return Err(RunError::Usage(
                "the redis guest needs a network card: run it with `castor primary --guest redis --net tap=...,mac=...,ip=...` (or `castor demo`)".into(),
            ));
        }
        Machine::new(a.workload.machine_config(a.guest, a.mem, a.vcpus, tracker)).map_err(RunError::Build)?
    };
    let is_kv = machine.config().workload.kind == WorkloadKind::Kv;
    let prior: Option<KvExpectation> = match &a.kv_verify {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| RunError::File { path: p.display().to_string(), err: e.to_string() })?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| RunError::File { path: p.display().to_string(), err: e.to_string() })?,
            )
        }
        None => None,
    };
    let ops_before = prior.as_ref().map(|p| p.ops);
    let mut load = (is_kv && (a.kv_clients > 0 || prior.is_some()))
        .then(|| KvLoad::new(a.kv_clients, 1, a.kv_window, a.kv_keys, prior.clone()));
    if let (Some(l), Some(_)) = (load.as_mut(), prior.as_ref()) {
        l.queue_verification(machine.devices(), 0xffff_0000).map_err(|e| RunError::Verify(e.to_string()))?;
    }

    let live = |line: String| {
        if a.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    live(format!(
        "castor run: guest {:?}, {} MiB, {} vCPUs, tracker {}, epoch {} ms{}",
        machine.config().workload.kind,
        machine.config().mem_bytes >> 20,
        machine.config().vcpus,
        tracker.name(),
        a.epoch_ms,
        if a.restore.is_some() { " (restored from snapshot)" } else { "" }
    ));

    let mut st = Stats {
        epochs: 0,
        dirty_total: 0,
        lost: 0,
        stop_us: vec![],
        resume_us: vec![],
        collect_us: vec![],
        console_lines: 0,
    };
    let start = Instant::now();
    let run_for = Duration::from_secs_f64(a.seconds.max(0.0));
    let epoch = Duration::from_millis(a.epoch_ms.max(1));
    let mut next_report = Duration::from_secs(1);
    let mut last = (0u64, 0u64, 0u64);
    machine.start().map_err(guest_err)?;
    let mut next_epoch = Instant::now();
    let mut quiescing = false;
    loop {
        if let Some(l) = load.as_mut() {
            // verification GETs first, so new writes cannot race them
            if !quiescing && l.verification_pending() == 0 {
                l.pump(machine.devices());
            }
        }
        next_epoch += epoch;
        let now = Instant::now();
        if next_epoch > now {
            std::thread::sleep(next_epoch - now);
        } else {
            next_epoch = now; // fell behind: do not try to catch up with a burst
        }
        let stop = machine.pause().map_err(guest_err)?;
        let t = Instant::now();
        let d = machine.collect().map_err(guest_err)?;
        st.collect_us.push(us(t.elapsed()));
        let resume = machine.resume().map_err(guest_err)?;
        st.stop_us.push(us(stop.elapsed));
        st.resume_us.push(us(resume.elapsed));
        st.epochs += 1;
        st.dirty_total += d.gfns.len() as u64;
        st.lost += u64::from(d.tracking_lost);
        for out in machine.devices().drain() {
            match out {
                Output::Console { cpu, line } => {
                    st.console_lines += 1;
                    if a.console {
                        live(format!("guest[{cpu}]: {line}"));
                    }
                }
                Output::Kv(r) => {
                    if let Some(l) = load.as_mut() {
                        l.on_response(&r);
                    }
                }
                Output::Done { cpu, code } => live(format!("guest[{cpu}]: workload done, code {code}")),
                Output::Mark { .. } => {}
                // `castor run` has no network card option
                Output::Frame(_) => {}
            }
        }
        let faults = machine.faults();
        if let Some(f) = faults.first() {
            return Err(RunError::Guest(format!("exception {} at rip {:#x} on cpu {}", f.vector, f.rip, f.cpu)));
        }
        if let Some((id, why)) = machine.exited_vcpus().first() {
            return Err(RunError::Guest(format!("vCPU {id} stopped: {why}")));
        }
        let el = start.elapsed();
        if el >= next_report {
            let acked = load.as_ref().map_or(0, |l| l.expect.acked);
            let window: Vec<f64> = st.stop_us.iter().rev().take(100).copied().collect();
            live(format!(
                "t={:>3.0}s epochs={} dirty/epoch={:.0} stop_p50={:.0}us resume_p50={:.0}us lost={} kv_ops/s={}",
                el.as_secs_f64(),
                st.epochs,
                (st.dirty_total - last.0) as f64 / (st.epochs - last.1).max(1) as f64,
                percentile(&window, 0.5),
                percentile(&st.resume_us.iter().rev().take(100).copied().collect::<Vec<_>>(), 0.5),
                st.lost,
                acked - last.2,
            ));
            last = (st.dirty_total, st.epochs, acked);
            next_report += Duration::from_secs(1);
        }
        if el >= run_for {
            let pending = load.as_ref().map_or(0, |l| l.verification_pending());
            let drained = load.as_ref().is_none_or(|l| l.expect.acked + l.unexpected > 0 || a.kv_clients == 0);
            if a.snapshot_out.is_none() || !is_kv {
                if pending == 0 || el >= run_for + Duration::from_secs(10) {
                    break;
                }
            } else {
                // quiesce: stop issuing, wait for every request in flight to be answered
                quiescing = true;
                let in_flight = load.as_ref().map_or(0, |l| l.in_flight());
                if (in_flight == 0 && drained && pending == 0) || el >= run_for + Duration::from_secs(10) {
                    break;
                }
            }
        }
    }
    machine.pause().map_err(guest_err)?;
    let mut snapshot_pages = None;
    if let Some(path) = &a.snapshot_out {
        let pages = snapshot::save(&machine, path).map_err(RunError::Snapshot)?;
        snapshot_pages = Some(pages);
        if let Some(l) = &load {
            let ep = expectation_path(path);
            let text = serde_json::to_string(&l.expect).expect("expectation serializes");
            std::fs::write(&ep, text)
                .map_err(|e| RunError::File { path: ep.display().to_string(), err: e.to_string() })?;
        }
        live(format!("snapshot: {} pages written to {}", pages, path.display()));
    }
    let full_exits = machine.ring_full_exits();
    machine.shutdown();

    let (acked, wrong, unexpected, vchecked, vmismatch, first_ops, final_ops) =
        load.as_ref().map_or((0, 0, 0, 0, 0, None, 0), |l| {
            (l.expect.acked, l.wrong, l.unexpected, l.verify_checked, l.verify_mismatch, l.first_ops, l.expect.ops)
        });
    let secs = start.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "epochs": st.epochs,
        "dirty_pages_total": st.dirty_total,
        "tracker": tracker.name(),
        "tracking_lost": st.lost,
        "stop_us_p50": percentile(&st.stop_us, 0.5),
        "stop_us_p99": percentile(&st.stop_us, 0.99),
        "resume_us_p50": percentile(&st.resume_us, 0.5),
        "resume_us_p99": percentile(&st.resume_us, 0.99),
        "collect_us_p50": percentile(&st.collect_us, 0.5),
        "collect_us_p99": percentile(&st.collect_us, 0.99),
        "ring_full_exits": full_exits,
        "seconds": secs,
        "epochs_per_s": st.epochs as f64 / secs.max(1e-9),
        "guest": format!("{:?}", machine.config().workload.kind).to_lowercase(),
        "mem_mib": machine.config().mem_bytes >> 20,
        "vcpus": machine.config().vcpus,
        "console_lines": st.console_lines,
        "kv_acked_ops": acked,
        "kv_wrong_responses": wrong,
        "kv_unexpected_responses": unexpected,
        "kv_ops_counter": final_ops,
        "kv_first_ops_counter": first_ops,
        "kv_ops_before_restore": ops_before,
        "kv_verify_checked": vchecked,
        "kv_verify_mismatches": vmismatch,
        "snapshot_pages": snapshot_pages,
        "host": runtime::host::Host::detect().describe(),
    });
    if a.json {
        println!("{report}");
    } else {
        live(format!(
            "done: {} epochs in {:.1}s, {} dirty pages, tracking lost {}, stop p50 {:.0}us p99 {:.0}us, resume p50 {:.0}us, kv acked {}",
            st.epochs,
            secs,
            st.dirty_total,
            st.lost,
            report["stop_us_p50"].as_f64().unwrap_or(0.0),
            report["stop_us_p99"].as_f64().unwrap_or(0.0),
            report["resume_us_p50"].as_f64().unwrap_or(0.0),
            acked
        ));
    }
    if vmismatch > 0 || wrong > 0 {
        return Err(RunError::Verify(format!("{vmismatch} verification mismatches, {wrong} wrong kv responses")));
    }
    Ok(())
}

/// The guest's workload options, shared by `castor run` and `castor primary`.
#[derive(Debug, Args, Clone)]
pub struct WorkloadArgs {
    /// dirty: working-set pages per vCPU.
    #[arg(long, default_value_t = 4096)]
    ws_pages: u64,
    /// dirty: page selection pattern.
    #[arg(long, value_enum, default_value = "random")]
    pattern: PatternArg,
    /// dirty: page writes per second per vCPU (0 = as fast as it goes).
    #[arg(long, default_value_t = 20000)]
    rate: u64,
    /// Fill this much guest memory (above the workload's area) with
    /// non-zero data before boot, e.g. `--fill 2G`: a guest of real size
    /// whose memory is full (every page distinct).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    fill: u64,
    /// dirty: write a console line after every page write (a guest that
    /// floods its console; what the VMM drops is counted in status).
    #[arg(long)]
    console_flood: bool,
}

impl WorkloadArgs {
    /// The machine these options describe for `guest`.
    pub fn machine_config(&self, guest: GuestArg, mem: u64, vcpus: u32, tracker: TrackerKind) -> MachineConfig {
        let workload = match guest {
            GuestArg::Dirty => {
                let pattern = match self.pattern {
                    PatternArg::Seq => Pattern::Sequential,
                    PatternArg::Random => Pattern::Random,
                    PatternArg::Hotcold => Pattern::HotCold,
                };
                WorkloadConfig {
                    console_flood: self.console_flood,
                    ..WorkloadConfig::dirty(self.ws_pages, pattern, self.rate)
                }
            }
            GuestArg::Kv => WorkloadConfig::kv(),
            GuestArg::Idle => WorkloadConfig::idle(),
            // the address comes from --net (castor primary sets it)
            GuestArg::Redis => WorkloadConfig::net(vmm::machine::NetAddr::default()),
        };
        MachineConfig { fill_bytes: self.fill, ..MachineConfig::new(mem, vcpus, tracker, workload) }
    }
}
