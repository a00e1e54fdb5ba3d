//! Which machine a figure comes from. Benchmarks, the demo, `castor run` and
//! the failover suite print this beside their figures, read from the machine
//! they run on (`/proc/cpuinfo`, `/proc/meminfo`, the loaded KVM modules), so
//! figures from another host never carry this project's host's name.

use serde::Serialize;

/// The machine, as far as figures depend on it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Host {
    /// Which KVM backs `/dev/kvm`: `KVM-PVM` (guest kernel code emulated,
    /// see docs/machine.md), `KVM (VT-x)`, `KVM (AMD-V)`, `KVM` when the
    /// module does not say, or `no /dev/kvm`.
    pub kvm: String,
    /// Runs under a hypervisor itself (the `hypervisor` CPU flag).
    pub nested: bool,
    /// CPUs this process may use.
    pub cores: usize,
    pub mem_gib: f64,
    /// The first CPU's model name.
    pub cpu: String,
}

impl Host {
    /// Reads this machine.
    pub fn detect() -> Host {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let module = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        Host::from_parts(
            &read("/proc/cpuinfo"),
            &read("/proc/meminfo"),
            Modules {
                dev_kvm: std::path::Path::new("/dev/kvm").exists(),
                pvm: module("kvm_pvm"),
                intel: module("kvm_intel"),
                amd: module("kvm_amd"),
            },
            cores,
        )
    }

    /// One line: `KVM-PVM, nested, 2 cores, 23.5 GiB, AMD EPYC`.
    pub fn describe(&self) -> String {
        format!(
            "{}{}, {} cores, {:.1} GiB, {}",
            self.kvm,
            if self.nested { ", nested" } else { "" },
            self.cores,
            self.mem_gib,
            if self.cpu.is_empty() { "unknown CPU" } else { &self.cpu }
        )
    }

    fn from_parts(cpuinfo: &str, meminfo: &str, m: Modules, cores: usize) -> Host {
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, f)| f.split_whitespace().collect())
            .unwrap_or_default();
        let has = |f: &str| flags.contains(&f);
        // a hardware module only backs /dev/kvm where the CPU offers its
        // extension; PVM needs none (it is what nested hosts without one use)
        let kvm = if !m.dev_kvm {
            "no /dev/kvm"
        } else if m.intel && has("vmx") {
            "KVM (VT-x)"
        } else if m.amd && has("svm") {
            "KVM (AMD-V)"
        } else if m.pvm {
            "KVM-PVM"
        } else {
            "KVM"
        };
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Host { kvm: kvm.into(), nested: has("hypervisor"), cores, mem_gib: mem_kib / 1048576.0, cpu }
    }
}

/// How much this machine's CPUs were wanted elsewhere, as running totals;
/// [`Contention::since`] gives what happened between two readings. A
/// latency figure's tail taken while these grew is the host's noise, which no
/// code here can avoid: `steal_ms` is time the hypervisor below ran something
/// else on this machine's vCPUs (`/proc/stat`), `cpu_wait_ms` time in which
/// some thread here was runnable but had no CPU (`/proc/pressure/cpu`,
/// "some"). A reading that could not be made is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Contention {
    pub steal_ms: f64,
    pub cpu_wait_ms: f64,
}

impl Contention {
    /// Reads the totals now.
    pub fn now() -> Contention {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Contention::from_parts(&read("/proc/stat"), &read("/proc/pressure/cpu"))
    }

    /// What grew from `earlier` to `self`.
    pub fn since(&self, earlier: &Contention) -> Contention {
        Contention {
            steal_ms: (self.steal_ms - earlier.steal_ms).max(0.0),
            cpu_wait_ms: (self.cpu_wait_ms - earlier.cpu_wait_ms).max(0.0),
        }
    }

    fn from_parts(stat: &str, pressure: &str) -> Contention {
        // the "cpu" line: user nice system idle iowait irq softirq steal ...,
        // in USER_HZ ticks (100 a second: fixed by the kernel's ABI)
        let steal_ticks: f64 = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .and_then(|l| l.split_whitespace().nth(8))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let wait_us: f64 = pressure
            .lines()
            .find(|l| l.starts_with("some "))
            .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("total=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Contention { steal_ms: steal_ticks * 10.0, cpu_wait_ms: wait_us / 1000.0 }
    }
}

/// Which KVM pieces are present.
#[derive(Debug, Clone, Copy, Default)]
struct Modules {
    dev_kvm: bool,
    pvm: bool,
    intel: bool,
    amd: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: &str = "MemTotal:       24683664 kB\nMemFree:        1 kB\n";

    fn cpu(flags: &str) -> String {
        format!("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu {flags} sse2\n\nprocessor\t: 1\n")
    }

    #[test]
    fn a_nested_pvm_host_is_named_as_such() {
        let m = Modules { dev_kvm: true, pvm: true, ..Modules::default() };
        let h = Host::from_parts(&cpu("hypervisor avx2"), MEM, m, 2);
        assert_eq!(h.kvm, "KVM-PVM");
        assert!(h.nested);
        assert_eq!(h.describe(), "KVM-PVM, nested, 2 cores, 23.5 GiB, AMD EPYC");
    }

    #[test]
    fn hardware_kvm_needs_both_the_module_and_the_cpu_flag() {
        let intel = Modules { dev_kvm: true, intel: true, ..Modules::default() };
        assert_eq!(Host::from_parts(&cpu("vmx"), MEM, intel, 16).kvm, "KVM (VT-x)");
        // the module without the extension: not hardware KVM
        assert_eq!(Host::from_parts(&cpu("sse4_2"), MEM, intel, 16).kvm, "KVM");
        let amd = Modules { dev_kvm: true, amd: true, pvm: true, ..Modules::default() };
        assert_eq!(Host::from_parts(&cpu("svm"), MEM, amd, 16).kvm, "KVM (AMD-V)");
        assert_eq!(Host::from_parts(&cpu("lm"), MEM, amd, 16).kvm, "KVM-PVM");
        let h = Host::from_parts(&cpu("vmx"), MEM, intel, 16);
        assert!(!h.nested);
        assert_eq!(h.describe(), "KVM (VT-x), 16 cores, 23.5 GiB, AMD EPYC");
    }

    #[test]
    fn contention_is_read_from_the_totals_and_differenced() {
        let stat =
            |steal: u64| format!("cpu  126346 0 53621 117954 473 0 8231 {steal} 6726 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n");
        let psi = |us: u64| {
            format!(
                "some avg10=4.75 avg60=23.32 avg300=17.74 total={us}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
            )
        };
        let a = Contention::from_parts(&stat(1296), &psi(375_404_678));
        assert_eq!(a, Contention { steal_ms: 12_960.0, cpu_wait_ms: 375_404.678 });
        let b = Contention::from_parts(&stat(1300), &psi(375_504_678));
        let d = b.since(&a);
        assert_eq!(d.steal_ms, 40.0);
        assert!((d.cpu_wait_ms - 100.0).abs() < 1e-6, "{d:?}");
        // unreadable files read as zero, and never as a negative difference
        assert_eq!(Contention::from_parts("", "garbage"), Contention::default());
        assert_eq!(Contention::default().since(&a), Contention::default());
    }

    #[test]
    fn a_machine_without_kvm_or_proc_files_still_describes_itself() {
        let h = Host::from_parts("", "", Modules::default(), 0);
        assert_eq!(h.kvm, "no /dev/kvm");
        assert_eq!(h.describe(), "no /dev/kvm, 0 cores, 0.0 GiB, unknown CPU");
    }
}
