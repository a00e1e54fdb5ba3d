//! The vCPU thread: its main function and its `KVM_RUN` loop with the
//! exits it handles.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::ring_full::ring_full;
use super::{RunState, Vcpu, VcpuContext};
use crate::devices::{GuestFault, IoAction};
use crate::memory::GuestMem;

impl Vcpu {
    pub(super) fn thread_main(self: Arc<Self>, ctx: VcpuContext) {
        // SAFETY: gettid has no arguments and cannot fail.
        self.tid.store(unsafe { libc::gettid() }, Ordering::Release);
        let reason = self.run_loop(&ctx);
        tracing::debug!(vcpu = self.id, %reason, "vCPU thread exits");
        self.set_state(RunState::Exited(reason));
    }

    fn run_loop(&self, ctx: &VcpuContext) -> String {
        let mut io_pending = false;
        let mut core = Some(self.core());
        self.set_state(RunState::Running);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return "stopped".into();
            }
            if self.pause.load(Ordering::SeqCst) && !io_pending {
                drop(core.take());
                self.park(ctx);
                core = Some(self.core());
                self.immediate_exit.set(0);
                continue;
            }
            let c = core.as_mut().expect("core held while running");
            let harvests_seen = self.foreign_harvests.load(Ordering::SeqCst);
            let resets_seen = ctx.ring_resets.load(Ordering::SeqCst);
            let exit = c.fd.run();
            match exit {
                Ok(VcpuExit::IoOut(port, data)) => {
                    io_pending = true;
                    if let IoAction::Fault(vector) = ctx.devices.io_out(self.id, port, data) {
                        let fault = read_fault(&c.fd, &ctx.mem, self.id, vector);
                        tracing::error!(?fault, "guest exception");
                        common::sync::lock(&ctx.faults).push(fault);
                        return format!("guest exception {vector} at rip {:#x}", fault.rip);
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    io_pending = true;
                    ctx.devices.io_in(self.id, port, data);
                }
                Ok(VcpuExit::MmioRead(gpa, data)) => {
                    io_pending = true;
                    ctx.devices.mmio_read(gpa, data);
                }
                Ok(VcpuExit::MmioWrite(gpa, data)) => {
                    io_pending = true;
                    ctx.devices.mmio_write(gpa, data);
                }
                Ok(VcpuExit::Unsupported(r)) if r == kvm_bindings::KVM_EXIT_DIRTY_RING_FULL => {
                    io_pending = false;
                    ring_full(self, ctx, harvests_seen, resets_seen);
                }
                Ok(VcpuExit::Intr) => io_pending = false,
                Ok(VcpuExit::Hlt) => return "guest halted with no in-kernel irqchip to wake it".into(),
                Ok(VcpuExit::Shutdown) => return "guest shutdown (triple fault)".into(),
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return format!("KVM entry failed: reason {reason:#x} on cpu {cpu}")
                }
                Ok(VcpuExit::InternalError) => return "KVM internal error (emulation failure)".into(),
                Ok(other) => return format!("unexpected exit {other:?}"),
                Err(e) if e.errno() == libc::EINTR => io_pending = false,
                Err(e) if e.errno() == libc::EAGAIN => {}
                Err(e) => return format!("KVM_RUN failed: {e}"),
            }
        }
    }
}

fn read_fault(fd: &VcpuFd, mem: &GuestMem, cpu: u32, vector: u64) -> GuestFault {
    let rsp = fd.get_regs().map(|r| r.rsp).unwrap_or(0);
    let q = |i: u64| mem.read_u64(rsp + 8 * i).unwrap_or(u64::MAX);
    GuestFault { cpu, vector, error_code: q(1), rip: q(2) }
}
