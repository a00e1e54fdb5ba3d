//! A session's I/O tasks: the writer, the ack reader and the heartbeats,
//! and what they ship ([`ToSecondary`]) and report ([`FromSecondary`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::liveness::Silence;
use common::proto::{Message, RefuseCode};
use tokio::sync::mpsc;

use super::pace::{epoch_bytes, page_bytes, LinkMeter};
use super::session::SessionExit;
use crate::engine::EpochPacket;
use crate::mode::Loss;
use crate::sender::{SessionReader, SessionWriter};

/// What the session's reader tasks report.
pub(super) enum FromSecondary {
    Ack(u64),
    ResyncRequest(String),
    /// The secondary cannot take the handover (why).
    HandoverRefused(String),
}

/// What the session's writer ships.
pub(super) enum ToSecondary {
    /// Live-sync pages; `first`: the first batch of a sync.
    Sync {
        first: bool,
        pages: Vec<common::proto::Page>,
        /// Their share of the engine's byte budget, given back once written.
        _queued: crate::engine::Queued,
    },
    Epoch(Box<EpochPacket>),
    /// The handover after this (acknowledged) epoch.
    Handover(u64),
}

pub(super) async fn write_loop(
    mut dw: SessionWriter,
    mut ship: mpsc::UnboundedReceiver<ToSecondary>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    meter: Arc<LinkMeter>,
) -> SessionExit {
    while let Some(s) = ship.recv().await {
        let res = match s {
            ToSecondary::Sync { first, pages, .. } => {
                let bytes = page_bytes(&pages);
                let r = dw.send_sync(first, pages).await;
                meter.sent(bytes);
                r
            }
            ToSecondary::Epoch(e) => {
                let e = *e;
                let (epoch, bytes) = (e.epoch, epoch_bytes(&e));
                let r = dw.send_epoch(e.epoch, e.full, e.pages, e.state, e.digest).await;
                meter.sent(bytes);
                common::sync::lock(&meter.written).push((epoch, bytes));
                r
            }
            ToSecondary::Handover(epoch) => dw.send(&Message::Handover { epoch }).await,
        };
        queued.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = res {
            return SessionExit::Lost(Loss::Send(e.to_string()));
        }
    }
    std::future::pending().await
}

pub(super) async fn read_acks(
    mut dr: SessionReader,
    heard: mpsc::UnboundedSender<FromSecondary>,
    gen: u64,
) -> SessionExit {
    loop {
        let h = match dr.recv().await {
            Ok(Some(Message::EpochAck { epoch })) => FromSecondary::Ack(epoch),
            Ok(Some(Message::ResyncRequest { reason })) => FromSecondary::ResyncRequest(reason),
            // the secondary accepted and closes the session: the end of the
            // I/O carries it (ahead of the close that follows)
            Ok(Some(Message::Handover { epoch })) => return SessionExit::HandedOver(epoch),
            Ok(Some(Message::Fence { generation, .. })) => return SessionExit::Fenced(generation),
            Ok(Some(Message::Refused { code: RefuseCode::StaleGeneration, .. })) => {
                return SessionExit::Fenced(gen.saturating_add(1))
            }
            Ok(Some(Message::Refused { code: RefuseCode::Takeover, reason })) => FromSecondary::HandoverRefused(reason),
            Ok(Some(Message::Refused { reason, .. })) => return SessionExit::Lost(Loss::Refused(reason)),
            Ok(Some(other)) => return SessionExit::Lost(Loss::Unexpected(format!("{:?}", other.kind()))),
            Ok(None) => return SessionExit::Lost(Loss::Closed("data")),
            Err(e) => return SessionExit::Lost(Loss::Channel { channel: "data", err: e.to_string() }),
        };
        if heard.send(h).is_err() {
            return SessionExit::Stopped;
        }
    }
}

