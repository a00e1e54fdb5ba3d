//! Listeners and the ready file.
//!
//! A node binds every listener it has when it starts (port 0 is allowed)
//! and, once all are bound, reports the bound addresses in its ready file:
//! one JSON object, written to a temporary name and renamed, so a reader
//! sees all of it or nothing. Whoever starts a node waits for that file
//! instead of choosing free ports itself (a port found free and passed on
//! can be taken in between, by anyone).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::control::{ControlAddr, ControlListener, SocketFile};

/// Errors of binding and reporting.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {err}")]
    Bind { addr: SocketAddr, err: std::io::Error },
    #[error("cannot write the ready file {path}: {err}")]
    Ready { path: PathBuf, err: std::io::Error },
    #[error("control socket {path}: {err}")]
    ControlSocket { path: PathBuf, err: std::io::Error },
    #[error("control socket {0}: another node listens there")]
    ControlInUse(PathBuf),
    #[error("control socket {0}: the path exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("--control {0} (TCP) needs --control-token FILE")]
    NeedsToken(ControlAddr),
    #[error("--control-token is only for a TCP control address (tcp:HOST:PORT)")]
    TokenWithoutTcp,
    #[error("control token: {0}")]
    Token(#[from] common::auth::AuthError),
}

/// Binds a listener with a clear error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    TcpListener::bind(addr).await.map_err(|err| ListenError::Bind { addr, err })
}

/// Binds `addr` if given.
pub async fn bind_opt(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, ListenError> {
    match addr {
        Some(a) => Ok(Some(bind(a).await?)),
        None => Ok(None),
    }
}

fn local(l: &Option<TcpListener>) -> Option<SocketAddr> {
    l.as_ref().and_then(|l| l.local_addr().ok())
}

/// Binds the control API at `addr`: a Unix socket made 0600 (a stale socket
/// nobody listens on is replaced; a live one is an error), or TCP with the
/// bearer token read from `token` (required for TCP, refused otherwise).
pub async fn bind_control(addr: &ControlAddr, token: Option<&Path>) -> Result<ControlListener, ListenError> {
    match addr {
        ControlAddr::Tcp(a) => {
            let token = token.ok_or_else(|| ListenError::NeedsToken(addr.clone()))?;
            let token = std::sync::Arc::new(common::auth::Secret::token_from_file(token)?);
            Ok(ControlListener::Tcp { listener: bind(*a).await?, token })
        }
        ControlAddr::Unix(path) => {
            use std::os::unix::fs::{FileTypeExt, PermissionsExt};
            if token.is_some() {
                return Err(ListenError::TokenWithoutTcp);
            }
            let err = |err| ListenError::ControlSocket { path: path.clone(), err };
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if !m.file_type().is_socket() {
                    return Err(ListenError::NotASocket(path.clone()));
                }
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ListenError::ControlInUse(path.clone()));
                }
                // left by a node that is gone
                std::fs::remove_file(path).map_err(err)?;
            }
            let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
            let socket = SocketFile(path.clone());
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
            // the uid peers must have: this process's own, not the owner
            // read back from the path (someone could swap the path between
            // the bind and that read)
            let uid = effective_uid();
            Ok(ControlListener::Unix { listener, socket, uid })
        }
    }
}

/// This process's effective uid (the owner of what it creates).
fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, touches no memory of ours and
    // cannot fail.
    unsafe { libc::geteuid() }
}

/// Every listener a node has, bound.
#[derive(Debug)]
pub struct Listeners {
    /// Client service (kv).
    pub service: TcpListener,
    /// Replication: a secondary's listen address, a primary's `--listen`.
    pub replication: Option<TcpListener>,
    pub control: Option<ControlListener>,
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds them all, or fails on the first that cannot be bound.
    pub async fn bind(
        service: SocketAddr,
        replication: Option<SocketAddr>,
        control: Option<(&ControlAddr, Option<&Path>)>,
        metrics: Option<SocketAddr>,
    ) -> Result<Listeners, ListenError> {
        let control = match control {
            Some((addr, token)) => Some(bind_control(addr, token).await?),
            None => None,
        };
        Ok(Listeners {
            service: bind(service).await?,
            replication: bind_opt(replication).await?,
            control,
            metrics: bind_opt(metrics).await?,
        })
    }

