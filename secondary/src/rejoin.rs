//! Re-protection: a secondary started with `--join` dials the primary it
//! protects (a data and a heartbeat connection) until it is promoted,
//! redialling after each session or failed dial.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runtime::join::{JOIN_DATA, JOIN_HEARTBEAT};
use runtime::status::NodeStatus;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::receiver::log_refusal;
use crate::receiver::{serve_connection, ReceiverConfig, ReceiverEvent};
use crate::replica::Replica;

/// First pause before a redial (jittered: up to twice as long).
const REDIAL_MIN: Duration = Duration::from_millis(150);
/// Longest pause between redials (jittered: up to twice as long).
const REDIAL_MAX: Duration = Duration::from_millis(600);

/// Dials `primary` and serves its sessions until `promoted`.
pub(crate) async fn redial<E>(
    primary: SocketAddr,
    rcfg: ReceiverConfig,
    replica: Arc<Mutex<Replica>>,
    promoted: Arc<AtomicBool>,
    on_event: E,
    status: Arc<NodeStatus>,
) where
    E: FnMut(ReceiverEvent) + Clone + Send + 'static,
{
    let refusals = runtime::lograte::LogLimiter::new(Duration::from_secs(10));
    // a growing pause while the primary cannot be reached or refuses us,
    // from the start again after each session
    let mut pause = common::retry::backoff(REDIAL_MIN, REDIAL_MAX);
    while !promoted.load(Ordering::SeqCst) {
        let dial = |tag: u8| async move {
            let mut s = TcpStream::connect(primary).await?;
            s.write_all(&[tag]).await?;
            Ok::<TcpStream, std::io::Error>(s)
        };
        match (dial(JOIN_DATA).await, dial(JOIN_HEARTBEAT).await) {
            (Ok(d), Ok(h)) => {
                let (r2, c2, e2) = (replica.clone(), rcfg.clone(), on_event.clone());
                let hb = tokio::spawn(async move { serve_connection(h, &c2, &r2, e2).await });
                let res = serve_connection(d, &rcfg, &replica, on_event.clone()).await;
                hb.abort();
                match res {
                    Ok(end) => {
                        tracing::warn!(?end, "joined replication session ended");
                        pause = common::retry::backoff(REDIAL_MIN, REDIAL_MAX);
                    }
                    Err(e) => log_refusal(&refusals, &status, primary, &e),
                }
            }
            _ => tracing::debug!(%primary, "primary not reachable yet"),
        }
        tokio::time::sleep(common::retry::next_pause(&mut pause)).await;
    }
}
