//! Part 2: the epoch pause, phase by phase, vs dirty pages per epoch, with
//! and without pre-copy, and its floor (a bare kick + resume).

use std::time::{Duration, Instant};

use vmm::abi::{PAGE_SIZE, PC_WRITES};
use vmm::{Machine, TrackerKind};

use super::floor::{memcpy_us, scattered_anon_us};
use super::{med, p99, us, wait_writes, writer, BenchError, PhaseRow, PRECOPY_MIN_PAGES};

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

pub(super) fn pause_phases(quick: bool, live: &dyn Fn(String)) -> Result<Vec<PhaseRow>, BenchError> {
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
