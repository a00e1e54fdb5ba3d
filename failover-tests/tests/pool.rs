//! The pool of hosts (issue 31), end to end: a real etcd, three real
//! `castor agent` processes (each a "host" with its own directory and its
//! own process group), one kv VM created with `castor vm create`, a
//! recorded client load. A host dies (kill -9 of its agent and every node
//! it runs): the witness fails the VM over, the agents re-protect it on
//! the remaining host, nothing acknowledged is lost.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use failover_tests::cluster::Cluster;
use failover_tests::load::{split_brain, Load};
use failover_tests::{castor_bin, serial};
use witness::pool::store::Store;
use witness::pool::{protection, Protection, View};

const T: Duration = Duration::from_secs(60);

/// One host: a `castor agent` in a process group of its own, so that
/// killing the group kills the agent and every node it started.
struct Host {
    name: String,
    child: Child,
    log: std::path::PathBuf,
}

impl Host {
    fn start(c: &Cluster, etcd: &str, name: &str, capacity: u32) -> Host {
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
            .env("CASTOR_LOG", std::env::var("FAILOVER_NODE_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .process_group(0)
            .spawn()
            .expect("castor agent");
        Host { name: name.into(), child, log }
    }

    /// kill -9 of the agent and of every node it started (a host dies).
    fn kill_all(&mut self) {
        // SAFETY: kill(2) takes no pointers; the group is our child's, which
        // we have not reaped (its id cannot be reused meanwhile).
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        runtime::harness::tail(&self.log, 30)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn read(rt: &tokio::runtime::Runtime, s: &Store) -> View {
    rt.block_on(s.read()).expect("reading the pool")
}

/// Waits until `f` holds for the pool's view.
fn wait_view(rt: &tokio::runtime::Runtime, s: &Store, t: Duration, f: impl Fn(&View) -> bool) -> Option<View> {
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

fn castor(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(castor_bin()).args(args).output().expect("castor");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn logs(hosts: &[Host], dir: &Path) -> String {
    let mut s = String::new();
    for h in hosts {
        s += &format!("--- agent {} ---\n{}\n", h.name, h.log_tail());
    }
    s += &format!("(node logs under {})", dir.display());
    s
}

#[test]
fn a_host_dies_its_vm_is_served_by_the_witness_and_reprotected_on_the_remaining_host() {
    let _g = serial();
    let c = Cluster::new("pool-host-dies");
    let etcd = c.etcd();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let store = rt.block_on(Store::connect(&etcd.url, Duration::from_millis(500))).unwrap();
    let mut hosts: Vec<Host> = ["h1", "h2", "h3"].iter().map(|n| Host::start(&c, &etcd.url, n, 2)).collect();
    assert!(
        wait_view(&rt, &store, T, |v| v.hosts.len() == 3).is_some(),
        "three hosts registered:\n{}",
        logs(&hosts, &c.dir)
    );

    let (code, out, err) = castor(&["vm", "create", "vm1", "--witness", &etcd.url, "--mem", "128M"]);
    assert_eq!(code, 0, "vm create: {out}{err}");
    let (code, _, err) = castor(&["vm", "create", "vm1", "--witness", &etcd.url]);
    assert_eq!(code, 8, "a second create is refused: {err}");

    let t0 = Instant::now();
    let Some(v) = wait_view(&rt, &store, T, |v| protection(v, "vm1") == Protection::Protected) else {
        panic!("vm1 never protected: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    let p = v.placement["vm1"].clone();
    let (pr, se) = (p.primary.clone().unwrap(), p.secondary.clone().unwrap());
    assert_ne!(pr.host, se.host, "anti-affinity");
    eprintln!(
        "vm1 protected {:.1} s after create: primary on {}, secondary on {}",
        t0.elapsed().as_secs_f64(),
        pr.host,
        se.host
    );
    let (_, list, _) = castor(&["vm", "list", "--witness", &etcd.url]);
    eprint!("{list}");

    let load = Load::start(&rt, vec![pr.service.unwrap(), se.service.unwrap()], 4, 16, 1);
    assert!(load.wait_more(200, T), "the load runs");

    // the primary's host dies: its agent and every node it runs, kill -9
    let dead = hosts.iter().position(|h| h.name == pr.host).unwrap();
    let acked_before = load.acked();
    let killed = Instant::now();
    hosts[dead].kill_all();
    eprintln!("killed host {} (its agent and its nodes) with {acked_before} writes acknowledged", pr.host);

    // served again: the witness promoted the secondary (term 2) and clients carry on
    let mut served = None;
    while killed.elapsed() < T {
        if load.acked() > acked_before + 10 {
            served = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let Some(served) = served else { panic!("vm1 not served again:\n{}", logs(&hosts, &c.dir)) };
    let third = ["h1", "h2", "h3"].into_iter().find(|h| *h != pr.host && *h != se.host).unwrap();
    // re-protected: the promoted node is the placed primary on the old
    // secondary's host, a new secondary on the third host is caught up
    let Some(v) = wait_view(&rt, &store, T, |v| {
        let p = v.placement.get("vm1").cloned().unwrap_or_default();
        protection(v, "vm1") == Protection::Protected
            && p.primary.as_ref().is_some_and(|x| x.host == se.host)
            && p.secondary.as_ref().is_some_and(|x| x.host == third)
    }) else {
        panic!("vm1 not re-protected: {:?}\n{}", read(&rt, &store), logs(&hosts, &c.dir));
    };
    let reprotected = killed.elapsed();
    let w = v.witness["vm1"].clone();
    assert_eq!(w.term, 2, "one promotion, by the witness");
    eprintln!(
        "host {} died: vm1 served again after {:.0} ms (first acks on the new primary), re-protected on {} after {:.0} ms (term {})",
        pr.host,
        served.as_secs_f64() * 1e3,
        third,
        reprotected.as_secs_f64() * 1e3,
        w.term
    );
    let (_, list, _) = castor(&["vm", "list", "--witness", &etcd.url]);
    eprint!("{list}");
    // the dead host's registration ends with its lease
    assert!(
        wait_view(&rt, &store, Duration::from_secs(10), |v| !v.hosts.contains_key(&pr.host)).is_some(),
        "the dead host's lease expired"
    );

    let new_sec = v.placement["vm1"].secondary.clone().unwrap();
    load.add_node(new_sec.service.unwrap());
    assert!(load.wait_more(200, T), "clients carry on, protected again");
    let verdict = load.finish(&rt, v.placement["vm1"].primary.clone().unwrap().service.unwrap());
    eprintln!(
        "acked {} writes, {} keys checked, lost {}, duplicated {}, longest gap {:.0} ms",
        verdict.acked,
        verdict.keys_checked,
        verdict.lost,
        verdict.duplicated,
        verdict.max_gap.as_secs_f64() * 1e3
    );
    assert_eq!((verdict.lost, verdict.duplicated), (0, 0), "nothing acknowledged lost or applied twice");
    assert!(verdict.keys_checked > 0);
    let sb = split_brain(&c.release_log());
    assert!(sb.is_empty(), "generations released by two nodes: {sb:?}");

    // delete: the agents stop its nodes; its history is cleared
    let (code, out, err) = castor(&["vm", "delete", "vm1", "--witness", &etcd.url, "--wait-s", "30"]);
    assert_eq!(code, 0, "vm delete: {out}{err}\n{}", logs(&hosts, &c.dir));
    let v = read(&rt, &store);
    assert!(v.placement.is_empty() && v.witness.is_empty(), "nothing left of vm1: {v:?}");
    assert!(v.slots.values().all(|s| s.is_empty()), "every slot given back: {:?}", v.slots);
    drop(hosts);
}
