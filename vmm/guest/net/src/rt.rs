//! The freestanding runtime of the guest workload: the C memory functions the
//! prebuilt `core` expects from libc, the panic handler, the heap, the int3
//! hypercalls of vmm/guest/boot.S and the console.

use core::arch::asm;
use core::fmt::{self, Write};

use crate::abi::{HC_OUT, HC_WAIT, PORT_CONSOLE};

// ---- C memory functions --------------------------------------------------
// Written with `rep movsb`/`rep stosb` so the compiler cannot turn them back
// into calls to themselves (a plain byte loop may be recognised as memcpy).

/// # Safety
/// `d` and `s` are valid for `n` bytes and do not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; DF is clear (SysV ABI).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") d => _, inout("rsi") s => _,
             options(nostack, preserves_flags));
    }
    d
}

/// # Safety
/// `d` and `s` are valid for `n` bytes; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize).wrapping_sub(s as usize) >= n {
        // d below s, or no overlap: a forward copy is safe
        // SAFETY: as for memcpy; a forward copy never reads a byte it already wrote.
        unsafe {
            asm!("rep movsb", inout("rcx") n => _, inout("rdi") d => _, inout("rsi") s => _,
                 options(nostack, preserves_flags));
        }
    } else if n > 0 {
        // d inside [s, s+n): copy backwards from the last byte
        // SAFETY: same ranges, walked from the end with DF set, then DF cleared again.
        unsafe {
            asm!("std", "rep movsb", "cld", inout("rcx") n => _, inout("rdi") d.add(n - 1) => _,
                 inout("rsi") s.add(n - 1) => _, options(nostack));
        }
    }
    d
}

/// # Safety
/// `d` is valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range; DF is clear.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") d => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    d
}

/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
#[inline(never)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees n readable bytes at a and b;
        // volatile keeps the loop a loop (not a call to memcmp/bcmp).
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
#[inline(never)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The prebuilt liballoc names this symbol; with panic=abort it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console(format_args!("net: panic: {info}"));
    loop {
        wait_irq();
    }
}

// ---- heap -----------------------------------------------------------------

#[global_allocator]
static HEAP: talc::TalcLock<spinning_top::RawSpinlock, talc::source::Manual> =
    talc::TalcLock::new(talc::source::Manual);

/// Hands `[base, base+size)` to the allocator. Returns false if it was refused.
///
/// # Safety
/// The range is RAM the workload owns, unused by anything else, for ever.
pub unsafe fn heap_init(base: *mut u8, size: usize) -> bool {
    // SAFETY: the caller hands over exclusive ownership of the range.
    unsafe { HEAP.lock().claim(base, size).is_some() }
}

// ---- hypercalls and time --------------------------------------------------

fn hcall(nr: u64, a0: u64, a1: u64) -> u64 {
    let ret;
    // SAFETY: int3 enters boot.S's DPL3 gate (isr_hcall), which switches to
    // the kernel stack through the TSS, reads rax/rdi/rsi, returns in rax and
    // preserves every other register. It may read guest memory the arguments
    // point to (the console buffer), so memory is not declared untouched.
    unsafe { asm!("int3", inlateout("rax") nr => ret, in("rdi") a0, in("rsi") a1, options(nostack)) };
    ret
}

/// OUT to a port through the hypercall (CPL3 OUT faults on this host).
pub fn out32(port: u16, value: u32) {
    hcall(HC_OUT, u64::from(port), u64::from(value));
}

/// Sleeps until the next interrupt (the net MSI or the LAPIC timer tick).
pub fn wait_irq() {
    hcall(HC_WAIT, 0, 0);
}

// ---- console ----------------------------------------------------------------

/// `struct con_buf` of user.c: the VMM reads `len` bytes of `text`.
#[repr(C)]
struct ConBuf {
    len: u32,
    text: [u8; 252],
}

impl Write for ConBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            let n = self.len as usize;
            if n < self.text.len() {
                self.text[n] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

/// Writes one console line (cut at 252 bytes). Costs a hypercall: keep rare.
pub fn console(args: fmt::Arguments<'_>) {
    let mut b = ConBuf { len: 0, text: [0; 252] };
    let _ = b.write_fmt(args);
    let b = core::hint::black_box(&b);
    // Identity-mapped: the buffer's address is its guest-physical address
    // (stacks and heap live below 4 GiB).
    out32(PORT_CONSOLE, b as *const ConBuf as usize as u32);
}

/// `format!`-style console line.
#[macro_export]
macro_rules! con {
    ($($t:tt)*) => { $crate::rt::console(format_args!($($t)*)) };
}
