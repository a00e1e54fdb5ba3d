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

/// Errors of binding and reporting.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {err}")]
    Bind { addr: SocketAddr, err: std::io::Error },
    #[error("cannot write the ready file {path}: {err}")]
    Ready { path: PathBuf, err: std::io::Error },
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

/// Every listener a node has, bound.
#[derive(Debug)]
pub struct Listeners {
    /// Client service (kv).
    pub service: TcpListener,
    /// Replication: a secondary's listen address, a primary's `--listen`.
    pub replication: Option<TcpListener>,
    pub control: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds them all, or fails on the first that cannot be bound.
    pub async fn bind(
        service: SocketAddr,
        replication: Option<SocketAddr>,
        control: Option<SocketAddr>,
        metrics: Option<SocketAddr>,
    ) -> Result<Listeners, ListenError> {
        Ok(Listeners {
            service: bind(service).await?,
            replication: bind_opt(replication).await?,
            control: bind_opt(control).await?,
            metrics: bind_opt(metrics).await?,
        })
    }

    /// The bound addresses.
    pub fn ready(&self) -> Ready {
        Ready {
            pid: std::process::id(),
            service: self.service.local_addr().ok(),
            replication: local(&self.replication),
            control: local(&self.control),
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
    pub control: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
}

impl Ready {
    /// Writes the ready file atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<(), ListenError> {
        let err = |err| ListenError::Ready { path: path.to_path_buf(), err };
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let body = serde_json::to_vec(self).map_err(|e| err(std::io::Error::other(e)))?;
        std::fs::write(&tmp, body).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
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
        let l = Listeners::bind(any, Some(any), Some(any), None).await.unwrap();
        let dir = std::env::temp_dir().join(format!("castor-ready-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.ready");
        assert_eq!(Ready::read(&path), None);
        l.ready().write(&path).unwrap();
        let r = Ready::read(&path).unwrap();
        assert_eq!(r.service, l.service.local_addr().ok());
        assert_ne!(r.service.unwrap().port(), 0);
        assert_ne!(r.replication, r.control);
        assert_eq!(r.metrics, None);
        // a taken address is a clear error
        let taken = r.service.unwrap();
        let e = Listeners::bind(taken, None, None, None).await.unwrap_err();
        assert!(e.to_string().contains(&taken.to_string()), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
