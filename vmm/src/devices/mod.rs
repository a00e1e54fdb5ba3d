//! Devices: the console (guest lines out), the `kv` service mailbox and,
//! when configured, the network card ([`crate::net`]).
//!
//! Everything a device sends out of the VM goes to the *outbox*; the machine's
//! owner drains it at epoch boundaries, which is where output commit hooks in.
//! Device state (queued and in-flight requests, undrained output) is saveable.
//!
//! # The device contract ([`Device`])
//!
//! Every device keeps the same five rules, so that an epoch's memory, its
//! vCPU state and its device state are one consistent point:
//! 1. it writes guest memory only through [`GuestMem`] (so the pages it
//!    touches are VMM-dirty pages of the running epoch);
//! 2. [`Device::quiesce`]: from its return until [`Device::unquiesce`] it
//!    neither writes guest memory nor raises an interrupt (the machine
//!    quiesces its devices after the vCPUs park and before the harvest);
//! 3. [`Device::take_output`]: at the boundary, output the guest produced
//!    in the epoch and the device still holds (frames in a transmit ring)
//!    moves to the outbox, so it is saved with the epoch and released only
//!    once the epoch is acknowledged;
//! 4. [`Device::save`] / [`Device::restore`]: its state, saved with the
//!    vCPUs parked and it quiesced; a restore refuses state it cannot take;
//! 5. bad input from the guest is counted and logged at a bounded rate,
//!    never a panic.
//!
//! The console ([`console`]) and the kv mailbox ([`kv`]) act only inside
//! their vCPU's I/O exits (never while the vCPUs are parked), so their
//! quiesce is empty and their output goes to the [`outbox`] at once; the
//! network card ([`crate::net`]) writes guest memory from its receive
//! thread and holds its output in the guest's transmit ring, so it has
//! both. [`Devices`] is the machine's bus: it routes the guest's port and
//! MMIO accesses, and saves, restores and quiesces every device together.

pub mod console;
pub mod kv;
pub mod outbox;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use common::state::{DeviceState, Output};
use kvm_ioctls::VmFd;

use crate::abi::*;
use crate::memory::GuestMem;
use crate::net::{NetConfig, NetDevice};
pub use console::Console;
pub use kv::{KvMailbox, KV_QUEUE_LIMIT};
pub use outbox::{Outbox, CONSOLE_BACKLOG, MARK_BACKLOG};

/// What every device of a machine does for a checkpoint (module docs).
pub trait Device {
    /// What [`Device::save`] returns.
    type State;
    /// Stops writing guest memory and raising interrupts.
    fn quiesce(&self);
    /// Lets the device act again.
    fn unquiesce(&self);
    /// Moves output the device holds for the guest into `out`.
    fn take_output(&self, out: &mut Vec<Output>);
    /// Its state (quiesced, vCPUs parked).
    fn save(&self) -> Self::State;
    /// Takes saved state back.
    fn restore(&self, st: &Self::State) -> Result<(), DeviceError>;
}

impl Device for NetDevice {
    type State = common::state::NetState;
    fn quiesce(&self) {
        NetDevice::quiesce(self);
    }
    fn unquiesce(&self) {
        NetDevice::unquiesce(self);
    }
    fn take_output(&self, out: &mut Vec<Output>) {
        out.extend(self.take_transmitted().into_iter().map(Output::Frame));
    }
    fn save(&self) -> Self::State {
        NetDevice::save(self)
    }
    fn restore(&self, st: &Self::State) -> Result<(), DeviceError> {
        Ok(NetDevice::restore(self, st)?)
    }
}

/// Errors of the devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("kv request queue for cpu {0} is full ({1} requests)")]
    QueueFull(u32, usize),
    #[error("guest memory: {0}")]
    Memory(#[from] crate::memory::MemoryError),
    #[error("network card: {0}")]
    Net(#[from] crate::net::NetError),
    #[error("the saved state has a network card and this machine has none, or the reverse")]
    NetMismatch,
}

/// An unexpected exception in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFault {
    pub cpu: u32,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
}

/// A log limiter: the first `burst` events are logged, then one in `every`.
#[derive(Debug, Default)]
pub struct LogLimiter {
    seen: AtomicU64,
}

impl LogLimiter {
    /// Whether this occurrence should be logged (returns the count so far).
    pub fn allow(&self) -> Option<u64> {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        (n <= 10 || n.is_power_of_two()).then_some(n)
    }
}

/// The devices of one machine: its bus.
#[derive(Debug)]
pub struct Devices {
    outbox: Arc<Outbox>,
    console: Console,
    kv: KvMailbox,
    net: Option<Arc<NetDevice>>,
    bad_io: LogLimiter,
}

/// What the vCPU loop must do after an I/O exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    Continue,
    /// The guest reported an exception (vector); the vCPU stops.
    Fault(u64),
}

