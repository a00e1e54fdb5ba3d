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
//! The console and the kv mailbox act only inside their vCPU's I/O exits
//! (never while the vCPUs are parked), so their quiesce is empty.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use common::state::{DeviceState, Output};
use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;

use crate::abi::*;
use crate::memory::GuestMem;
use crate::net::{NetConfig, NetDevice};

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

/// Bound on queued kv requests per cpu (back-pressure for clients).
pub const KV_QUEUE_LIMIT: usize = 4096;
/// Bound on undrained console lines; beyond it lines are counted and dropped.
pub const CONSOLE_BACKLOG: usize = 10_000;
/// Marker and done writes kept between two drains (an epoch); more are
/// dropped and counted (a guest flooding the port cannot grow the outbox,
/// nor the epoch's state past its frame).
pub const MARK_BACKLOG: usize = 4096;

/// An unexpected exception in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFault {
    pub cpu: u32,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
}

#[derive(Debug, Default)]
struct Inner {
    queues: Vec<VecDeque<KvRequest>>,
    in_flight: Vec<Vec<KvRequest>>,
    outbox: Vec<Output>,
    /// When the oldest output in the outbox was sent (None while empty).
    first_output_at: Option<std::time::Instant>,
    console_backlog: usize,
    mark_backlog: usize,
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

/// The devices of one machine.
#[derive(Debug)]
pub struct Devices {
    mem: Arc<GuestMem>,
    vm: Arc<VmFd>,
    ncpus: u32,
    inner: Mutex<Inner>,
    console_lines: AtomicU64,
    /// The outbox is not empty (read without the lock by the epoch engine).
    has_output: AtomicBool,
    /// Outputs in the outbox (read without the lock by the epoch loop).
    outbox_len: std::sync::atomic::AtomicUsize,
    dropped_lines: AtomicU64,
    dropped_marks: AtomicU64,
    bad_io: LogLimiter,
    net: Option<Arc<NetDevice>>,
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
        let net = net.map(|cfg| Arc::new(NetDevice::new(Arc::clone(&mem), Arc::clone(&vm), cfg)));
        Devices {
            net,
            mem,
            vm,
            ncpus,
            inner: Mutex::new(Inner {
                queues: vec![VecDeque::new(); ncpus as usize],
                in_flight: vec![Vec::new(); ncpus as usize],
                ..Default::default()
            }),
            console_lines: AtomicU64::new(0),
            has_output: AtomicBool::new(false),
            outbox_len: std::sync::atomic::AtomicUsize::new(0),
            dropped_lines: AtomicU64::new(0),
            dropped_marks: AtomicU64::new(0),
            bad_io: LogLimiter::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        common::sync::lock(&self.inner)
    }

    /// The cpu that serves `client` (requests of one client stay in order).
    pub fn cpu_for_client(&self, client: u32) -> u32 {
        client % self.ncpus
    }

    /// Queues a kv request for the guest and wakes the serving vCPU.
    pub fn submit(&self, req: KvRequest) -> Result<(), DeviceError> {
        let cpu = self.cpu_for_client(req.client);
        {
            let mut g = self.lock();
            let q = &mut g.queues[cpu as usize];
            if q.len() >= KV_QUEUE_LIMIT {
                return Err(DeviceError::QueueFull(cpu, q.len()));
            }
            q.push_back(req);
        }
        self.wake(cpu);
        Ok(())
    }

    /// Sends the wake-up interrupt to `cpu` (MSI straight to its LAPIC).
    pub fn wake(&self, cpu: u32) {
        let msi =
            kvm_msi { address_lo: 0xfee0_0000 | (cpu << 12), address_hi: 0, data: VEC_WAKE, ..Default::default() };
        if let Err(e) = self.vm.signal_msi(msi) {
            if let Some(n) = self.bad_io.allow() {
                tracing::warn!(cpu, error = %e, occurrences = n, "kv wake-up interrupt failed");
            }
        }
    }

    /// Takes everything the devices sent out since the last call.
    pub fn drain(&self) -> Vec<Output> {
        self.drain_timed().0
    }