    /// The bound addresses.
    pub fn ready(&self) -> Ready {
        Ready {
            pid: std::process::id(),
            service: self.service.local_addr().ok(),
            replication: local(&self.replication),
            control: self.control.as_ref().and_then(ControlListener::addr),
            metrics: local(&self.metrics),
        }
    }
}

/// What a ready file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub pid: u32,
    pub service: Option<SocketAddr>,
    pub replication: Option<SocketAddr>,
    pub control: Option<ControlAddr>,
    pub metrics: Option<SocketAddr>,
}

impl Ready {
    /// Writes the ready file atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<(), ListenError> {
        let err = |err| ListenError::Ready { path: path.to_path_buf(), err };
        let body = serde_json::to_vec(self).map_err(|e| err(std::io::Error::other(e)))?;
        crate::state_dir::write_atomic(path, &body, false).map_err(err)
    }

    /// Reads a ready file; `None` while it is not there (or not whole).
    pub fn read(path: &Path) -> Option<Ready> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn port_zero_binds_and_the_ready_file_reports_it() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let dir = std::env::temp_dir().join(format!("castor-ready-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ctl = ControlAddr::Unix(dir.join("node.ctl"));
        let l = Listeners::bind(any, Some(any), Some((&ctl, None)), None).await.unwrap();
        let path = dir.join("node.ready");
        assert_eq!(Ready::read(&path), None);
        l.ready().write(&path).unwrap();
        let r = Ready::read(&path).unwrap();
        assert_eq!(r.service, l.service.local_addr().ok());
        assert_ne!(r.service.unwrap().port(), 0);
        assert_eq!(r.control, Some(ctl.clone()));
        assert_eq!(r.metrics, None);
        // a taken address is a clear error
        let taken = r.service.unwrap();
        let e = Listeners::bind(taken, None, None, None).await.unwrap_err();
        assert!(e.to_string().contains(&taken.to_string()), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_control_socket_is_private_and_a_live_one_is_not_taken_over() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("castor-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("n.ctl");
        let ctl = ControlAddr::Unix(path.clone());
        let l = bind_control(&ctl, None).await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // a second node on the same path is refused while the first listens
        assert!(matches!(bind_control(&ctl, None).await, Err(ListenError::ControlInUse(_))));
        drop(l);
        assert!(!path.exists(), "the socket file goes with the listener");
        // a stale socket (its node was killed) is replaced
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        let l = bind_control(&ctl, None).await.unwrap();
        drop(l);
        // not a socket: refused, left alone
        std::fs::write(&path, b"data").unwrap();
        assert!(matches!(bind_control(&ctl, None).await, Err(ListenError::NotASocket(_))));
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        // TCP needs a token, a token needs TCP
        let tcp: ControlAddr = "tcp:127.0.0.1:0".parse().unwrap();
        assert!(matches!(bind_control(&tcp, None).await, Err(ListenError::NeedsToken(_))));
        let token = dir.join("token");
        common::auth::write_secret_file(&token, b"a-token-of-enough-bytes").unwrap();
        assert!(matches!(bind_control(&ctl, Some(&token)).await, Err(ListenError::TokenWithoutTcp)));
        assert!(bind_control(&tcp, Some(&token)).await.is_ok());
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(bind_control(&tcp, Some(&token)).await, Err(ListenError::Token(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Peers of the control socket are checked against this process's
    /// effective uid, not against the owner of whatever the path names
    /// after the bind.
    #[tokio::test]
    async fn the_control_socket_admits_this_process_s_effective_uid() {
        let dir = std::env::temp_dir().join(format!("castor-ctl-uid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let l = bind_control(&ControlAddr::Unix(dir.join("u.ctl")), None).await.unwrap();
        // SAFETY: geteuid takes no arguments and cannot fail.
        let euid = unsafe { libc::geteuid() };
        match &l {
            ControlListener::Unix { uid, .. } => assert_eq!(*uid, euid),
            other => panic!("not a Unix listener: {other:?}"),
        }
        drop(l);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
