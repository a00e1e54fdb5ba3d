//! The core's vocabulary: its [`Mode`], the [`Event`]s it takes, the [`Actions`]
//! it returns, and why a session ends or an event is refused.

use std::time::{Duration, Instant};

use common::state::Output;
use runtime::status::Protection;

use super::{Answer, Ask, Command};

/// Why the session with the secondary ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Loss {
    #[error("sending failed: {0}")]
    Send(String),
    #[error("the secondary refused us: {0}")]
    Refused(String),
    #[error("unexpected {0} from the secondary")]
    Unexpected(String),
    #[error("the secondary closed the {0} channel")]
    Closed(&'static str),
    #[error("{channel} channel: {err}")]
    Channel { channel: &'static str, err: String },
    #[error("no heartbeat reply for {0:?}")]
    HeartbeatTimeout(Duration),
    #[error("no ack for {waited:?}, and no byte of the data connection read for {no_progress:?}")]
    AckTimeout { waited: Duration, no_progress: Duration },
    #[error("the secondary acknowledged epoch {epoch}, which this session never sent (last sent: {last_sent:?})")]
    AckBeyondSent { epoch: u64, last_sent: Option<u64> },
}

/// The protection mode of a primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// No secondary: output leaves at once (or the guest stays paused, by policy).
    Unprotected,
    /// A secondary session is up; no epoch of it acknowledged yet.
    Syncing,
    /// The secondary acknowledged an epoch of this session.
    Protected,
    /// The secondary was lost and may be taking over: nothing is released,
    /// the guest is paused.
    Holding {
        since: Instant,
        why: Loss,
        /// The secondary (its witness name or durable node id) we hold for:
        /// without a witness only it coming back ends the hold (it shows
        /// its generation), or the operator's `unprotect`.
        peer: String,
    },
    /// A newer generation exists: this node must never release output again.
    /// `by`: that generation when the fencer named it (a fence message, the
    /// witness's term), else ours + 1, the least it can be (a peer that
    /// only refused ours as stale).
    Fenced { by: u64 },
    /// A planned switchover: the engine ends its last epoch (`last`, once
    /// known) and keeps the guest paused; acked output is released as when
    /// protected; once `last` is acknowledged the handover is sent (`sent`).
    HandingOver { last: Option<u64>, sent: bool },
    /// The secondary accepted the handover after `epoch`: this node never
    /// releases output again (the secondary runs the guest now).
    HandedOver { epoch: u64 },
}

impl Mode {
    pub fn protection(&self) -> Protection {
        match self {
            Mode::Unprotected => Protection::Unprotected,
            Mode::Syncing => Protection::Syncing,
            Mode::Protected => Protection::Protected,
            Mode::Holding { .. } => Protection::Holding,
            Mode::Fenced { .. } => Protection::Fenced,
            Mode::HandingOver { .. } => Protection::HandingOver,
            Mode::HandedOver { .. } => Protection::HandedOver,
        }
    }

    /// A secondary session is up.
    pub fn in_session(&self) -> bool {
        matches!(self, Mode::Syncing | Mode::Protected | Mode::HandingOver { .. })
    }
}

/// What a new secondary's replica holds as its session starts. Either way
/// the engine brings it up to date with a live sync (memory copied while
/// the guest runs, ended by a delta epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resync {
    /// Its replica is empty.
    IntoEmpty,
    /// It holds an older epoch of ours: the sync is staged beside that
    /// epoch, which stays usable for failover until the sync's final epoch
    /// commits.
    BesideCommitted,
}

