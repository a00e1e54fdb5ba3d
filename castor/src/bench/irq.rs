//! Part 6: what one interrupt costs the guest. The network card raises MSI
//! 0x41 on vCPU 0, and on a KVM-PVM host the guest's CPL0 handler is
//! emulated: a guest writing pages as fast as it can (CPL3, native) is
//! measured alone, then while MSIs arrive at a steady rate; the writes it
//! loses, over the interrupts it took, are the cost of one (in guest time).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm::abi::{PC_WRITES, VEC_NET};
use vmm::{Machine, TrackerKind};

use super::{writer, BenchError};

/// The interrupt row.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IrqCost {
    /// Interrupts raised per second while measured.
    pub interrupts_per_s: f64,
    /// Page writes per second alone (the mean of before and after).
    pub writes_per_s_alone: f64,
    /// Page writes per second with the interrupts arriving.
    pub writes_per_s_with: f64,
    /// Guest time one interrupt takes (entry, the EOI-only handler, return).
    pub cost_us: f64,
}

/// Gap between two MSIs (a sleep: the raiser must not take the guest's
/// core; with the timer's slack about 10k/s, a busy card's rate).
const GAP: Duration = Duration::from_micros(50);

fn write_rate(m: &Machine, secs: f64) -> f64 {
    let a = m.percpu(0, PC_WRITES);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    (m.percpu(0, PC_WRITES) - a) as f64 / t.elapsed().as_secs_f64()
}

pub(super) fn interrupt_cost(quick: bool, live: &dyn Fn(String)) -> Result<IrqCost, BenchError> {
    let secs = if quick { 0.5 } else { 1.5 };
    // 64 pages written in turn: after the first round every write hits a
    // page the tracker already has (no ring exits), so only interrupts stop it
    let mut m = writer(256 << 20, 64, TrackerKind::Ring { entries: 4096 })?;
    m.resume()?;
    let before = write_rate(&m, secs);
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let (with, elapsed) = std::thread::scope(|s| {
        let t = Instant::now();
        let raiser = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if m.raise_msi(VEC_NET).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(GAP);
            }
        });
        let with = write_rate(&m, secs);
        stop.store(true, Ordering::Relaxed);
        let _ = raiser.join();
        (with, t.elapsed())
    });
    let after = write_rate(&m, secs);
    let alone = (before + after) / 2.0;
    let per_s = sent.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64();
    let cost_us = if per_s > 0.0 { (1.0 - with / alone).max(0.0) * 1e6 / per_s } else { f64::NAN };
    live(format!(
        "interrupt: MSI 0x41 at {per_s:.0}/s: guest writes {with:.0}/s against {alone:.0}/s alone ({before:.0} before, {after:.0} after): {cost_us:.1} us of guest time each"
    ));
    Ok(IrqCost { interrupts_per_s: per_s, writes_per_s_alone: alone, writes_per_s_with: with, cost_us })
}
