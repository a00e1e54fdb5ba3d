//! The networked guest image boots with WorkloadKind::Net: without a network
//! card at NET_MMIO_GPA it says so on the console and waits (no fault, no
//! panic), and it keeps running (the timer still ticks).

use std::time::{Duration, Instant};

use vmm::abi::{WorkloadKind, GUEST_NET_IMAGE, NET_MMIO_GPA};
use vmm::devices::Output;
use vmm::{Machine, MachineConfig, NetAddr, TrackerKind, WorkloadConfig};

fn console_lines(m: &mut Machine, want: impl Fn(&str) -> bool, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut lines = Vec::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        for o in m.devices().drain() {
            if let Output::Console { line, .. } = o {
                lines.push(line);
            }
        }
        if lines.iter().any(|l| want(l)) {
            break;
        }
    }
    lines
}

#[test]
fn net_guest_without_a_card_reports_it_and_waits() {
    let net = NetAddr { ipv4: "10.0.0.2".parse().expect("ip"), ..NetAddr::default() };
    let cfg = MachineConfig::new(128 << 20, 2, TrackerKind::Bitmap, WorkloadConfig::net(net));
    assert_eq!(cfg.workload.kind, WorkloadKind::Net);
    let mut m = Machine::new(cfg).expect("machine");
    m.start().expect("start");
    let lines = console_lines(&mut m, |l| l.starts_with("net:"), Duration::from_secs(20));
    let want = format!("net: no usable virtio-net device at {NET_MMIO_GPA:#x}");
    // the runtime (heap, smoltcp, RESP) works in the real guest
    assert!(lines.iter().any(|l| l.contains("self-check ok")), "console: {lines:?}");
    assert!(lines.iter().any(|l| l.starts_with(&want)), "console: {lines:?}");
    // still alive and quiet: no fault, no more lines (no busy error loop)
    std::thread::sleep(Duration::from_millis(300));
    let more: Vec<_> = m.devices().drain();
    assert!(more.iter().all(|o| !matches!(o, Output::Console { .. })), "unexpected output: {more:?}");
    m.pause().expect("pause");
    assert!(m.faults().is_empty(), "faults: {:?}", m.faults());
    assert!(GUEST_NET_IMAGE.len() < 1 << 20);
    eprintln!("net guest image: {} bytes; console: {lines:?}", GUEST_NET_IMAGE.len());
}
