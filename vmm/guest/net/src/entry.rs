//! `user_main`: where boot.S drops every vCPU at CPL3.

use core::arch::asm;

use crate::abi::{BootInfo, BOOT_MAGIC, NET_MMIO_GPA, NET_WORKLOAD_BYTES, WL_NET};
use crate::netdev::NetDev;
use crate::rt::{heap_init, wait_irq};
use crate::server::{Clock, NetConfig, Server, SOCKETS};

/// The stack the workload switches to (boot.S's per-cpu user stack is 32 KiB;
/// smoltcp and the server get more), carved from the bottom of the heap region.
const STACK_BYTES: u64 = 1 << 20;

fn idle() -> ! {
    loop {
        wait_irq();
    }
}

/// Entry from boot.S (`iretq` to CPL3 with rdi = cpu, rsi = boot info).
/// vCPU 0 serves; the others only take interrupts (WL_IDLE behaviour).
#[no_mangle]
pub extern "C" fn user_main(cpu: u64, boot_info: *const BootInfo) -> ! {
    // SAFETY: the VMM writes the boot info at BOOT_INFO_GPA (identity-mapped)
    // before the vCPUs start and never changes it afterwards.
    let bi = unsafe { &*boot_info };
    if cpu != 0 || bi.magic != BOOT_MAGIC || bi.workload != WL_NET {
        idle();
    }
    let want = NET_WORKLOAD_BYTES;
    let lin = bi.heap_offset;
    if lin + want > bi.ram_size.min(bi.hole_start) {
        con!("net: {} bytes of RAM above the heap offset {:#x} are needed; halting", want, lin);
        idle();
    }
    let base = bi.lin_to_gpa(lin);
    let stack_top = base + STACK_BYTES;
    // SAFETY: [base+STACK_BYTES, base+want) is RAM the VMM reserved for this
    // workload (workload_bytes of WL_NET); nothing else uses it.
    if !unsafe { heap_init(stack_top as usize as *mut u8, (want - STACK_BYTES) as usize) } {
        con!("net: heap refused; halting");
        idle();
    }
    // SAFETY: [base, stack_top) is reserved RAM used for nothing else; the
    // switch happens once and net_main never returns, so nothing on the old
    // stack is used again. stack_top is page-aligned, so rsp is 16-aligned
    // before the call as the SysV ABI wants.
    unsafe {
        asm!("mov rsp, {top}", "call {main}", top = in(reg) stack_top, main = sym net_main,
             in("rdi") boot_info, options(noreturn));
    }
}

extern "C" fn net_main(boot_info: *const BootInfo) -> ! {
    // SAFETY: as in user_main.
    let bi = unsafe { &*boot_info };
    let mut dev = match NetDev::probe() {
        Ok(d) => d,
        Err(e) => {
            con!("net: no usable virtio-net device at {:#x} ({:?}); waiting", NET_MMIO_GPA, e);
            idle();
        }
    };
    let cfg = match NetConfig::from_boot(bi) {
        Ok(c) => c,
        Err(e) => {
            con!("net: {}; waiting", e);
            idle();
        }
    };
    let clock = Clock::new(bi.tsc_khz);
    let mut server = Server::new(&mut dev, &cfg, clock);
    let [a, b, c, d] = cfg.ip;
    let m = dev.mac();
    let gw = cfg.gateway.unwrap_or([0; 4]);
    con!(
        "net: {}.{}.{}.{}/{} port {} mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} gw {}.{}.{}.{} sockets {}",
        a, b, c, d, cfg.prefix, cfg.port, m[0], m[1], m[2], m[3], m[4], m[5], gw[0], gw[1], gw[2], gw[3], SOCKETS
    );
    server.run(&mut dev, bi.report_ms)
}
