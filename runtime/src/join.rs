//! Secondaries that dial a primary to protect it (`castor secondary --join`,
//! or new secondaries joining a promoted node): each connection starts with
//! one preamble byte naming its channel.

use std::time::Duration;

use common::proto::Channel;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::admission::{self, Admitted, Limits};

/// Preamble byte a joining secondary sends before the handshake.
pub const JOIN_DATA: u8 = b'D';
/// Preamble byte of a joining secondary's heartbeat connection.
pub const JOIN_HEARTBEAT: u8 = b'H';

/// A secondary that dialed us: its data or heartbeat connection.
pub type Joiner = (TcpStream, Channel);

/// The channel a preamble byte names.
pub fn channel_of(preamble: u8) -> Option<Channel> {
    match preamble {
        JOIN_DATA => Some(Channel::Data),
        JOIN_HEARTBEAT => Some(Channel::Heartbeat),
        _ => None,
    }
}

/// Reads the preamble of a joining connection (bounded in time).
pub async fn read_preamble(mut s: TcpStream) -> Option<Joiner> {
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b)).await.ok()?.ok()?;
    Some((s, channel_of(b[0])?))
}

/// Connections whose preamble may be awaited at once; more wait their
/// turn, fairly across their sources ([`crate::admission`]).
pub const MAX_PREAMBLES: usize = 16;

/// Accepts joining secondaries on `listener` and hands them on.
pub fn accept_joiners(listener: TcpListener) -> mpsc::Receiver<Joiner> {
    let (tx, rx) = mpsc::channel(8);
    let limits = Limits { total: MAX_PREAMBLES, ..Limits::DEFAULT };
    let mut admitted = admission::admit(admission::accepted(listener), "join preamble", limits);
    tokio::spawn(async move {
        while let Some(a) = admitted.recv().await {
            if tx.is_closed() {
                return;
            }
            let tx = tx.clone();
            tokio::spawn(async move {
                let j = read_preamble(a.conn).await;
                drop(a.permit);
                if let Some(j) = j {
                    let _ = tx.send(j).await;
                }
            });
        }
    });
    rx
}

/// Admits the joiners `rx` yields (to their handshake) fairly across their
/// sources, at most `total` at once: each comes out with its slot.
pub fn admit_joiners(rx: mpsc::Receiver<Joiner>, what: &'static str, total: usize) -> mpsc::Receiver<Admitted<Joiner>> {
    let arrivals = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            let (stream, channel) = rx.recv().await?;
            // one whose peer is gone already is dropped here
            if let Ok(peer) = stream.peer_addr() {
                return Some((((stream, channel), peer), rx));
            }
        }
    });
    admission::admit(Box::pin(arrivals), what, Limits { total, ..Limits::DEFAULT })
}
