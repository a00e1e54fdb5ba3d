//! castor's networked guest workload (WL_NET): a CPL3 program that drives the
//! virtio-net card (virtio-mmio at NET_MMIO_GPA) with `virtio-drivers`, runs
//! `smoltcp` over it and serves the Redis protocol (RESP2) on a TCP port.
//!
//! Built as a no_std static library for the host target and linked with the
//! guest kernel (vmm/guest/boot.S) by vmm/build.rs. Under `cargo test` it is an
//! ordinary std crate, so the protocol code is tested on the host.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

// first: its `con!` macro is used by the modules below
#[cfg(not(test))]
#[macro_use]
pub mod rt;

pub mod abi;
pub mod clock;
pub mod cmd;
pub mod resp;
pub mod rings;
pub mod netdev;
pub mod server;

#[cfg(not(test))]
mod entry;
#[cfg(test)]
mod test_wire;
#[cfg(test)]
mod virtio_model;
