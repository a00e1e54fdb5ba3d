//! Dirty tracking on real KVM: every collection's dirty set must equal the set
//! of pages the guest wrote. The `dirty` workload stamps each write into the
//! page it writes (a fresh, unique value), so between two pauses the pages the
//! guest wrote are exactly the working-set pages whose stamp changed.

mod dirty_support;

use std::collections::BTreeSet;
use std::time::Duration;

use dirty_support::{wait_writes, MIB, RING};
use vmm::abi::{Pattern, KERNEL_END, PAGE_SIZE};
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};

const GIB: u64 = 1 << 30;

/// Guest address of working-set page `j` of `cpu` (mirrors dirty_main in user.c).
fn ws_gpa(m: &Machine, cpu: u32, j: u64) -> u64 {
    let w = &m.config().workload;
    let lin = KERNEL_END + (j * u64::from(m.config().vcpus) + u64::from(cpu)) * w.ws_stride * PAGE_SIZE;
    m.memory().linear_to_gpa(lin)
}

struct Checker {
    /// gpa of each working-set page -> last stamp seen
    stamps: Vec<(u64, u64)>,
    ws: BTreeSet<u64>,
    /// Pages reported dirty whose write had not landed yet (see `round`).
    early: BTreeSet<u64>,
    vcpus: usize,
    /// Pause as the epoch engine does: the vCPU threads save their state as
    /// they park while the owner harvests, and the ring reset is handed to
    /// a parked thread (`pause_and_save`, `collect_overlapped`,
    /// `finish_reset`, `save`) instead of `pause` and `collect`.
    boundary: bool,
}

impl Checker {
    fn new(m: &Machine) -> Self {
        let mut stamps = Vec::new();
        for cpu in 0..m.config().vcpus {
            for j in 0..m.config().workload.ws_pages {
                stamps.push((ws_gpa(m, cpu, j), 0));
            }
        }
        let ws = stamps.iter().map(|s| s.0 / PAGE_SIZE).collect();
        Checker { stamps, ws, early: BTreeSet::new(), vcpus: m.config().vcpus as usize, boundary: false }
    }

    /// Pauses, collects, and checks; returns (pages written, dirty set size).
    fn round(&mut self, m: &mut Machine) -> (usize, usize) {
        let d = if self.boundary {
            m.pause_and_save().expect("pause");
            let d = m.collect_overlapped().expect("collect");
            assert!(m.finish_reset(), "ring reset failed");
            let st = m.save().expect("save");
            assert_eq!(st.vcpus.len(), self.vcpus);
            d
        } else {
            m.pause().expect("pause");
            m.collect().expect("collect")
        };
        assert!(!d.tracking_lost, "tracking lost without overflow");
        let mut written = BTreeSet::new();
        for (gpa, last) in self.stamps.iter_mut() {
            let now = m.memory().read_u64(*gpa).expect("read stamp");
            if now != *last {
                written.insert(*gpa / PAGE_SIZE);
                *last = now;
            }
        }
        let dirty: BTreeSet<u64> = d.gfns.iter().copied().collect();
        let dirty_ws: BTreeSet<u64> = dirty.intersection(&self.ws).copied().collect();
        let missing: Vec<_> = written.difference(&dirty_ws).take(10).collect();
        assert!(missing.is_empty(), "pages written but not reported dirty: {missing:x?}");
        // KVM logs a page when it makes it writable on the write fault; if the
        // kick lands before the faulting store is retried, the page is reported
        // one collection early. At most one such page per vCPU, and its write
        // must land (and be reported again) when that vCPU next runs.
        let extra: BTreeSet<u64> = dirty_ws.difference(&written).copied().collect();
        self.early = self.early.difference(&written).copied().chain(extra).collect();
        assert!(
            self.early.len() <= self.vcpus,
            "pages reported dirty but not written, more than one per vCPU: {:x?}",
            self.early
        );
        let outside: Vec<_> = dirty.difference(&self.ws).filter(|&&g| g * PAGE_SIZE >= KERNEL_END).take(10).collect();
        assert!(outside.is_empty(), "pages reported dirty outside the kernel area and working set: {outside:x?}");
        assert!(
            m.faults().is_empty() && m.exited_vcpus().is_empty(),
            "guest failed: {:?} {:?}",
            m.faults(),
            m.exited_vcpus()
        );
        m.resume().expect("resume");
        (written.len(), d.gfns.len())
    }
}

