//! Real castor nodes as child processes.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{castor_bin, free_addr};

/// Options shared by the nodes of a test.
#[derive(Debug, Clone)]
pub struct NodeOpts {
    pub epoch_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub fence_grace_ms: u64,
    pub verify_digest: bool,
    pub tracker: &'static str,
    pub ring_entries: u32,
    pub mem: &'static str,
    pub vcpus: u32,
    pub extra: Vec<String>,
    /// Extra environment (crash points).
    pub env: Vec<(String, String)>,
}

impl Default for NodeOpts {
    fn default() -> Self {
        NodeOpts {
            epoch_ms: 10,
            heartbeat_timeout_ms: 250,
            fence_grace_ms: 500,
            verify_digest: false,
            tracker: "ring",
            ring_entries: 65536,
            mem: "128M",
            vcpus: 2,
            extra: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// One castor process.
#[derive(Debug)]
pub struct NodeProc {
    pub name: String,
    pub child: Child,
    pub control: SocketAddr,
    pub service: SocketAddr,
    /// Replication listen address (secondaries).
    pub listen: Option<SocketAddr>,
    pub log: PathBuf,
}

impl NodeProc {
    /// The node's status JSON, if it answers.
    pub fn status(&self) -> Option<Value> {
        let mut s = std::net::TcpStream::connect_timeout(&self.control, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"status\n").ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        serde_json::from_str(&line).ok()
    }

    /// Sends a control command.
    pub fn command(&self, cmd: &str) -> Option<String> {
        let mut s = std::net::TcpStream::connect_timeout(&self.control, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{cmd}\n").as_bytes()).ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        Some(line)
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Exit code if the process has ended within `t`.
    pub fn wait_exit(&mut self, t: Duration) -> Option<i32> {
        let end = Instant::now() + t;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of its log (for failure messages).
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Waits until the status satisfies `f`.
    pub fn wait_status(&self, t: Duration, f: impl Fn(&Value) -> bool) -> Option<Value> {
        let end = Instant::now() + t;
        while Instant::now() < end {
            if let Some(s) = self.status() {
                if f(&s) {
                    return Some(s);
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        None
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
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
        std::fs::write(&secret, format!("failover-test-secret-{}-{test}", std::process::id())).expect("secret");
        Cluster { dir, secret }
    }

    /// Where released responses are logged (one file for all nodes: G3).
    pub fn release_log(&self) -> PathBuf {
        self.dir.join("released.log")
    }

    fn common(&self, o: &NodeOpts, name: &str, service: SocketAddr, control: SocketAddr) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--name".into(),
            name.into(),
            "--secret-file".into(),
            self.secret.display().to_string(),
            "--service-listen".into(),
            service.to_string(),
            "--control".into(),
            control.to_string(),
            "--epoch-ms".into(),
            o.epoch_ms.to_string(),
            "--heartbeat-timeout-ms".into(),
            o.heartbeat_timeout_ms.to_string(),
            "--fence-grace-ms".into(),
            o.fence_grace_ms.to_string(),
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
        v.extend(o.extra.iter().cloned());
        v
    }

    fn spawn(&self, name: &str, args: Vec<String>, o: &NodeOpts) -> (Child, PathBuf) {
        let log = self.dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).expect("log");
        let f2 = f.try_clone().expect("log");
        let mut cmd = Command::new(castor_bin());
        cmd.args(&args).env("CASTOR_LOG", "info").stdin(Stdio::null()).stdout(f).stderr(f2);
        for (k, v) in &o.env {
            cmd.env(k, v);
        }
        (cmd.spawn().expect("spawn castor"), log)
    }

    /// Addresses for a node started later: (listen, service, control).
    pub fn plan() -> (SocketAddr, SocketAddr, SocketAddr) {
        (free_addr(), free_addr(), free_addr())
    }

    /// Starts a secondary (optionally joining a primary's listen address).
    pub fn secondary(&self, name: &str, o: &NodeOpts, join: Option<SocketAddr>) -> NodeProc {
        self.secondary_at(name, o, join, Self::plan())
    }

    /// Starts a secondary on planned addresses.
    pub fn secondary_at(
        &self,
        name: &str,
        o: &NodeOpts,
        join: Option<SocketAddr>,
        (listen, service, control): (SocketAddr, SocketAddr, SocketAddr),
    ) -> NodeProc {
        let mut args: Vec<String> = vec!["secondary".into(), "--listen".into(), listen.to_string()];
        if let Some(j) = join {
            args.push("--join".into());
            args.push(j.to_string());
        }
        args.extend(self.common(o, name, service, control));
        let (child, log) = self.spawn(name, args, o);
        let n = NodeProc { name: name.into(), child, control, service, listen: Some(listen), log };
        n.wait_status(Duration::from_secs(10), |_| true)
            .unwrap_or_else(|| panic!("{name} did not start:\n{}", n.log_tail()));
        n
    }

    /// Starts a kv primary protected by the secondary at `peer`.
    pub fn primary(&self, name: &str, o: &NodeOpts, peer: SocketAddr) -> NodeProc {
        let (service, control) = (free_addr(), free_addr());
        let mut args: Vec<String> = vec![
            "primary".into(),
            "--peer".into(),
            peer.to_string(),
            "--guest".into(),
            "kv".into(),
            "--mem".into(),
            o.mem.into(),
            "--vcpus".into(),
            o.vcpus.to_string(),
        ];
        args.extend(self.common(o, name, service, control));
        let (child, log) = self.spawn(name, args, o);
        NodeProc { name: name.into(), child, control, service, listen: None, log }
    }

    /// Starts a primary process without waiting for it (returns the child).
    pub fn raw(&self, name: &str, args: Vec<String>, o: &NodeOpts) -> (Child, PathBuf) {
        self.spawn(name, args, o)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
