//! Machine state: everything besides memory that a VM needs to continue on
//! another host or in another process. All types are serde-serializable
//! (kvm-bindings' serde feature for the KVM structures).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use serde::{Deserialize, Serialize};

/// The shape of a VM: a replica or a restored VM must match it exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmShape {
    /// Total RAM in bytes.
    pub mem_bytes: u64,
    /// Guest-physical RAM ranges (start, length), in KVM slot order.
    pub ram_ranges: Vec<(u64, u64)>,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Digest of the guest image the VM booted.
    pub image_id: u64,
}

/// Per-vCPU architectural state, in the order it is saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// Raw KVM_GET_XSAVE2 region (sized by KVM_CAP_XSAVE2), as u32 words.
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
    /// TSC frequency in kHz, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// VM-wide state of the in-kernel devices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// `kv` operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[repr(u32)]
pub enum KvOp {
    #[default]
    Get = 1,
    Put = 2,
    Add = 3,
    Del = 4,
}

/// A `kv` request: a client id and sequence number make retries idempotent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
pub struct KvRequest {
    pub client: u32,
    pub seq: u32,
    pub op: KvOp,
    pub key: u64,
    pub value: u64,
}

/// A `kv` response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
pub struct KvResponse {
    pub client: u32,
    pub seq: u32,
    /// 0 ok, 1 not found, 2 table full, 3 stale sequence, 4 bad op.
    pub status: u32,
    pub value: u64,
    /// The table's applied-operation counter after this request.
    pub ops: u64,
}

/// Something a device sent out of the VM (subject to output commit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// One console line from the guest.
    Console { cpu: u32, line: String },
    /// A kv response.
    Kv(KvResponse),
    /// A workload reported that it finished.
    Done { cpu: u32, code: u32 },
    /// A workload phase marker (tests).
    Mark { cpu: u32, value: u32 },
    /// An Ethernet frame the guest transmitted (without its virtio-net header).
    Frame(Vec<u8>),
}

/// The saveable state of the VMM's own devices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Requests waiting for each cpu.
    pub kv_queues: Vec<Vec<KvRequest>>,
    /// Requests each cpu has taken from its mailbox and not yet answered.
    pub kv_in_flight: Vec<Vec<KvRequest>>,
    /// Output not yet drained by the owner.
    pub outbox: Vec<Output>,
    /// Console lines produced so far.
    pub console_lines: u64,
    /// The network card, if the machine has one.
    pub net: Option<NetState>,
}

/// A MAC address as people write it (`52:54:00:12:34:56`).
pub fn mac_text(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// One virtqueue's state (virtio-queue's `QueueState`, less event index).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// A virtio-mmio transport's own registers (the queues' are apart).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioRegs {
    pub status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
}

/// The saveable state of the network card (virtio-net over virtio-mmio).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub regs: MmioRegs,
    /// Receive queue, then transmit queue.
    pub queues: Vec<QueueSnapshot>,
    /// Frames received and not yet delivered into the guest.
    pub rx_backlog: Vec<Vec<u8>>,
}

/// The complete non-memory state of a machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    pub shape: VmShape,
    /// Guest boot parameters (the workload configuration), opaque here.
    pub boot: Vec<u8>,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub devices: DeviceState,
    /// The CPU the guest was given when it was built (kept as it is across
    /// restores: a restored vCPU's CPUID read back from KVM may differ from
    /// what the guest was given).
    pub cpu: CpuModel,
}

/// What a guest's CPU asks of the host that runs it: the CPUID vendor, the
/// feature leaves the guest was given (the primary host's KVM-supported
/// set, kept across failovers), the XSAVE components, and the TSC
/// frequency. A host whose KVM lacks any of it cannot restore the guest
/// (MSRs refused, XSAVE state refused, a TSC frequency it cannot set) or
/// would hand it instructions that fault.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    /// CPUID leaf 0's vendor string ("GenuineIntel", "AuthenticAMD").
    pub vendor: String,
    /// Feature words: (leaf, subleaf, register name, bits).
    pub features: Vec<(u32, u32, char, u32)>,
    /// The guest's TSC frequency (kHz); 0: unknown.
    pub tsc_khz: u32,
    /// Whether this host's KVM can run a guest at another TSC frequency
    /// (KVM_CAP_TSC_CONTROL). Meaningful for a host, not a guest.
    pub tsc_scaling: bool,
}

