//! `castor demo --pool N`: a pool of N hosts on this machine. A real etcd
//! on loopback, N `castor agent` processes (each a "host": its own state
//! dir, its own process group with the nodes it starts), two kv VMs created
//! in the pool and put under client load through castor's kv client. At
//! `--kill-primary-at` the host holding the most VMs' nodes, a primary
//! among them, dies with everything it runs (kill -9 of its process
//! group); the demo waits until every VM is served again (the witness's
//! promotion, or a primary that runs alone) and protected again (the pool
//! places a new secondary on a host left), then reads each VM's table back
//! and counts acknowledged writes lost or applied twice.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use witness::pool::store::Store;
use witness::pool::{protection, Protection, Role, View, VmSpec};

use super::{read_back, spawn_clients, DemoArgs, DemoError, Load};

/// The demo's VMs.
const VMS: [&str; 2] = ["vm1", "vm2"];
/// The hosts' lease TTL: a dead host's placements are freed after it.
const LEASE_TTL_S: u64 = 2;
/// How long after the kill every VM must be served and protected again.
const BOUND: Duration = Duration::from_secs(30);

/// One host: a `castor agent` leading a process group of its own, in which
/// it starts its nodes; dropped, the whole group is killed.
struct Host {
    name: String,
    child: Child,
    log: PathBuf,
    dead: bool,
}

