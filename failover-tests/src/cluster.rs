//! Real castor nodes as child processes, started through the one process
//! harness (`runtime::harness`): every node binds its own ports (port 0)
//! and reports them in its ready file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;

pub use runtime::harness::NodeProc;
use runtime::harness::Spec;

use crate::castor_bin;

/// Any free port on loopback, chosen by the node that binds it.
pub const ANY: &str = "127.0.0.1:0";

/// Options shared by the nodes of a test.
#[derive(Debug, Clone)]
pub struct NodeOpts {
    pub epoch_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub verify_digest: bool,
    pub tracker: &'static str,
    pub ring_entries: u32,
    pub mem: &'static str,
    pub vcpus: u32,
    pub extra: Vec<String>,
    /// Extra environment (crash points).
    pub env: Vec<(String, String)>,
    /// The witness's client URLs (`--witness`), with `--vm-id test`.
    pub witness: Option<String>,
    /// Give each node `--state-dir <dir>/<name>.state`.
    pub state_dir: bool,
    /// The primary's guest (`--guest`): kv unless a test needs another.
    pub guest: &'static str,
}

impl Default for NodeOpts {
    fn default() -> Self {
        NodeOpts {
            epoch_ms: 10,
            heartbeat_timeout_ms: 250,
            verify_digest: false,
            tracker: "ring",
            ring_entries: 65536,
            mem: "128M",
            vcpus: 2,
            extra: Vec::new(),
            env: Vec::new(),
            witness: None,
            state_dir: false,
            guest: "kv",
        }
    }
}

/// A directory with a shared secret and the nodes' logs.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    pub secret: PathBuf,
}

impl Cluster {
    pub fn new(test: &str) -> Cluster {
        let dir = std::env::temp_dir().join(format!("castor-ft-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let secret = dir.join("secret");
        common::auth::generate_secret_file(&secret, true).expect("secret");
        Cluster { dir, secret }
    }

    /// A real etcd (Debian's etcd-server) for this test, on loopback.
    pub fn etcd(&self) -> witness::server::Etcd {
        witness::server::Etcd::start(&self.dir.join("etcd")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A real 3-member etcd cluster for this test.
    pub fn etcd_cluster(&self) -> Vec<witness::server::Etcd> {
        witness::server::Etcd::cluster(&self.dir.join("etcd3"), 3).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Where released responses are logged (one file for all nodes: G3).
    pub fn release_log(&self) -> PathBuf {
        self.dir.join("released.log")
    }

    fn common(&self, o: &NodeOpts, name: &str) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--name".into(),
            name.into(),
            "--secret-file".into(),
            self.secret.display().to_string(),
            "--service-listen".into(),
            ANY.into(),
            "--control".into(),
            self.dir.join(format!("{name}.ctl")).display().to_string(),
            "--epoch-ms".into(),
            o.epoch_ms.to_string(),
            "--heartbeat-timeout-ms".into(),
            o.heartbeat_timeout_ms.to_string(),
            "--tracker".into(),
            o.tracker.into(),
            "--ring-entries".into(),
            o.ring_entries.to_string(),
            "--release-log".into(),
            self.release_log().display().to_string(),
        ];
        if o.verify_digest {
            v.push("--verify-digest".into());
        }
        if o.state_dir {
            v.extend(["--state-dir".into(), self.dir.join(format!("{name}.state")).display().to_string()]);
        }
        if let Some(w) = &o.witness {
            v.extend(["--witness".into(), w.clone(), "--vm-id".into(), "test".into()]);
        }
        if o.env.iter().any(|(k, _)| k.starts_with("CASTOR_")) {
            // test hooks act only with this flag
            v.push("--test-hooks".into());
        }
        v.extend(o.extra.iter().cloned());
        v
    }

    fn spec(&self, name: &str, args: Vec<String>, o: &NodeOpts) -> Spec {
        // FAILOVER_NODE_LOG: the nodes' log filter (default info), to debug a scenario
        let level = std::env::var("FAILOVER_NODE_LOG").unwrap_or_else(|_| "info".into());
        let mut env = vec![("CASTOR_LOG".to_string(), level)];
        env.extend(o.env.iter().cloned());
        Spec { exe: castor_bin(), name: name.into(), args, dir: self.dir.clone(), env }
    }

    fn start(&self, name: &str, args: Vec<String>, o: &NodeOpts) -> NodeProc {
        self.spec(name, args, o).start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a secondary (optionally joining a primary's listen address).
    pub fn secondary(&self, name: &str, o: &NodeOpts, join: Option<SocketAddr>) -> NodeProc {
        let mut args: Vec<String> = vec!["secondary".into(), "--listen".into(), ANY.into()];
        if let Some(j) = join {
            args.push("--join".into());
            args.push(j.to_string());
        }
        args.extend(self.common(o, name));
        self.start(name, args, o)
    }

    /// Starts a kv primary protected by the secondary at `peer` (none: it
    /// runs unprotected); `listen`: it also accepts secondaries that join.
    pub fn primary_with(&self, name: &str, o: &NodeOpts, peer: Option<SocketAddr>, listen: bool) -> NodeProc {
        let mut args: Vec<String> = vec![
            "primary".into(),
            "--guest".into(),
            o.guest.into(),
            "--mem".into(),
            o.mem.into(),
            "--vcpus".into(),
            o.vcpus.to_string(),
        ];
        if let Some(p) = peer {
            args.extend(["--peer".into(), p.to_string()]);
        }
        if listen {
            args.extend(["--listen".into(), ANY.into()]);
        }
        args.extend(self.common(o, name));
        self.start(name, args, o)
    }

    /// Starts a kv primary protected by the secondary at `peer`.
    pub fn primary(&self, name: &str, o: &NodeOpts, peer: SocketAddr) -> NodeProc {
        self.primary_with(name, o, Some(peer), false)
    }

    /// Starts a castor process without waiting for it (returns the child).
    pub fn raw(&self, name: &str, args: Vec<String>, o: &NodeOpts) -> (Child, PathBuf) {
        self.spec(name, args, o).spawn().unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // FAILOVER_KEEP=1 keeps every test's logs (to read a failure that
        // did not panic)
        if !std::thread::panicking() && std::env::var_os("FAILOVER_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
