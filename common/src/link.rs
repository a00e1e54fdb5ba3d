//! The encrypted, mutually authenticated link between a primary and a
//! secondary: a Noise handshake (`snow`), keyed by the shared secret.
//!
//! Pattern `Noise_NNpsk0_25519_AESGCM_SHA256`: both sides make an ephemeral
//! X25519 key per connection, and the pre-shared key (derived from the
//! secret file) is mixed in before the first message, so only a holder of
//! the secret completes the handshake (the responder can read the
//! initiator's first message only with it; the initiator the responder's
//! answer). After two messages each direction has its own AES-256-GCM key:
//! a frame reflected back to its sender does not decrypt, a recorded
//! session replayed gets fresh keys from the responder and fails at its
//! first frame, and every frame is encrypted (see `frame.rs`).
//!
//! Why Noise and not TLS: castor's nodes already share a secret file and
//! need no PKI; rustls has no external PSK mode, so TLS would need a CA and
//! certificates for every lab pair. QEMU offers either for migration.
//!
//! Handshake messages travel as `u16 length (big-endian) | message`, at most
//! [`MAX_HANDSHAKE_MESSAGE`] bytes: before authentication a peer can make us
//! buffer no more than that.

use std::sync::Arc;

use snow::{Builder, StatelessTransportState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::Secret;

/// The Noise protocol of the link.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Bound to the transcript: a peer of another protocol or version fails.
const PROLOGUE: &[u8] = b"castor link v2";
/// Largest handshake message accepted (both are 48 bytes).
pub const MAX_HANDSHAKE_MESSAGE: usize = 256;

/// Errors of the link handshake.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the peer does not hold the shared secret (its handshake did not authenticate)")]
    Unauthenticated,
    #[error("not a castor handshake: a message of {0} bytes")]
    NotAHandshake(usize),
    #[error("the connection closed during the handshake")]
    Closed,
    #[error("handshake I/O: {0}")]
    Io(String),
    #[error("noise: {0}")]
    Noise(String),
}

impl From<std::io::Error> for LinkError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::UnexpectedEof => LinkError::Closed,
            _ => LinkError::Io(e.to_string()),
        }
    }
}

/// The transport keys of one connection, both directions. Not `Clone`:
/// [`Transport::split`] makes the one [`SealKey`] of this side's sending
/// direction, so two sealers can never use one nonce twice under one key.
#[derive(Debug)]
pub struct Transport(StatelessTransportState);

/// This side's sending key: the only thing that seals with it. Not `Clone`
/// (a second sealer would reuse its nonces: AES-GCM's keystream twice and
/// its authentication key given away).
///
/// ```compile_fail
/// fn copies<T: Clone>() {}
/// copies::<common::link::SealKey>();
/// ```
#[derive(Debug)]
pub struct SealKey(Arc<StatelessTransportState>);

/// This side's receiving key: opening twice is harmless, so it may be cloned.
///
/// ```
/// fn copies<T: Clone>() {}
/// copies::<common::link::OpenKey>();
/// ```
#[derive(Debug, Clone)]
pub struct OpenKey(Arc<StatelessTransportState>);

impl Transport {
    /// The sending and receiving halves (each uses its own key and nonces).
    pub fn split(self) -> (SealKey, OpenKey) {
        let t = Arc::new(self.0);
        (SealKey(t.clone()), OpenKey(t))
    }
}

impl SealKey {
    /// Seals `plain` under record nonce `nonce` into `out` (its length
    /// plus the 16-byte tag); the caller never repeats a nonce.
    pub fn seal(&self, nonce: u64, plain: &[u8], out: &mut [u8]) -> Result<usize, LinkError> {
        self.0.write_message(nonce, plain, out).map_err(noise)
    }
}

impl OpenKey {
    /// Opens a record sealed by the peer under `nonce`; an error when it
    /// does not authenticate.
    pub fn open(&self, nonce: u64, sealed: &[u8], out: &mut [u8]) -> Result<usize, LinkError> {
        self.0.read_message(nonce, sealed, out).map_err(|_| LinkError::Unauthenticated)
    }
}

fn builder_psk(secret: &Secret) -> zeroize::Zeroizing<[u8; 32]> {
    zeroize::Zeroizing::new(secret.mac(&[b"castor link psk v2"]))
}

fn noise(e: snow::Error) -> LinkError {
    LinkError::Noise(e.to_string())
}

async fn write_msg<W: AsyncWriteExt + Unpin>(w: &mut W, m: &[u8]) -> Result<(), LinkError> {
    let len = u16::try_from(m.len()).map_err(|_| LinkError::NotAHandshake(m.len()))?;
    let mut b = Vec::with_capacity(2 + m.len());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(m);
    w.write_all(&b).await?;
    w.flush().await?;
    Ok(())
}

