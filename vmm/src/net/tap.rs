//! The card's backend on the host: a Linux TAP device (layer 2, no packet
//! information header, no offloads: the guest's stack computes its own
//! checksums). `tun-rs` opens it.
//!
//! A TAP named on the command line is created if missing, brought up, and
//! may be put on a bridge by the operator (docs/operations.md). What the
//! guest transmits is written by whoever releases output
//! ([`Tap::send`]); what arrives is pumped into the card by a thread
//! ([`RxPump`]), or drained and dropped while the node is a secondary.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tun_rs::{DeviceBuilder, InterruptEvent, Layer, SyncDevice};

use super::{NetDevice, NetError};
use crate::devices::LogLimiter;

/// An open TAP device.
pub struct Tap {
    name: String,
    dev: SyncDevice,
    sent: AtomicU64,
    send_errors: AtomicU64,
    bad: LogLimiter,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap").field("name", &self.name).field("sent", &self.sent).finish_non_exhaustive()
    }
}

impl Tap {
    /// Opens (creating if needed) the TAP device `name` and brings it up.
    pub fn open(name: &str) -> Result<Arc<Tap>, NetError> {
        let err = |source| NetError::Tap { name: name.into(), source };
        let dev = DeviceBuilder::new()
            .name(name)
            .layer(Layer::L2)
            .with(|b| {
                b.offload(false).packet_information(false);
            })
            .build_sync()
            .map_err(err)?;
        dev.set_nonblocking(true).map_err(err)?;
        Ok(Arc::new(Tap {
            name: name.into(),
            dev,
            sent: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            bad: LogLimiter::default(),
        }))
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes one frame to the network. A full TAP queue drops it (the
    /// guest's TCP retransmits), counted and logged at a bounded rate.
    pub fn send(&self, frame: &[u8]) {
        match self.dev.send(frame) {
            Ok(_) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.send_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(n) = self.bad.allow() {
                    tracing::warn!(tap = %self.name, error = %e, occurrences = n, "a frame could not be written to the TAP device");
                }
            }
        }
    }

    /// Frames written and frames that failed.
    pub fn sent_counts(&self) -> (u64, u64) {
        (self.sent.load(Ordering::Relaxed), self.send_errors.load(Ordering::Relaxed))
    }
}

/// Where received frames go.
#[derive(Debug, Clone)]
pub enum RxSink {
    /// Into the guest's card.
    Card(Arc<NetDevice>),
    /// Nowhere: a secondary drains its TAP and never delivers or transmits.
    Drop,
}

/// A thread that reads the TAP and hands each frame to its sink; stopped
/// (and joined) when dropped.
pub struct RxPump {
    stop: Arc<AtomicBool>,
    event: Arc<InterruptEvent>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RxPump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxPump").field("received", &self.received).finish_non_exhaustive()
    }
}

impl RxPump {
    pub fn start(tap: Arc<Tap>, sink: RxSink) -> Result<RxPump, NetError> {
        let event = Arc::new(InterruptEvent::new().map_err(|source| NetError::Tap { name: tap.name.clone(), source })?);
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (ev, st, rc) = (Arc::clone(&event), Arc::clone(&stop), Arc::clone(&received));
        let thread = std::thread::Builder::new()
            .name(format!("tap-rx {}", tap.name))
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !st.load(Ordering::Relaxed) {
                    match tap.dev.recv_intr_timeout(&mut buf, &ev, Some(Duration::from_millis(200))) {
                        Ok(n) => {
                            rc.fetch_add(1, Ordering::Relaxed);
                            // (the card drops and counts what no frame can be)
                            if let RxSink::Card(card) = &sink {
                                card.receive(buf[..n].to_vec());
                            }
                        }
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock) => {}
                        Err(e) => {
                            if let Some(c) = tap.bad.allow() {
                                tracing::warn!(tap = %tap.name, error = %e, occurrences = c, "reading the TAP device failed");
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })
            .map_err(|source| NetError::Tap { name: "rx thread".into(), source })?;
        Ok(RxPump { stop, event, received, thread: Some(thread) })
    }

    /// Frames read from the TAP so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for RxPump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.event.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