/// What the heartbeat task learns from the secondary's replies.
pub(super) struct HeartbeatShared {
    /// When the last heartbeat the secondary answered was sent.
    pub(super) heard: Arc<std::sync::Mutex<Instant>>,
    /// When the last heartbeat was sent whose reply counted more bytes read
    /// from the data connection than the one before.
    pub(super) data_progress: Arc<std::sync::Mutex<Instant>>,
    /// Set while a handover is out: the secondary raises its generation as
    /// it takes over, and its heartbeat replies may show it, or its
    /// heartbeat channel close, before the data connection brings its
    /// acceptance; the data connection decides then (acceptance, refusal,
    /// or its loss), within the heartbeat timeout.
    pub(super) handing_over: Arc<std::sync::atomic::AtomicBool>,
}

pub(super) async fn heartbeats(
    mut hr: common::beats::BeatRx,
    mut hw: SessionWriter,
    gen: u64,
    interval: Duration,
    timeout: Duration,
    live: HeartbeatShared,
) -> SessionExit {
    let mut received_max = 0u64;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut last_reply = Instant::now();
    // the last tick ran late and judged nothing (the next one judges)
    let mut stalled_last = false;
    let start = Instant::now();
    // false once the channel closed during a handover (the secondary took
    // over and hung up; its acceptance may still be on its way on the data
    // connection, which then ends the session)
    let mut open = true;
    let handing_over = || live.handing_over.load(std::sync::atomic::Ordering::SeqCst);
    loop {
        tokio::select! {
            // replies first: a task that woke late (a stalled host or
            // runtime) reads the replies that wait in its socket before it
            // judges the silence at the tick, instead of a coin toss
            // between the two
            biased;
            m = crate::sender::recv(&mut hr), if open => match m {
                Ok(Some(Message::Heartbeat { generation, time_us, received, .. })) => {
                    if generation > gen && !live.handing_over.load(std::sync::atomic::Ordering::SeqCst) {
                        return SessionExit::Fenced(generation);
                    }
                    // liveness is when the answered heartbeat was *sent*
                    // (its echoed time): replies that waited in our socket
                    // while this process was frozen say the secondary was
                    // alive back then, not now
                    let sent = start + Duration::from_micros(time_us);
                    if sent > last_reply && sent <= Instant::now() {
                        last_reply = sent;
                        *common::sync::lock(&live.heard) = sent;
                        if received > received_max {
                            received_max = received;
                            *common::sync::lock(&live.data_progress) = sent;
                        }
                    }
                }
                Ok(Some(other)) => return SessionExit::Lost(Loss::Unexpected(format!("{:?} on the heartbeat channel", other.kind()))),
                Ok(None) | Err(_) if handing_over() => open = false,
                Ok(None) => return SessionExit::Lost(Loss::Closed("heartbeat")),
                Err(e) => return SessionExit::Lost(Loss::Channel { channel: "heartbeat", err: e.to_string() }),
            },
            due = tick.tick() => {
                // how late this tick ran: a late one found this process
                // stalled, and judges nothing (see `common::liveness`)
                let late = due.elapsed();
                let time_us = start.elapsed().as_micros() as u64;
                if open && hw.send(&Message::Heartbeat { generation: gen, seq, time_us, received: 0 }).await.is_err() {
                    if !handing_over() {
                        return SessionExit::Lost(Loss::Closed("heartbeat"));
                    }
                    open = false;
                }
                seq += 1;
                let since = last_reply.elapsed();
                let judged = common::liveness::judge_silence(late, stalled_last, true, since, timeout);
                stalled_last = judged == Silence::Stalled;
                match judged {
                    Silence::Silent => return SessionExit::Lost(Loss::HeartbeatTimeout(since)),
                    Silence::Stalled => tracing::debug!(
                        late_ms = late.as_millis() as u64,
                        silent_ms = since.as_millis() as u64,
                        "heartbeat tick ran late (this process stalled): silence judged at the next tick"
                    ),
                    Silence::Heard => {}
                }
            }
        }
    }
}