/// How far a guest's TSC frequency may be from the host's without scaling
/// (KVM's own tolerance, `tsc_tolerance_ppm`).
pub const TSC_TOLERANCE_PPM: u64 = 250;

/// Why a host cannot run a guest's CPU (each line one reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this host cannot run the guest's CPU: {}", .0.join("; "))]
pub struct CpuMismatch(pub Vec<String>);

impl CpuModel {
    /// Whether `host` (a host's model) can run a guest of this model.
    pub fn fits(&self, host: &CpuModel) -> Result<(), CpuMismatch> {
        let mut why = Vec::new();
        if self.vendor != host.vendor {
            why.push(format!("the guest's CPU is {}, this host's {}", self.vendor, host.vendor));
        }
        for &(leaf, sub, reg, bits) in &self.features {
            let have = host.features.iter().find(|f| f.0 == leaf && f.1 == sub && f.2 == reg).map_or(0, |f| f.3);
            let missing = bits & !have;
            if missing != 0 {
                why.push(format!("CPUID {leaf:#x}.{sub} {reg}: features {missing:#010x} are missing here"));
            }
        }
        let (g, h) = (u64::from(self.tsc_khz), u64::from(host.tsc_khz));
        if g != 0 && h != 0 && g.abs_diff(h) * 1_000_000 > g * TSC_TOLERANCE_PPM && !host.tsc_scaling {
            why.push(format!("the guest's TSC runs at {g} kHz, this host's at {h} kHz, and its KVM cannot scale it"));
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(CpuMismatch(why))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn device_state_round_trips() {
        let st = DeviceState {
            kv_queues: vec![vec![KvRequest { client: 1, seq: 2, op: KvOp::Put, key: 3, value: 4 }], vec![]],
            kv_in_flight: vec![vec![], vec![KvRequest::default()]],
            outbox: vec![Output::Console { cpu: 0, line: "hi".into() }, Output::Kv(KvResponse::default())],
            console_lines: 9,
            net: Some(NetState {
                mac: [2, 0, 0, 0, 0, 1],
                queues: vec![QueueSnapshot::default(); 2],
                ..Default::default()
            }),
        };
        let b = codec::encode(&st).expect("encode");
        assert_eq!(codec::decode::<DeviceState>(&b).expect("decode"), st);
        assert!(codec::decode::<DeviceState>(&b[..b.len() - 1]).is_err());
    }
}

#[cfg(test)]
mod cpu_tests {
    use super::*;

    fn model(feat: u32, khz: u32, scaling: bool) -> CpuModel {
        CpuModel {
            vendor: "GenuineIntel".into(),
            features: vec![(1, 0, 'c', feat), (7, 0, 'b', 0x10)],
            tsc_khz: khz,
            tsc_scaling: scaling,
        }
    }

    #[test]
    fn a_host_fits_a_guest_that_asks_no_more_than_it_has() {
        let guest = model(0b0110, 2_000_000, false);
        assert_eq!(guest.fits(&model(0b1110, 2_000_000, false)), Ok(()));
        // a few ppm of calibration noise is no difference
        assert_eq!(guest.fits(&model(0b0110, 2_000_100, false)), Ok(()));
        let e = guest.fits(&model(0b0010, 2_000_000, false)).unwrap_err();
        assert!(e.0[0].contains("0x00000004"), "{e}");
        let e = guest.fits(&model(0b0110, 2_600_000, false)).unwrap_err();
        assert!(e.to_string().contains("cannot scale"), "{e}");
        assert_eq!(guest.fits(&model(0b0110, 2_600_000, true)), Ok(()), "a host that scales the TSC");
        let amd = CpuModel { vendor: "AuthenticAMD".into(), ..model(0b1111, 2_000_000, true) };
        assert!(guest.fits(&amd).unwrap_err().to_string().contains("AuthenticAMD"));
        let bare = CpuModel { features: vec![(1, 0, 'c', 0b0110)], ..model(0, 2_000_000, false) };
        assert!(guest.fits(&bare).unwrap_err().to_string().contains("0x7.0 b"), "a leaf the host lacks");
    }
}
