//! Dirty tracking when the ring overflows: the `kwrite` workload's CPL0
//! writes are emulated on KVM-PVM and can push a vCPU's dirty ring past its
//! size. A collection must then say "tracking lost", never hand out a
//! partial set, and the ring must be re-synchronised so that later
//! collections are exact again (docs/machine.md, "Ring overflow").

use std::collections::BTreeSet;
use std::time::Duration;

use vmm::abi::{WorkloadKind, KERNEL_END, PAGE_SIZE};
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};

const MIB: u64 = 1 << 20;

/// The `kwrite` workload over 4096 pages a vCPU (CPL0 writes, emulated on
/// KVM-PVM) with a ring of `entries`, started; and the gpa of its first page
/// (vCPU `c` writes the 4096 pages from page `4096 c`).
fn kernel_writer(entries: u32, ring_verify: bool, vcpus: u32, hot_pages: bool) -> (Machine, u64) {
    let mut w = WorkloadConfig::idle();
    w.kind = WorkloadKind::KernelWrite;
    w.ws_pages = KERNEL_WRITER_PAGES as u64;
    let mut cfg = MachineConfig::new(256 * MIB, vcpus, TrackerKind::Ring { entries }, w);
    cfg.ring_verify = ring_verify;
    cfg.hot_pages = hot_pages;
    let mut m = Machine::new(cfg).expect("machine");
    let base = m.memory().linear_to_gpa(KERNEL_END);
    m.start().expect("start");
    (m, base)
}

const KERNEL_WRITER_PAGES: usize = 4096;

/// The `kwrite` pages whose stamp changed since `last` (updated in place),
/// read with the machine paused.
fn kernel_writes(m: &Machine, base: u64, last: &mut [u64]) -> BTreeSet<u64> {
    let mut written = BTreeSet::new();
    for (j, last) in last.iter_mut().enumerate() {
        let gpa = base + j as u64 * PAGE_SIZE;
        let now = m.memory().read_u64(gpa).expect("read");
        if now != *last {
            written.insert(gpa / PAGE_SIZE);
            *last = now;
        }
    }
    written
}

/// CPL0 writes are emulated on KVM-PVM and can push the ring past its hard
/// limit: the machine must say "tracking lost", never hand out a partial set.
/// Where the host does not overflow, every set must still be exact.
///
/// A 2048-entry ring. Until 2026-12-08 collections right after a loss could
/// miss pages while reported exact (a bug in re-synchronising the ring, see
/// `exact_collections_after_a_loss_hold_every_write` and docs/machine.md);
/// this test found it at 512 entries once and at 2048 once, in suite runs.
/// castor's rings are 65536 entries unless `--ring-entries` says otherwise.
#[test]
fn emulated_writes_overflow_is_reported_as_tracking_lost() {
    let (mut m, base) = kernel_writer(2048, false, 1, false);
    let mut lost = 0;
    let mut exact = 0;
    let mut last_stamps = vec![0u64; KERNEL_WRITER_PAGES];
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(20));
        m.pause().expect("pause");
        let d = m.collect().expect("collect");
        let written = kernel_writes(&m, base, &mut last_stamps);
        if d.tracking_lost {
            lost += 1;
        } else {
            let dirty: BTreeSet<u64> = d.gfns.iter().copied().collect();
            let missing: Vec<_> = written.difference(&dirty).take(10).collect();
            assert!(missing.is_empty(), "collection without 'tracking lost' misses written pages {missing:x?}");
            exact += 1;
        }
        m.resume().expect("resume");
    }
    assert!(m.faults().is_empty(), "{:?}", m.faults());
    eprintln!("emulated writer: {lost} collections reported tracking lost, {exact} exact");
    assert!(lost > 0, "a 2048-entry ring under 4096-page emulated rounds never reported an overflow");
}

/// After a collection that reported "tracking lost" (a ring overflowed under
/// emulated CPL0 writes on KVM-PVM), the ring is desynchronised; every
/// collection said exact must still hold every page written. Until
/// 2026-12-08 this was an ignored reproducer of a bug: re-synchronising
/// skipped from where the last harvest stopped to the start of the run of
/// DIRTY entries, and when the run had wrapped past that position its last
/// entries were dropped and the ring's position fell short of KVM's, so the
/// next collections found nothing where KVM pushed. With waits 8 times the
/// base (2-26 ms) about 3% of the collections right after a loss missed pages
/// at 2048 and 4096 entries (one reported none of 3861 pages written); see
/// docs/machine.md, "Ring overflow". Runs 2 vCPUs (each ring re-aligned
/// with the other's marks recycled first). Longer or more runs:
/// `PROBE_ITERS=2000 PROBE_RING=512 PROBE_SCALE=1 PROBE_VCPUS=1
/// [PROBE_VERIFY=1] cargo test --release -p castor-vmm --test dirty_overflow --
/// --nocapture exact_collections_after_a_loss` (PROBE_SCALE stretches the
/// waits between collections; PROBE_VERIFY scans the whole ring after each
/// harvest).
#[test]
fn exact_collections_after_a_loss_hold_every_write() {
    loss_recovery_probe(false);
}

