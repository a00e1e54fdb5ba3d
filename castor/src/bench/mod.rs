//! `castor bench`: epoch latency, ring vs bitmap, and the physical floor,
//! measured in one run on this machine.
//!
//! 1. Collection cost (collect + re-arm) vs guest size, ring and bitmap,
//!    for the same number of pages dirtied by the guest.
//! 2. The epoch pause, phase by phase, vs dirty pages per epoch (ring).
//! 3. The floor: a bare kick + resume, plus a memcpy of the same pages.
//! 4. End to end: a primary/secondary pair on loopback with the kv guest.
//! 5. The network row: redis-benchmark against the networked guest,
//!    protected and unprotected.
//! 6. What one interrupt (the card's MSI) costs the guest.

mod collect;
mod floor;
mod irq;
mod net;
mod phases;
mod plot;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use vmm::abi::{Pattern, KERNEL_END, PAGE_SIZE, PC_WRITES};
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};

use crate::bench_e2e::{end_to_end, E2e};
use collect::collection_cost;
use phases::pause_phases;
use plot::plot;

/// `castor bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Fewer points and samples (about two minutes).
    #[arg(long)]
    quick: bool,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the PNG plots into this directory.
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Skip the end-to-end part (no processes).
    #[arg(long)]
    no_e2e: bool,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("machine: {0}")]
    Machine(#[from] vmm::MachineError),
    #[error("the guest stopped writing")]
    Stalled,
    #[error("end to end: {0}")]
    E2e(String),
    #[error("{0}")]
    Io(String),
}

impl BenchError {
    pub fn exit_code(&self) -> i32 {
        match self {
            BenchError::Machine(_) => 3,
            BenchError::Stalled | BenchError::E2e(_) => 4,
            BenchError::Io(_) => 5,
        }
    }
}

pub(crate) fn med(v: &[f64]) -> f64 {
    common::sync::percentile(v, 0.5)
}
pub(crate) fn p99(v: &[f64]) -> f64 {
    common::sync::percentile(v, 0.99)
}
/// The engine's default `--precopy-min-pages`.
const PRECOPY_MIN_PAGES: u64 = 256;

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[derive(Debug, Clone, Serialize)]
struct CollectRow {
    tracker: String,
    mem_mib: u64,
    pages: u64,
    dirty_mean: f64,
    collect_us_p50: f64,
    collect_us_p99: f64,
}

#[derive(Debug, Clone, Serialize)]
struct PhaseRow {
    pages: u64,
    dirty_mean: f64,
    stop_us: f64,
    harvest_us: f64,
    reset_us: f64,
    copy_us: f64,
    save_us: f64,
    resume_us: f64,
    /// The epoch pause with pre-copy rounds (the engine's default).
    pause_us_p50: f64,
    pause_us_p99: f64,
    /// Pages per epoch copied by pre-copy rounds, not in the pause.
    precopied_mean: f64,
    /// The same boundaries without pre-copy (every page copied in the pause).
    stop_and_copy_pause_us_p50: f64,
    stop_and_copy_pause_us_p99: f64,
    floor_us: f64,
    /// Copy of the same guest pages again (warm): the copy part of the floor.
    memcpy_us: f64,
    /// The floor's own tail: p99 of its kick + resume and of its copy (the
    /// host's noise, which a pause's p99 cannot avoid either).
    floor_kick_us_p99: f64,
    floor_copy_us_p99: f64,
    /// memcpy of as many bytes between contiguous host buffers.
    memcpy_contiguous_us: f64,
    /// The same number of pages copied from an ordinary anonymous mapping
    /// of the guest's size, at the writer's stride (scattered, no guest).
    memcpy_scattered_anon_us: f64,
    /// The host's contention over the run of pre-copy boundaries whose
    /// pauses are `pause_us_*` and the phase medians (the guest's running
    /// between them included; the stop-and-copy and floor runs are not in
    /// it): the hypervisor's steal and the time some thread of this machine
    /// waited for a CPU, with the window's length.
    host_contention: runtime::host::Contention,
}

