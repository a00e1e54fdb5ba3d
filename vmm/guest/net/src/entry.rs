//! `user_main`: where boot.S drops every vCPU at CPL3.

use core::arch::asm;

use crate::abi::{BootInfo, BOOT_MAGIC, NET_MMIO_GPA, NET_WORKLOAD_BYTES, WL_NET};
use crate::netdev::NetDev;
use smoltcp::phy;
use smoltcp::time::{Duration, Instant};

use crate::clock::{rdtsc, Clock};
use crate::rt::{heap_init, wait_irq};
use crate::resp::{Conn, Limits, Store};
use crate::server::{NetConfig, Server, SOCKETS};

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
            let check = self_check(bi);
            con!("net: no usable virtio-net device at {:#x} ({:?}); self-check {}; waiting", NET_MMIO_GPA, e, check);
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
    let m = dev.mac();
    let mut server = Server::new(&mut dev, m, &cfg, rdtsc(), clock.now());
    let [a, b, c, d] = cfg.ip;
    let gw = cfg.gateway.unwrap_or([0; 4]);
    con!(
        "net: {}.{}.{}.{}/{} port {} mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} gw {}.{}.{}.{} sockets {}",
        a, b, c, d, cfg.prefix, cfg.port, m[0], m[1], m[2], m[3], m[4], m[5], gw[0], gw[1], gw[2], gw[3], SOCKETS
    );
    serve(&mut server, &mut dev, &clock, bi.report_ms)
}

/// Iterations with nothing done but smoltcp asking to be polled again at once
/// before the loop sleeps anyway (guards against a busy loop).
const IDLE_SPINS: u32 = 64;
/// How long the loop keeps polling the rings after its last work before it
/// sleeps. On KVM-PVM a sleep (HC_WAIT) and the interrupt that ends it run
/// emulated CPL0 code: ~50 us of guest time per interrupt (`castor bench`,
/// part 6), more than the gap between two requests of a busy client set, so
/// a guest that slept at once took one interrupt per request. Polling this
/// long catches the next frame of a burst; an idle guest sleeps after it.
const POLL_BEFORE_SLEEP: Duration = Duration::from_micros(300);

/// The main loop. Busy (and for [`POLL_BEFORE_SLEEP`] after): polls the
/// rings in memory, no exits. Idle: asks for an interrupt and sleeps (HC_WAIT) until a frame, a returned TX buffer (only
/// when all are out) or the timer tick; smoltcp's own timers are no shorter
/// than the tick (delayed ACK off, RTO >= 1 s). With `report_ms` > 0, a
/// counter line at most every max(report_ms, 10 s) while traffic moves.
fn serve(server: &mut Server, dev: &mut NetDev, clock: &Clock, report_ms: u64) -> ! {
    let mut spins = 0;
    let every = Duration::from_millis(report_ms.max(10_000));
    let mut next_report = clock.now() + every;
    let mut reported = (0, 0);
    let mut last_work = clock.now();
    loop {
        let now = clock.now();
        if report_ms > 0 && now >= next_report {
            next_report = now + every;
            let st = dev.stats;
            if reported != (st.rx_frames, st.tx_frames) {
                reported = (st.rx_frames, st.tx_frames);
                con!(
                    "net: keys={} rx={} tx={} tx_full={} rx_err={} tx_err={}",
                    server.keys(), st.rx_frames, st.tx_frames, st.tx_full, st.rx_errors, st.tx_errors
                );
            }
        }
        dev.service();
        if server.poll(now, dev) || (dev.rx_ready() && !dev.tx_blocked()) {
            spins = 0;
            last_work = now;
            continue;
        }
        if !dev.tx_blocked() && clock.now() < last_work + POLL_BEFORE_SLEEP {
            continue;
        }
        let due = server.poll_delay(clock.now());
        if due == Some(Duration::ZERO) && !dev.tx_blocked() && spins < IDLE_SPINS {
            spins += 1;
            continue;
        }
        spins = 0;
        let for_tx = dev.tx_blocked();
        dev.sleep(for_tx, wait_irq);
    }
}

/// Uninhabited tokens: [`NoWire`] never hands one out.
enum Never {}

impl phy::RxToken for Never {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, _f: F) -> R {
        match self {}
    }
}

impl phy::TxToken for Never {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, _len: usize, _f: F) -> R {
        match self {}
    }
}

/// A device with no frames and no room to send (for the self-check).
struct NoWire;

impl phy::Device for NoWire {
    type RxToken<'a> = Never;
    type TxToken<'a> = Never;
    fn receive(&mut self, _: Instant) -> Option<(Never, Never)> {
        None
    }
    fn transmit(&mut self, _: Instant) -> Option<Never> {
        None
    }
    fn capabilities(&self) -> phy::DeviceCapabilities {
        let mut c = phy::DeviceCapabilities::default();
        c.max_transmission_unit = crate::netdev::FRAME_MAX;
        c
    }
}

/// Without a card, checks what runs without one in the real guest: the heap
/// (an interface and all the sockets' buffers, as with a card), smoltcp, SSE
/// code on the switched stack, and the RESP engine. For the smoke test.
fn self_check(bi: &BootInfo) -> &'static str {
    let cfg =
        NetConfig::from_boot(bi).unwrap_or(NetConfig { ip: [10, 0, 0, 2], prefix: 24, gateway: None, port: 6379 });
    let clock = Clock::new(bi.tsc_khz);
    let mut server = Server::new(&mut NoWire, [2, 0, 0, 0, 0, 1], &cfg, rdtsc(), clock.now());
    let _ = server.poll(clock.now(), &mut NoWire);
    drop(server);
    let mut store = Store::new(1 << 20);
    let mut conn = Conn::new(Limits::DEFAULT);
    conn.feed(b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$2\r\n41\r\nINCR a\r\nGET a\r\n");
    conn.process(&mut store);
    if conn.pending_out() == b"+OK\r\n:42\r\n$2\r\n42\r\n" {
        "ok"
    } else {
        "FAILED"
    }
}
