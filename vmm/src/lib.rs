//! castor-vmm: the KVM machine that castor's primary and secondary both run.
//!
//! * [`memory`]: guest memory (vm-memory, MAP_NORESERVE) and the VMM's tracked write path.
//! * [`ring`]: the KVM dirty ring (mmap, harvest, reset, overflow detection).
//! * [`tracker`]: ring and bitmap pieces behind one [`tracker::DirtySet`]; the
//!   machine's one `DirtyTracker` (dirty.rs) uses them.
//! * [`vcpu`]: vCPU threads with kick/park/resume.
//! * [`devices`]: console and the `kv` mailbox, and the device contract.
//! * [`net`]: the network card (virtio-net over virtio-mmio) and its TAP backend.
//! * [`state`]: full vCPU and VM state save/restore.
//! * [`snapshot`]: memory + state to a file and back.
//! * [`machine`]: all of it together.
//! * [`abi`], [`boot`]: the built-in guest and how it is booted.

pub mod abi;
pub mod boot;
pub mod cpu;
pub mod devices;
mod dirty;
pub mod machine;
pub mod memory;
pub mod net;
mod retention;
pub mod ring;
mod ring_set;
pub mod snapshot;
pub mod state;
pub mod tracker;
pub mod vcpu;

pub use dirty::Trust;
pub use machine::{Machine, MachineConfig, MachineError, NetAddr, WorkloadConfig};
pub use tracker::{DirtySet, TrackerKind};
