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
    /// Runs in a virtual machine itself (the `hypervisor` CPU flag): with
    /// `/dev/kvm`, its guests are nested.
    pub nested: bool,
    /// CPUs this process may use.
    pub cores: usize,
    /// Memory of the machine (`MemTotal`), GiB.
    pub mem_gib: f64,
    /// The first CPU's model name.
    pub cpu: String,
}

impl Host {
    /// Reads this machine.
    pub fn detect() -> Host {
        let module = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        Host::from_parts(
            &read_or_empty("/proc/cpuinfo"),
            &read_or_empty("/proc/meminfo"),
            Modules {
                dev_kvm: std::path::Path::new("/dev/kvm").exists(),
                pvm: module("kvm_pvm"),
                intel: module("kvm_intel"),
                amd: module("kvm_amd"),
            },
            cores,
        )
    }

    /// One line: `KVM-PVM, nested, 2 cores, 23.5 GiB, AMD EPYC` (`in a VM`
    /// instead of `nested` where there is no `/dev/kvm`).
    pub fn describe(&self) -> String {
        let vm = match (self.nested, self.kvm == NO_KVM) {
            (false, _) => "",
            (true, false) => ", nested",
            (true, true) => ", in a VM",
        };
        format!(
            "{}{vm}, {} cores, {:.1} GiB, {}",
            self.kvm,
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
        // one vendor module backs /dev/kvm; a loaded kvm_pvm module is one
        // whose start succeeded (a built-in kvm_intel shows in /sys/module
        // whether or not it took /dev/kvm), and a hardware module backs it
        // only where the CPU offers its extension
        let kvm = if !m.dev_kvm {
            NO_KVM
        } else if m.pvm {
            "KVM-PVM"
        } else if m.intel && has("vmx") {
            "KVM (VT-x)"
        } else if m.amd && has("svm") {
            "KVM (AMD-V)"
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

/// How much this machine's CPUs were wanted elsewhere while something was
/// timed: take [`Contention::now`] before and after, and
/// [`Contention::since`] gives what grew in between. A latency figure's tail
/// taken while these grew is the host's noise, which no code here can avoid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Contention {
    /// CPU time the hypervisor below ran something else on this machine's
    /// vCPUs, summed over the vCPUs (`/proc/stat`, 10 ms ticks); None where
    /// it could not be read.
    pub steal_ms: Option<f64>,
    /// Wall-clock time in which at least one thread of this machine was
    /// runnable but had no CPU (`/proc/pressure/cpu`, "some"); None where it
    /// could not be read.
    pub cpu_wait_ms: Option<f64>,
    /// Wall-clock time between the two readings (0 in a reading).
    pub window_ms: f64,
    #[serde(skip)]
    read_at: Option<std::time::Instant>,
}

impl Contention {
    /// Reads the running totals now.
    pub fn now() -> Contention {
        let mut c = Contention::from_parts(&read_or_empty("/proc/stat"), &read_or_empty("/proc/pressure/cpu"));
        c.read_at = Some(std::time::Instant::now());
        c
    }

    /// What grew from the reading `earlier` to the reading `self` (a part
    /// missing from either reading is None).
    pub fn since(&self, earlier: &Contention) -> Contention {
        let d = |a: Option<f64>, b: Option<f64>| Some((a? - b?).max(0.0));
        let window_ms = match (self.read_at, earlier.read_at) {
            (Some(a), Some(b)) => a.saturating_duration_since(b).as_secs_f64() * 1e3,
            _ => 0.0,
        };
        Contention {
            steal_ms: d(self.steal_ms, earlier.steal_ms),
            cpu_wait_ms: d(self.cpu_wait_ms, earlier.cpu_wait_ms),
            window_ms,
            read_at: None,
        }
    }

    /// One line for a live report: `steal 0 ms, a thread waiting for a CPU
    /// 11 ms, over 2400 ms`.
    pub fn describe(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("unknown".to_string(), |v| format!("{v:.0} ms"));
        format!(
            "steal {} (CPU time, all vCPUs), a thread waiting for a CPU {}, over {:.0} ms",
            ms(self.steal_ms),
            ms(self.cpu_wait_ms),
            self.window_ms
        )
    }

    fn from_parts(stat: &str, pressure: &str) -> Contention {
        // the "cpu" line: user nice system idle iowait irq softirq steal ...,
        // in USER_HZ ticks (100 a second: fixed by the kernel's ABI)
        let steal_ticks: Option<f64> = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .and_then(|l| l.split_whitespace().nth(8))
            .and_then(|v| v.parse().ok());
        let wait_us: Option<f64> = pressure
            .lines()
            .find(|l| l.starts_with("some "))
            .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("total=")))
            .and_then(|v| v.parse().ok());
        Contention {
            steal_ms: steal_ticks.map(|t| t * 10.0),
            cpu_wait_ms: wait_us.map(|u| u / 1000.0),
            window_ms: 0.0,
            read_at: None,
        }
    }
}

const NO_KVM: &str = "no /dev/kvm";

/// A file's text, or nothing where it cannot be read (the parsers then
/// report the part unknown).
fn read_or_empty(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
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
        let amd = Modules { dev_kvm: true, amd: true, ..Modules::default() };
        assert_eq!(Host::from_parts(&cpu("svm"), MEM, amd, 16).kvm, "KVM (AMD-V)");
        assert_eq!(Host::from_parts(&cpu("lm"), MEM, amd, 16).kvm, "KVM");
        // a loaded kvm_pvm started, so it is what backs /dev/kvm, beside a
        // (possibly built-in) hardware module
        let both = Modules { pvm: true, ..amd };
        assert_eq!(Host::from_parts(&cpu("svm hypervisor"), MEM, both, 16).kvm, "KVM-PVM");
        // the flags are words of the first "flags" line only
        let tricky = "model name\t: X\nflags\t\t: fpu svmx\nvmx flags\t: vmx\n";
        assert_eq!(Host::from_parts(tricky, MEM, intel, 16).kvm, "KVM");
        let h = Host::from_parts(&cpu("vmx"), MEM, intel, 16);
        assert!(!h.nested);
        assert_eq!(h.describe(), "KVM (VT-x), 16 cores, 23.5 GiB, AMD EPYC");
    }