/// The working-set pages whose stamp changed since `stamps` (updated in
/// place) and that `gfns` does not hold, read with the machine paused.
fn unreported_writes(m: &Machine, stamps: &mut [(u64, u64)], gfns: &[u64]) -> Vec<u64> {
    let dirty: BTreeSet<u64> = gfns.iter().copied().collect();
    let mut missing = Vec::new();
    for (gpa, last) in stamps.iter_mut() {
        let now = m.memory().read_u64(*gpa).expect("read");
        if now != *last {
            if !dirty.contains(&(*gpa / PAGE_SIZE)) {
                missing.push(*gpa / PAGE_SIZE);
            }
            *last = now;
        }
    }
    missing
}

fn check_exact(mem: u64, vcpus: u32, tracker: TrackerKind, pattern: Pattern, ws_pages: u64, spread: bool) -> u64 {
    check_exact_with(mem, vcpus, tracker, pattern, ws_pages, spread, false)
}

fn check_exact_with(
    mem: u64,
    vcpus: u32,
    tracker: TrackerKind,
    pattern: Pattern,
    ws_pages: u64,
    spread: bool,
    boundary: bool,
) -> u64 {
    let mut w = WorkloadConfig::dirty(ws_pages, pattern, 20_000);
    w.report_ms = 0;
    if spread {
        // spread the working set over all of RAM
        w.ws_stride = ((mem - KERNEL_END) / PAGE_SIZE) / (ws_pages * u64::from(vcpus));
    }
    let mut cfg = MachineConfig::new(mem, vcpus, tracker, w);
    cfg.ring_verify = true;
    let mut m = Machine::new(cfg).expect("machine");
    let mut c = Checker::new(&m);
    c.boundary = boundary;
    m.start().expect("start");
    let mut total = 0;
    for i in 0..25 {
        // alternate short and long epochs
        wait_writes(&m, if i % 2 == 0 { 5 } else { 150 });
        total += c.round(&mut m).0 as u64;
    }
    assert!(total > 100, "the guest wrote too little to test anything ({total} pages)");
    if spread {
        let top = c.stamps.iter().map(|s| s.0).max().expect("pages");
        assert!(top > mem / 2, "working set not spread over the guest ({top:#x})");
    }
    total
}

#[test]
fn ring_exact_1vcpu_256m() {
    check_exact(256 * MIB, 1, RING, Pattern::Random, 2048, false);
}

#[test]
fn ring_exact_2vcpu_256m() {
    check_exact(256 * MIB, 2, RING, Pattern::Random, 2048, false);
}

/// The epoch engine's pause: saves at park, the harvest overlapped with
/// them and the ring reset handed to a parked vCPU thread.
#[test]
fn ring_exact_2vcpu_256m_at_epoch_boundaries() {
    check_exact_with(256 * MIB, 2, RING, Pattern::Random, 2048, false, true);
}

#[test]
fn ring_exact_2vcpu_16g_spread() {
    check_exact(16 * GIB, 2, RING, Pattern::Sequential, 1024, true);
}

#[test]
fn ring_exact_1vcpu_16g_spread() {
    check_exact(16 * GIB, 1, RING, Pattern::HotCold, 1024, true);
}

#[test]
fn bitmap_exact_1vcpu_256m() {
    check_exact(256 * MIB, 1, TrackerKind::Bitmap, Pattern::Random, 2048, false);
}

#[test]
fn bitmap_exact_2vcpu_256m() {
    check_exact(256 * MIB, 2, TrackerKind::Bitmap, Pattern::HotCold, 2048, false);
}

#[test]
fn bitmap_exact_2vcpu_16g_spread() {
    check_exact(16 * GIB, 2, TrackerKind::Bitmap, Pattern::Random, 1024, true);
}

#[test]
fn bitmap_exact_1vcpu_16g_spread() {
    check_exact(16 * GIB, 1, TrackerKind::Bitmap, Pattern::Sequential, 1024, true);
}

/// A ring far smaller than the working set: the vCPUs exit on ring-full many
/// times per collection, and still no page is lost.
#[test]
fn small_ring_full_exits_lose_nothing() {
    let mut w = WorkloadConfig::dirty(8192, Pattern::Sequential, 0);
    w.report_ms = 0;
    let mut cfg = MachineConfig::new(256 * MIB, 2, TrackerKind::Ring { entries: 512 }, w);
    cfg.ring_verify = true;
    let mut m = Machine::new(cfg).expect("machine");
    let mut c = Checker::new(&m);
    m.start().expect("start");
    let mut biggest = 0;
    for _ in 0..12 {
        wait_writes(&m, 1200);
        biggest = biggest.max(c.round(&mut m).1);
    }
    m.pause().expect("pause");
    let exits = m.ring_full_exits();
    assert!(exits >= 24, "expected ring-full exits with a 512-entry ring, saw {exits}");
    assert!(biggest > 512, "collections should exceed the ring size (largest {biggest})");
}

