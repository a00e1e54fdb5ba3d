//! One session with the secondary: the loop that applies what its I/O
//! tasks report, and how it ends ([`SessionExit`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime::control::Refused;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use super::pace::{epoch_bytes, page_bytes, LinkMeter, LinkPace};
use super::session_io::{heartbeats, read_acks, write_loop, FromSecondary, HeartbeatShared, ToSecondary};
use super::witness_link::next_answer;
use super::{next_of, Replicator};
use crate::engine::{EngineError, EpochPacket, Packet};
use crate::mode::{Command, Event, Loss, Mode};
use crate::sender::Session;

/// How a session ended.
pub(super) enum SessionExit {
    Lost(Loss),
    Fenced(u64),
    Stopped,
    GuestFailed(EngineError),
    /// The secondary accepted the handover after this epoch (from the
    /// reader: its echo; from the session: applied, this node handed over).
    HandedOver(u64),
}

/// How long a switchover started by SIGTERM may take before the primary
/// stops anyway (its secondary then fails over by the heartbeat timeout).
const STOP_SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(5);

impl Replicator {
    /// One session: this task applies every event; the link's I/O runs
    /// beside it (writer, ack reader, heartbeats) and reports here.
    pub(super) async fn run_session(&mut self, data: Session, hb: Session) -> SessionExit {
        let (dr, dw) = data.into_halves();
        let (hr, hw) = hb.into_halves();
        let (ship_tx, ship_rx) = mpsc::unbounded_channel::<ToSecondary>();
        // packets handed to the writer and not yet sent: past the bound this
        // task stops taking packets, so a slow link holds the engine back
        // (its packet channel fills) as it did when the writer read them
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ship_max = self.cfg.engine.max_in_flight as usize + 8;
        let (heard_tx, mut heard_rx) = mpsc::unbounded_channel::<FromSecondary>();
        let (gen, interval, timeout) = (self.cfg.generation, self.cfg.heartbeat_interval, self.cfg.peer_timeout);
        let queued_w = queued.clone();
        let meter = Arc::new(LinkMeter::default());
        let meter_w = meter.clone();
        let mut pace = LinkPace::default();
        // epochs of this session with output: when their oldest output was
        // sent (how long output waits is measured to its release)
        let mut output_since = std::collections::BTreeMap::<u64, Instant>::new();
        let mut sync_begun = false;
        // when the last heartbeat the secondary answered was sent: an ack
        // is applied only while that is recent (the secondary cannot have
        // taken over yet: it heard us then, and waits a timeout). A primary that was frozen past the
        // timeout finds acks in its socket when it thaws; the secondary may
        // have taken over meanwhile, so it releases nothing more and treats
        // the session as lost (the witness or the two-node rule decides).
        let last_reply = Arc::new(std::sync::Mutex::new(Instant::now()));
        let last_reply_hb = last_reply.clone();
        // when the secondary last said it had read more of the data
        // connection (its heartbeat replies count the bytes): on a slow
        // link an epoch's ack takes seconds, and the session is lost for a
        // missing ack only once these bytes have stopped growing too
        let data_progress = Arc::new(std::sync::Mutex::new(Instant::now()));
        let data_progress_hb = data_progress.clone();
        let handing_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // each on its own task: a writer busy sealing megabytes of a sync
        // must not delay a heartbeat (the secondary counts a primary that
        // sends none for its timeout as dead), nor the reading of replies.
        // The heartbeats run on a thread of their own (`common::beats`), so
        // they wait for nothing the node's runtime does.
        // Aborted when the session ends (the guards drop with `io`).
        let writer = AbortOnDropHandle::new(tokio::spawn(write_loop(dw, ship_rx, queued_w, meter_w)));
        let acks = AbortOnDropHandle::new(tokio::spawn(read_acks(dr, heard_tx, gen)));
        let moved = match crate::sender::detach_halves(hr, hw) {
            Ok(m) => m,
            Err(e) => return SessionExit::Lost(Loss::Channel { channel: "heartbeat", err: e.to_string() }),
        };
        let shared = HeartbeatShared {
            heard: last_reply_hb,
            data_progress: data_progress_hb,
            handing_over: handing_over.clone(),
        };
        let beats = AbortOnDropHandle::new(common::beats::spawn(async move {
            match crate::sender::attach_halves(moved) {
                Ok((hr, hw)) => heartbeats(hr, hw, gen, interval, timeout, shared).await,
                Err(e) => SessionExit::Lost(Loss::Channel { channel: "heartbeat", err: e.to_string() }),
            }
        }));
        let io = async move {
            // the first to end decides; the others are aborted as they drop
            let ended = tokio::select! {
                e = writer => e,
                e = acks => e,
                e = beats => e,
            };
            ended.unwrap_or_else(|e| SessionExit::Lost(Loss::Unexpected(format!("a session task ended: {e}"))))
        };
        let mut io = std::pin::pin!(io);
        let ack_timeout = self.cfg.peer_timeout * 4;
        let mut tick = tokio::time::interval(self.cfg.heartbeat_interval);
        let mut stop = self.stop.clone();
        // SIGTERM with a caught-up secondary: hand over, then stop
        let mut stopping: Option<Instant> = None;
        loop {
            tokio::select! {
                end = &mut io => {
                    let SessionExit::HandedOver(epoch) = end else { return end };
                    let _ = self.apply(Event::HandoverAccepted { epoch });
                    if let Mode::HandedOver { epoch } = self.state.mode() {
                        tracing::warn!(epoch = *epoch, peer = %self.session_peer, "handed over: the secondary runs the guest now");
                        return SessionExit::HandedOver(*epoch);
                    }
                    return SessionExit::Lost(Loss::Unexpected(format!("a handover acceptance for epoch {epoch}")));
                }
                h = heard_rx.recv() => match h {
                    Some(FromSecondary::Ack(epoch)) => {
                        if let Some(why) = self.state.ack_violation(epoch) {
                            // an ack of an epoch never sent: recorded
                            // nowhere; the core ends the session, releasing
                            // nothing
                            tracing::error!(epoch, error = %why, "protocol error from the secondary: ending the session");
                            let _ = self.apply(Event::Ack { epoch });
                            return SessionExit::Lost(why);
                        }
                        let silent = common::sync::lock(&last_reply).elapsed();
                        if silent > self.cfg.peer_timeout {
                            return SessionExit::Lost(Loss::HeartbeatTimeout(silent));
                        }
                        self.shared.record_ack(epoch);
                        pace.acked(epoch, Instant::now());
                        let mib_s = pace.rate() / 1048576.0;
                        self.status.update(|s| s.link_mib_s = mib_s);
                        common::crashpoint::hit("primary.after_ack");
                        if let Some(sent) = self.state.sent_at(epoch) {
                            self.status.record_ack_latency(sent.elapsed().as_secs_f64() * 1e6);
                        }
                        let mut handover = None;
                        if let Ok(due) = self.apply(Event::Ack { epoch }) {
                            handover = due;
                            let later = output_since.split_off(&epoch.saturating_add(1));
                            for since in std::mem::replace(&mut output_since, later).into_values() {
                                self.status.record_output_hold(since.elapsed().as_secs_f64() * 1e6);
                            }
                        }
                        common::crashpoint::hit("primary.after_release");
                        self.status.update(|s| s.acked_epoch = Some(epoch));
                        if let Some(epoch) = handover {
                            tracing::info!(epoch, "the last epoch is acknowledged: handing over");
                            // counted like an epoch: the writer counts every
                            // ship it takes (a refused handover goes on with
                            // this session)
                            queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            handing_over.store(true, std::sync::atomic::Ordering::SeqCst);
                            let _ = ship_tx.send(ToSecondary::Handover(epoch));
                        }
                    }
                    Some(FromSecondary::ResyncRequest(reason)) => {
                        tracing::error!(%reason, "secondary asks for a full resync");
                        let _ = self.apply(Event::ResyncRequested);
                    }
                    Some(FromSecondary::HandoverRefused(reason)) => {
                        handing_over.store(false, std::sync::atomic::Ordering::SeqCst);
                        tracing::error!(%reason, "the secondary cannot take the handover: this node keeps the guest, protected");
                        if let Some(c) = self.switchover.take() {
                            c.answer(Err(Refused(format!("the switchover was abandoned, this node keeps the guest: {reason}"))));
                        }
                        let _ = self.apply(Event::HandoverRefused);
                        if stopping.is_some() {
                            tracing::error!("asked to stop, but the secondary cannot take the guest: stopping without a handover");
                            return SessionExit::Stopped;
                        }
                    }
                    None => {}
                },
                p = self.packets.recv(), if queued.load(std::sync::atomic::Ordering::SeqCst) < ship_max => match p {
                    None => return SessionExit::Stopped,
                    Some(Packet::Failed(e)) => return SessionExit::GuestFailed(e),
                    Some(Packet::Release(o)) => { let _ = self.apply(Event::Released(o)); }
                    // a sync begun in an earlier session: its pages would
                    // arrive here without their SyncBegin (the engine starts
                    // the sync again for this session)
                    Some(Packet::Sync { first: false, .. }) if !sync_begun => {}
                    Some(Packet::Sync { first, pages, queued: q, .. }) => {
                        sync_begun |= first;
                        queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        meter.queued.fetch_add(page_bytes(&pages), std::sync::atomic::Ordering::Relaxed);
                        let _ = ship_tx.send(ToSecondary::Sync { first, pages, _queued: q });
                    }
                    Some(Packet::Epoch(mut e)) => {
                        self.record_epoch(&e);
                        let outputs = std::mem::take(&mut e.outputs);
                        if let (false, Some(since)) = (outputs.is_empty(), e.outputs_since) {
                            output_since.insert(e.epoch, since);
                        }
                        let _ = self.apply(Event::Epoch { epoch: e.epoch, outputs });
                        if e.last {
                            let _ = self.apply(Event::LastEpoch { epoch: e.epoch });
                        }
                        queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        meter.queued.fetch_add(epoch_bytes(&e), std::sync::atomic::Ordering::Relaxed);
                        let _ = ship_tx.send(ToSecondary::Epoch(e));
                    }
                },
                c = next_of(&mut self.commands) => if let Some(c) = c { self.answer(c) },
                a = next_answer(&mut self.witness) => {
                    self.witness_answered(a);
                    if let Some(by) = self.fenced() {
                        return SessionExit::Fenced(by);
                    }
                }
                _ = tick.tick() => {
                    if stopping.is_some_and(|t| t.elapsed() > STOP_SWITCHOVER_TIMEOUT) {
                        tracing::warn!("the switchover did not complete in time: stopping");
                        return SessionExit::Stopped;
                    }
                    let _ = self.apply(Event::Tick);
                    for (epoch, bytes) in std::mem::take(&mut *common::sync::lock(&meter.written)) {
                        pace.written(epoch, bytes);
                    }
                    if let Some(t) = self.state.oldest_unacked() {
                        let queued_bytes = meter.queued.load(std::sync::atomic::Ordering::Relaxed);
                        let still = common::sync::lock(&data_progress).elapsed();
                        if pace.overdue(ack_timeout, queued_bytes, t.elapsed(), still) {
                            return SessionExit::Lost(Loss::AckTimeout { waited: t.elapsed(), no_progress: still });
                        }
                    }
                }
                _ = stop.changed(), if stopping.is_none() => {
                    if !*stop.borrow() {
                        continue;
                    }
                    match self.apply(Event::Command(Command::Switchover)) {
                        Ok(_) => {
                            tracing::warn!("asked to stop: handing over to the secondary first");
                            stopping = Some(Instant::now());
                        }
                        Err(e) => {
                            tracing::info!(reason = %e, "asked to stop: no switchover");
                            return SessionExit::Stopped;
                        }
                    }
                }
            }
        }
    }

    fn record_epoch(&self, e: &EpochPacket) {
        let bytes = page_bytes(&e.pages);
        self.status.update(|s| {
            s.epoch = e.epoch;
            s.last_epoch = e.phases;
            s.epoch_len_us_max = s.epoch_len_us_max.max(e.phases.len_us);
            s.pages_total += e.pages.len() as u64;
            s.pages_unchanged_total += e.phases.unchanged;
            s.pages_delta_total += e.phases.deltas;
            s.bytes_total += bytes;
            s.epochs += 1;
        });
        self.status.record_boundary(&e.phases);
    }
}
