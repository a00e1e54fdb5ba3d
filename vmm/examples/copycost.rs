use std::time::Instant;
use vmm::abi::{Pattern, KERNEL_END, PAGE_SIZE};
use vmm::{Machine, MachineConfig, TrackerKind, WorkloadConfig};
fn main() {
    let n = 1024u64;
    let mem = 256u64 << 20;
    let mut w = WorkloadConfig::dirty(n, Pattern::Sequential, 0);
    w.ws_stride = ((mem - KERNEL_END) / PAGE_SIZE) / n;
    let mut m = Machine::new(MachineConfig::new(mem, 1, TrackerKind::Ring { entries: 65536 }, w)).unwrap();
    m.start().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    m.pause().unwrap();
    let d = m.collect().unwrap();
    let gfns: Vec<u64> = d.gfns.iter().copied().filter(|g| g * 4096 >= KERNEL_END).take(1024).collect();
    println!("pages {}", gfns.len());
    for _ in 0..3 {
        let t = Instant::now();
        let mut v = vec![0u8; gfns.len() * 4096];
        m.copy_pages_into(&gfns, &mut v).unwrap();
        println!("fresh alloc copy {:?} {}", t.elapsed(), v[0]);
    }
    let mut buf = vec![1u8; gfns.len() * 4096];
    for _ in 0..3 {
        let t = Instant::now();
        unsafe { m.memory().copy_pages_quiescent(&gfns, &mut buf).unwrap() };
        println!("reused buf copy {:?}", t.elapsed());
    }
    let contig: Vec<u64> = (0x1000..0x1000 + gfns.len() as u64).collect();
    for _ in 0..3 {
        let t = Instant::now();
        unsafe { m.memory().copy_pages_quiescent(&contig, &mut buf).unwrap() };
        println!("contig copy {:?}", t.elapsed());
    }
    for _ in 0..3 {
        let t = Instant::now();
        let v = vec![0u8; gfns.len() * 4096];
        println!("alloc only {:?} {}", t.elapsed(), v[100]);
    }
}
