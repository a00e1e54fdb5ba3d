use std::time::Duration;
use vmm::abi::{WorkloadKind, KERNEL_END, PAGE_SIZE, PC_WRITES};
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};

fn main() {
    let entries: u32 = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(512);
    let pages: u64 = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(4096);
    let mut w = WorkloadConfig::idle();
    w.kind = WorkloadKind::KernelWrite;
    w.ws_pages = pages;
    let mut cfg = MachineConfig::new(256 << 20, 1, TrackerKind::Ring { entries }, w);
    cfg.ring_verify = std::env::var("VERIFY").is_ok();
    let mut m = Machine::new(cfg).expect("machine");
    let base = KERNEL_END;
    m.start().unwrap();
    let mut last = vec![0u64; pages as usize];
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(std::env::var("MS").map(|s| s.parse().unwrap()).unwrap_or(20)));
        m.pause().unwrap();
        let d = m.collect().unwrap();
        let mut written = 0;
        let mut missing = 0;
        let set: std::collections::HashSet<u64> = d.gfns.iter().copied().collect();
        for j in 0..pages {
            let g = base + j * PAGE_SIZE;
            let v = m.memory().read_u64(g).unwrap();
            if v != last[j as usize] {
                written += 1;
                if !set.contains(&(g / PAGE_SIZE)) {
                    missing += 1;
                }
                last[j as usize] = v;
            }
        }
        println!(
            "rounds {} dirty {} kvm {} lost {} written {} missing {} full_exits {} stalls {}",
            m.percpu(0, PC_WRITES),
            d.gfns.len(),
            d.from_kvm,
            d.tracking_lost,
            written,
            missing,
            m.ring_full_exits(),
            m.ring_stalls()
        );
        m.resume().unwrap();
    }
}