/// Runs the guest until every vCPU wrote `n` more pages.
fn wait_writes(m: &Machine, n: u64) -> Result<(), BenchError> {
    let start: Vec<u64> = (0..m.config().vcpus).map(|c| m.percpu(c, PC_WRITES)).collect();
    let t = Instant::now();
    while (0..m.config().vcpus).any(|c| m.percpu(c, PC_WRITES) < start[c as usize] + n) {
        if t.elapsed() > Duration::from_secs(30) {
            return Err(BenchError::Stalled);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// A 1-vCPU guest writing `pages` pages in turn, spread over all its RAM.
fn writer(mem: u64, pages: u64, tracker: TrackerKind) -> Result<Machine, BenchError> {
    let mut w = WorkloadConfig::dirty(pages, Pattern::Sequential, 0);
    w.report_ms = 0;
    w.ws_stride = (((mem - KERNEL_END) / PAGE_SIZE) / pages).max(1);
    let mut m = Machine::new(MachineConfig::new(mem, 1, tracker, w))?;
    m.start()?;
    wait_writes(&m, pages)?;
    m.pause()?;
    m.collect()?; // drop boot-time pages
    Ok(m)
}

pub fn bench(a: BenchArgs) -> Result<(), BenchError> {
    let live = |s: String| println!("{s}");
    let started = Instant::now();
    let host = runtime::host::Host::detect();
    let host_line = host.describe();
    println!("castor bench ({}): host {host_line}", if a.quick { "quick" } else { "full" });
    let collect = collection_cost(a.quick, &live)?;
    let phases = pause_phases(a.quick, &live)?;
    let irq = irq::interrupt_cost(a.quick, &live)?;
    let e2e = if a.no_e2e { E2e::default() } else { end_to_end(a.quick, &live)? };
    let network = if a.no_e2e { net::NetBench::default() } else { net::network(a.quick, &live)? };
    let c = |t: &str, mib: u64| {
        collect.iter().find(|r| r.tracker == t && r.mem_mib == mib && r.pages == 64).map(|r| r.collect_us_p50)
    };
    let ratio = |t: &str| match (c(t, 16384), c(t, 256)) {
        (Some(big), Some(small)) => big / small,
        _ => f64::NAN,
    };
    let k1 = phases.iter().find(|r| r.pages == 1024);
    let k16 = phases.iter().find(|r| r.pages == 16384);
    let report = serde_json::json!({
        "host": host_line,
        "host_detail": host,
        "quick": a.quick,
        "seconds": started.elapsed().as_secs_f64(),
        "ring_cost_ratio_16g_256m": ratio("ring"),
        "bitmap_cost_ratio_16g_256m": ratio("bitmap"),
        "pause_us_p99_1k": k1.map(|r| r.pause_us_p99),
        "pause_us_p50_1k": k1.map(|r| r.pause_us_p50),
        "floor_us_1k": k1.map(|r| r.floor_us),
        "host_contention_1k": k1.map(|r| r.host_contention),
        "pause_us_p99_16k": k16.map(|r| r.pause_us_p99),
        "floor_us_16k": k16.map(|r| r.floor_us),
        "stop_and_copy_pause_us_p99_1k": k1.map(|r| r.stop_and_copy_pause_us_p99),
        "stop_and_copy_pause_us_p99_16k": k16.map(|r| r.stop_and_copy_pause_us_p99),
        "output_delay_ms_p50": e2e.output_delay_ms_p50,
        "output_delay_ms_p99": e2e.output_delay_ms_p99,
        "output_delay_ms_p99_timer_only": e2e.output_delay_ms_p99_timer_only,
        "output_delay_ms_p50_light": e2e.output_delay_ms_p50_light,
        "output_delay_ms_p99_light": e2e.output_delay_ms_p99_light,
        "output_delay_ms_p99_light_timer_only": e2e.output_delay_ms_p99_light_timer_only,
        "epochs_per_s": e2e.epochs_per_s,
        "epochs_per_s_saturated": e2e.epochs_per_s_saturated,
        "throughput_ratio_protected": e2e.throughput_ratio_protected,
        "throughput_ratio_protected_bitmap_hot": e2e.throughput_ratio_protected_bitmap_hot,
        "throughput_ratio_protected_no_retention": e2e.throughput_ratio_protected_no_retention,
        "throughput_ratio_protected_no_precopy": e2e.throughput_ratio_protected_no_precopy,
        "output_delay_ms_p99_no_precopy": e2e.output_delay_ms_p99_no_precopy,
        "output_delay_ms_p50_unprotected": e2e.output_delay_ms_p50_unprotected,
        "output_delay_ms_p99_unprotected": e2e.output_delay_ms_p99_unprotected,
        "output_delay_added_ms_p50": e2e.output_delay_added_ms_p50,
        "output_delay_added_ms_p99": e2e.output_delay_added_ms_p99,
        "output_hold_ms_p50": e2e.output_hold_ms_p50,
        "output_hold_ms_p99": e2e.output_hold_ms_p99,
        "pause_phases_p50": e2e.pause_phases_p50,
        "pause_phases_p99": e2e.pause_phases_p99,
        "failover_ms_p50": e2e.failover_ms_p50,
        "sync_gib_per_s": e2e.full_guests.first().map(|r| r.sync_gib_per_s),
        "resync_max_pause_ms": e2e.full_guests.first().map(|r| r.resync_max_pause_ms),
        "collection": collect,
        "pause_phases": phases,
        "end_to_end": e2e,
    });
    let mut report = report;
    report["network"] = serde_json::to_value(&network).unwrap_or_default();
    report["interrupt"] = serde_json::to_value(&irq).unwrap_or_default();
    println!(
        "summary: ring cost 16G/256M = {:.2}, bitmap cost 16G/256M = {:.2}; pause p99 at 1024 pages = {:.0} us vs floor {:.0} us ({:.2}x); epochs/s {:.0} at 256 clients ({:.0} saturated); throughput protected/unprotected {:.2}; failover p50 {:.0} ms",
        ratio("ring"),
        ratio("bitmap"),
        k1.map_or(0.0, |r| r.pause_us_p99),
        k1.map_or(0.0, |r| r.floor_us),
        k1.map_or(0.0, |r| r.pause_us_p99 / r.floor_us),
        e2e.epochs_per_s,
        e2e.epochs_per_s_saturated,
        e2e.throughput_ratio_protected,
        e2e.failover_ms_p50
    );
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report).unwrap_or_default())
            .map_err(|e| BenchError::Io(format!("{}: {e}", p.display())))?;
    }
    if let Some(d) = &a.plots {
        plot(d, &collect, &phases, &host_line)?;
        println!("plots written to {}", d.display());
    }
    Ok(())
}
