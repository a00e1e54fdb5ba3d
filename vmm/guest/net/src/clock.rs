//! Time from the TSC (rdtsc runs natively at CPL3).

use core::arch::asm;

use smoltcp::time::Instant;

/// The time stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc reads the TSC into edx:eax and touches nothing else.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Microseconds since it was made, from the TSC.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    t0: u64,
    per_us: u64,
}

impl Clock {
    /// `tsc_khz` from the boot info (0: assume 1 GHz).
    pub fn new(tsc_khz: u64) -> Clock {
        let khz = if tsc_khz == 0 { 1_000_000 } else { tsc_khz };
        Clock { t0: rdtsc(), per_us: (khz / 1000).max(1) }
    }
    pub fn now(&self) -> Instant {
        Instant::from_micros((rdtsc().wrapping_sub(self.t0) / self.per_us) as i64)
    }
}
