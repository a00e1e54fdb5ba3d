//! The secondary's side of a replication connection: handshake, then epochs
//! into the replica, acknowledging each commit.

mod beats;
mod config;
mod counting;
mod error;
mod resync;
mod trial;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::frame::{FrameError, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use common::proto::{Channel, HelloAck, Kind, Message, RefuseCode, StateAssembler};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::replica::{Replica, ReplicaError};
use counting::CountingRead;
use resync::Resyncing;

pub use config::ReceiverConfig;
pub(crate) use error::log_refusal;
pub use error::ReceiverError;
pub use resync::MAX_SKIPPED_EPOCHS;
pub use trial::{TrialRestore, TRIAL_RETRY};

/// How long the node may take to build the machine and win the term
/// before a handover is refused (the primary's guest waits paused).
pub const TAKEOVER_ANSWER: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a peer has to authenticate.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Read buffer of a connection before it authenticated (grown after).
const PRE_AUTH_BUFFER: usize = 8 << 10;

/// How a connection ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The primary closed the connection between frames.
    Closed,
    /// The primary said Shutdown.
    Shutdown,
    /// The primary handed over after this epoch (our committed one); we
    /// accepted and take over.
    Handover(u64),
}

/// What the receiver reports as it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverEvent {
    Authenticated {
        generation: u64,
        channel: Channel,
    },
    Committed {
        epoch: u64,
    },
    /// A heartbeat on a data channel (those of the heartbeat channel are
    /// marked in `ReceiverConfig::liveness` by the heartbeat thread).
    Heartbeat {
        generation: u64,
        seq: u64,
    },
    /// Any frame on a data channel (liveness of the primary).
    Data,
    /// The primary handed over after `epoch` (committed here): take over now.
    Handover {
        epoch: u64,
    },
    /// Applying `epoch` failed halfway: the replica is torn (unusable) and a
    /// full resync was asked for.
    ApplyFailed {
        epoch: u64,
    },
}

/// Serves one replication connection until it ends. The replica is left at
/// its committed epoch whatever happens. Nothing of the replica is touched
/// before the peer authenticated (within [`HANDSHAKE_TIMEOUT`]), and only
/// the newest authenticated data session owns staging and can drop it: a stranger's
/// connection that ends changes nothing.
pub async fn serve_connection(
    stream: TcpStream,
    cfg: &ReceiverConfig,
    replica: &Arc<Mutex<Replica>>,
    mut on_event: impl FnMut(ReceiverEvent),
) -> Result<SessionEnd, ReceiverError> {
    let mut session = None;
    let result = serve_inner(stream, cfg, replica, &mut on_event, &mut session).await;
    if let Some(id) = session {
        let (epoch, sync) = common::sync::lock(replica).end_data_session(id);
        if let Some(e) = epoch {
            tracing::warn!(epoch = e, "dropped a partly received epoch; replica stays at its committed epoch");
        }
        if sync {
            tracing::warn!("dropped an unfinished live sync; the replica stays at its committed epoch");
        }
    }
    result
}