/// Hot-page retention: re-arming is deferred, so retained pages stay
/// writable and are reported every time. Collections may then report pages
/// not written, but must never miss one that was, including across re-arms
/// (on schedule, at the page cap, for non-converging sets) and, with a small
/// ring, across ring-full exits that reset the rings mid-epoch.
fn hot_pages_never_miss_a_write(tracker: TrackerKind, pattern: Pattern, ws: u64, writes: u64) -> Machine {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut w = WorkloadConfig::dirty(ws, pattern, 20_000);
    w.report_ms = 0;
    let mut cfg = MachineConfig::new(256 * MIB, 2, tracker, w);
    cfg.hot_pages = true;
    // re-arm on schedule within the run, as well as at the cap
    cfg.hot_page_epochs = 64;
    let mut m = Machine::new(cfg).expect("machine");
    let c = Checker::new(&m);
    let mut stamps = c.stamps.clone();
    m.start().expect("start");
    let mut max_hot = 0;
    let mut history: Vec<(BTreeSet<u64>, u64, u64, usize)> = Vec::new();
    for i in 0..150 {
        wait_writes(&m, if i % 3 == 0 { 5 } else { writes });
        m.pause().expect("pause");
        let d = m.collect().expect("collect");
        assert!(!d.tracking_lost, "collection {i}: tracking lost");
        let dirty: BTreeSet<u64> = d.gfns.iter().copied().collect();
        history.push((dirty.clone(), m.hot_page_rearms(), m.ring_full_exits(), m.hot_page_count()));
        for (gpa, last) in stamps.iter_mut() {
            let now = m.memory().read_u64(*gpa).expect("read");
            if now != *last {
                let g = *gpa / PAGE_SIZE;
                let past: Vec<_> = history
                    .iter()
                    .rev()
                    .take(4)
                    .map(|(set, rearms, exits, hot)| (set.contains(&g), set.len(), *rearms, *exits, *hot))
                    .collect();
                assert!(
                    dirty.contains(&g),
                    "collection {i}: page {g:#x} written but not reported; last collections (reported it, size, rearms, ring-full exits, retained): {past:?}"
                );
                *last = now;
            }
        }
        max_hot = max_hot.max(m.hot_page_count());
        m.resume().expect("resume");
    }
    assert!(max_hot > 20, "hot-page retention never kicked in ({max_hot} pages)");
    assert!(m.hot_page_rearms() >= 2, "never re-armed ({} re-arms)", m.hot_page_rearms());
    m
}

#[test]
fn bitmap_hot_pages_never_miss_a_write() {
    let _ = hot_pages_never_miss_a_write(TrackerKind::Bitmap, Pattern::HotCold, 512, 120);
}

#[test]
fn ring_hot_pages_never_miss_a_write() {
    let _ = hot_pages_never_miss_a_write(TrackerKind::Ring { entries: 65536 }, Pattern::HotCold, 512, 120);
}

/// A random writer over 2048 pages per vCPU: the retained set reaches the
/// page cap, so re-arms come from both rules; a 512-entry ring
/// fills within a few epochs, so ring-full exits reset the rings (and with them
/// the collector's deferred entries) mid-epoch.
#[test]
fn ring_hot_pages_never_miss_a_write_with_ring_full_exits() {
    let mut m = hot_pages_never_miss_a_write(TrackerKind::Ring { entries: 512 }, Pattern::Random, 2048, 400);
    m.pause().expect("pause");
    assert!(m.ring_full_exits() > 0, "the small ring never filled");
}

