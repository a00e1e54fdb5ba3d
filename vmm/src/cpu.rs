//! The CPU a guest was given, and the one a host can give: compared in the
//! replication handshake (`common::state::CpuModel::fits`), so a pair whose
//! secondary could not restore the guest is refused when it forms, not
//! found out at failover.

use common::state::CpuModel;
use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::{Cap, Kvm};

use crate::machine::MachineError;

/// The feature words compared: (leaf, subleaf, register, bits that count).
/// Leaf 1 ECX bit 27 (OSXSAVE) mirrors the guest's CR4 and is left out.
const FEATURE_WORDS: &[(u32, u32, char, u32)] = &[
    (0x1, 0, 'c', !(1 << 27)),
    (0x1, 0, 'd', u32::MAX),
    (0x7, 0, 'b', u32::MAX),
    (0x7, 0, 'c', u32::MAX),
    (0x7, 0, 'd', u32::MAX),
    (0x7, 1, 'a', u32::MAX),
    (0xd, 0, 'a', u32::MAX),
    (0xd, 1, 'a', u32::MAX),
    (0x8000_0001, 0, 'c', u32::MAX),
    (0x8000_0001, 0, 'd', u32::MAX),
];

fn reg(e: &kvm_cpuid_entry2, r: char) -> u32 {
    match r {
        'a' => e.eax,
        'b' => e.ebx,
        'c' => e.ecx,
        _ => e.edx,
    }
}

/// The model of CPUID `entries` (a guest's, or a host's supported set) and
/// a TSC frequency.
pub fn model_of(entries: &[kvm_cpuid_entry2], tsc_khz: u32, tsc_scaling: bool) -> CpuModel {
    let find = |leaf: u32, sub: u32| {
        entries.iter().find(|e| e.function == leaf && (e.index == sub || sub == 0 && e.index == 0))
    };
    let vendor = find(0, 0).map_or_else(String::new, |e| {
        let mut v = Vec::with_capacity(12);
        for w in [e.ebx, e.edx, e.ecx] {
            v.extend_from_slice(&w.to_le_bytes());
        }
        String::from_utf8_lossy(&v).trim_end_matches('\0').to_string()
    });
    let features = FEATURE_WORDS
        .iter()
        .filter_map(|&(leaf, sub, r, mask)| find(leaf, sub).map(|e| (leaf, sub, r, reg(e, r) & mask)))
        .collect();
    CpuModel { vendor, features, tsc_khz, tsc_scaling }
}

/// Whether this host's KVM can set another TSC frequency.
pub fn tsc_scaling(kvm: &Kvm) -> bool {
    kvm.check_extension(Cap::TscControl)
}

/// What this host can run: its KVM-supported CPUID and the TSC frequency a
/// new vCPU gets (a scratch VM, built and dropped).
pub fn host_model() -> Result<CpuModel, MachineError> {
    let kvm = Kvm::new().map_err(MachineError::Kvm)?;
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| MachineError::Setup("KVM_GET_SUPPORTED_CPUID", e))?;
    let vm = kvm.create_vm().map_err(|e| MachineError::Setup("KVM_CREATE_VM", e))?;
    let vcpu = vm.create_vcpu(0).map_err(|e| MachineError::Setup("KVM_CREATE_VCPU", e))?;
    let khz = vcpu.get_tsc_khz().unwrap_or(0);
    Ok(model_of(supported.as_slice(), khz, tsc_scaling(&kvm)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_host_runs_its_own_guests() {
        let host = host_model().expect("host model");
        assert!(!host.vendor.is_empty(), "{host:?}");
        assert!(host.features.iter().any(|f| f.0 == 1 && f.2 == 'd' && f.3 != 0), "{host:?}");
        // a guest built here is given this host's supported set
        let m = crate::Machine::new(crate::MachineConfig::new(
            64 << 20,
            1,
            crate::TrackerKind::Bitmap,
            crate::WorkloadConfig::idle(),
        ))
        .expect("machine");
        assert_eq!(m.cpu_model().fits(&host), Ok(()));
        let mut poorer = host.clone();
        poorer.features.retain(|f| f.0 != 1);
        assert!(m.cpu_model().fits(&poorer).is_err());
    }
}