async fn read_msg<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<Vec<u8>, LinkError> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    let n = u16::from_be_bytes(len) as usize;
    if n > MAX_HANDSHAKE_MESSAGE {
        return Err(LinkError::NotAHandshake(n));
    }
    let mut m = vec![0u8; n];
    r.read_exact(&mut m).await?;
    Ok(m)
}

/// The handshake state of one side, keyed by the secret.
fn handshake_state(secret: &Secret, initiator: bool) -> Result<snow::HandshakeState, LinkError> {
    let psk = builder_psk(secret);
    let b = Builder::new(NOISE_PARAMS.parse().map_err(noise)?)
        .psk(0, &psk)
        .map_err(noise)?
        .prologue(PROLOGUE)
        .map_err(noise)?;
    if initiator { b.build_initiator() } else { b.build_responder() }.map_err(noise)
}

fn transport(hs: snow::HandshakeState) -> Result<Transport, LinkError> {
    Ok(Transport(hs.into_stateless_transport_mode().map_err(noise)?))
}

/// The primary's side: it dialed, it starts.
pub async fn initiate<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    s: &mut S,
    secret: &Secret,
) -> Result<Transport, LinkError> {
    let mut hs = handshake_state(secret, true)?;
    let mut buf = [0u8; MAX_HANDSHAKE_MESSAGE];
    let n = hs.write_message(&[], &mut buf).map_err(noise)?;
    write_msg(s, &buf[..n]).await?;
    let m = read_msg(s).await?;
    let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];
    hs.read_message(&m, &mut payload).map_err(|_| LinkError::Unauthenticated)?;
    transport(hs)
}

/// The secondary's side.
pub async fn respond<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    s: &mut S,
    secret: &Secret,
) -> Result<Transport, LinkError> {
    let mut hs = handshake_state(secret, false)?;
    let m = read_msg(s).await?;
    let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];
    hs.read_message(&m, &mut payload).map_err(|_| LinkError::Unauthenticated)?;
    let mut buf = [0u8; MAX_HANDSHAKE_MESSAGE];
    let n = hs.write_message(&[], &mut buf).map_err(noise)?;
    write_msg(s, &buf[..n]).await?;
    transport(hs)
}

/// Both ends of a link made in memory (tests, benches, fuzzing):
/// (initiator, responder).
pub fn pair(secret: &Secret) -> Result<(Transport, Transport), LinkError> {
    let (mut i, mut r) = (handshake_state(secret, true)?, handshake_state(secret, false)?);
    let (mut m, mut p) = ([0u8; MAX_HANDSHAKE_MESSAGE], [0u8; MAX_HANDSHAKE_MESSAGE]);
    let n = i.write_message(&[], &mut m).map_err(noise)?;
    r.read_message(&m[..n], &mut p).map_err(|_| LinkError::Unauthenticated)?;
    let n = r.write_message(&[], &mut m).map_err(noise)?;
    i.read_message(&m[..n], &mut p).map_err(|_| LinkError::Unauthenticated)?;
    Ok((transport(i)?, transport(r)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::generate().expect("secret")
    }

    #[tokio::test]
    async fn both_sides_agree_only_with_the_same_secret() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let s = secret();
        let (i, r) = tokio::join!(initiate(&mut a, &s), respond(&mut b, &s));
        let ((i, i_open), (_, r)) = (i.expect("initiator").split(), r.expect("responder").split());
        let mut c = [0u8; 64];
        let n = i.seal(0, b"hello", &mut c).expect("seal");
        let mut p = [0u8; 64];
        let m = r.open(0, &c[..n], &mut p).expect("open");
        assert_eq!(&p[..m], b"hello");
        // a frame reflected back to its sender does not open
        assert!(i_open.open(0, &c[..n], &mut p).is_err());
        // nor under another nonce
        assert!(r.open(1, &c[..n], &mut p).is_err());

        let (mut a, mut b) = tokio::io::duplex(4096);
        let other = secret();
        // the responder hangs up on failure, as the receiver does
        let responder = async move {
            let r = respond(&mut b, &s).await;
            drop(b);
            r
        };
        let (i, r) = tokio::join!(initiate(&mut a, &other), responder);
        assert!(matches!(r, Err(LinkError::Unauthenticated)), "{r:?}");
        assert!(i.is_err());
    }

    #[tokio::test]
    async fn garbage_before_the_handshake_is_refused_without_buffering_it() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let s = secret();
        a.write_all(b"CSTR\x01\x00\x01\x00garbage").await.expect("write");
        let r = respond(&mut b, &s).await;
        assert!(matches!(r, Err(LinkError::NotAHandshake(n)) if n > MAX_HANDSHAKE_MESSAGE), "{r:?}");
    }
}