    #[test]
    fn contention_is_read_from_the_totals_and_differenced() {
        // the whole "cpu" line: user nice system idle iowait irq softirq steal guest guest_nice
        let stat =
            |steal: u64| format!("cpu  126346 0 53621 117954 473 0 8231 {steal} 6726 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n");
        let psi = |us: u64| {
            format!(
                "some avg10=4.75 avg60=23.32 avg300=17.74 total={us}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=7\n"
            )
        };
        let a = Contention::from_parts(&stat(1296), &psi(375_404_678));
        assert_eq!((a.steal_ms, a.cpu_wait_ms), (Some(12_960.0), Some(375_404.678)));
        let b = Contention::from_parts(&stat(1300), &psi(375_504_678));
        let d = b.since(&a);
        assert_eq!(d.steal_ms, Some(40.0));
        assert!((d.cpu_wait_ms.unwrap() - 100.0).abs() < 1e-6, "{d:?}");
        // a part unreadable in either reading is unknown, never a total since boot
        let none = Contention::from_parts("", "garbage");
        assert_eq!((none.steal_ms, none.cpu_wait_ms), (None, None));
        assert_eq!(b.since(&none).steal_ms, None);
        assert_eq!(none.since(&a).cpu_wait_ms, None);
        // totals never run backwards into a negative difference
        assert_eq!(a.since(&b).steal_ms, Some(0.0));
        assert!(
            d.describe().starts_with("steal 40 ms (CPU time, all vCPUs), a thread waiting for a CPU 100 ms"),
            "{}",
            d.describe()
        );
        assert!(none.since(&a).describe().contains("steal unknown"));
    }

    #[test]
    fn the_window_is_the_time_between_two_readings() {
        let a = Contention::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let d = Contention::now().since(&a);
        assert!(d.window_ms >= 20.0, "{d:?}");
        assert_eq!(a.window_ms, 0.0);
    }

    #[test]
    fn a_machine_without_kvm_or_proc_files_still_describes_itself() {
        let h = Host::from_parts("", "", Modules::default(), 0);
        assert_eq!(h.kvm, "no /dev/kvm");
        assert_eq!(h.describe(), "no /dev/kvm, 0 cores, 0.0 GiB, unknown CPU");
        let vm = Host::from_parts(&cpu("hypervisor"), MEM, Modules::default(), 4);
        assert_eq!(vm.describe(), "no /dev/kvm, in a VM, 4 cores, 23.5 GiB, AMD EPYC");
    }
}
