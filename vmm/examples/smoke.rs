use std::time::{Duration, Instant};
use vmm::abi::{Pattern, PC_TICKS, PC_WRITES};
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};

fn main() {
    let kind = std::env::args().nth(1).unwrap_or("ring".into());
    let tracker = if kind == "ring" { TrackerKind::Ring { entries: 65536 } } else { TrackerKind::Bitmap };
    let mut w = WorkloadConfig::dirty(512, Pattern::Random, 0);
    w.report_ms = 300;
    let mut m = Machine::new(MachineConfig::new(256 << 20, 2, tracker, w)).expect("machine");
    m.start().expect("start");
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
        let p = m.pause().expect("pause");
        let d = m.collect().expect("collect");
        if n % 20 == 0 {
            println!(
                "pause {:?} dirty {} lost {} writes {} {} ticks {}",
                p.elapsed,
                d.gfns.len(),
                d.tracking_lost,
                m.percpu(0, PC_WRITES),
                m.percpu(1, PC_WRITES),
                m.percpu(0, PC_TICKS)
            );
        }
        m.resume().expect("resume");
        n += 1;
        for o in m.devices().drain() {
            println!("{o:?}");
        }
    }
    println!("faults {:?} exited {:?}", m.faults(), m.exited_vcpus());
}
