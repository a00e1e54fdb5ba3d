//! The epoch engine: runs on its own thread and owns the machine. At each
//! epoch boundary it stops the vCPUs, collects the dirty set, copies the pages,
//! (tracking was re-armed by the collection), saves the machine state, drains
//! device output, and resumes the guest; the packet goes to the network side,
//! so shipping epoch N overlaps with running N+1.

mod bases;
mod boundary;
mod live_sync;
mod options;
mod packet;
mod pool;
mod precopy;
mod schedule;
mod shared;
mod state;
mod unreleased;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::state::Output;
use tokio::sync::mpsc;
use vmm::Machine;

use crate::mode::EngineCommand;
use bases::Bases;
use pool::BufPool;
use precopy::PreCopy;
use state::{EngineEvent, EngineState};

pub use options::{EngineOptions, OutputSeen, UnprotectedPolicy, MAX_EPOCH_OUTPUTS};
pub use packet::{EngineError, EpochPacket, Packet};
pub use runtime::status::Phases;
pub use shared::{EngineShared, Queued};

/// How often the engine skims the dirty rings for a pre-copy round.
const PRECOPY_POLL: Duration = Duration::from_micros(500);

/// How often the engine looks for output while an output-driven epoch runs
/// (and, unprotected, passes output on). 50 us rather than 100: with the
/// settled rule, 2 rounds at 16 connections gave a protected p50 of
/// 0.967 / 0.919 ms against 1.135 / 0.935 at 100 us (not measured alone
/// for the unprotected path; docs/benchmarks.md, 2026-12-07).
const OUTPUT_POLL: Duration = Duration::from_micros(50);

/// The engine.
#[derive(Debug)]
pub struct Engine {
    machine: Machine,
    opts: EngineOptions,
    shared: Arc<EngineShared>,
    tx: mpsc::Sender<Packet>,
    commands: std::sync::mpsc::Receiver<EngineCommand>,
    /// What the engine is doing: changed only by [`EngineState::step`].
    state: EngineState,
    /// When a budget pause was last logged (once per 10 s).
    budget_said: Option<Instant>,
    held: Vec<Output>,
    /// When the oldest output in `held` was sent.
    held_since: Option<Instant>,
    /// Frames produced and not yet written out, for every saved state.
    unreleased: unreleased::Unreleased,
    pool: BufPool,
    /// Test hook (`CASTOR_FORCE_TRACKING_LOST_EVERY=N`, with `--test-hooks`): treat every N-th
    /// epoch as if dirty tracking had been lost.
    force_lost_every: Option<u64>,
    /// The epoch the test hook last forced lost.
    last_forced: Option<u64>,
    /// What the secondary holds of the pages shipped lately: a page
    /// reported dirty again (hot-page retention reports retained pages
    /// every epoch) whose content equals it is not shipped again; one that
    /// changed in a few bytes ships as a delta against it.
    bases: Bases,
    /// When the guest last resumed after a boundary (the epoch's start).
    epoch_started: Instant,
    /// The devices' output mark and when it last changed (output-driven
    /// epochs end once it has been still for `output_quiet`).
    output_mark: (u64, Instant),
    /// This epoch's pre-copy rounds.
    pre: PreCopy,
    /// When the rings were last skimmed for a pre-copy round.
    last_skim: Instant,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl Engine {
    pub fn new(
        machine: Machine,
        opts: EngineOptions,
        shared: Arc<EngineShared>,
        tx: mpsc::Sender<Packet>,
        commands: std::sync::mpsc::Receiver<EngineCommand>,
    ) -> Self {
        let force_lost_every = std::env::var("CASTOR_FORCE_TRACKING_LOST_EVERY")
            .ok()
            .filter(|_| common::crashpoint::test_hooks_enabled())
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&n| n > 0);
        let unreleased = unreleased::Unreleased::new(Arc::clone(&shared.frames_released));
        Engine {
            machine,
            opts,
            shared,
            tx,
            commands,
            state: EngineState::Alone,
            budget_said: None,
            held: Vec::new(),
            held_since: None,
            unreleased,
            pool: BufPool::default(),
            force_lost_every,
            last_forced: None,
            bases: Bases::default(),
            epoch_started: Instant::now(),
            output_mark: (0, Instant::now()),
            pre: PreCopy::default(),
            last_skim: Instant::now(),
        }
    }

