//! `castor bench`: epoch latency, ring vs bitmap, and the physical floor,
//! measured in one run on this machine.
//!
//! 1. Collection cost (collect + re-arm) vs guest size, ring and bitmap,
//!    for the same number of pages dirtied by the guest.
//! 2. The epoch pause, phase by phase, vs dirty pages per epoch (ring).
//! 3. The floor: a bare kick + resume, plus a memcpy of the same pages.
//! 4. End to end: a primary/secondary pair on loopback with the kv guest.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use vmm::abi::{Pattern, KERNEL_END, PAGE_SIZE, PC_WRITES};
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};

use crate::bench_e2e::{end_to_end, E2e};

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

fn collection_cost(quick: bool, live: &dyn Fn(String)) -> Result<Vec<CollectRow>, BenchError> {
    let sizes: &[u64] = if quick { &[256, 4096, 16384] } else { &[256, 1024, 4096, 16384] };
    let counts: &[u64] = if quick { &[64, 1024] } else { &[64, 1024, 16384] };
    let mut rows = Vec::new();
    for &mib in sizes {
        for tracker in [TrackerKind::Ring { entries: 65536 }, TrackerKind::Bitmap] {
            for &n in counts {
                // the 64-page collections take ~10 us: more of them, so the
                // median (the cost ratio's input) is stable run to run
                let samples = match (quick, n <= 64) {
                    (true, true) => 30,
                    (true, false) => 12,
                    (false, true) => 100,
                    (false, false) => 30,
                };
                let mut m = writer(mib << 20, n, tracker)?;
                let (mut t, mut dirty) = (Vec::new(), Vec::new());
                // untimed warm-up collections first: the first ones after
                // boot carry the boot's pages and meet cold KVM structures
                for i in 0..samples + 10 {
                    m.resume()?;
                    wait_writes(&m, n)?;
                    m.pause()?;
                    let s = Instant::now();
                    let d = m.collect()?;
                    if i >= 10 {
                        t.push(us(s.elapsed()));
                        dirty.push(d.gfns.len() as f64);
                    }
                }
                // let the machine's teardown (freeing its memory) finish
                // before the next configuration is timed
                drop(m);
                std::thread::sleep(Duration::from_millis(300));
                let row = CollectRow {
                    tracker: tracker.name().into(),
                    mem_mib: mib,
                    pages: n,
                    dirty_mean: dirty.iter().sum::<f64>() / dirty.len() as f64,
                    collect_us_p50: med(&t),
                    collect_us_p99: p99(&t),
                };
                live(format!(
                    "collect  {:>6} {:>6} MiB {:>6} pages: p50 {:>8.1} us  p99 {:>8.1} us  (dirty {:.0})",
                    row.tracker, mib, n, row.collect_us_p50, row.collect_us_p99, row.dirty_mean
                ));
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// Copy of `pages` pages spread over an ordinary anonymous mapping of `mem`
/// bytes (faulted in, 4 KiB pages, the writer's stride) into a warm buffer,
/// other pages each pass: what scattered copying costs here without guest
/// memory.
fn scattered_anon_us(pages: u64, mem: u64) -> f64 {
    let ps = PAGE_SIZE as usize;
    let src = vec![7u8; mem as usize];
    let stride = ((mem - KERNEL_END) / PAGE_SIZE / pages).max(1) as usize;
    let mut dst = vec![0u8; pages as usize * ps];
    let mut t = Vec::new();
    // each pass copies other pages (shifted by one): cold in the caches,
    // as pages just written by the guest on another CPU are for the copy
    for pass in 0..15 {
        let s = Instant::now();
        for i in 0..pages as usize {
            let off = (KERNEL_END as usize + (i * stride + pass % stride.max(1)) * ps) % (mem as usize - ps);
            dst[i * ps..(i + 1) * ps].copy_from_slice(std::hint::black_box(&src[off..off + ps]));
        }
        std::hint::black_box(&dst);
        t.push(us(s.elapsed()));
    }
    med(&t)
}

fn memcpy_us(pages: u64) -> f64 {
    let n = (pages * PAGE_SIZE) as usize;
    let src = vec![7u8; n];
    let mut dst = vec![0u8; n];
    let mut t = Vec::new();
    for _ in 0..15 {
        let s = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        t.push(us(s.elapsed()));
    }
    med(&t)
}

/// The boundaries of one phase-bench run.
#[derive(Default)]
struct Boundaries {
    /// stop, harvest, reset, copy, save, resume
    ph: [Vec<f64>; 6],
    totals: Vec<f64>,
    /// Pages of each epoch (copied in the pause or by pre-copy rounds).
    dirty: Vec<f64>,
    /// Of those, pages copied by pre-copy rounds and not again in the pause.
    precopied: Vec<f64>,
    /// The floor's copy: the epoch's pages again, guest stopped, warm buffer.
    warm: Vec<f64>,
}

/// Pre-copy in the bench, as the engine does it: skim every 500 us; once
/// `min` pages wait, a round re-arms them and copies them while the guest
/// runs. Runs until every vCPU wrote `n` more pages; returns the pages
/// copied by rounds (sorted, unique).
fn wait_writes_precopy(m: &mut Machine, n: u64, min: u64, buf: &mut Vec<u8>) -> Result<Vec<u64>, BenchError> {
    let cpus = m.config().vcpus;
    let start: Vec<u64> = (0..cpus).map(|c| m.percpu(c, PC_WRITES)).collect();
    let t = Instant::now();
    let mut pre = Vec::new();
    let mut last_skim = Instant::now();
    while (0..cpus).any(|c| m.percpu(c, PC_WRITES) < start[c as usize] + n) {
        if t.elapsed() > Duration::from_secs(30) {
            return Err(BenchError::Stalled);
        }
        if last_skim.elapsed() >= Duration::from_micros(500) {
            last_skim = Instant::now();
            if m.precopy_due(min, !pre.is_empty()) {
                bench_round(m, buf, &mut pre)?;
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    // the engine's last round before the boundary
    if m.precopy_due(min / 4, !pre.is_empty()) {
        bench_round(m, buf, &mut pre)?;
    }
    pre.sort_unstable();
    pre.dedup();
    Ok(pre)
}

/// One pre-copy round: re-arm, copy while the guest runs, note the pages.
fn bench_round(m: &mut Machine, buf: &mut Vec<u8>, pre: &mut Vec<u64>) -> Result<(), BenchError> {
    if let Some(gfns) = m.precopy_round()? {
        buf.resize(gfns.len() * PAGE_SIZE as usize, 0);
        m.copy_pages_running(&gfns, buf)?;
        pre.extend(gfns);
    }
    Ok(())
}

/// `samples` boundaries of a guest writing `n` pages per epoch, timed as the
/// epoch engine times them; `precopy`: with pre-copy rounds (their minimum).
fn boundaries(m: &mut Machine, n: u64, samples: usize, precopy: Option<u64>) -> Result<Boundaries, BenchError> {
    let mut b = Boundaries::default();
    let mut pagebuf: Vec<u8> = Vec::new();
    let mut prebuf: Vec<u8> = Vec::new();
    let mut warmbuf: Vec<u8> = Vec::new();
    // three untimed boundaries first: fault in the copy buffers (the
    // engine's pooled buffers are warm after its first epochs too)
    for i in 0..samples + 3 {
        let record = i >= 3;
        m.resume()?;
        let pre = match precopy {
            Some(min) => wait_writes_precopy(m, n, min, &mut prebuf)?,
            None => {
                wait_writes(m, n)?;
                Vec::new()
            }
        };
        let t0 = Instant::now();
        // as the epoch engine does: the vCPU threads save their state as
        // they park, while this thread harvests and copies, and a large ring
        // reset runs on a parked vCPU thread; "reset" below is the wait for
        // that reset
        let stop = m.pause_and_save()?;
        let d = m.collect_overlapped()?;
        let t2 = Instant::now();
        pagebuf.resize(d.gfns.len() * PAGE_SIZE as usize, 0);
        m.copy_pages_into(&d.gfns, &mut pagebuf)?;
        let tc = Instant::now();
        if !m.finish_reset() {
            return Err(BenchError::E2e("dirty ring reset failed during the pause benchmark".into()));
        }
        let t3 = Instant::now();
        let st = m.save()?;
        let t4 = Instant::now();
        let resume = m.resume()?;
        let t5 = Instant::now();
        std::hint::black_box((&pagebuf, &st));
        if d.tracking_lost {
            return Err(BenchError::E2e("dirty tracking lost during the pause benchmark".into()));
        }
        if !record {
            m.pause()?;
            continue;
        }
        b.ph[0].push(us(stop.elapsed));
        b.ph[1].push(d.harvest_ns as f64 / 1e3);
        b.ph[2].push(d.reset_ns as f64 / 1e3 + us(t3 - tc));
        b.ph[3].push(us(tc - t2));
        b.ph[4].push(us(t4 - t3));
        b.ph[5].push(us(resume.elapsed));
        b.totals.push(us(t5 - t0));
        let uncollected: Vec<u64> = pre.iter().copied().filter(|g| d.gfns.binary_search(g).is_err()).collect();
        b.dirty.push((d.gfns.len() + uncollected.len()) as f64);
        b.precopied.push(uncollected.len() as f64);
        m.pause()?;
        // the floor's copy: all of the epoch's pages again (warm buffer),
        // guest stopped, outside the timed boundary
        let mut all = d.gfns.clone();
        all.extend(uncollected);
        all.sort_unstable();
        warmbuf.resize(all.len() * PAGE_SIZE as usize, 0);
        let tw = Instant::now();
        m.copy_pages_into(&all, &mut warmbuf)?;
        b.warm.push(us(tw.elapsed()));
    }
    Ok(b)
}

fn pause_phases(quick: bool, live: &dyn Fn(String)) -> Result<Vec<PhaseRow>, BenchError> {
    let counts: &[u64] = if quick { &[64, 1024, 4096, 16384] } else { &[64, 256, 1024, 4096, 16384] };
    let mut rows = Vec::new();
    for &n in counts {
        // enough boundaries that p99 is a percentile, not the maximum
        let samples = match (quick, n <= 1024) {
            (true, true) => 200,
            (true, false) => 15,
            (false, true) => 200,
            (false, false) => 50,
        };
        let mut m = writer(256 << 20, n, TrackerKind::Ring { entries: 65536 })?;
        // the floor's kick/resume, on the same running guest
        let mut kick = Vec::new();
        for _ in 0..samples {
            m.resume()?;
            std::thread::sleep(Duration::from_millis(2));
            let s = Instant::now();
            m.pause()?;
            m.resume()?;
            kick.push(us(s.elapsed()));
        }
        m.pause()?;
        m.collect()?;
        // stop-and-copy first (every page copied in the pause), then what
        // the engine does by default (pre-copy rounds while the guest runs)
        let sc = boundaries(&mut m, n, samples, None)?;
        let before = runtime::host::Contention::now();
        let b = boundaries(&mut m, n, samples, Some(PRECOPY_MIN_PAGES))?;
        let host_contention = runtime::host::Contention::now().since(&before);
        let (ph, totals, dirty) = (&b.ph, &b.totals, &b.dirty);
        let mut warm = sc.warm.clone();
        warm.extend_from_slice(&b.warm);
        let mc = med(&warm);
        let contiguous = memcpy_us(n);
        let scattered = scattered_anon_us(n, 256 << 20);
        let row = PhaseRow {
            pages: n,
            dirty_mean: dirty.iter().sum::<f64>() / dirty.len() as f64,
            stop_us: med(&ph[0]),
            harvest_us: med(&ph[1]),
            reset_us: med(&ph[2]),
            copy_us: med(&ph[3]),
            save_us: med(&ph[4]),
            resume_us: med(&ph[5]),
            pause_us_p50: med(totals),
            pause_us_p99: p99(totals),
            precopied_mean: b.precopied.iter().sum::<f64>() / b.precopied.len() as f64,
            stop_and_copy_pause_us_p50: med(&sc.totals),
            stop_and_copy_pause_us_p99: p99(&sc.totals),
            floor_us: med(&kick) + mc,
            memcpy_us: mc,
            floor_kick_us_p99: p99(&kick),
            floor_copy_us_p99: p99(&warm),
            memcpy_contiguous_us: contiguous,
            memcpy_scattered_anon_us: scattered,
            host_contention,
        };
        live(format!(
            "pause    {:>6} pages ({:.0} pre-copied): stop {:>6.0} harvest {:>6.0} reset {:>6.0} copy {:>6.0} save {:>6.0} resume {:>5.0} | total p50 {:>6.0} p99 {:>6.0} us (stop-and-copy p50 {:.0} p99 {:.0}) | floor {:>6.0} us (kick+resume {:.0}, copy of the same pages {:.0}; contiguous memcpy {:.0}, scattered anonymous {:.0}) | p50/floor {:.2} p99/floor {:.2}",
            n,
            row.precopied_mean,
            row.stop_us,
            row.harvest_us,
            row.reset_us,
            row.copy_us,
            row.save_us,
            row.resume_us,
            row.pause_us_p50,
            row.pause_us_p99,
            row.stop_and_copy_pause_us_p50,
            row.stop_and_copy_pause_us_p99,
            row.floor_us,
            med(&kick),
            mc,
            contiguous,
            scattered,
            row.pause_us_p50 / row.floor_us,
            row.pause_us_p99 / row.floor_us
        ));
        live(format!(
            "         p99 by phase: stop {:.0} harvest {:.0} reset {:.0} copy {:.0} save {:.0} resume {:.0} | floor's own p99: kick+resume {:.0}, copy {:.0} | host over the pre-copy boundaries: {}",
            p99(&ph[0]),
            p99(&ph[1]),
            p99(&ph[2]),
            p99(&ph[3]),
            p99(&ph[4]),
            p99(&ph[5]),
            row.floor_kick_us_p99,
            row.floor_copy_us_p99,
            row.host_contention.describe()
        ));
        rows.push(row);
    }
    Ok(rows)
}

/// Draws the legend and writes the PNG.
fn finish_chart<'a, DB: plotters::prelude::DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    mut ch: plotters::prelude::ChartContext<'a, DB, CT>,
    root: &plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), BenchError>
where
    DB::ErrorType: 'static,
{
    use plotters::prelude::*;
    ch.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
        .map_err(|e| BenchError::Io(e.to_string()))?;
    root.present().map_err(|e| BenchError::Io(e.to_string()))
}

fn plot(dir: &std::path::Path, collect: &[CollectRow], phases: &[PhaseRow], host: &str) -> Result<(), BenchError> {
    use plotters::prelude::*;
    let font =
        ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"].iter().find_map(|p| std::fs::read(p).ok()).ok_or_else(
            || BenchError::Io("no DejaVuSans.ttf for plot labels (apt-get install fonts-dejavu-core)".into()),
        )?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| BenchError::Io("bad font".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| BenchError::Io(e.to_string()))?;
    let ioe = |e: &dyn std::fmt::Display| BenchError::Io(e.to_string());

    // pause vs dirty pages
    let path = dir.join("pause_vs_dirty_pages.png");
    let root = BitMapBackend::new(&path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| ioe(&e))?;
    let ymax =
        phases.iter().map(|r| r.pause_us_p99.max(r.floor_us).max(r.stop_and_copy_pause_us_p99)).fold(1.0, f64::max)
            * 1.3;
    let xmax = phases.iter().map(|r| r.pages).max().unwrap_or(64) as f64 * 1.5;
    let mut ch = ChartBuilder::on(&root)
        .caption(format!("epoch pause vs dirty pages (ring, 256 MiB; {host})"), ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((40f64..xmax).log_scale(), (10f64..ymax).log_scale())
        .map_err(|e| ioe(&e))?;
    ch.configure_mesh().x_desc("dirty pages per epoch").y_desc("microseconds").draw().map_err(|e| ioe(&e))?;
    type Pick = Box<dyn Fn(&PhaseRow) -> f64>;
    let series: [(&str, RGBColor, Pick); 5] = [
        ("pause p50 (pre-copy)", BLUE, Box::new(|r| r.pause_us_p50)),
        ("pause p99 (pre-copy)", RED, Box::new(|r| r.pause_us_p99)),
        ("stop-and-copy pause p99", MAGENTA, Box::new(|r| r.stop_and_copy_pause_us_p99)),
        ("floor (kick+resume+memcpy)", BLACK, Box::new(|r| r.floor_us)),
        ("state save", GREEN, Box::new(|r| r.save_us)),
    ];
    for (name, color, f) in series {
        ch.draw_series(LineSeries::new(phases.iter().map(|r| (r.pages as f64, f(r))), color.stroke_width(2)))
            .map_err(|e| ioe(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    finish_chart(ch, &root)?;

    // collection cost vs guest size
    let path = dir.join("collect_vs_guest_size.png");
    let root = BitMapBackend::new(&path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| ioe(&e))?;
    let ymax = collect.iter().map(|r| r.collect_us_p50).fold(1.0, f64::max) * 2.0;
    let mut ch = ChartBuilder::on(&root)
        .caption(format!("collect + re-arm cost vs guest size (median; {host})"), ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((200f64..24000f64).log_scale(), (1f64..ymax).log_scale())
        .map_err(|e| ioe(&e))?;
    ch.configure_mesh().x_desc("guest memory (MiB)").y_desc("microseconds").draw().map_err(|e| ioe(&e))?;
    let colors = [BLUE, RED, CYAN, MAGENTA, GREEN, BLACK];
    let mut i = 0;
    for tracker in ["ring", "bitmap"] {
        let mut counts: Vec<u64> = collect.iter().map(|r| r.pages).collect();
        counts.sort_unstable();
        counts.dedup();
        for n in counts {
            let pts: Vec<(f64, f64)> = collect
                .iter()
                .filter(|r| r.tracker == tracker && r.pages == n)
                .map(|r| (r.mem_mib as f64, r.collect_us_p50))
                .collect();
            let color = colors[i % colors.len()];
            i += 1;
            ch.draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| ioe(&e))?
                .label(format!("{tracker}, {n} pages"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    finish_chart(ch, &root)?;
    Ok(())
}

pub fn bench(a: BenchArgs) -> Result<(), BenchError> {
    let live = |s: String| println!("{s}");
    let started = Instant::now();
    let host = runtime::host::Host::detect();
    let host_line = host.describe();
    println!("castor bench ({}): host {host_line}", if a.quick { "quick" } else { "full" });
    let collect = collection_cost(a.quick, &live)?;
    let phases = pause_phases(a.quick, &live)?;
    let e2e = if a.no_e2e { E2e::default() } else { end_to_end(a.quick, &live)? };
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