    /// [`Devices::drain`], and when the oldest of those outputs was sent
    /// (None if there were none): how long output waits is measured from it.
    pub fn drain_timed(&self) -> (Vec<Output>, Option<std::time::Instant>) {
        let mut g = self.lock();
        g.console_backlog = 0;
        g.mark_backlog = 0;
        self.has_output.store(false, Ordering::Relaxed);
        self.outbox_len.store(0, Ordering::Relaxed);
        (std::mem::take(&mut g.outbox), g.first_output_at.take())
    }

    /// Outputs sent since the last [`Devices::drain`] (no lock taken).
    pub fn outbox_len(&self) -> usize {
        self.outbox_len.load(Ordering::Relaxed)
    }

    /// The guest has sent output since the last [`Devices::drain`] (or
    /// queued frames its network card has not taken yet).
    pub fn has_output(&self) -> bool {
        self.has_output.load(Ordering::Relaxed) || self.net.as_ref().is_some_and(|n| n.has_transmit())
    }

    /// The network card, if the machine has one.
    pub fn net(&self) -> Option<&Arc<NetDevice>> {
        self.net.as_ref()
    }

    /// The machine is pausing (its vCPUs are parked): every device stops
    /// acting, and the output the network card holds moves to the outbox
    /// (the contract's rules 2 and 3).
    pub fn quiesce(&self) {
        if let Some(n) = &self.net {
            Device::quiesce(n.as_ref());
        }
        self.take_device_output();
    }

    /// The machine resumes: the devices act again.
    pub fn unquiesce(&self) {
        if let Some(n) = &self.net {
            Device::unquiesce(n.as_ref());
        }
    }

    /// Moves output the devices hold into the outbox. Also safe while the
    /// guest runs (an unprotected node releases at once): the card's ring
    /// writes go through the tracked path, under the card's lock.
    pub fn take_device_output(&self) {
        let Some(n) = &self.net else { return };
        let mut frames = Vec::new();
        n.take_output(&mut frames);
        if frames.is_empty() {
            return;
        }
        let mut g = self.lock();
        g.outbox.extend(frames);
        g.first_output_at.get_or_insert_with(std::time::Instant::now);
        self.has_output.store(true, Ordering::Relaxed);
        self.outbox_len.store(g.outbox.len(), Ordering::Relaxed);
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
        (self.console_lines.load(Ordering::Relaxed), self.dropped_lines.load(Ordering::Relaxed))
    }

    fn mark(&self, o: Output) {
        let mut g = self.lock();
        if g.mark_backlog >= MARK_BACKLOG {
            self.dropped_marks.fetch_add(1, Ordering::Relaxed);
            return;
        }
        g.mark_backlog += 1;
        g.outbox.push(o);
        g.first_output_at.get_or_insert_with(std::time::Instant::now);
        self.has_output.store(true, Ordering::Relaxed);
        self.outbox_len.store(g.outbox.len(), Ordering::Relaxed);
    }

    /// Outputs dropped for backlog: (console lines, marker writes).
    pub fn dropped_counts(&self) -> (u64, u64) {
        (self.dropped_lines.load(Ordering::Relaxed), self.dropped_marks.load(Ordering::Relaxed))
    }

    fn console(&self, cpu: u32, gpa: u64) {
        let line = (|| {
            let len = self.mem.read_u32(gpa).ok()?;
            if len > CONSOLE_MAX {
                return None;
            }
            let mut buf = vec![0u8; len as usize];
            self.mem.read(gpa + 4, &mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf).into_owned())
        })();
        let Some(line) = line else {
            if let Some(n) = self.bad_io.allow() {
                tracing::warn!(cpu, gpa, occurrences = n, "malformed console buffer from guest");
            }
            return;
        };
        self.console_lines.fetch_add(1, Ordering::Relaxed);
        let mut g = self.lock();
        if g.console_backlog >= CONSOLE_BACKLOG {
            self.dropped_lines.fetch_add(1, Ordering::Relaxed);
            return;
        }
        g.console_backlog += 1;
        g.outbox.push(Output::Console { cpu, line });
        g.first_output_at.get_or_insert_with(std::time::Instant::now);
        self.has_output.store(true, Ordering::Relaxed);
        self.outbox_len.store(g.outbox.len(), Ordering::Relaxed);
    }

