//! The one process harness: starts castor nodes as child processes and
//! supervises them (castor demo, castor bench and the failover suite all use
//! it).
//!
//! A node is started with `--ready-file`; the harness waits until the node
//! has bound its listeners (any may be port 0) and reads their addresses
//! from that file. No port is ever chosen here and handed to a process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::control::ask;
use crate::listen::Ready;

/// An exit status as a person reads it.
pub fn exit_text(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exit code {c}"),
        None => "killed by a signal".into(),
    }
}

/// What [`NodeProc::wait_exit`] found, as a person reads it.
pub fn waited_text(w: Option<i32>) -> String {
    match w {
        None => "still running".into(),
        Some(-1) => "killed by a signal".into(),
        Some(c) => format!("exit code {c}"),
    }
}

/// Errors of starting a node.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("cannot start {name}: {err}")]
    Spawn { name: String, err: std::io::Error },
    #[error("{name} exited ({}) before it was ready; its log ends:\n{tail}", exit_text(*.code))]
    Exited { name: String, code: Option<i32>, tail: String },
    #[error("{name} was not ready within {secs} s; its log ends:\n{tail}")]
    NotReady { name: String, secs: u64, tail: String },
    #[error("{name} serves no control API (start it with --control)")]
    NoControl { name: String },
}

/// How long a node may take to bind its listeners (it builds its VM first).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What to start.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The castor binary.
    pub exe: PathBuf,
    pub name: String,
    /// Its arguments (the harness adds `--ready-file`).
    pub args: Vec<String>,
    /// Where its log and ready file go.
    pub dir: PathBuf,
    /// Extra environment (log filter, crash points).
    pub env: Vec<(String, String)>,
}

impl Spec {
    /// Starts the process without waiting for it (for nodes expected to fail
    /// early); stdout and stderr go to `<dir>/<name>.log`.
    pub fn spawn(&self) -> Result<(Child, PathBuf), HarnessError> {
        let err = |err| HarnessError::Spawn { name: self.name.clone(), err };
        let log = self.dir.join(format!("{}.log", self.name));
        let f = std::fs::File::create(&log).map_err(err)?;
        let f2 = f.try_clone().map_err(err)?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args).stdin(Stdio::null()).stdout(f).stderr(f2);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        Ok((cmd.spawn().map_err(err)?, log))
    }

    /// Starts the node and waits until it reports its bound listeners.
    pub fn start(&self) -> Result<NodeProc, HarnessError> {
        let ready_path = self.dir.join(format!("{}.ready", self.name));
        let _ = std::fs::remove_file(&ready_path);
        let mut spec = self.clone();
        spec.args.extend(["--ready-file".into(), ready_path.display().to_string()]);
        let (mut child, log) = spec.spawn()?;
        let end = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(ready) = Ready::read(&ready_path).filter(|r| r.pid == child.id()) {
                let Some(control) = ready.control else {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(HarnessError::NoControl { name: self.name.clone() });
                };
                return Ok(NodeProc {
                    name: self.name.clone(),
                    control,
                    service: ready.service.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
                    listen: ready.replication,
                    metrics: ready.metrics,
                    child,
                    log,
                });
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(HarnessError::Exited { name: self.name.clone(), code: st.code(), tail: tail(&log, 15) });
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HarnessError::NotReady {
                    name: self.name.clone(),
                    secs: READY_TIMEOUT.as_secs(),
                    tail: tail(&log, 15),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The last `n` lines of a log file.
pub fn tail(log: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One running castor node, killed (-9) when dropped.
#[derive(Debug)]
pub struct NodeProc {
    pub name: String,
    pub child: Child,
    pub control: crate::control::ControlAddr,
    pub service: SocketAddr,
    /// Replication listen address (secondaries; primaries with --listen).
    pub listen: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub log: PathBuf,
}

impl NodeProc {
    /// The node's status JSON, if it answers.
    pub fn status(&self) -> Option<Value> {
        serde_json::from_str(&ask(&self.control, "status", None).ok()?.body).ok()
    }

    /// Sends a control command; the JSON reply, applied or refused.
    pub fn command(&self, cmd: &str) -> Option<String> {
        ask(&self.control, cmd, None).ok().map(|a| a.body)
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP: the process neither answers nor refuses (a frozen host).
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGTERM: an orderly stop (a protected primary hands over first).
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// SIGCONT after [`NodeProc::freeze`].
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) takes no pointers; the pid is our own child's,
        // not yet reaped (so not reused).
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
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
        tail(&self.log, 15)
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
        self.thaw();
        self.kill9();
    }
}
