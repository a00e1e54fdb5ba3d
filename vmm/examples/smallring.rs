use std::time::Duration;
use vmm::abi::{Pattern, PC_WRITES};
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};
fn main() {
    let mut w = WorkloadConfig::dirty(8192, Pattern::Sequential, 0);
    w.report_ms = 0;
    let mut cfg = MachineConfig::new(256 << 20, 2, TrackerKind::Ring { entries: 512 }, w);
    cfg.ring_verify = std::env::var("VERIFY").is_ok();
    let mut m = Machine::new(cfg).unwrap();
    m.start().unwrap();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(15));
        m.pause().unwrap();
        let d = m.collect().unwrap();
        let _ = &d;
        println!(
            "dirty {} kvm {} lost {} writes {} {} exits {} stalls {}",
            d.gfns.len(),
            d.from_kvm,
            d.tracking_lost,
            m.percpu(0, PC_WRITES),
            m.percpu(1, PC_WRITES),
            m.ring_full_exits(),
            m.ring_stalls()
        );
        m.resume().unwrap();
    }
}