/// What the epoch engine is told to do. The engine applies them in order;
/// its behaviour is a function of the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineCommand {
    /// Ship epochs to the secondary, starting with this resync.
    Protect(Resync),
    /// Keep the guest paused: no new output.
    Hold,
    /// No secondary: run by the unprotected policy, output released at once.
    Alone,
    /// Resync the secondary (it asked: its replica diverged or is torn):
    /// a live sync, whose final epoch replaces the replica.
    LiveResync,
    /// End the current epoch now, ship it as the last one, and keep the
    /// guest paused (a planned switchover).
    Finish,
    /// A switchover was refused after the last epoch: run the guest on,
    /// protected (the secondary holds exactly the epoch it stopped at).
    Resume,
}

/// Why a command or event was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this node is the primary: a forced failover is asked of its secondary")]
    IsPrimary,
    #[error("not holding but {0}: unprotect only ends a hold")]
    NotHolding(Protection),
    #[error("fenced by generation {0}: this node takes no commands")]
    Fenced(u64),
    #[error("a secondary session is already up")]
    SessionUp,
    #[error("with a witness, the witness decides when a hold ends (it grants running alone)")]
    WitnessDecides,
    #[error(
        "holding for secondary {0}: without a witness only it can show it did not take over; \
         `castor unprotect` if you know it is dead"
    )]
    HoldingFor(String),
    #[error("not protected but {0}: a switchover needs a secondary that acknowledges epochs")]
    NotProtected(Protection),
    #[error("the witness has not recorded the secondary as caught up yet: try again in a moment")]
    NotRecorded,
    #[error("a switchover is already under way")]
    SwitchingOver,
    #[error("handed over: the secondary runs the guest now; this node takes no commands")]
    HandedOver,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A secondary session is up. `next_epoch`: the engine's next epoch.
    SessionUp {
        next_epoch: u64,
        resync: Resync,
        /// The secondary's name (its HelloAck node).
        peer: String,
    },
    /// The engine finished `epoch` (sent to the secondary in a session).
    Epoch {
        epoch: u64,
        outputs: Vec<Output>,
    },
    /// Output of an unprotected engine epoch.
    Released(Vec<Output>),
    /// The secondary acknowledged `epoch` (and every one before it).
    Ack {
        epoch: u64,
    },
    /// The secondary asks for a full resync.
    ResyncRequested,
    /// The witness answered the ask with this tag.
    Witness {
        tag: u64,
        answer: Answer,
    },
    SessionLost(Loss),
    /// A node of generation `by` exists (or of a later one: `by` is ours +
    /// 1 when the peer only refused ours as stale; see [`Mode::Fenced`]).
    Fenced {
        by: u64,
    },
    /// Time passes.
    Tick,
    Command(Command),
    /// The epoch the engine ended last before a handover (after its
    /// [`Event::Epoch`]).
    LastEpoch {
        epoch: u64,
    },
    /// The secondary accepted the handover after `epoch`.
    HandoverAccepted {
        epoch: u64,
    },
    /// The secondary cannot take the handover (its machine does not build
    /// there, the witness refused it): the session goes on and this node
    /// resumes the guest, protected.
    HandoverRefused,
}

impl Event {
    /// The event's name (for logs).
    pub fn name(&self) -> &'static str {
        match self {
            Event::SessionUp { .. } => "session-up",
            Event::Epoch { .. } => "epoch",
            Event::Released(_) => "released",
            Event::Ack { .. } => "ack",
            Event::ResyncRequested => "resync-requested",
            Event::Witness { .. } => "witness",
            Event::SessionLost(_) => "session-lost",
            Event::Fenced { .. } => "fenced",
            Event::Tick => "tick",
            Event::Command(_) => "command",
            Event::LastEpoch { .. } => "last-epoch",
            Event::HandoverAccepted { .. } => "handover-accepted",
            Event::HandoverRefused => "handover-refused",
        }
    }
}

/// The effect of one event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Actions {
    pub engine: Option<EngineCommand>,
    /// Output that leaves castor now.
    pub release: Vec<Output>,
    /// Ask the witness this.
    pub ask: Option<Ask>,
    /// Send the secondary the handover after this epoch (acknowledged).
    pub handover: Option<u64>,
}