    fn kv_poll(&self, cpu: u32) -> u32 {
        let mut g = self.lock();
        let g = &mut *g;
        let (queue, in_flight) = (&mut g.queues[cpu as usize], &mut g.in_flight[cpu as usize]);
        if !in_flight.is_empty() {
            // The guest polled again without answering: it lost its batch. Deliver it again.
            if let Some(n) = self.bad_io.allow() {
                tracing::warn!(cpu, pending = in_flight.len(), occurrences = n, "kv poll with unanswered batch");
            }
        } else {
            while in_flight.len() < KV_MAX_BATCH {
                match queue.pop_front() {
                    Some(r) => in_flight.push(r),
                    None => break,
                }
            }
        }
        let mut bytes = Vec::with_capacity(in_flight.len() * 32);
        for r in in_flight.iter() {
            bytes.extend_from_slice(&kv_request_bytes(r));
        }
        if self.mem.write(MAILBOX_GPA + u64::from(cpu) * PAGE_SIZE, &bytes).is_err() {
            return 0;
        }
        in_flight.len() as u32
    }

    fn kv_responses(&self, cpu: u32, n: u32) {
        let mut g = self.lock();
        let in_flight = std::mem::take(&mut g.in_flight[cpu as usize]);
        if n as usize != in_flight.len() {
            if let Some(c) = self.bad_io.allow() {
                tracing::warn!(
                    cpu,
                    answered = n,
                    delivered = in_flight.len(),
                    occurrences = c,
                    "kv answer count mismatch"
                );
            }
        }
        for (i, req) in in_flight.iter().enumerate().take(n as usize) {
            let mut b = [0u8; 32];
            let gpa = MAILBOX_GPA + u64::from(cpu) * PAGE_SIZE + KV_RESP_OFF + i as u64 * 32;
            if self.mem.read(gpa, &mut b).is_err() {
                continue;
            }
            let resp = kv_response_from_bytes(&b);
            if resp.client != req.client || resp.seq != req.seq {
                if let Some(c) = self.bad_io.allow() {
                    tracing::warn!(cpu, ?resp, ?req, occurrences = c, "kv response does not match its request");
                }
                continue;
            }
            g.outbox.push(Output::Kv(resp));
            g.first_output_at.get_or_insert_with(std::time::Instant::now);
            self.has_output.store(true, Ordering::Relaxed);
            self.outbox_len.store(g.outbox.len(), Ordering::Relaxed);
        }
    }

    /// Handles an OUT from the guest.
    pub fn io_out(&self, cpu: u32, port: u16, data: &[u8]) -> IoAction {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(v);
        match port {
            PORT_CONSOLE => self.console(cpu, u64::from(value)),
            PORT_KV_RESP => self.kv_responses(cpu, value),
            PORT_DONE => self.mark(Output::Done { cpu, code: value }),
            PORT_MARK => self.mark(Output::Mark { cpu, value }),
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
            PORT_KV_POLL => self.kv_poll(cpu),
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

    /// Saves the device state (call with all vCPUs parked).
    pub fn save(&self) -> DeviceState {
        let g = self.lock();
        DeviceState {
            kv_queues: g.queues.iter().map(|q| q.iter().copied().collect()).collect(),
            kv_in_flight: g.in_flight.clone(),
            outbox: g.outbox.clone(),
            console_lines: self.console_lines.load(Ordering::Relaxed),
            net: self.net.as_ref().map(|n| Device::save(n.as_ref())),
        }
    }

    /// Restores device state saved by [`Devices::save`] (same cpu count).
    /// A network card stays quiesced until the machine resumes.
    pub fn restore(&self, st: &DeviceState) -> Result<(), DeviceError> {
        match (&self.net, &st.net) {
            (Some(n), Some(s)) => Device::restore(n.as_ref(), s)?,
            (None, None) => {}
            _ => return Err(DeviceError::NetMismatch),
        }
        let mut g = self.lock();
        let n = self.ncpus as usize;
        g.queues = (0..n).map(|i| st.kv_queues.get(i).cloned().unwrap_or_default().into()).collect();
        g.in_flight = (0..n).map(|i| st.kv_in_flight.get(i).cloned().unwrap_or_default()).collect();
        g.outbox = st.outbox.clone();
        g.first_output_at = (!g.outbox.is_empty()).then(std::time::Instant::now);
        self.outbox_len.store(g.outbox.len(), Ordering::Relaxed);
        self.has_output.store(!g.outbox.is_empty(), Ordering::Relaxed);
        self.console_lines.store(st.console_lines, Ordering::Relaxed);
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
}
