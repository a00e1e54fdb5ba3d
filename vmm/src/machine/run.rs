//! Running the machine: start, pause, resume, the state save and shutdown.

use std::time::Instant;

use super::{Machine, MachineError, PauseTiming, LIFT_AFTER, PAUSE_TIMEOUT};
use crate::state::{self, MachineState};

impl Machine {
    /// Starts the vCPU threads; the guest runs.
    pub fn start(&mut self) -> Result<(), MachineError> {
        if self.started {
            return Ok(());
        }
        for v in &self.vcpus {
            v.start(self.ctx.clone(), false)?;
        }
        self.started = true;
        self.paused = false;
        self.devices.unquiesce();
        Ok(())
    }

    /// Stops every vCPU at a point where its state can be saved.
    pub fn pause(&mut self) -> Result<PauseTiming, MachineError> {
        self.pause_inner(false)
    }

    /// Pauses as [`Machine::pause`] and has every vCPU thread save its state
    /// as it parks, in parallel, while the caller harvests and copies;
    /// [`Machine::save`] picks the results up. What an epoch boundary does:
    /// a save asked for after the pause ([`Machine::begin_save`]) starts
    /// later, once the parked thread has noticed it.
    pub fn pause_and_save(&mut self) -> Result<PauseTiming, MachineError> {
        self.pause_inner(true)
    }

    fn pause_inner(&mut self, save: bool) -> Result<PauseTiming, MachineError> {
        let t = Instant::now();
        if !self.started || self.paused {
            self.paused = true;
            if save {
                self.begin_save();
            }
            return Ok(PauseTiming { elapsed: t.elapsed() });
        }
        // (before any vCPU is asked: a save it begins waits for the point)
        self.ctx.save_point.store(false, std::sync::atomic::Ordering::SeqCst);
        self.vm_saved = None;
        for v in &self.vcpus {
            if save {
                v.request_pause_saving()?;
            } else {
                v.request_pause()?;
            }
        }
        for v in &self.vcpus {
            v.wait_parked(PAUSE_TIMEOUT)?;
        }
        // The save point. The device contract: no device acts while the
        // machine is paused, and output they hold joins this epoch's outbox.
        // Then the chips, at once: the vCPUs' LAPICs are saved after this
        // (the threads wait for it), not before, so no interrupt a device
        // or the PIT raised during the pause is in one saved state and not
        // the other; the PIT ticks on in the kernel meanwhile, and a tick
        // between the two is at worst delivered twice, never lost.
        self.devices.quiesce();
        if save {
            self.vm_saved = Some(state::save_vm(&self.vm)?);
        }
        self.ctx.save_point.store(true, std::sync::atomic::Ordering::SeqCst);
        self.paused = true;
        Ok(PauseTiming { elapsed: t.elapsed() })
    }

    /// Lets the vCPUs run again (returns once every thread has left its park).
    pub fn resume(&mut self) -> Result<PauseTiming, MachineError> {
        self.tracker.before_resume(&self.vcpus, &self.ctx);
        let t = Instant::now();
        if !self.started {
            return self.start().map(|_| PauseTiming { elapsed: t.elapsed() });
        }
        for v in &self.vcpus {
            v.resume();
        }
        let lift_at = Instant::now() + LIFT_AFTER;
        for v in &self.vcpus {
            v.wait_running(lift_at, PAUSE_TIMEOUT);
        }
        self.devices.unquiesce();
        self.paused = false;
        Ok(PauseTiming { elapsed: t.elapsed() })
    }

    /// True while the vCPUs are parked (or not started).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Starts saving every vCPU's state on its own parked thread, in
    /// parallel, while the caller copies pages; [`Machine::save`] then picks
    /// the results up (or saves inline what was not done). Optional; call
    /// it right after the pause: the harvest does not need the vCPU cores a
    /// save holds (each ring has its own lock).
    pub fn begin_save(&self) {
        if self.paused && self.started {
            for v in &self.vcpus {
                v.request_save();
            }
        }
    }

    /// Saves the full machine state (the machine must be paused).
    pub fn save(&self) -> Result<MachineState, MachineError> {
        if !self.paused {
            return Err(MachineError::NotPaused("saving state"));
        }
        // the chips as saved at this pause's save point (a pause without
        // one, e.g. the machine was paused before: saved now, all quiet)
        let vm = match &self.vm_saved {
            Some(vm) => vm.clone(),
            None => state::save_vm(&self.vm)?,
        };
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(v.take_state(&self.save_ctx)?);
        }
        Ok(MachineState {
            shape: self.shape.clone(),
            boot: common::codec::encode(&self.cfg.workload).map_err(|e| MachineError::BadWorkload(e.to_string()))?,
            vcpus,
            vm,
            devices: self.devices.save(),
            cpu: self.cpu.clone(),
        })
    }

    /// Stops all vCPU threads.
    pub fn shutdown(&mut self) {
        for v in &self.vcpus {
            v.stop();
        }
        self.started = false;
    }
}
