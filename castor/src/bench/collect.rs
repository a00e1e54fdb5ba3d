//! Part 1: collection cost (collect + re-arm) vs guest size, ring and bitmap.

use std::time::{Duration, Instant};

use vmm::TrackerKind;

use super::{med, p99, us, wait_writes, writer, BenchError, CollectRow};

pub(super) fn collection_cost(quick: bool, live: &dyn Fn(String)) -> Result<Vec<CollectRow>, BenchError> {
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