impl Host {
    fn start(a: &DemoArgs, exe: &Path, url: &str, name: &str, dir: &Path, secret: &Path) -> Result<Host, DemoError> {
        let state = dir.join(name);
        let setup = |e: std::io::Error| DemoError::Setup(format!("host {name}: {e}"));
        std::fs::create_dir_all(&state).map_err(setup)?;
        let log = dir.join(format!("agent-{name}.log"));
        let f = std::fs::File::create(&log).map_err(setup)?;
        let child = Command::new(exe)
            .args(["agent", "--witness", url, "--host", name, "--capacity", &VMS.len().to_string()])
            .arg("--state-dir")
            .arg(&state)
            .arg("--secret-file")
            .arg(secret)
            .args(["--lease-ttl-s", &LEASE_TTL_S.to_string(), "--poll-ms", "100"])
            .arg(format!("--node-arg=--heartbeat-timeout-ms={}", a.heartbeat_ms()))
            .arg(format!("--node-arg=--epoch-ms={}", a.epoch_ms))
            .arg(format!("--node-arg=--tracker={}", a.tracker.name()))
            .env("CASTOR_LOG", std::env::var("CASTOR_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(f.try_clone().map_err(setup)?)
            .stderr(f)
            .process_group(0)
            .spawn()
            .map_err(setup)?;
        Ok(Host { name: name.into(), child, log, dead: false })
    }

    /// kill -9 of the agent and every node it started (its process group).
    fn kill_all(&mut self) {
        if self.dead {
            return;
        }
        // SAFETY: kill(2) takes no pointers; the group is led by our child,
        // not reaped yet, so its id cannot have been reused.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
        self.dead = true;
    }

    fn log_tail(&self) -> String {
        runtime::harness::tail(&self.log, 15)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// What the demo watches while it waits: etcd, its hosts, and Ctrl-C.
struct Pool<'a> {
    rt: &'a tokio::runtime::Runtime,
    store: Store,
    hosts: Vec<Host>,
    interrupted: Arc<AtomicBool>,
}

impl Pool<'_> {
    /// The pool as etcd has it now; fails if the demo was interrupted or a
    /// host that was not killed has stopped.
    fn read(&mut self) -> Result<Option<View>, DemoError> {
        if self.interrupted.load(Ordering::SeqCst) {
            return Err(DemoError::Interrupted);
        }
        for h in self.hosts.iter_mut().filter(|h| !h.dead) {
            if let Ok(Some(st)) = h.child.try_wait() {
                h.dead = true;
                return Err(DemoError::Node(format!("the agent of {} exited ({st}):\n{}", h.name, h.log_tail())));
            }
        }
        Ok(self.rt.block_on(self.store.read()).ok())
    }

    /// Waits up to `t` until `f` holds for the pool's view.
    fn wait(&mut self, t: Duration, what: &str, f: impl Fn(&View) -> bool) -> Result<View, DemoError> {
        let end = Instant::now() + t;
        loop {
            if let Some(v) = self.read()? {
                if f(&v) {
                    return Ok(v);
                }
            }
            if Instant::now() > end {
                return Err(DemoError::Node(format!("{what} within {} s", t.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether `vm` is protected with no node on `dead`.
fn protected_without(v: &View, vm: &str, dead: &str) -> bool {
    let p = v.placement.get(vm).cloned().unwrap_or_default();
    protection(v, vm) == Protection::Protected
        && [p.primary, p.secondary].iter().all(|x| x.as_ref().is_some_and(|x| x.host != dead))
}

/// The host to kill: one holding a primary, touching the most VMs (then
/// by name).
fn victim(v: &View) -> Option<String> {
    let primaries =
        |h: &str| VMS.iter().filter(|vm| v.placement[**vm].primary.as_ref().is_some_and(|p| p.host == h)).count();
    v.hosts
        .keys()
        .filter(|h| primaries(h) > 0)
        .max_by_key(|h| (v.slots.get(*h).map_or(0, |s| s.len()), primaries(h), std::cmp::Reverse((*h).clone())))
        .cloned()
}

/// The time from the kill until the VM was served again: for a VM whose
/// primary died, its first acknowledgement released by a newer generation
/// (the promoted node); for one whose secondary died, the end of its
/// longest pause in acknowledgements that began within a heartbeat timeout
/// of the kill (the primary holds its output from the kill on, until the
/// witness lets it run alone; a later pause, such as a new secondary's
/// final sync epoch, is not the failover).
fn served_again(acks: &[(Instant, u64)], kill: Instant, lost: Option<Role>, heartbeat: Duration) -> Option<Duration> {
    let mut acks = acks.to_vec();
    acks.sort();
    match lost? {
        Role::Primary => {
            let before = acks.iter().filter(|(t, _)| *t <= kill).map(|(_, g)| *g).max().unwrap_or(0);
            acks.iter().find(|(t, g)| *t > kill && *g > before).map(|(t, _)| *t - kill)
        }
        Role::Secondary => {
            let mut prev = kill;
            let mut best: Option<(Duration, Instant)> = None;
            for (t, _) in acks.iter().filter(|(t, _)| *t > kill) {
                if prev > kill + heartbeat {
                    break;
                }
                if best.is_none_or(|(gap, _)| *t - prev > gap) {
                    best = Some((*t - prev, *t));
                }
                prev = *t;
            }
            best.map(|(_, t)| t - kill)
        }
    }
}

fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1e4).round() / 10.0)
}

/// Runs the pool demo; returns its report and its verdict (an error when
/// an acknowledged write was lost or duplicated, or a VM was not served
/// or protected again within the bound).
pub(super) fn demo(
    a: &DemoArgs,
    n: u32,
    dir: &Path,
    live: &dyn Fn(String),
) -> Result<(Value, Result<(), DemoError>), DemoError> {
    if n < 3 {
        return Err(DemoError::Args(format!(
            "--pool {n}: at least 3 hosts (two run a VM's nodes, a third re-protects it)"
        )));
    }
    if a.no_witness {
        return Err(DemoError::Args("--pool needs the witness (the pool lives in etcd)".into()));
    }
    let setup = |e: String| DemoError::Setup(e);
    let exe = std::env::current_exe().map_err(|e| setup(e.to_string()))?;
    let secret = dir.join("secret");
    common::auth::generate_secret_file(&secret, true).map_err(|e| setup(e.to_string()))?;
    let etcd = witness::server::Etcd::start(&dir.join("etcd")).map_err(|e| setup(e.to_string()))?;
    live(format!("witness: etcd {} (pid {}) on loopback", etcd.url, etcd.pid()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| setup(e.to_string()))?;
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        // the hosts run in process groups of their own (so that one can be
        // killed with its nodes): Ctrl-C does not reach them, the demo
        // stops them itself
        let flag = interrupted.clone();
        rt.spawn(async move {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            flag.store(true, Ordering::SeqCst);
        });
    }
    let store = rt.block_on(Store::connect(&etcd.url, Duration::from_millis(500))).map_err(|e| setup(e.to_string()))?;
    let mut pool = Pool { rt: &rt, store, hosts: Vec::new(), interrupted };
    for i in 1..=n {
        let h = Host::start(a, &exe, &etcd.url, &format!("h{i}"), dir, &secret)?;
        pool.hosts.push(h);
    }
    pool.wait(Duration::from_secs(30), "the agents did not register", |v| v.hosts.len() == n as usize)?;
    live(format!(
        "pool: {n} hosts (castor agent, capacity {} each, lease TTL {LEASE_TTL_S} s), logs in {}{}",
        VMS.len(),
        dir.display(),
        if a.dir.is_none() { " (removed at the end)" } else { "" }
    ));
    let t = Instant::now();
    for vm in VMS {
        let spec = VmSpec { guest: "kv".into(), mem: a.mem, vcpus: a.vcpus, net: None };
        rt.block_on(pool.store.create_vm(vm, &spec)).map_err(|e| setup(e.to_string()))?;
    }
    let v = pool.wait(Duration::from_secs(120), "the VMs were not protected", |v| {
        VMS.iter().all(|vm| protection(v, vm) == Protection::Protected)
    })?;
    let host = |vm: &str, r: Role| v.placement[vm].get(r).map_or("-".to_string(), |p| p.host.clone());
    for vm in VMS {
        live(format!(
            "{vm} protected {:.1} s after `castor vm create`: primary on {}, secondary on {}",
            t.elapsed().as_secs_f64(),
            host(vm, Role::Primary),
            host(vm, Role::Secondary)
        ));
    }

    // client load on both VMs, each client with both nodes of its VM
    let stop = Arc::new(AtomicBool::new(false));
    let mut loads = Vec::new();
    let mut handles = Vec::new();
    for (i, vm) in VMS.iter().enumerate() {
        let p = &v.placement[*vm];
        let nodes: Vec<_> = [&p.primary, &p.secondary].iter().filter_map(|x| x.as_ref()?.service).collect();
        let load = Arc::new(Load::default());
        let first = 1 + 1000 * i as u32;
        handles.extend(spawn_clients(&rt, &load, &stop, nodes, first..=first + a.clients.max(1) - 1, a.keys));
        loads.push(load);
    }
    let acked = |i: usize| loads[i].acked.load(Ordering::SeqCst);
    let start = Instant::now();
    let kill_at = Duration::from_secs_f64(a.kill_primary_at.unwrap_or(a.seconds / 2.0).max(0.0));
    let end_at = Duration::from_secs_f64(a.seconds);
    let mut killed: Option<(Instant, String, View)> = None;
    let mut reprotected: [Option<Instant>; 2] = [None, None];
    let mut prev = [0u64; 2];
    let mut next_tick = Duration::from_secs(1);
    let mut answered = Instant::now();
    let r = loop {
        std::thread::sleep(Duration::from_millis(10));
        let Some(v) = pool.read()? else {
            if answered.elapsed() > Duration::from_secs(10) {
                break Err(DemoError::Node("etcd has not answered for 10 s".into()));
            }
            continue;
        };
        answered = Instant::now();
        if killed.is_none() && start.elapsed() >= kill_at {
            let Some(dead) = victim(&v) else { break Err(DemoError::Node("no host holds a primary".into())) };
            let i = pool.hosts.iter().position(|h| h.name == dead).expect("a host of ours");
            pool.hosts[i].kill_all();
            let k = Instant::now();
            live(format!(
                "t={:.1}s: host {dead} died (kill -9 of its agent and its nodes), holding {}",
                start.elapsed().as_secs_f64(),
                VMS.iter()
                    .flat_map(|vm| [Role::Primary, Role::Secondary].map(|r| (vm, r)))
                    .filter(|(vm, r)| v.placement[**vm].get(*r).is_some_and(|p| p.host == dead))
                    .map(|(vm, r)| format!("{vm}'s {}", r.as_str()))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ));
            killed = Some((k, dead, v.clone()));
        }
        if let Some((k, dead, _)) = &killed {
            for (i, vm) in VMS.iter().enumerate() {
                if reprotected[i].is_none() && protected_without(&v, vm, dead) {
                    reprotected[i] = Some(Instant::now());
                    let p = &v.placement[*vm];
                    live(format!(
                        "t={:.1}s: {vm} protected again {:.0} ms after the kill (primary on {}, secondary on {}, term {})",
                        start.elapsed().as_secs_f64(),
                        k.elapsed().as_secs_f64() * 1e3,
                        p.primary.as_ref().map_or("-", |p| &p.host),
                        p.secondary.as_ref().map_or("-", |p| &p.host),
                        v.witness.get(*vm).map_or(0, |w| w.term)
                    ));
                }
            }
            // every VM protected again, then a second of protected load
            let done = reprotected.iter().all(Option::is_some)
                && reprotected.iter().flatten().max().is_some_and(|t| t.elapsed() > Duration::from_secs(1));
            if done && start.elapsed() >= end_at {
                break Ok(());
            }
            if k.elapsed() > BOUND {
                let late: Vec<&str> =
                    VMS.iter().zip(reprotected).filter(|(_, r)| r.is_none()).map(|(vm, _)| *vm).collect();
                break Err(DemoError::Node(format!(
                    "{} not protected again within {} s of the kill: {:?}",
                    late.join(" and "),
                    BOUND.as_secs(),
                    VMS.iter().map(|vm| (vm, protection(&v, vm))).collect::<Vec<_>>()
                )));
            }
        }
        if start.elapsed() >= next_tick {
            next_tick += Duration::from_secs(1);
            let line: Vec<String> = VMS
                .iter()
                .enumerate()
                .map(|(i, vm)| {
                    let (n, d) = (acked(i), acked(i) - prev[i]);
                    prev[i] = n;
                    let why = match protection(&v, vm) {
                        Protection::Protected => "protected".to_string(),
                        Protection::Unprotected(r) => format!("unprotected: {r}"),
                    };
                    format!("{vm} {n} acked (+{d}), term {}, {why}", v.witness.get(*vm).map_or(0, |w| w.term))
                })
                .collect();
            live(format!("t={:>2.0}s {}", start.elapsed().as_secs_f64(), line.join(" | ")));
        }
    };
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        let _ = rt.block_on(h);
    }
    r?;
    let (k, dead, before) = killed.expect("the loop ends after the kill");

    // read each VM's table back from its primary
    let v = pool.read()?.ok_or_else(|| DemoError::Node("etcd does not answer at the end".into()))?;
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    for (i, vm) in VMS.iter().enumerate() {
        let p = v.placement[*vm].clone();
        let svc =
            p.primary.as_ref().and_then(|p| p.service).ok_or_else(|| DemoError::Node(format!("{vm}: no primary")))?;
        let (lost, dup, checked) = read_back(&rt, &loads[i], svc)?;
        let lost_node = [Role::Primary, Role::Secondary]
            .into_iter()
            .find(|r| before.placement[*vm].get(*r).is_some_and(|p| p.host == dead));
        let acks = common::sync::lock(&loads[i].acked_at).clone();
        let served = served_again(&acks, k, lost_node, Duration::from_millis(a.heartbeat_ms()));
        let reprot = reprotected[i].map(|t| t - k);
        if reprot.is_none() {
            bad.push(format!("{vm} was not protected again"));
        }
        if lost_node.is_some() && served.is_none() {
            bad.push(format!("{vm} was not served again"));
        }
        if lost + dup > 0 {
            bad.push(format!("{vm}: {lost} acknowledged writes lost, {dup} duplicated"));
        }
        let uncertain = common::sync::lock(&loads[i].uncertain).len();
        live(format!(
            "summary: {vm}: {}; protected again after {} ms (primary on {}, secondary on {}, term {}); {} acked ops, {lost} lost, {dup} duplicated ({checked} keys checked)",
            match (lost_node, served) {
                (Some(r), Some(s)) => format!("lost its {} with {dead}, served again after {:.0} ms", r.as_str(), s.as_secs_f64() * 1e3),
                (Some(r), None) => format!("lost its {} with {dead}, NOT served again", r.as_str()),
                (None, _) => format!("had no node on {dead}"),
            },
            reprot.map_or("?".into(), |d| format!("{:.0}", d.as_secs_f64() * 1e3)),
            p.primary.as_ref().map_or("-", |p| &p.host),
            p.secondary.as_ref().map_or("-", |p| &p.host),
            v.witness.get(*vm).map_or(0, |w| w.term),
            acked(i),
        ));
        rows.push(json!({
            "name": vm,
            "lost_node": lost_node.map(Role::as_str),
            "failover_ms": ms(served),
            "reprotected_ms": ms(reprot),
            "lost_acked_ops": lost,
            "duplicate_ops": dup,
            "acked_ops": acked(i),
            "keys_checked": checked,
            "uncertain_keys": uncertain,
            "term": v.witness.get(*vm).map_or(0, |w| w.term),
            "primary_host": p.primary.as_ref().map(|p| p.host.clone()),
            "secondary_host": p.secondary.as_ref().map(|p| p.host.clone()),
        }));
    }
    let report = json!({
        "pool": n,
        "killed_host": dead,
        "killed_at_s": (k - start).as_secs_f64(),
        "lease_ttl_s": LEASE_TTL_S,
        "heartbeat_timeout_ms": a.heartbeat_ms(),
        "mem": a.mem,
        "clients_per_vm": a.clients.max(1),
        "vms": rows,
        "ok": bad.is_empty(),
        "host": runtime::host::Host::detect().describe(),
    });
    let verdict = if bad.is_empty() { Ok(()) } else { Err(DemoError::Verify(bad.join("; "))) };
    Ok((report, verdict))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_again_is_the_promoted_nodes_first_ack_or_the_pause_that_began_at_the_kill() {
        let k = Instant::now() + Duration::from_secs(1);
        let at = |ms: i64, g| {
            let t =
                if ms >= 0 { k + Duration::from_millis(ms as u64) } else { k - Duration::from_millis((-ms) as u64) };
            (t, g)
        };
        let hb = Duration::from_millis(250);
        // a lost primary: acks of generation 1 in flight after the kill do not count
        let acks = [at(-5, 1), at(2, 1), at(280, 2), at(290, 2)];
        assert_eq!(served_again(&acks, k, Some(Role::Primary), hb), Some(Duration::from_millis(280)));
        // a lost secondary: the pause that began at the kill, not a later
        // longer one (a new secondary's final sync)
        let mut acks = vec![at(-5, 1), at(10, 1)];
        acks.extend((9..40).map(|i| at(i * 10, 1)));
        acks.extend([at(2000, 1), at(2400, 1)]);
        assert_eq!(served_again(&acks, k, Some(Role::Secondary), hb), Some(Duration::from_millis(90)));
        assert_eq!(served_again(&acks, k, None, hb), None, "no node on the dead host");
        assert_eq!(served_again(&[at(-5, 1)], k, Some(Role::Primary), hb), None, "never served again");
    }

    #[test]
    fn the_host_killed_holds_a_primary_and_the_most_nodes() {
        let mut v = View::default();
        let placed = |h: &str| Some(witness::pool::Placed { host: h.into(), addr: None, service: None });
        for (h, slots) in [("h1", 1), ("h2", 2), ("h3", 1)] {
            v.hosts.insert(h.into(), witness::pool::HostInfo { capacity: 2, net: false });
            let s = v.slots.entry(h.into()).or_default();
            for i in 0..slots {
                s.insert((format!("x{i}"), Role::Secondary));
            }
        }
        v.placement.insert("vm1".into(), witness::pool::VmPlacement { primary: placed("h1"), secondary: placed("h2") });
        v.placement.insert("vm2".into(), witness::pool::VmPlacement { primary: placed("h3"), secondary: placed("h2") });
        // h2 holds the most nodes but no primary
        assert_eq!(victim(&v).as_deref(), Some("h1"));
        v.placement.get_mut("vm2").unwrap().primary = placed("h2");
        assert_eq!(victim(&v).as_deref(), Some("h2"));
    }
}
