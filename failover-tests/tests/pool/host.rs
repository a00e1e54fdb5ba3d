//! The pool tests' hosts (`castor agent` processes) and helpers.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use failover_tests::castor_bin;
use std::net::SocketAddr;

use failover_tests::cluster::Cluster;
use failover_tests::load::{split_brain, Load, Verdict};
use witness::pool::store::Store;
use witness::pool::View;

pub const T: Duration = Duration::from_secs(60);

/// One host: a `castor agent` in a process group of its own, so that
/// killing the group kills the agent and every node it started.
pub struct Host {
    pub name: String,
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl Host {
    pub fn start(c: &Cluster, etcd: &str, name: &str, capacity: u32) -> Host {
        Host::start_with(c, etcd, name, capacity, &[])
    }

    /// As [`Host::start`], with more agent options.
    pub fn start_with(c: &Cluster, etcd: &str, name: &str, capacity: u32, extra: &[String]) -> Host {
        let dir = c.dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = c.dir.join(format!("agent-{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(castor_bin())
            .args(["agent", "--witness", etcd, "--host", name, "--capacity", &capacity.to_string()])
            .args(["--state-dir", &dir.display().to_string(), "--secret-file", &c.secret.display().to_string()])
            .args(["--lease-ttl-s", "2", "--poll-ms", "100"])
            .arg("--node-arg=--heartbeat-timeout-ms=250")
            .arg("--node-arg=--epoch-ms=10")
            .arg(format!("--node-arg=--release-log={}", c.release_log().display()))
            .args(extra)
            .env("CASTOR_LOG", std::env::var("FAILOVER_NODE_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .process_group(0)
            .spawn()
            .expect("castor agent");
        Host { name: name.into(), child, log }
    }

    /// Signals the agent and every node it started (its process group).
    pub fn signal_all(&self, sig: i32) {
        // SAFETY: kill(2) takes no pointers; the group is our child's, which
        // we have not reaped (its id cannot be reused meanwhile).
        unsafe {
            libc::kill(-(self.child.id() as i32), sig);
        }
    }

    /// kill -9 of the agent alone (its nodes run on, orphaned).
    pub fn kill_agent(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// kill -9 of the agent and of every node it started (a host dies).
    pub fn kill_all(&mut self) {
        self.signal_all(libc::SIGCONT);
        self.signal_all(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// The processes of its group other than the agent (its nodes).
    pub fn nodes(&self) -> Vec<u32> {
        group_nodes(self.child.id())
    }

    pub fn log_tail(&self) -> String {
        runtime::harness::tail(&self.log, 30)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The processes of the group led by `agent` other than itself.
pub fn group_nodes(agent: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        // SAFETY: getpgid(2) takes no pointers.
        if pid != agent && unsafe { libc::getpgid(pid as i32) } == agent as i32 {
            v.push(pid);
        }
    }
    v
}

pub fn read(rt: &tokio::runtime::Runtime, s: &Store) -> View {
    rt.block_on(s.read()).expect("reading the pool")
}

/// Waits until `f` holds for the pool's view.
pub fn wait_view(rt: &tokio::runtime::Runtime, s: &Store, t: Duration, f: impl Fn(&View) -> bool) -> Option<View> {
    let end = Instant::now() + t;
    while Instant::now() < end {
        if let Ok(v) = rt.block_on(s.read()) {
            if f(&v) {
                return Some(v);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

pub fn castor(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(castor_bin()).args(args).output().expect("castor");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

pub fn logs(hosts: &[Host], dir: &Path) -> String {
    let mut s = String::new();
    for h in hosts {
        s += &format!("--- agent {} ---\n{}\n", h.name, h.log_tail());
    }
    s += &format!("(node logs under {})", dir.display());
    s
}

pub fn vm_list(etcd: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = castor(&["vm", "list", "--witness", etcd, "--json"]);
    assert_eq!(code, 0, "vm list: {err}");
    serde_json::from_str::<serde_json::Value>(out.trim()).expect("vm list --json").as_array().cloned().unwrap()
}

/// A runtime for the test's own etcd calls and a pool store on `urls`.
pub fn connect(urls: &str) -> (tokio::runtime::Runtime, Store) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let store = rt.block_on(Store::connect(urls, Duration::from_millis(500))).unwrap();
    (rt, store)
}

/// Ends `load` against `survivor` and checks that nothing acknowledged was
/// lost or applied twice; `what` names the VM in the line it prints.
pub fn nothing_lost(rt: &tokio::runtime::Runtime, load: Load, survivor: SocketAddr, what: &str) -> Verdict {
    let verdict = load.finish(rt, survivor);
    eprintln!("{what}acked {}, lost {}, duplicated {}", verdict.acked, verdict.lost, verdict.duplicated);
    assert_eq!((verdict.lost, verdict.duplicated), (0, 0), "{what}nothing acknowledged lost or applied twice");
    verdict
}

/// No generation's responses were released by two nodes.
pub fn no_split_brain(c: &Cluster) {
    let sb = split_brain(&c.release_log());
    assert!(sb.is_empty(), "generations released by two nodes: {sb:?}");
}