impl Devices {
    pub fn new(mem: Arc<GuestMem>, vm: Arc<VmFd>, ncpus: u32, net: Option<NetConfig>) -> Self {
        let outbox = Arc::new(Outbox::default());
        Devices {
            console: Console::new(Arc::clone(&mem), Arc::clone(&outbox)),
            kv: KvMailbox::new(Arc::clone(&mem), Arc::clone(&vm), Arc::clone(&outbox), ncpus),
            net: net.map(|cfg| Arc::new(NetDevice::new(mem, vm, cfg))),
            outbox,
            bad_io: LogLimiter::default(),
        }
    }

    /// The cpu that serves `client` (requests of one client stay in order).
    pub fn cpu_for_client(&self, client: u32) -> u32 {
        self.kv.cpu_for_client(client)
    }

    /// Queues a kv request for the guest and wakes the serving vCPU.
    pub fn submit(&self, req: KvRequest) -> Result<(), DeviceError> {
        self.kv.submit(req)
    }

    /// Sends the kv wake-up interrupt to `cpu`.
    pub fn wake(&self, cpu: u32) {
        self.kv.wake(cpu);
    }

    /// Takes everything the devices sent out since the last call.
    pub fn drain(&self) -> Vec<Output> {
        self.drain_timed().0
    }

    /// [`Devices::drain`], and when the oldest of those outputs was sent
    /// (None if there were none): how long output waits is measured from it.
    pub fn drain_timed(&self) -> (Vec<Output>, Option<std::time::Instant>) {
        self.outbox.drain_timed()
    }

    /// Outputs sent since the last [`Devices::drain`] (no lock taken).
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Network frames waiting in the outbox (e.g. restored with a state).
    pub fn outbox_frames(&self) -> u64 {
        self.outbox.snapshot().iter().filter(|o| matches!(o, Output::Frame(_))).count() as u64
    }

    /// The guest has sent output since the last [`Devices::drain`] (or
    /// queued frames its network card has not taken yet).
    pub fn has_output(&self) -> bool {
        !self.outbox.is_empty() || self.net.as_ref().is_some_and(|n| n.has_transmit())
    }

    /// The network card's guest has handled every frame it was given (see
    /// [`NetDevice::rx_settled`]); false without a card.
    pub fn rx_settled(&self) -> bool {
        self.net.as_ref().is_some_and(|n| n.rx_settled())
    }

    /// A mark that changes whenever the guest sends output (the outbox's
    /// length and the card's transmit index; cheap, no exit): an epoch
    /// engine sees from it when the output stopped growing.
    pub fn output_mark(&self) -> u64 {
        let tx = self.net.as_ref().map_or(0, |n| n.transmit_mark());
        ((self.outbox.len() as u64) << 16) ^ tx
    }

    /// The network card, if the machine has one.
    pub fn net(&self) -> Option<&Arc<NetDevice>> {
        self.net.as_ref()
    }

    /// The machine is pausing (its vCPUs are parked): every device stops
    /// acting, and the output they hold moves to the outbox (the contract's
    /// rules 2 and 3).
    pub fn quiesce(&self) {
        self.console.quiesce();
        self.kv.quiesce();
        if let Some(n) = &self.net {
            Device::quiesce(n.as_ref());
        }
        self.take_device_output();
    }

    /// The machine resumes: the devices act again.
    pub fn unquiesce(&self) {
        self.console.unquiesce();
        self.kv.unquiesce();
        if let Some(n) = &self.net {
            Device::unquiesce(n.as_ref());
        }
    }

    /// Moves output the devices hold into the outbox. Also safe while the
    /// guest runs (an unprotected node releases at once): the card's ring
    /// writes go through the tracked path, under the card's lock.
    pub fn take_device_output(&self) {
        let mut out = Vec::new();
        self.console.take_output(&mut out);
        self.kv.take_output(&mut out);
        if let Some(n) = &self.net {
            n.take_output(&mut out);
        }
        self.outbox.extend(out);
    }

    /// An MMIO read by the guest (the network card's registers; elsewhere
    /// nothing answers: all ones).
    pub fn mmio_read(&self, gpa: u64, data: &mut [u8]) {
        match &self.net {
            Some(n) if NetDevice::claims(gpa) => n.mmio_read(gpa, data),
            _ => data.fill(0xff),
        }
    }

    /// An MMIO write by the guest.
    pub fn mmio_write(&self, gpa: u64, data: &[u8]) {
        match &self.net {
            Some(n) if NetDevice::claims(gpa) => n.mmio_write(gpa, data),
            _ => {
                if let Some(c) = self.bad_io.allow() {
                    tracing::debug!(gpa, occurrences = c, "MMIO write where no device is");
                }
            }
        }
    }

