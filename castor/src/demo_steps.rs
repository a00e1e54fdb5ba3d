//! The steps both demos (the kv guest's and the networked guest's) share:
//! the set-up (key, witness, secondary), the partition's relay, the wait for
//! protection, the fault, the operator's `castor unprotect`, and which node
//! serves.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use runtime::harness::NodeProc;
use runtime::proxy::{Fault, Proxy};
use serde_json::Value;

use super::{node_args, start_node, DemoArgs, DemoError, Scenario};

/// What both demos set up first: the link key, the witness (unless
/// `--no-witness`), and the secondary.
pub(super) struct Setup {
    pub(super) secret: PathBuf,
    pub(super) etcd: Option<witness::server::Etcd>,
}

impl Setup {
    /// Makes the key and the witness and starts the secondary (with
    /// `extra` arguments); returns it and its replication address.
    pub(super) fn start(
        a: &DemoArgs,
        dir: &Path,
        live: &dyn Fn(String),
        extra: Vec<String>,
    ) -> Result<(Setup, NodeProc, std::net::SocketAddr), DemoError> {
        let secret = dir.join("secret");
        common::auth::generate_secret_file(&secret, true).map_err(|e| DemoError::Setup(e.to_string()))?;
        let etcd = if a.no_witness {
            None
        } else {
            let e = witness::server::Etcd::start(&dir.join("etcd"))
                .map_err(|e| DemoError::Setup(format!("{e} (or run the demo with --no-witness)")))?;
            live(format!("witness: etcd {} (pid {}) on loopback", e.url, e.pid()));
            Some(e)
        };
        let setup = Setup { secret, etcd };
        let mut sargs: Vec<String> =
            vec!["secondary".into(), "--listen".into(), "127.0.0.1:0".into(), "--name".into(), "node-b".into()];
        sargs.extend(setup.common(a));
        sargs.extend(extra);
        let secondary = start_node("secondary", &sargs, dir)?;
        let repl =
            secondary.listen.ok_or_else(|| DemoError::Node("the secondary reported no replication address".into()))?;
        Ok((setup, secondary, repl))
    }

    /// The arguments both nodes take.
    pub(super) fn common(&self, a: &DemoArgs) -> Vec<String> {
        let mut v = node_args(None, &self.secret);
        if let Some(e) = &self.etcd {
            v.extend(["--witness".into(), e.url.clone(), "--vm-id".into(), "demo".into()]);
        }
        v.extend([
            "--epoch-ms".into(),
            a.epoch_ms.to_string(),
            "--heartbeat-timeout-ms".into(),
            a.heartbeat_ms().to_string(),
            "--tracker".into(),
            a.tracker.name().into(),
        ]);
        v
    }
}

/// For a partition the primary reaches its secondary through the fault
/// proxy (the one the failover tests use), whose blackhole cuts the link
/// both ways with the connections left open (a partition neither answers
/// nor refuses).
pub(super) fn relay_for(
    a: &DemoArgs,
    rt: &tokio::runtime::Runtime,
    repl: std::net::SocketAddr,
) -> Result<Option<Proxy>, DemoError> {
    match a.scenario {
        Scenario::Partition => Ok(Some(rt.block_on(Proxy::start(repl)).map_err(|e| DemoError::Setup(e.to_string()))?)),
        _ => Ok(None),
    }
}

/// Waits until the primary is protected (and, for a switchover with a
/// witness, until the witness records the secondary as caught up: the
/// switchover goes to such a secondary), then says so.
pub(super) fn await_protection(
    mut primary: Option<&mut NodeProc>,
    a: &DemoArgs,
    witness: bool,
    dir: &Path,
    live: &dyn Fn(String),
) -> Result<(), DemoError> {
    let t = Instant::now();
    let status = |p: &Option<&mut NodeProc>| p.as_ref().and_then(|p| p.status());
    while status(&primary).is_none_or(|s| s["protection"] != "protected") {
        if let Some(Ok(Some(st))) = primary.as_mut().map(|p| p.child.try_wait()) {
            return Err(DemoError::Node(format!(
                "the primary exited ({st}); see {}",
                dir.join("primary.log").display()
            )));
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err(DemoError::Node(format!("the primary never became protected; logs in {}", dir.display())));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    live(format!(
        "protected after {:.1}s (initial sync done); scenario {} at t={:.1}s",
        t.elapsed().as_secs_f64(),
        a.scenario.name(),
        a.kill_primary_at.unwrap_or(a.seconds / 2.0)
    ));
    if witness && a.scenario == Scenario::Switchover {
        let t = Instant::now();
        while status(&primary).is_none_or(|s| s["witness"]["sync_recorded"] != true) {
            if t.elapsed() > Duration::from_secs(10) {
                return Err(DemoError::Node("the witness never recorded the secondary as caught up".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// What [`inject`] left to follow.
pub(super) struct Injected {
    pub(super) frozen: bool,
    pub(super) unprotect_at: Option<Instant>,
}

/// The scenario's fault, now (`at`: seconds into the load).
pub(super) fn inject(
    scenario: Scenario,
    at: f64,
    primary: &mut Option<NodeProc>,
    secondary: &NodeProc,
    relay: Option<&Proxy>,
    no_witness: bool,
    live: &dyn Fn(String),
) -> Injected {
    let mut f = Injected { frozen: false, unprotect_at: None };
    match scenario {
        Scenario::KillPrimary => {
            drop(primary.take()); // kill -9 and reap
            live(format!("t={at:.1}s: killed the primary (kill -9)"));
        }
        Scenario::StandbyDies => {
            secondary.freeze();
            f.frozen = true;
            live(format!("t={at:.1}s: froze the secondary for good (SIGSTOP: a host that dies silently)"));
            if no_witness {
                f.unprotect_at = Some(Instant::now() + Duration::from_secs(2));
            }
        }
        Scenario::Partition => {
            if let Some(r) = relay {
                r.set(Fault::Blackhole);
            }
            live(format!("t={at:.1}s: cut the link between the nodes both ways (both still reach etcd)"));
        }
        Scenario::Switchover => {
            let reply = primary.as_ref().and_then(|p| p.command("switchover")).unwrap_or_default();
            live(format!("t={at:.1}s: castor switchover -> {}", reply.trim()));
        }
    }
    f
}

/// Without a witness a primary whose standby died holds: the demo types
/// `castor unprotect` for the operator once `at` has come.
pub(super) fn unprotect_when_due(
    at: &mut Option<Instant>,
    primary: Option<&NodeProc>,
    start: Instant,
    live: &dyn Fn(String),
) {
    if at.is_some_and(|t| Instant::now() >= t) {
        *at = None;
        let reply = primary.and_then(|p| p.command("unprotect")).unwrap_or_default();
        live(format!(
            "t={:.1}s: without a witness the primary holds; as the operator who knows the standby is dead: castor unprotect -> {}",
            start.elapsed().as_secs_f64(),
            reply.trim()
        ));
    }
}

/// The status of the node that serves now: a primary (or promoted node)
/// that is neither fenced, holding, nor handed over. (A frozen secondary is
/// not asked: its control socket accepts and never answers.)
pub(super) fn serving(primary: Option<&NodeProc>, secondary: Option<&NodeProc>) -> Option<Value> {
    let serves = |s: &Value| {
        s["role"] == "primary" && !matches!(s["protection"].as_str(), Some("fenced" | "holding" | "handed-over"))
    };
    primary.and_then(NodeProc::status).filter(serves).or_else(|| secondary.and_then(NodeProc::status).filter(serves))
}
