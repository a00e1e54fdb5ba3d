//! Finding a secondary: dialing the peer, a joiner's handshake, what this
//! primary offers, and how a refusal is logged.

use std::net::SocketAddr;
use std::time::Duration;

use common::proto::{Channel, RefuseCode};
use runtime::admission::Admitted;
use runtime::join::Joiner;
use tokio::sync::mpsc;

use super::Replicator;
use crate::sender::{Offer, SenderError, Session};

/// How long a joining secondary has for its handshake.
const JOIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Joiner handshakes that may run at once; more wait their turn, fairly
/// across their sources (`runtime::admission`).
pub(super) const MAX_JOIN_HANDSHAKES: usize = 16;

/// A joiner's finished handshake.
pub(super) type Handshaken = Result<(Session, Channel), SenderError>;

/// The generation that fenced this primary (of generation `gen`), if `e`
/// says one did: the peer refused ours as stale without naming its own, so
/// ours + 1, the least it can be (as when the session's reader hears the
/// same refusal; see [`Mode::Fenced`]).
///
/// [`Mode::Fenced`]: crate::mode::Mode::Fenced
pub(super) fn fenced_by(e: &SenderError, gen: u64) -> Option<u64> {
    match e {
        SenderError::Refused { code: RefuseCode::StaleGeneration, .. } => Some(gen.saturating_add(1)),
        _ => None,
    }
}

impl Replicator {
    /// Logs a secondary that could not be reached or refused us, at most
    /// once per kind of failure every 10 s (the others at debug); settings that do not fit the secondary's are
    /// an error and go into the status (`pair_error`). Returns whether it
    /// was a settings mismatch.
    pub(super) fn refused(&self, peer: Option<SocketAddr>, e: &SenderError) -> bool {
        let pair = matches!(
            e,
            SenderError::PairMismatch(_) | SenderError::Refused { code: RefuseCode::Pair | RefuseCode::Cpu, .. }
        );
        if pair {
            self.status.update(|s| s.pair_error = Some(e.to_string()));
        }
        let kind = match e {
            _ if pair => "pair",
            SenderError::Connect { .. } | SenderError::TimedOut(_) | SenderError::Closed(_) => "unreachable",
            _ => "refused",
        };
        let peer = peer.map_or_else(|| "joiner".to_string(), |p| p.to_string());
        let Some(skipped) = self.refusals.allow(kind) else {
            tracing::debug!(%peer, error = %e, "secondary not reachable");
            return pair;
        };
        match kind {
            "pair" => {
                tracing::error!(%peer, skipped, error = %e, "the secondary cannot protect this guest (settings that differ, or a host that cannot run its CPU): this pair does not protect until that is fixed")
            }
            // a warning (the default log level shows it): this node is not
            // protected while it lasts
            "unreachable" => tracing::warn!(%peer, skipped, error = %e, "secondary not reachable yet (dialing again)"),
            _ => tracing::warn!(%peer, skipped, error = %e, "a secondary failed the handshake"),
        }
        pair
    }

    /// Runs a joiner's handshake on its own task (a joiner that stalls
    /// cannot hold up this loop); the result comes back on `done`. The
    /// joiner holds its admission slot until the handshake ends.
    pub(super) fn handshake_joiner(&self, joiner: Admitted<Joiner>, done: mpsc::Sender<Handshaken>) {
        let Admitted { conn: (stream, channel), permit: slot, .. } = joiner;
        let (secret, offer) = (self.cfg.secret.clone(), self.offer());
        tokio::spawn(async move {
            let _slot = slot;
            let v = common::frame::PROTOCOL_VERSION;
            let hs = Session::handshake(stream, &secret, &offer, channel, v, v);
            let r = match tokio::time::timeout(JOIN_HANDSHAKE_TIMEOUT, hs).await {
                Ok(Ok(s)) => Ok((s, channel)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(SenderError::TimedOut("handshake")),
            };
            let _ = done.send(r).await;
        });
    }

    /// What this primary's Hello offers.
    fn offer(&self) -> Offer {
        Offer {
            shape: self.shape.clone(),
            cpu: self.cpu.clone(),
            generation: self.cfg.generation,
            pair: self.cfg.pair.clone(),
        }
    }

    /// Dials the peer on its own task: a peer that accepts and then stalls
    /// (a frozen host) cannot hold up this loop, nor the witness's answers.
    pub(super) fn dial(&self, peer: SocketAddr) -> tokio::task::JoinHandle<Result<(Session, Session), SenderError>> {
        let (secret, offer) = (self.cfg.secret.clone(), self.offer());
        tokio::spawn(async move {
            let t = Duration::from_secs(2);
            let offer = &offer;
            let one = |ch| {
                let c = Session::connect_channel(peer, &secret, offer, ch);
                async move { tokio::time::timeout(t, c).await.map_err(|_| SenderError::TimedOut("connect"))? }
            };
            Ok((one(Channel::Data).await?, one(Channel::Heartbeat).await?))
        })
    }
}
