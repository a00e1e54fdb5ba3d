//! The kv service's mailbox: client requests queued per vCPU, handed to the
//! guest in batches when it polls (an IN from [`PORT_KV_POLL`] writes them
//! into its mailbox page) and its answers read back when it reports them
//! (an OUT to [`PORT_KV_RESP`]); answers go to the outbox at once. It acts
//! only inside the vCPU's I/O exits (and queues client requests, which the
//! guest sees only at its next poll), so quiescing it is empty.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use common::state::{KvRequest, Output};
use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;

use super::outbox::Outbox;
use super::{Device, DeviceError, LogLimiter};
use crate::abi::*;
use crate::memory::GuestMem;

/// Bound on queued kv requests per cpu (back-pressure for clients).
pub const KV_QUEUE_LIMIT: usize = 4096;

#[derive(Debug)]
struct Queues {
    waiting: Vec<VecDeque<KvRequest>>,
    in_flight: Vec<Vec<KvRequest>>,
}

/// What the mailbox saves: requests waiting, and requests each cpu took
/// and has not answered yet.
pub type KvState = (Vec<Vec<KvRequest>>, Vec<Vec<KvRequest>>);

/// The kv mailbox.
#[derive(Debug)]
pub struct KvMailbox {
    mem: Arc<GuestMem>,
    vm: Arc<VmFd>,
    outbox: Arc<Outbox>,
    ncpus: u32,
    queues: Mutex<Queues>,
    bad: LogLimiter,
}

impl KvMailbox {
    pub fn new(mem: Arc<GuestMem>, vm: Arc<VmFd>, outbox: Arc<Outbox>, ncpus: u32) -> Self {
        let n = ncpus as usize;
        KvMailbox {
            mem,
            vm,
            outbox,
            ncpus,
            queues: Mutex::new(Queues { waiting: vec![VecDeque::new(); n], in_flight: vec![Vec::new(); n] }),
            bad: LogLimiter::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queues> {
        common::sync::lock(&self.queues)
    }

    /// The cpu that serves `client` (requests of one client stay in order).
    pub fn cpu_for_client(&self, client: u32) -> u32 {
        client % self.ncpus
    }

    /// Queues a request for the guest and wakes the serving vCPU.
    pub fn submit(&self, req: KvRequest) -> Result<(), DeviceError> {
        let cpu = self.cpu_for_client(req.client);
        {
            let mut g = self.lock();
            let q = &mut g.waiting[cpu as usize];
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
            if let Some(n) = self.bad.allow() {
                tracing::warn!(cpu, error = %e, occurrences = n, "kv wake-up interrupt failed");
            }
        }
    }

    /// The guest polls: its next batch goes into its mailbox page; returns
    /// how many requests it holds.
    pub fn poll(&self, cpu: u32) -> u32 {
        let mut g = self.lock();
        let g = &mut *g;
        let (queue, in_flight) = (&mut g.waiting[cpu as usize], &mut g.in_flight[cpu as usize]);
        if !in_flight.is_empty() {
            // The guest polled again without answering: it lost its batch. Deliver it again.
            if let Some(n) = self.bad.allow() {
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

    /// The guest answered `n` requests of its batch.
    pub fn responses(&self, cpu: u32, n: u32) {
        let in_flight = std::mem::take(&mut self.lock().in_flight[cpu as usize]);
        if n as usize != in_flight.len() {
            if let Some(c) = self.bad.allow() {
                tracing::warn!(
                    cpu,
                    answered = n,
                    delivered = in_flight.len(),
                    occurrences = c,
                    "kv answer count mismatch"
                );
            }
        }
        let mut out = Vec::with_capacity(in_flight.len());
        for (i, req) in in_flight.iter().enumerate().take(n as usize) {
            let mut b = [0u8; 32];
            let gpa = MAILBOX_GPA + u64::from(cpu) * PAGE_SIZE + KV_RESP_OFF + i as u64 * 32;
            if self.mem.read(gpa, &mut b).is_err() {
                continue;
            }
            let resp = kv_response_from_bytes(&b);
            if resp.client != req.client || resp.seq != req.seq {
                if let Some(c) = self.bad.allow() {
                    tracing::warn!(cpu, ?resp, ?req, occurrences = c, "kv response does not match its request");
                }
                continue;
            }
            out.push(Output::Kv(resp));
        }
        self.outbox.extend(out);
    }
}

impl Device for KvMailbox {
    type State = KvState;
    fn quiesce(&self) {}
    fn unquiesce(&self) {}
    fn take_output(&self, _out: &mut Vec<Output>) {}
    fn save(&self) -> KvState {
        let g = self.lock();
        (g.waiting.iter().map(|q| q.iter().copied().collect()).collect(), g.in_flight.clone())
    }
    /// (Missing cpus get empty queues; extra ones are dropped: the shape
    /// check before a restore makes the counts equal.)
    fn restore(&self, st: &KvState) -> Result<(), DeviceError> {
        let n = self.ncpus as usize;
        let mut g = self.lock();
        g.waiting = (0..n).map(|i| st.0.get(i).cloned().unwrap_or_default().into()).collect();
        g.in_flight = (0..n).map(|i| st.1.get(i).cloned().unwrap_or_default()).collect();
        Ok(())
    }
}