    /// Console lines produced so far (and lines dropped for backlog).
    pub fn console_counts(&self) -> (u64, u64) {
        self.console.counts()
    }

    /// Outputs dropped for backlog: (console lines, marker writes).
    pub fn dropped_counts(&self) -> (u64, u64) {
        self.console.dropped()
    }

    /// Handles an OUT from the guest.
    pub fn io_out(&self, cpu: u32, port: u16, data: &[u8]) -> IoAction {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(v);
        match port {
            PORT_CONSOLE => self.console.line(cpu, u64::from(value)),
            PORT_KV_RESP => self.kv.responses(cpu, value),
            PORT_DONE => self.console.mark(Output::Done { cpu, code: value }),
            PORT_MARK => self.console.mark(Output::Mark { cpu, value }),
            PORT_FAULT => return IoAction::Fault(u64::from(value)),
            _ => {
                if let Some(c) = self.bad_io.allow() {
                    tracing::debug!(cpu, port, value, occurrences = c, "OUT to unknown port ignored");
                }
            }
        }
        IoAction::Continue
    }

    /// Handles an IN from the guest.
    pub fn io_in(&self, cpu: u32, port: u16, data: &mut [u8]) {
        let value = match port {
            PORT_KV_POLL => self.kv.poll(cpu),
            _ => {
                if let Some(c) = self.bad_io.allow() {
                    tracing::debug!(cpu, port, occurrences = c, "IN from unknown port");
                }
                u32::MAX
            }
        };
        let b = value.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = b[i % 4];
        }
    }

    /// Saves every device's state and the outbox (call with all vCPUs
    /// parked and the devices quiesced).
    pub fn save(&self) -> DeviceState {
        let (kv_queues, kv_in_flight) = self.kv.save();
        DeviceState {
            kv_queues,
            kv_in_flight,
            outbox: self.outbox.snapshot(),
            console_lines: self.console.save(),
            net: self.net.as_ref().map(|n| Device::save(n.as_ref())),
        }
    }

    /// Restores what [`Devices::save`] saved (same cpu count). A network
    /// card stays quiesced until the machine resumes.
    pub fn restore(&self, st: &DeviceState) -> Result<(), DeviceError> {
        match (&self.net, &st.net) {
            (Some(n), Some(s)) => Device::restore(n.as_ref(), s)?,
            (None, None) => {}
            _ => return Err(DeviceError::NetMismatch),
        }
        self.kv.restore(&(st.kv_queues.clone(), st.kv_in_flight.clone()))?;
        self.console.restore(&st.console_lines)?;
        self.outbox.replace(st.outbox.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_flooding_the_mark_port_is_bounded_and_counted() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("vm"));
        let mem = Arc::new(GuestMem::new(64 << 20).expect("guest memory"));
        let d = Devices::new(mem, vm, 1, None);
        assert!(!d.has_output());
        for i in 0..MARK_BACKLOG as u32 + 100 {
            d.io_out(0, PORT_MARK, &i.to_le_bytes());
        }
        assert!(d.has_output());
        assert_eq!(d.dropped_counts(), (0, 100));
        assert_eq!(d.drain().len(), MARK_BACKLOG);
        assert!(!d.has_output());
        d.io_out(0, PORT_MARK, &1u32.to_le_bytes());
        assert_eq!(d.drain().len(), 1, "the bound is per epoch (between drains)");
    }

    #[test]
    fn every_device_saves_and_restores_through_the_bus() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let mem = Arc::new(GuestMem::new(64 << 20).expect("guest memory"));
        let d = Devices::new(Arc::clone(&mem), Arc::new(kvm.create_vm().expect("vm")), 2, None);
        for seq in 0..5 {
            d.submit(KvRequest { client: seq % 2, seq, op: KvOp::Put, key: 1, value: 2 }).expect("submit");
        }
        assert_eq!(d.io_in_value(0), 3, "cpu 0 takes its batch of three");
        d.io_out(0, PORT_MARK, &7u32.to_le_bytes());
        let st = d.save();
        assert_eq!((st.kv_queues[1].len(), st.kv_in_flight[0].len(), st.outbox.len()), (2, 3, 1));
        let e = Devices::new(mem, Arc::new(kvm.create_vm().expect("vm")), 2, None);
        e.restore(&st).expect("restore");
        assert_eq!(e.save(), st);
        assert!(e.has_output(), "the restored outbox is released again");
        // a state with a network card does not fit a machine without one
        let with_card = DeviceState { net: Some(Default::default()), ..st };
        assert!(matches!(e.restore(&with_card), Err(DeviceError::NetMismatch)));
    }

    impl Devices {
        fn io_in_value(&self, cpu: u32) -> u32 {
            let mut b = [0u8; 4];
            self.io_in(cpu, PORT_KV_POLL, &mut b);
            u32::from_le_bytes(b)
        }
    }
}