/// The same, paced as the epoch engine does it: hot-page retention on, the
/// rings skimmed while the guest runs, a pre-copy round in every other
/// epoch (its pages count as reported), and every other boundary an
/// overlapped collection (the reset handed to a parked vCPU thread).
#[test]
fn exact_collections_after_a_loss_hold_every_write_engine_paced() {
    loss_recovery_probe(true);
}

fn loss_recovery_probe(engine: bool) {
    let env = |k: &str, default: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (iters, scale) = (env("PROBE_ITERS", 300), env("PROBE_SCALE", 8));
    let vcpus = env("PROBE_VCPUS", 2) as u32;
    let (mut m, base) =
        kernel_writer(env("PROBE_RING", 2048) as u32, std::env::var_os("PROBE_VERIFY").is_some(), vcpus, engine);
    let (mut lost, mut bad) = (0, 0);
    let mut last_stamps = vec![0u64; KERNEL_WRITER_PAGES * vcpus as usize];
    // exact collections since the last lost one
    let mut since_lost = 0u64;
    let mut first_lost = None;
    let mut exact_after_loss = 0u64;
    // per distance from the last lost collection (9: 9 or more): (exact collections, misses)
    let mut by_dist = std::collections::BTreeMap::<u64, (u64, u64)>::new();
    // the last collection at which each vCPU had made a kwrite round more: a
    // vCPU stuck for good (its ring's reset index past its push index, or
    // never stepped forward) makes no more
    let mut rounds = vec![0u64; vcpus as usize];
    let mut last_progress = vec![0u64; vcpus as usize];
    for i in 0..iters {
        let wait = Duration::from_micros((200 + (i * 7919) % 3000) * scale);
        let mut precopied = BTreeSet::new();
        if engine {
            for k in 0..4 {
                std::thread::sleep(wait / 4);
                m.skim();
                if k == 2 && i % 2 == 1 {
                    precopied.extend(m.precopy_round().expect("pre-copy").unwrap_or_default());
                }
            }
        } else {
            std::thread::sleep(wait);
        }
        let overlapped = engine && i % 2 == 0;
        let (d, reset_ok) = if overlapped {
            m.pause_and_save().expect("pause");
            let d = m.collect_overlapped().expect("collect");
            let ok = m.finish_reset();
            m.save().expect("save");
            (d, ok)
        } else {
            m.pause().expect("pause");
            (m.collect().expect("collect"), true)
        };
        for (c, r) in rounds.iter_mut().enumerate() {
            let now = m.percpu(c as u32, vmm::abi::PC_WRITES);
            if now > *r {
                *r = now;
                last_progress[c] = i;
            }
        }
        let written = kernel_writes(&m, base, &mut last_stamps);
        if d.tracking_lost || !reset_ok {
            lost += 1;
            since_lost = 0;
            first_lost.get_or_insert(i);
        } else {
            since_lost += 1;
            exact_after_loss += u64::from(first_lost.is_some());
            let dirty: BTreeSet<u64> = d.gfns.iter().copied().chain(precopied).collect();
            let missing: Vec<_> = written.difference(&dirty).copied().collect();
            let e = by_dist.entry(since_lost.min(9)).or_default();
            e.0 += 1;
            if !missing.is_empty() {
                e.1 += 1;
                bad += 1;
                eprintln!(
                    "iter {i}: exact collection {since_lost} after a lost one missed {} of {} written (dirty {}): first {:x?}",
                    missing.len(),
                    written.len(),
                    dirty.len(),
                    &missing[..missing.len().min(6)]
                );
            }
        }
        m.resume().expect("resume");
    }
    eprintln!(
        "dirty recovery{}: {lost} lost, {} exact, {bad} exact-but-missing; by distance from the last lost one (collections, misses): {by_dist:?}; (re-alignments, unsticks) {:?}, pre-copy rounds {}",
        if engine { " (engine-paced)" } else { "" },
        iters - lost,
        m.ring_resyncs(),
        m.precopy_rounds()
    );
    assert_eq!(bad, 0);
    for (c, last) in last_progress.iter().enumerate() {
        assert!(
            last + 100 >= iters,
            "vCPU {c} made no kwrite round after collection {last} of {iters} ({} rounds)",
            rounds[c]
        );
    }
    // tracking must come back after a loss (a wedged ring is lost for good)
    assert!(
        exact_after_loss > 0 || first_lost.is_none_or(|f| f + 30 > iters),
        "no exact collection after the first loss (collection {first_lost:?} of {iters})"
    );
}
