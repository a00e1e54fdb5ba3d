//! Full machine state save/restore on real KVM, inside one process (the CLI
//! tests do it across processes with a file).

use std::time::{Duration, Instant};

use vmm::abi::{Pattern, PC_TICKS, PC_WRITES};
use vmm::snapshot::Snapshot;
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};

fn bytes<T: serde::Serialize>(x: &T) -> Vec<u8> {
    common::codec::encode(x).expect("encode")
}

fn wait_until(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A started 2-vCPU, 128 MiB machine (ring tracking) whose guest writes
/// random pages, once each vCPU has made more than `writes` page writes.
fn writing_machine(writes: u64) -> Machine {
    let mut w = WorkloadConfig::dirty(1024, Pattern::Random, 10_000);
    w.report_ms = 0;
    let mut m =
        Machine::new(MachineConfig::new(128 << 20, 2, TrackerKind::Ring { entries: 4096 }, w)).expect("machine");
    m.start().expect("start");
    wait_until(|| (0..2).all(|c| m.percpu(c, PC_WRITES) > writes));
    m
}

#[test]
fn dirty_guest_continues_after_save_and_restore() {
    let mut a = writing_machine(500);
    a.pause().expect("pause");
    let saved: Vec<u64> = (0..2).map(|c| a.percpu(c, PC_WRITES)).collect();
    let ticks: Vec<u64> = (0..2).map(|c| a.percpu(c, PC_TICKS)).collect();
    let st = a.save().expect("save");
    assert_eq!(st.vcpus.len(), 2);
    assert!(!st.vcpus[0].msrs.is_empty(), "no MSRs saved");
    assert!(st.vcpus[0].xsave.len() >= 1024);
    // the state survives the codec
    let bytes = common::codec::encode(&st).expect("encode");
    let st2: vmm::state::MachineState = common::codec::decode(&bytes).expect("decode");
    let mut b = Machine::restore(TrackerKind::Bitmap, &st2, |mem| {
        let mut page = vec![0u8; 4096];
        for gfn in a.memory().all_gfns() {
            a.memory().read_page(gfn, &mut page)?;
            if page.iter().any(|&x| x != 0) {
                mem.write(gfn * 4096, &page)?;
            }
        }
        Ok(())
    })
    .expect("restore");
    drop(a);
    assert_eq!((0..2).map(|c| b.percpu(c, PC_WRITES)).collect::<Vec<_>>(), saved);
    b.start().expect("start restored");
    wait_until(|| (0..2).all(|c| b.percpu(c, PC_WRITES) > saved[c as usize] + 500));
    wait_until(|| (0..2).all(|c| b.percpu(c, PC_TICKS) > ticks[c as usize] + 10));
    assert!(b.faults().is_empty() && b.exited_vcpus().is_empty(), "{:?} {:?}", b.faults(), b.exited_vcpus());
    // the restored machine tracks dirty pages too
    b.pause().expect("pause");
    let d = b.collect().expect("collect");
    assert!(!d.gfns.is_empty() && !d.tracking_lost);
}

#[test]
fn snapshot_file_round_trip_and_refusals() {
    let dir = std::env::temp_dir().join(format!("castor-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("idle.snap");
    let mut m =
        Machine::new(MachineConfig::new(64 << 20, 1, TrackerKind::Bitmap, WorkloadConfig::idle())).expect("machine");
    m.start().expect("start");
    wait_until(|| m.percpu(0, PC_TICKS) > 5);
    m.pause().expect("pause");
    let pages = vmm::snapshot::save(&m, &path).expect("save");
    assert!(pages > 10);
    let snap = Snapshot::read(&path).expect("read");
    let mut r = snap.restore(TrackerKind::Ring { entries: 1024 }).expect("restore");
    let t0 = r.percpu(0, PC_TICKS);
    r.start().expect("start");
    wait_until(|| r.percpu(0, PC_TICKS) > t0 + 5);
    // refusals: every corruption is caught before anything is built
    let good = std::fs::read(&path).expect("read");
    let mut bad = good.clone();
    bad[8] = 9; // version
    assert!(matches!(
        Snapshot::parse(bad),
        Err(vmm::snapshot::SnapshotError::Version(_)) | Err(vmm::snapshot::SnapshotError::Checksum)
    ));
    assert!(matches!(Snapshot::parse(good[..good.len() / 2].to_vec()), Err(vmm::snapshot::SnapshotError::Checksum)));
    assert!(matches!(Snapshot::parse(b"CASTSNP1".to_vec()), Err(vmm::snapshot::SnapshotError::Truncated)));
    std::fs::remove_dir_all(&dir).ok();
}

/// The epoch boundary's pause: each vCPU thread saves its state as it parks
/// (`pause_and_save`; what other vCPUs can change, the LAPIC, mp_state and
/// pending events, once every vCPU is parked), while the owner harvests and
/// a large ring reset runs on a parked thread. What `save` then returns must be the parked vCPU's
/// state: in every part that cannot change while it is parked, equal to a
/// save the owner makes itself in the same pause (the LAPIC's timer count
/// and the TSC run on, so they are left out). Saves asked for after the
/// pause (`pause` + `begin_save`) and none at all (`pause` + `save`) are
/// mixed in, back to back and spaced, and the guest must run on throughout.
#[test]
fn state_saved_as_the_vcpus_park_is_the_parked_state() {
    const MSR_IA32_TSC: u32 = 0x10;
    let mut m = writing_machine(100);
    let first: Vec<u64> = (0..2).map(|c| m.percpu(c, PC_WRITES)).collect();
    for i in 0..300 {
        match i % 3 {
            0 | 1 => {
                m.pause_and_save().expect("pause and save");
            }
            _ => {
                m.pause().expect("pause");
                if i % 2 == 0 {
                    m.begin_save();
                }
            }
        }
        // the LAPIC, mp_state and events of a save begun at a park are read
        // only once this count says every vCPU is parked
        assert_eq!(m.parked_vcpu_threads(), 2, "pause {i}: parked vCPU threads");
        let d = m.collect_overlapped().expect("collect");
        assert!(!d.tracking_lost, "pause {i}: tracking lost");
        assert!(m.finish_reset(), "pause {i}: ring reset failed");
        let writes: Vec<u64> = (0..2).map(|c| m.percpu(c, PC_WRITES)).collect();
        let a = m.save().expect("save");
        // the second save finds no parked thread's save to pick up: the
        // owner asks KVM itself
        let b = m.save().expect("save again");
        assert_eq!((0..2).map(|c| m.percpu(c, PC_WRITES)).collect::<Vec<_>>(), writes, "pause {i}: guest ran");
        for (x, y) in a.vcpus.iter().zip(&b.vcpus) {
            let v = x.id;
            assert_eq!(x.id, y.id);
            assert_eq!(bytes(&x.regs), bytes(&y.regs), "pause {i}, vCPU {v}: regs");
            assert_eq!(bytes(&x.sregs), bytes(&y.sregs), "pause {i}, vCPU {v}: sregs");
            assert_eq!(x.xsave, y.xsave, "pause {i}, vCPU {v}: xsave");
            assert_eq!(bytes(&x.xcrs), bytes(&y.xcrs), "pause {i}, vCPU {v}: xcrs");
            assert_eq!(bytes(&x.debugregs), bytes(&y.debugregs), "pause {i}, vCPU {v}: debug regs");
            assert_eq!(bytes(&x.mp_state), bytes(&y.mp_state), "pause {i}, vCPU {v}: mp_state");
            assert_eq!(bytes(&x.vcpu_events), bytes(&y.vcpu_events), "pause {i}, vCPU {v}: vcpu_events");
            let msrs = |s: &vmm::state::VcpuState| -> Vec<(u32, u64)> {
                s.msrs.iter().filter(|e| e.index != MSR_IA32_TSC).map(|e| (e.index, e.data)).collect()
            };
            assert_eq!(msrs(x), msrs(y), "pause {i}, vCPU {v}: MSRs");
            assert_eq!(x.lapic.regs.len(), y.lapic.regs.len());
        }
        m.resume().expect("resume");
        assert_eq!(m.parked_vcpu_threads(), 0, "resume {i}: parked vCPU threads");
        if i % 4 != 0 {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    assert!(m.faults().is_empty() && m.exited_vcpus().is_empty(), "{:?} {:?}", m.faults(), m.exited_vcpus());
    wait_until(|| (0..2).all(|c| m.percpu(c, PC_WRITES) > first[c as usize] + 500));
}

/// The save point: the VM-wide chips (PIC, IOAPIC, PIT, kvmclock) are saved
/// in the pause itself, once every vCPU is parked and the devices are
/// quiesced, and before the vCPUs' LAPICs (which the parked threads save
/// after that point), not when the owner takes the state after its copy:
/// the PIT and the guest's timers raise interrupts all through a pause, and
/// a tick between a LAPIC saved early and a chip saved late was in one saved
/// state and not the other. A state taken 30 ms after the pause holds the
/// chips as they were at the pause; the guest, whose timer ticks throughout,
/// runs on after each.
#[test]
fn chips_are_saved_at_the_pause_with_the_vcpus_not_after_the_copy() {
    let mut m = writing_machine(100);
    for i in 0..5 {
        m.pause_and_save().expect("pause and save");
        let a = m.save().expect("save");
        std::thread::sleep(Duration::from_millis(30));
        let b = m.save().expect("save 30 ms later");
        assert_eq!(a.vm.clock.clock, b.vm.clock.clock, "pause {i}: the kvmclock was read after the pause");
        assert_eq!(bytes(&a.vm.pit), bytes(&b.vm.pit), "pause {i}: PIT");
        assert_eq!(bytes(&a.vm.ioapic), bytes(&b.vm.ioapic), "pause {i}: IOAPIC");
        m.resume().expect("resume");
        std::thread::sleep(Duration::from_millis(5));
    }
    // a pause without a save point (a plain pause) reads the chips when
    // asked: the machine has been quiet since the pause
    m.pause().expect("pause");
    let a = m.save().expect("save");
    std::thread::sleep(Duration::from_millis(30));
    let b = m.save().expect("save later");
    assert!(b.vm.clock.clock >= a.vm.clock.clock + 20_000_000, "a plain pause's save reads the clock when asked");
    let ticks = m.percpu(0, vmm::abi::PC_TICKS);
    m.resume().expect("resume");
    wait_until(|| m.percpu(0, vmm::abi::PC_TICKS) > ticks + 2);
    assert!(m.faults().is_empty() && m.exited_vcpus().is_empty(), "{:?} {:?}", m.faults(), m.exited_vcpus());
}