/// A ring reset cut short (as a pending signal cuts it on this host) leaves
/// harvested entries marked but not recycled, and their pages writable. With
/// hot-page retention deferring the next reset, nothing would notice: later
/// collections would miss writes to those pages. Every collection after an
/// injected short reset is checked against the guest's stamps: it must be
/// reported lost or hold every page written, and tracking must come back
/// (every slot re-protected, then an exact reset) within a few collections.
#[test]
fn ring_short_reset_keeps_tracking_lost_until_whole() {
    use vmm::Trust;
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut w = WorkloadConfig::dirty(2048, Pattern::Random, 20_000);
    w.report_ms = 0;
    let mut cfg = MachineConfig::new(256 * MIB, 2, TrackerKind::Ring { entries: 65536 }, w);
    cfg.hot_pages = true;
    cfg.hot_page_epochs = 64;
    let mut m = Machine::new(cfg).expect("machine");
    let mut stamps = Checker::new(&m).stamps;
    m.start().expect("start");
    let (mut lost, mut lost_after_injection, mut last_lost) = (0, 0, None);
    // a short reset is armed at collection 10 and again 10 collections after
    // the first one happened (with retention, the next synchronous reset can
    // be up to `hot_page_epochs` collections away)
    let mut injected_at: Vec<usize> = Vec::new();
    let mut fired_at: Vec<usize> = Vec::new();
    for i in 0..220 {
        wait_writes(&m, if i % 3 == 0 { 5 } else { 120 });
        m.pause().expect("pause");
        if i == 10 || (injected_at.len() == 1 && fired_at.first().is_some_and(|&f| i == f + 10)) {
            m.inject_short_reset();
            injected_at.push(i);
        }
        let before = m.short_resets_injected();
        let d = m.collect().expect("collect");
        let fired = m.short_resets_injected() > before;
        let missing = unreported_writes(&m, &mut stamps, &d.gfns);
        if d.tracking_lost {
            lost += 1;
            last_lost = Some(i);
            if !injected_at.is_empty() {
                lost_after_injection += 1;
            }
        } else {
            assert!(
                missing.is_empty(),
                "collection {i} (short resets injected at or after {injected_at:?}) was not reported lost but misses {} written pages: {:x?}",
                missing.len(),
                &missing[..missing.len().min(8)]
            );
        }
        if fired {
            eprintln!("collection {i}: short reset, re-arm and re-protect of 256 MiB took {} us", d.reset_ns / 1000);
            fired_at.push(i);
            assert!(d.tracking_lost, "collection {i}: the short reset itself was not reported");
            assert_eq!(m.tracking_trust(), Trust::Reprotected, "collection {i}: slots not re-protected");
        }
        assert!(m.faults().is_empty(), "{:?}", m.faults());
        m.resume().expect("resume");
    }
    m.pause().expect("pause");
    eprintln!(
        "short resets armed at {injected_at:?}, done at {fired_at:?}; collections lost {lost} ({lost_after_injection} after an injection), re-protects {}, last lost {last_lost:?}",
        m.tracking_reprotects()
    );
    assert_eq!(fired_at.len(), 2, "the injected short resets did not both happen");
    assert!(m.tracking_reprotects() >= 2);
    assert_eq!(m.tracking_trust(), Trust::Whole, "tracking never became whole again");
    assert!(
        last_lost.is_some_and(|l| l < fired_at[1] + 4),
        "collections still lost 4 collections after the last short reset (last lost: {last_lost:?})"
    );
}

/// A desynchronised ring whose vCPU is stuck ring-full with nothing pushed
/// (KVM counts at least its soft limit of entries as used, none of them
/// DIRTY, its indexes unknown): the collection finds KVM's reset index with
/// resets of marked blocks and steps it forward; the vCPU runs again, the ring is
/// re-aligned and tracking becomes whole, and no collection said exact
/// misses a write. The stuck state is made by forgetting vCPU 0's entries
/// (never recycled) at every collection until it sticks
/// (`Machine::inject_stuck_ring`).
#[test]
fn stuck_desynchronised_ring_is_stepped_forward_and_loses_nothing() {
    use vmm::Trust;
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut w = WorkloadConfig::dirty(2048, Pattern::Random, 20_000);
    w.report_ms = 0;
    let cfg = MachineConfig::new(256 * MIB, 1, TrackerKind::Ring { entries: 512 }, w);
    let mut m = Machine::new(cfg).expect("machine");
    let mut stamps = Checker::new(&m).stamps;
    m.start().expect("start");
    let (mut lost, mut exact_after) = (0, 0);
    for i in 0..80 {
        // the guest cannot write while its vCPU is stuck: wait by time
        std::thread::sleep(Duration::from_millis(15));
        m.pause().expect("pause");
        if i == 5 {
            m.inject_stuck_ring();
        }
        let d = m.collect().expect("collect");
        let missing = unreported_writes(&m, &mut stamps, &d.gfns);
        if d.tracking_lost {
            lost += 1;
        } else {
            assert!(
                missing.is_empty(),
                "collection {i} was not reported lost but misses {} written pages: {:x?}",
                missing.len(),
                &missing[..missing.len().min(8)]
            );
            if m.ring_resyncs().1 > 0 {
                exact_after += 1;
            }
        }
        assert!(m.faults().is_empty(), "{:?}", m.faults());
        m.resume().expect("resume");
    }
    m.pause().expect("pause");
    let (realigns, unsticks) = m.ring_resyncs();
    eprintln!(
        "stuck ring: {lost} collections lost, {exact_after} exact after the unstick; {realigns} re-alignments, {unsticks} unsticks, {} stalled exits",
        m.ring_stalls()
    );
    assert!(unsticks >= 1, "the stuck ring was never stepped forward");
    assert!(realigns >= 1, "the ring was never re-aligned after the unstick");
    assert!(exact_after >= 10, "tracking did not come back after the unstick ({exact_after} exact collections)");
    assert_eq!(m.tracking_trust(), Trust::Whole, "tracking never became whole again");
}