async fn serve_inner(
    stream: TcpStream,
    cfg: &ReceiverConfig,
    replica: &Arc<Mutex<Replica>>,
    on_event: &mut impl FnMut(ReceiverEvent),
    session: &mut Option<u64>,
) -> Result<SessionEnd, ReceiverError> {
    let _ = stream.set_nodelay(true);
    let mut stream = stream;
    let handshake = async {
        // The Noise handshake: a peer without the secret fails here, having
        // made us read at most one small message, before anything is read
        // into the replica.
        let link = common::link::respond(&mut stream, &cfg.secret).await.map_err(|e| match e {
            common::link::LinkError::Closed => ReceiverError::Closed("during the handshake"),
            other => ReceiverError::Unauthenticated(other.to_string()),
        })?;
        let (r, w) = stream.into_split();
        let r = CountingRead { inner: r, count: cfg.data_received.clone(), armed: false };
        let (sealer, opener) = common::frame::codecs(PROTOCOL_VERSION, PROTOCOL_VERSION, link);
        let mut rx = FramedRead::with_capacity(r, opener, PRE_AUTH_BUFFER);
        let mut tx = FramedWrite::new(w, sealer);
        // the first frame proves the peer holds this session's keys (a
        // replayed handshake message does not)
        let hs_err = |e: FrameError| match e {
            FrameError::Corrupt => {
                ReceiverError::Unauthenticated("the first frame did not open: a replayed or forged handshake".into())
            }
            other => ReceiverError::Frame(other),
        };
        let first = rx.next().await.ok_or(ReceiverError::Closed("before Hello"))?.map_err(hs_err)?;
        let hello = match Message::decode(first.kind, first.payload)? {
            Message::Hello(h) => h,
            other => return Err(ReceiverError::Unexpected(other.kind(), "before Hello")),
        };
        let refuse = |code: RefuseCode, reason: String| Message::Refused { code, reason }.to_frame();
        if !(hello.min_version..=hello.max_version).contains(&PROTOCOL_VERSION)
            || hello.max_version < MIN_PROTOCOL_VERSION
        {
            let _ =
                tx.send(refuse(RefuseCode::Version, format!("this secondary speaks version {PROTOCOL_VERSION}"))).await;
            return Err(ReceiverError::VersionRefused { min: hello.min_version, max: hello.max_version });
        }
        // a stale primary learns it is fenced whatever else differs
        let ours = cfg.generation();
        if hello.generation < ours {
            let _ = tx
                .send(refuse(RefuseCode::StaleGeneration, format!("generation {} is fenced", hello.generation)))
                .await;
            return Err(ReceiverError::StaleGeneration { peer: hello.generation, ours });
        }
        if let Err(e) = cfg.pair.check_peer(&hello.pair) {
            let _ = tx.send(refuse(RefuseCode::Pair, format!("the secondary refused the pair: {e}"))).await;
            return Err(e.into());
        }
        if let Some(host) = &cfg.host_cpu {
            if let Err(e) = hello.cpu.fits(host) {
                let _ = tx.send(refuse(RefuseCode::Cpu, format!("the secondary refused: {e}"))).await;
                return Err(e.into());
            }
        }
        if let Some(why) = cfg.trial.as_ref().and_then(TrialRestore::refusal) {
            let reason = format!("the secondary's last trial restore failed: {why}");
            let _ = tx.send(refuse(RefuseCode::Cpu, reason)).await;
            return Err(ReceiverError::TrialRestore(why));
        }
        // authenticated: only now may the peer shape the replica
        let shape_ok = common::sync::lock(replica).check_shape(&hello.shape);
        if let Err(e) = shape_ok {
            let _ = tx.send(refuse(RefuseCode::Shape, e.to_string())).await;
            return Err(e.into());
        }
        let committed_epoch = common::sync::lock(replica).committed_epoch();
        tx.send(
            Message::HelloAck(HelloAck {
                version: PROTOCOL_VERSION,
                committed_epoch,
                generation: ours,
                node: cfg.node.clone(),
                pair: cfg.pair.clone(),
            })
            .to_frame(),
        )
        .await
        .map_err(ReceiverError::Frame)?;
        Ok::<_, ReceiverError>((hello, committed_epoch, rx, tx))
    };
    let (hello, committed_epoch, mut rx, mut tx) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ReceiverError::HandshakeTimeout(HANDSHAKE_TIMEOUT))??;
    rx.read_buffer_mut().reserve(1 << 21);
    // a primary of a newer generation (after failovers) raises ours, stored
    // before any of its epochs is taken
    if let Some(sd) = &cfg.state {
        sd.raise_generation(hello.generation)?;
    }
    cfg.generation.fetch_max(hello.generation, Ordering::SeqCst);
    on_event(ReceiverEvent::Authenticated { generation: hello.generation, channel: hello.channel });
    tracing::info!(generation = hello.generation, ?committed_epoch, channel = ?hello.channel, "primary authenticated");
    if hello.channel == Channel::Heartbeat {
        return beats::answer(rx, tx, cfg).await;
    }

    // an authenticated data session: its bytes count as the link's progress
    rx.get_mut().armed = true;
    // this data session owns staging from now on (a newer one takes it
    // over, and this one ends at its next frame)
    let mine = common::sync::lock(replica).open_data_session();
    *session = Some(mine);
    let mut state = StateAssembler::default();
    // set once this session asked for a resync (see `Resyncing`)
    let mut resyncing: Option<Resyncing> = None;
    // whether this session's trial restore ran
    let mut tried = false;
    loop {
        // between two frames the runtime polls its timers and sockets: a
        // sync's frames arrive faster than they are opened and stored, and
        // without this yield the task ran for 100+ ms (its cooperative
        // budget), heartbeat replies waited as long, and the primary ended
        // the session (the primary's writer yields the same way)
        tokio::task::yield_now().await;
        let Some(frame) = rx.next().await else {
            return Ok(SessionEnd::Closed);
        };
        let frame = frame.map_err(ReceiverError::Frame)?;
        on_event(ReceiverEvent::Data);
        if cfg.generation() > hello.generation && common::sync::lock(replica).committed_epoch().is_some() {
            // we took over (or were told a newer primary exists): fence this one
            let fence = Message::Fence { generation: cfg.generation(), reason: "a newer generation took over".into() };
            let _ = tx.send(fence.to_frame()).await;
            return Err(ReceiverError::StaleGeneration { peer: hello.generation, ours: cfg.generation() });
        }
        let msg = Message::decode(frame.kind, frame.payload)?;
        if common::sync::lock(replica).data_session() != mine {
            return Err(ReceiverError::Superseded);
        }
        // after our resync request: the deltas already in flight are
        // skipped, whole, until the resync begins
        if let Some(r) = &mut resyncing {
            match &msg {
                Message::EpochBegin { epoch, full: false, .. } if r.skipping.is_none() => {
                    let skip = {
                        let rep = common::sync::lock(replica);
                        rep.needs_resync() && !rep.sync_open()
                    };
                    if skip {
                        r.skipped += 1;
                        if r.skipped > MAX_SKIPPED_EPOCHS {
                            return Err(ReceiverError::ResyncNotStarted { skipped: r.skipped - 1 });
                        }
                        tracing::info!(epoch, "a delta epoch sent before the primary read our resync request: skipped");
                        r.skipping = Some(*epoch);
                        continue;
                    }
                }
                Message::PageChunk(c) if r.skipping.is_some() => {
                    r.inside(Kind::PageChunk, c.epoch)?;
                    continue;
                }
                Message::StateChunk(c) if r.skipping.is_some() => {
                    r.inside(Kind::StateChunk, c.epoch)?;
                    continue;
                }
                Message::EpochEnd(t) if r.skipping.is_some() => {
                    r.inside(Kind::EpochEnd, t.epoch)?;
                    r.skipping = None;
                    continue;
                }
                Message::Heartbeat { .. } | Message::Shutdown { .. } => {}
                other if r.skipping.is_some() => {
                    return Err(ReceiverError::Unexpected(other.kind(), "inside a skipped epoch"));
                }
                _ => {}
            }
        }
        match msg {
            Message::SyncBegin => {
                resyncing = None;
                common::sync::lock(replica).begin_sync()?;
                tracing::info!("live sync begun: pages go to a staging area until its final epoch commits");
            }
            Message::FullSyncChunk(c) => common::sync::lock(replica).full_sync_chunk(&c)?,
            Message::EpochBegin { epoch, page_count, full } => {
                common::sync::lock(replica).begin_epoch(epoch, page_count, full)?;
                if full {
                    // the resync began
                    resyncing = None;
                }
                state.reset();
                common::crashpoint::hit("secondary.after_begin");
            }
            Message::PageChunk(c) => {
                common::sync::lock(replica).chunk(c)?;
                common::crashpoint::hit("secondary.mid_chunks");
            }
            Message::StateChunk(c) => {
                // only the epoch being staged has state to receive
                if common::sync::lock(replica).staging_epoch() != Some(c.epoch) {
                    return Err(ReceiverError::Unexpected(Kind::StateChunk, "outside the epoch being staged"));
                }
                state.push(c)?;
            }
            Message::EpochEnd(tail) => {
                let end = state.finish(tail)?;
                let t = Instant::now();
                let res = crate::apply::apply_epoch(replica, end).await;
                match res {
                    Ok(epoch) => {
                        tracing::debug!(epoch, apply_us = t.elapsed().as_micros() as u64, "epoch committed");
                        common::crashpoint::hit("secondary.after_apply");
                        if let Some(trial) = cfg.trial.as_ref().filter(|_| !std::mem::replace(&mut tried, true)) {
                            // before the first ack of this session: the
                            // primary counts on us only once we could run it
                            if let Err(why) = trial.run(replica).await {
                                let reason = format!("the replica does not restore on the secondary's host: {why}");
                                let _ = tx.send(Message::Refused { code: RefuseCode::Cpu, reason }.to_frame()).await;
                                return Err(ReceiverError::TrialRestore(why));
                            }
                        }
                        tx.send(Message::EpochAck { epoch }.to_frame()).await.map_err(ReceiverError::Frame)?;
                        common::crashpoint::hit("secondary.after_ack");
                        on_event(ReceiverEvent::Committed { epoch });
                    }
                    Err(ReplicaError::Diverged { epoch, expected, got }) => {
                        let reason = format!("replica digest {got:#x} != primary {expected:#x} after epoch {epoch}");
                        tx.send(Message::ResyncRequest { reason }.to_frame()).await.map_err(ReceiverError::Frame)?;
                        resyncing = Some(Resyncing::default());
                    }
                    Err(e @ ReplicaError::Delta { .. }) => {
                        // nothing was written: the replica is its committed
                        // epoch; the primary syncs it live again
                        let reason = format!("an epoch's delta does not apply here: {e}");
                        tracing::error!(%reason, "asking the primary for a resync");
                        tx.send(Message::ResyncRequest { reason }.to_frame()).await.map_err(ReceiverError::Frame)?;
                        resyncing = Some(Resyncing::default());
                    }
                    Err(ReplicaError::Torn { epoch, why }) => {
                        // not acknowledged: the primary holds its output and
                        // resyncs it live: the sync's final epoch repairs it
                        on_event(ReceiverEvent::ApplyFailed { epoch });
                        let reason = format!("applying epoch {epoch} failed halfway ({why}): the replica is torn");
                        tx.send(Message::ResyncRequest { reason }.to_frame()).await.map_err(ReceiverError::Frame)?;
                        resyncing = Some(Resyncing::default());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Message::Heartbeat { generation, seq, .. } => on_event(ReceiverEvent::Heartbeat { generation, seq }),
            Message::Shutdown { reason } => {
                tracing::info!(%reason, "primary shut the session down");
                return Ok(SessionEnd::Shutdown);
            }
            Message::Refused { code, reason } => return Err(ReceiverError::RefusedByPrimary { code, reason }),
            Message::Handover { epoch } => {
                // accepted only from exactly the epoch committed here, on a
                // replica that passed its checks
                let (committed, diverged) = {
                    let r = common::sync::lock(replica);
                    (r.committed_epoch(), r.needs_resync())
                };
                let mut why = match committed {
                    _ if diverged => Some("the replica failed its last check".to_string()),
                    Some(c) if c == epoch => None,
                    c => Some(format!("the committed epoch here is {c:?}")),
                };
                // the node builds the machine (and, with a witness, wins the
                // term) before we accept: a takeover that cannot run is
                // refused here, and the primary carries on
                if let (None, Some(takeover)) = (&why, &cfg.takeover) {
                    let (reply, verdict) = tokio::sync::oneshot::channel();
                    let _ = takeover.send(crate::takeover::TakeoverAsk { epoch, reply });
                    why = match tokio::time::timeout(TAKEOVER_ANSWER, verdict).await {
                        Ok(Ok(Ok(()))) => None,
                        Ok(Ok(Err(why))) => Some(why),
                        Ok(Err(_)) => Some("this node stopped before it could take over".into()),
                        Err(_) => Some(format!("this node did not take over within {TAKEOVER_ANSWER:?}")),
                    };
                }
                if let Some(why) = why {
                    // the session goes on: the primary resumes the guest
                    tracing::warn!(epoch, %why, "handover refused: the primary keeps the guest");
                    let reason = format!("handover refused: {why}");
                    tx.send(Message::Refused { code: RefuseCode::Takeover, reason }.to_frame())
                        .await
                        .map_err(ReceiverError::Frame)?;
                    continue;
                }
                tx.send(Message::Handover { epoch }.to_frame()).await.map_err(ReceiverError::Frame)?;
                on_event(ReceiverEvent::Handover { epoch });
                tracing::warn!(epoch, "the primary handed over: taking over");
                return Ok(SessionEnd::Handover(epoch));
            }
            other => return Err(ReceiverError::Unexpected(other.kind(), "during replication")),
        }
    }
}
