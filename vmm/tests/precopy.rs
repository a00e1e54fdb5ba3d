//! Pre-copy against real KVM: pages copied while the guest runs, plus the
//! boundary's copies, make a page-exact replica.

mod dirty_support;

use std::collections::BTreeSet;

use dirty_support::{wait_writes, MIB, RING};
use vmm::abi::{Pattern, PAGE_SIZE};
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};

/// Pre-copy: pages copied while the guest runs (after a round re-armed their
/// tracking), plus the boundary's copies of the pages its collection reports,
/// make a page-exact replica. The guest writes as fast as it can during every
/// round's copy: a page written after its round's re-arm (torn or stale
/// copies among them) must be reported by the boundary, and a pre-copied page
/// the boundary does not report must be unchanged since its copy. The whole
/// of guest memory is compared with the replica at every boundary.
fn precopy_keeps_a_page_exact_replica(tracker: TrackerKind, hot_pages: bool) -> Machine {
    use std::collections::{BTreeMap, HashMap};
    let mut w = WorkloadConfig::dirty(2048, Pattern::Random, 0);
    w.report_ms = 0;
    let mut cfg = MachineConfig::new(128 * MIB, 2, tracker, w);
    cfg.hot_pages = hot_pages;
    let mut m = Machine::new(cfg).expect("machine");
    m.start().expect("start");
    wait_writes(&m, 100);
    let ps = PAGE_SIZE as usize;
    let mut page = vec![0u8; ps];
    m.pause().expect("pause");
    m.collect().expect("collect");
    let gfns: Vec<u64> = m.memory().all_gfns().collect();
    let mut replica: HashMap<u64, Vec<u8>> = HashMap::new();
    for &g in &gfns {
        m.memory().read_page(g, &mut page).expect("read");
        replica.insert(g, page.clone());
    }
    m.resume().expect("resume");
    let (mut precopied, mut reported_again, mut changed) = (0u64, 0u64, 0u64);
    for epoch in 0..30 {
        let mut pre: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for round in 0..3 {
            wait_writes(&m, 200);
            let r = m
                .precopy_round()
                .expect("pre-copy round")
                .unwrap_or_else(|| panic!("epoch {epoch} round {round}: pre-copy refused while tracking is whole"));
            let mut buf = vec![0u8; r.len() * ps];
            m.copy_pages_running(&r, &mut buf).expect("copy");
            for (i, &g) in r.iter().enumerate() {
                pre.insert(g, buf[i * ps..(i + 1) * ps].to_vec());
            }
        }
        wait_writes(&m, 50);
        m.pause().expect("pause");
        let d = m.collect().expect("collect");
        assert!(!d.tracking_lost, "epoch {epoch}: tracking lost");
        let dirty: BTreeSet<u64> = d.gfns.iter().copied().collect();
        for (g, bytes) in &pre {
            precopied += 1;
            m.memory().read_page(*g, &mut page).expect("read");
            if dirty.contains(g) {
                reported_again += 1;
                changed += u64::from(page != *bytes);
                continue;
            }
            assert!(
                page == *bytes,
                "epoch {epoch}: page {g:#x} was pre-copied and not reported again, but changed since its copy"
            );
        }
        for &g in &d.gfns {
            m.memory().read_page(g, &mut page).expect("read");
            replica.insert(g, page.clone());
        }
        for (g, bytes) in pre {
            if !dirty.contains(&g) {
                replica.insert(g, bytes);
            }
        }
        let mut differ = Vec::new();
        for &g in &gfns {
            m.memory().read_page(g, &mut page).expect("read");
            if replica[&g] != page {
                differ.push(g);
            }
        }
        assert!(
            differ.is_empty(),
            "epoch {epoch}: the replica differs from guest memory in {} pages: {:x?}",
            differ.len(),
            &differ[..differ.len().min(8)]
        );
        assert!(m.faults().is_empty(), "{:?}", m.faults());
        m.resume().expect("resume");
    }
    eprintln!(
        "pre-copied {precopied} pages in {} rounds; {reported_again} reported again by their boundary ({changed} of them changed after their copy)",
        m.precopy_rounds()
    );
    assert_eq!(m.precopy_rounds(), 90);
    assert!(changed > 0, "no page was written after its pre-copy: the test exercised nothing");
    m
}

#[test]
fn ring_precopy_keeps_a_page_exact_replica() {
    precopy_keeps_a_page_exact_replica(RING, false);
}

#[test]
fn ring_precopy_with_hot_pages_keeps_a_page_exact_replica() {
    precopy_keeps_a_page_exact_replica(RING, true);
}

/// Pre-copy rounds on other threads race with ring-full exits (a 512-entry
/// ring): an exit that finds its ring emptied by a round must not be taken
/// for a desynchronised ring (a false loss).
#[test]
fn ring_precopy_with_ring_full_exits_keeps_a_page_exact_replica() {
    let mut m = precopy_keeps_a_page_exact_replica(TrackerKind::Ring { entries: 512 }, true);
    m.pause().expect("pause");
    assert!(m.ring_full_exits() > 0, "the small ring never filled");
}