    fn send(&self, p: Packet) -> bool {
        self.tx.blocking_send(p).is_ok()
    }

    fn check_guest(&self) -> Result<(), EngineError> {
        if let Some(f) = self.machine.faults().first() {
            return Err(EngineError::GuestFault { vector: f.vector, rip: f.rip, cpu: f.cpu });
        }
        if let Some((id, why)) = self.machine.exited_vcpus().first() {
            return Err(EngineError::VcpuExited { cpu: *id, why: why.clone() });
        }
        Ok(())
    }

    /// Applies the commands that arrived, in order.
    fn poll_commands(&mut self) {
        while let Ok(c) = self.commands.try_recv() {
            // a command's only effect is the state it leaves
            self.state.step(EngineEvent::Command(c));
        }
    }

    /// Runs until `shared.stop`; returns the machine (paused).
    pub fn run(mut self) -> Machine {
        if let Err(e) = self.run_loop() {
            tracing::error!(error = %e, "epoch engine stopped");
            let _ = self.send(Packet::Failed(e));
        }
        let _ = self.machine.pause();
        self.machine
    }

    fn run_loop(&mut self) -> Result<(), EngineError> {
        // a running machine handed over (a promoted secondary's) stops at
        // once under the pause policy: no output before a secondary syncs
        if self.opts.unprotected == UnprotectedPolicy::Pause {
            self.machine.pause()?;
        }
        let mut next = Instant::now();
        loop {
            self.poll_commands();
            if self.shared.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            next += self.opts.epoch;
            // sleep to the epoch's end, or end it early once the rings have
            // filled with more than max_epoch_pages entries (ring-full exits
            // make this cheap to notice; the bitmap tracker has no such signal)
            loop {
                let now = Instant::now();
                if next <= now {
                    // a boundary that overran is absorbed by the next epochs
                    // (the grid holds); only a stall of a whole epoch resets it
                    if now - next > self.opts.epoch {
                        next = now;
                    }
                    break;
                }
                if self.machine.ring_pending() + self.pre.pages() >= self.opts.max_epoch_pages
                    || self.machine.devices().outbox_len() >= MAX_EPOCH_OUTPUTS
                    || (self.state.protecting() && self.over_budget())
                {
                    next = now;
                    break;
                }
                // a switchover ends the epoch at once
                self.poll_commands();
                if self.state.finishing() {
                    next = now;
                    break;
                }
                // output-driven: held output waits for this epoch's ack, so
                // end the epoch once it is min_epoch old (the epochs in
                // flight bound the rate to what the link acknowledges)
                let output_driven = self.opts.min_epoch.filter(|_| self.state.protecting());
                if let Some(min) = output_driven {
                    // (or sooner: the output went quiet, the guest answered
                    // what it had)
                    let mark = self.machine.devices().output_mark();
                    if mark != self.output_mark.0 {
                        self.output_mark = (mark, now);
                    }
                    let devices = self.machine.devices();
                    let seen = OutputSeen {
                        age: now - self.epoch_started,
                        still_for: now - self.output_mark.1,
                        has_output: devices.has_output(),
                        settled: self.opts.end_when_settled && devices.rx_settled(),
                    };
                    if self.opts.output_epoch_ends(min, seen) {
                        next = now;
                        break;
                    }
                }
                // unprotected and running: output leaves at once (no
                // secondary to wait for; the epoch only bounds tracking)
                let alone = self.state.alone() && self.opts.unprotected == UnprotectedPolicy::Continue;
                if alone {
                    // (the card's transmit ring too: taken while the guest
                    // runs, its ring writes tracked)
                    self.machine.devices().take_device_output();
                    let out = self.machine.devices().drain();
                    self.release_now(out);
                }
                // (a guest paused until a secondary syncs has nothing to pre-copy)
                let precopy =
                    self.opts.precopy_min_pages.filter(|_| self.state.protecting() && !self.machine.is_paused());
                if let Some(min) = precopy {
                    if now >= self.last_skim + PRECOPY_POLL {
                        self.last_skim = now;
                        if self.machine.precopy_due(min, !self.pre.rounds.is_empty()) {
                            self.precopy_round()?;
                        }
                    }
                }
                let step = if output_driven.is_some() || alone {
                    OUTPUT_POLL
                } else if precopy.is_some() {
                    PRECOPY_POLL
                } else {
                    Duration::from_millis(1)
                };
                std::thread::sleep((next - now).min(step));
            }
            self.check_guest()?;
            self.poll_commands();
            if self.state.step(EngineEvent::WaitEnded).resume_guest && self.machine.is_paused() {
                // a refused handover: the guest runs on from its last epoch
                self.machine.resume()?;
                tracing::warn!("the handover was refused: the guest runs here again, protected");
            }
            if !self.state.protecting() {
                if self.opts.tracking_off && self.state.alone() {
                    if self.machine.is_paused() {
                        self.machine.resume()?;
                    }
                    self.machine.devices().take_device_output();
                    let out = self.machine.devices().drain();
                    self.release_now(out);
                    std::thread::sleep(Duration::from_millis(1));
                    next = Instant::now();
                    continue;
                }
                self.unprotected_epoch()?;
                continue;
            }
            if self.state.sync_due() {
                self.live_sync()?;
                next = Instant::now();
                continue;
            }
            // Bound epochs in flight: while the secondary is behind, the
            // guest runs on (a longer epoch) instead of queueing more copies,
            // for 5 s at most; and past the byte budget it is paused until
            // the link has drained below it (no epoch is taken then).
            self.wait_for_the_link()?;
            if !self.state.protecting() {
                continue;
            }
            // a last round just before the boundary, once a quarter of the
            // round minimum waits: the pause then copies only what the guest
            // wrote during this round's copy
            if let Some(min) = self.opts.precopy_min_pages {
                if !self.state.finishing()
                    && !self.machine.is_paused()
                    && !self.over_budget()
                    && self.machine.precopy_due(min / 4, !self.pre.rounds.is_empty())
                {
                    self.precopy_round()?;
                }
            }
            let last = self.state.finishing();
            let Some(packet) = self.boundary(!last)? else {
                // the collection was incomplete: a live resync follows
                continue;
            };
            if last {
                // the guest stays paused (the state is handing over): the
                // secondary runs it from here
                tracing::info!(epoch = packet.epoch, "last epoch before the handover: the guest stays paused");
            }
            if !self.send(Packet::Epoch(Box::new(packet))) {
                return Ok(());
            }
        }
    }

    /// Sends output out at once (no secondary to wait for). Every frame
    /// the router writes must pass [`unreleased::Unreleased::produced`]
    /// first, in the same order: the router's count of frames written
    /// indexes the frames produced.
    fn release_now(&mut self, out: Vec<Output>) {
        if !out.is_empty() {
            self.unreleased.produced(&out);
            self.send(Packet::Release(out));
        }
    }

    /// Moves the devices' output into `held` (the guest is paused).
    fn hold_output(&mut self) {
        let (out, since) = self.machine.devices().drain_timed();
        self.held.extend(out);
        self.held_since = match (self.held_since, since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// Every pause counts for the longest one (status `pause_us_max`).
    fn note_pause(&self, us: f64) {
        self.shared.pause_us_max.fetch_max(us as u64, Ordering::Relaxed);
    }
}
