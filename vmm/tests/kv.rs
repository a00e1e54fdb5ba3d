//! The `kv` guest through its device: requests, idempotent retries, and the
//! VMM's mailbox writes showing up in the dirty set.

use std::time::{Duration, Instant};

use vmm::abi::{KvOp, KvRequest, KvResponse, MAILBOX_GPA, PAGE_SIZE};
use vmm::devices::Output;
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};

fn responses(m: &mut Machine, want: usize) -> Vec<KvResponse> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < want {
        assert!(Instant::now() < deadline, "only {} of {want} responses", got.len());
        std::thread::sleep(Duration::from_millis(5));
        for o in m.devices().drain() {
            if let Output::Kv(r) = o {
                got.push(r);
            }
        }
    }
    got
}

#[test]
fn kv_applies_once_answers_retries_and_dirties_the_mailbox() {
    for tracker in [TrackerKind::Ring { entries: 4096 }, TrackerKind::Bitmap] {
        let mut m = Machine::new(MachineConfig::new(128 << 20, 2, tracker, WorkloadConfig::kv())).expect("machine");
        m.start().expect("start");
        let dev = m.devices().clone();
        // client 7 (served by cpu 1): ADD 5 twice with the same seq = one application
        let add = KvRequest { client: 7, seq: 1, op: KvOp::Add, key: 42, value: 5 };
        dev.submit(add).expect("submit");
        let r1 = responses(&mut m, 1);
        dev.submit(add).expect("retry");
        let r2 = responses(&mut m, 1);
        assert_eq!(r1[0].value, 5);
        assert_eq!(r2[0], r1[0], "a retried request must get the same answer");
        dev.submit(KvRequest { client: 7, seq: 2, op: KvOp::Get, key: 42, value: 0 }).expect("get");
        let g = responses(&mut m, 1);
        assert_eq!((g[0].status, g[0].value), (0, 5), "the retry was applied twice");
        // an older sequence number is stale
        dev.submit(KvRequest { client: 7, seq: 1, op: KvOp::Add, key: 42, value: 5 }).expect("stale");
        assert_eq!(responses(&mut m, 1)[0].status, 3);
        // many clients at once across both vCPUs
        for c in 100..164u32 {
            dev.submit(KvRequest { client: c, seq: 1, op: KvOp::Put, key: u64::from(c), value: u64::from(c) * 3 })
                .expect("put");
        }
        let rs = responses(&mut m, 64);
        assert!(rs.iter().all(|r| r.status == 0 && r.value == u64::from(r.client) * 3));
        // the VMM's mailbox writes are part of the dirty set
        m.pause().expect("pause");
        let d = m.collect().expect("collect");
        assert!(d.from_vmm >= 1, "no VMM-written pages reported");
        let mailbox0 = MAILBOX_GPA / PAGE_SIZE;
        assert!(
            d.gfns.contains(&mailbox0) || d.gfns.contains(&(mailbox0 + 1)),
            "mailbox page missing from the dirty set"
        );
        assert!(m.faults().is_empty());
    }
}
