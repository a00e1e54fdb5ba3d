//! A known bug, kept as a reproducer (ignored: it fails today). After a
//! collection that reported "tracking lost" (a ring overflowed under emulated
//! CPL0 writes on KVM-PVM), the recovery re-protects every slot and trusts the
//! next collection once its reset recycled what it harvested; with a small
//! ring about 1% of those next collections (and a few of the ones after a
//! collection that missed) say "exact" yet miss pages the guest wrote, some
//! report no page at all (an undetected desynchronisation). Measured
//! 2026-12-07 on KVM-PVM (nested, 2 cores), per 2000-2500 collections:
//! 512 entries, 2-12 misses in every run (distance 1 from a loss, some at 2);
//! 1024 entries, 3-5; 2048 entries, 0 of 1943 exact collections (558 right
//! after a loss); 4096 entries, 0 of ~7000. castor's rings are 65536 entries
//! unless `--ring-entries` says otherwise. Run:
//! `PROBE_ITERS=2000 [PROBE_RING=512] [PROBE_SCALE=1] [PROBE_VERIFY=1] cargo
//! test --release -p castor-vmm --test dirty_recovery -- --ignored --nocapture`
//! (PROBE_SCALE stretches the waits between collections; PROBE_VERIFY scans
//! the whole ring after each harvest, which did not stop the misses right
//! after a loss). See docs/machine.md, "Ring overflow".
use std::collections::BTreeSet;
use std::time::Duration;

use vmm::abi::{WorkloadKind, KERNEL_END, PAGE_SIZE};
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};

const MIB: u64 = 1 << 20;

#[test]
#[ignore = "a known bug: exact collections right after a tracking loss can miss writes (see the module doc)"]
fn exact_collections_after_a_loss_hold_every_write() {
    let iters: u64 = std::env::var("PROBE_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let mut w = WorkloadConfig::idle();
    w.kind = WorkloadKind::KernelWrite;
    w.ws_pages = 4096;
    let mut cfg = MachineConfig::new(
        256 * MIB,
        1,
        TrackerKind::Ring { entries: std::env::var("PROBE_RING").ok().and_then(|v| v.parse().ok()).unwrap_or(512) },
        w,
    );
    cfg.ring_verify = std::env::var_os("PROBE_VERIFY").is_some();
    let mut m = Machine::new(cfg).expect("machine");
    let base = m.memory().linear_to_gpa(KERNEL_END);
    m.start().expect("start");
    let (mut lost, mut exact, mut bad) = (0, 0, 0);
    let mut last_stamps = vec![0u64; 4096];
    let mut prev_lost = false;
    let mut since_lost = 0u64;
    let mut by_dist = std::collections::BTreeMap::<u64, (u64, u64)>::new();
    for i in 0..iters {
        let us =
            (200 + (i * 7919) % 3000) * std::env::var("PROBE_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
        std::thread::sleep(Duration::from_micros(us));
        m.pause().expect("pause");
        let d = m.collect().expect("collect");
        let mut written = BTreeSet::new();
        for (j, last) in last_stamps.iter_mut().enumerate() {
            let gpa = base + j as u64 * PAGE_SIZE;
            let now = m.memory().read_u64(gpa).expect("read");
            if now != *last {
                written.insert(gpa / PAGE_SIZE);
                *last = now;
            }
        }
        if d.tracking_lost {
            lost += 1;
            since_lost = 0;
        } else {
            since_lost += 1;
            let dirty: BTreeSet<u64> = d.gfns.iter().copied().collect();
            let missing: Vec<_> = written.difference(&dirty).copied().collect();
            let e = by_dist.entry(since_lost.min(9)).or_default();
            e.0 += 1;
            if !missing.is_empty() {
                e.1 += 1;
                bad += 1;
                eprintln!(
                    "iter {i}: exact collection after {} missed {} of {} written (dirty {}): first {:x?}",
                    if prev_lost { "a LOST one" } else { "an exact one" },
                    missing.len(),
                    written.len(),
                    dirty.len(),
                    &missing[..missing.len().min(6)]
                );
            }
            exact += 1;
        }
        prev_lost = d.tracking_lost;
        m.resume().expect("resume");
    }
    eprintln!("dirty recovery: {lost} lost, {exact} exact, {bad} exact-but-missing; by distance from the last lost one (collections, misses): {by_dist:?}");
    assert_eq!(bad, 0);
}
