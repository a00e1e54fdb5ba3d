//! Secondaries that dial a primary to protect it (`castor secondary --join`,
//! or new secondaries joining a promoted node): each connection starts with
//! one preamble byte naming its channel.

use std::time::Duration;

use common::proto::Channel;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

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

/// Connections whose preamble may be awaited at once; more are closed.
pub const MAX_PREAMBLES: usize = 16;

/// Accepts joining secondaries on `listener` and hands them on.
pub fn accept_joiners(listener: TcpListener) -> mpsc::Receiver<Joiner> {
    let (tx, rx) = mpsc::channel(8);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_PREAMBLES));
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
            let tx = tx.clone();
            tokio::spawn(async move {
                let j = read_preamble(s).await;
                drop(slot);
                if let Some(j) = j {
                    let _ = tx.send(j).await;
                }
            });
        }
    });
    rx
}
