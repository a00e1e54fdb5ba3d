//! The castor service end to end (issue 4): real processes on loopback.

use std::time::{Duration, Instant};

use client::KvClient;
use common::state::KvOp;
use failover_tests::cluster::{Cluster, NodeOpts};
use failover_tests::load::{split_brain, Load};
use failover_tests::proxy::{Fault, Proxy};
use failover_tests::serial;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

const T: Duration = Duration::from_secs(30);

#[path = "service/connections.rs"]
mod connections;
#[path = "service/sync.rs"]
mod sync;

#[test]
fn initial_sync_and_verified_epochs() {
    let _g = serial();
    let c = Cluster::new("sync");
    let o = NodeOpts { verify_digest: true, ..NodeOpts::default() };
    let s = c.secondary("s", &o, None);
    let p = c.primary("p", &o, s.listen.expect("listen"));
    p.wait_status(T, |v| v["protection"] == "protected")
        .unwrap_or_else(|| panic!("never protected:\n{}", p.log_tail()));
    let rt = rt();
    let load = Load::start(&rt, vec![p.service], 6, 32, 1);
    assert!(load.wait_more(400, T), "clients stalled:\n{}", p.log_tail());
    let s0 = s.status().expect("secondary status");
    let c0 = s0["committed_epoch"].as_u64().expect("committed");
    std::thread::sleep(Duration::from_millis(500));
    let s1 = s.status().expect("secondary status");
    let c1 = s1["committed_epoch"].as_u64().expect("committed");
    assert!(c1 >= c0 + 20, "the secondary commits epochs ({c0} -> {c1})");
    // verification mode: every epoch's replica digest matched the primary's
    assert_eq!(s1["protection"], "replicating", "replica diverged:\n{}", s.log_tail());
    let ps = p.status().expect("primary status");
    assert_eq!(ps["syncs"], 1);
    assert!(ps["acked_epoch"].as_u64().expect("acked") + 8 >= ps["epoch"].as_u64().expect("epoch"), "{ps}");
    assert!(ps["epochs"].as_u64().expect("epochs") > 50);
    let v = load.finish(&rt, p.service);
    assert_eq!((v.lost, v.duplicated), (0, 0), "{v:?}");
}

/// Output commit: while the secondary's acks are held back by a proxy, the
/// guest's response to a request exists but is not released.
#[test]
fn responses_are_held_until_their_epoch_is_acknowledged() {
    let _g = serial();
    let c = Cluster::new("commit");
    // long timeouts: holding acks must not look like a dead secondary here
    let o = NodeOpts { heartbeat_timeout_ms: 8000, ..NodeOpts::default() };
    let s = c.secondary("s", &o, None);
    let rt = rt();
    let proxy = rt.block_on(Proxy::start(s.listen.expect("listen"))).expect("start the proxy");
    let p = c.primary("p", &o, proxy.addr);
    p.wait_status(T, |v| v["protection"] == "protected")
        .unwrap_or_else(|| panic!("never protected:\n{}", p.log_tail()));
    let svc = p.service;
    let first = rt.block_on(async {
        let mut k = KvClient::new(5, vec![svc]);
        k.call(KvOp::Put, 1, 11).await
    });
    assert_eq!(first.expect("first call").resp.value, 11);

    proxy.set(Fault::HoldReplies);
    std::thread::sleep(Duration::from_millis(100));
    let acked_before = p.status().expect("status")["acked_epoch"].as_u64();
    let t = Instant::now();
    let call = rt.spawn(async move {
        let mut k = KvClient::new(6, vec![svc]);
        k.attempt_timeout = Duration::from_secs(30);
        let r = k.call(KvOp::Put, 2, 22).await;
        (r, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!call.is_finished(), "a response left the primary while its epoch was unacknowledged");
    let st = p.status().expect("status");
    assert_eq!(st["acked_epoch"].as_u64(), acked_before, "acks arrived through a held link?");
    assert!(st["epochs_in_flight"].as_u64().unwrap_or(0) >= 1, "{st}");
    let released_at = Instant::now();
    proxy.set(Fault::Pass);
    let (r, at) = rt.block_on(call).expect("join");
    assert_eq!(r.expect("held call").resp.value, 22);
    assert!(at >= released_at, "answered before the acks were let through");
    eprintln!("response held for {:?} until the acks flowed again", at - t);
    // the primary measured the wait too (from the guest's answer to its release)
    let st = p
        .wait_status(T, |v| v["output_hold_us_p99"].as_f64() >= Some(1.0e6))
        .unwrap_or_else(|| panic!("status does not show output held for a second: {}", p.status().unwrap_or_default()));
    eprintln!("status: output held p50 {} us, p99 {} us", st["output_hold_us_p50"], st["output_hold_us_p99"]);
}

#[test]
fn failover_fences_the_old_primary_and_reprotection_survives_a_second_failover() {
    let _g = serial();
    let c = Cluster::new("failover");
    let o = NodeOpts::default();
    let s1 = c.secondary("s1", &o, None);
    let mut p = c.primary("p", &o, s1.listen.expect("listen"));
    p.wait_status(T, |v| v["protection"] == "protected")
        .unwrap_or_else(|| panic!("never protected:\n{}", p.log_tail()));
    let rt = rt();
    let load = Load::start(&rt, vec![p.service, s1.service], 8, 32, 1);
    assert!(load.wait_more(300, T), "no progress before the kill");

    // first failover
    let killed = Instant::now();
    p.kill9();
    let st = s1
        .wait_status(T, |v| v["role"] == "primary")
        .unwrap_or_else(|| panic!("s1 did not take over:\n{}", s1.log_tail()));
    assert_eq!(st["generation"], 1);
    eprintln!("failover 1: {:?} to a running guest (reported {} ms)", killed.elapsed(), st["last_failover_ms"]);
    assert!(load.wait_more(300, T), "clients did not carry on after the failover:\n{}", s1.log_tail());

    // the old primary comes back with its old generation: refused, fenced
    let (mut old, _) = c.raw(
        "p-again",
        vec![
            "primary".into(),
            "--peer".into(),
            s1.listen.expect("listen").to_string(),
            "--mem".into(),
            o.mem.into(),
            "--secret-file".into(),
            c.secret.display().to_string(),
            "--service-listen".into(),
            failover_tests::cluster::ANY.into(),
        ],
        &o,
    );
    let code = (0..300).find_map(|_| {
        std::thread::sleep(Duration::from_millis(50));
        old.try_wait().ok().flatten().map(|s| s.code())
    });
    let _ = old.kill();
    assert_eq!(code, Some(Some(7)), "the returning old primary was not fenced");

    // re-protection by a new secondary, then a second failover to it
    let s2 = c.secondary("s2", &o, s1.listen);
    load.add_node(s2.service);
    s1.wait_status(T, |v| v["protection"] == "protected")
        .unwrap_or_else(|| panic!("s2 never protected s1:\n{}\n{}", s1.log_tail(), s2.log_tail()));
    assert!(load.wait_more(300, T), "no progress while re-protected");
    let mut s1 = s1;
    s1.kill9();
    let st = s2
        .wait_status(T, |v| v["role"] == "primary")
        .unwrap_or_else(|| panic!("s2 did not take over:\n{}", s2.log_tail()));
    assert_eq!(st["generation"], 2);
    assert!(load.wait_more(300, T), "clients did not carry on after the second failover:\n{}", s2.log_tail());
    let v = load.finish(&rt, s2.service);
    eprintln!("{v:?}");
    assert_eq!((v.lost, v.duplicated, v.uncertain), (0, 0, 0), "{v:?}");
    assert!(v.sources.iter().any(|(_, g)| *g == 2), "no response came from generation 2");
    assert!(split_brain(&c.release_log()).is_empty(), "two nodes released output in one generation");
}

/// A forced failover while the primary is alive: the secondary takes over,
/// and the old primary learns the new generation from a heartbeat reply,
/// stops releasing output and exits as fenced. Metrics are served meanwhile.
#[test]
fn forced_failover_fences_a_live_primary_and_metrics_are_served() {
    let _g = serial();
    let c = Cluster::new("forced");
    let s = c.secondary("s", &NodeOpts::default(), None);
    let po =
        NodeOpts { extra: vec!["--metrics-listen".into(), failover_tests::cluster::ANY.into()], ..NodeOpts::default() };
    let mut p = c.primary("p", &po, s.listen.expect("listen"));
    p.wait_status(T, |v| v["protection"] == "protected")
        .unwrap_or_else(|| panic!("never protected:\n{}", p.log_tail()));
    let rt = rt();
    let load = Load::start(&rt, vec![p.service, s.service], 4, 16, 1);
    assert!(load.wait_more(200, T));

    let text = {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(p.metrics.expect("metrics address")).expect("metrics");
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("get");
        let mut body = String::new();
        conn.read_to_string(&mut body).expect("read");
        body
    };
    for needle in [
        "castor_epochs_total",
        "castor_epoch_pause_us_bucket",
        "castor_epoch_phase_us_bucket{le=\"50.0\",phase=\"stop\"}",
        "castor_epoch_phase_us_count{phase=\"copy\"}",
        "castor_ack_latency_us_p99",
        "castor_output_hold_us_p99",
        "castor_output_hold_us_bucket",
        "castor_epochs_in_flight",
        "castor_failovers_total",
        "castor_bytes_total",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    // the parts of the pauses under load: every boundary stops and resumes
    // the vCPUs, and the guest ran between two boundaries
    let st = p.status().expect("status");
    for part in ["stop_us", "resume_us", "len_us"] {
        assert!(st["pause_phases_p50"][part].as_f64() > Some(0.0), "{part} missing: {st}");
    }
    assert!(st["pause_phases_p99"]["stop_us"].as_f64() >= st["pause_phases_p50"]["stop_us"].as_f64(), "{st}");

    // the control socket speaks HTTP (raw requests: a GET of a command too)
    let http = |req: &str, addr: &runtime::control::ControlAddr| {
        use std::io::{Read, Write};
        let runtime::control::ControlAddr::Unix(path) = addr else { panic!("not a socket: {addr}") };
        let mut conn = std::os::unix::net::UnixStream::connect(path).expect("control");
        conn.write_all(req.as_bytes()).expect("request");
        let mut body = String::new();
        conn.read_to_string(&mut body).expect("read");
        body
    };
    let st = http("GET /status HTTP/1.1\r\nHost: x\r\n\r\n", &p.control);
    assert!(st.starts_with("HTTP/1.1 200") && st.contains("\"role\":\"primary\""), "{st}");
    let nf = http("GET /nonsense HTTP/1.1\r\n\r\n", &p.control);
    assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
    // a GET (what a web page's <img src=...> sends) does not act
    let get = http("GET /failover HTTP/1.1\r\n\r\n", &s.control);
    assert!(get.starts_with("HTTP/1.1 405"), "{get}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.status().expect("s")["role"], "secondary", "a GET made the secondary take over");
    // the primary takes no forced failover: it says why
    let r = p.command("failover").expect("reply");
    assert!(r.contains("\"ok\":false") && r.contains("primary"), "{r}");
    let reply = http("POST /failover HTTP/1.1\r\nContent-Length: 0\r\n\r\n", &s.control);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"ok\":true"), "{reply}");
    s.wait_status(T, |v| v["role"] == "primary" && v["generation"] == 1)
        .unwrap_or_else(|| panic!("no takeover:\n{}", s.log_tail()));
    assert_eq!(p.wait_exit(T), Some(7), "the live old primary was not fenced:\n{}", p.log_tail());
    assert!(load.wait_more(200, T), "clients did not move to the new primary");
    let v = load.finish(&rt, s.service);
    assert_eq!((v.lost, v.duplicated), (0, 0), "{v:?}");
    assert!(split_brain(&c.release_log()).is_empty());
}

/// `--unprotected pause`: without a secondary the guest does not run (no
/// response is released); once a secondary is in sync, it does.
#[test]
fn unprotected_pause_policy_waits_for_a_secondary() {
    let _g = serial();
    let c = Cluster::new("pause");
    let o = NodeOpts { extra: vec!["--unprotected".into(), "pause".into()], ..NodeOpts::default() };
    let p = c.primary_with("p", &o, None, true);
    p.wait_status(T, |v| v["role"] == "primary").expect("primary up");
    let rt = rt();
    let svc = p.service;
    let call = rt.spawn(async move {
        let mut k = KvClient::new(9, vec![svc]);
        k.attempt_timeout = Duration::from_secs(30);
        k.call(KvOp::Put, 3, 33).await
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!call.is_finished(), "an unprotected primary under the pause policy answered");
    assert_eq!(p.status().expect("status")["protection"], "unprotected");
    let _s = c.secondary("s", &NodeOpts::default(), p.listen);
    let r = rt.block_on(call).expect("join").expect("call after protection");
    assert_eq!(r.resp.value, 33);
}

/// An `unprotect` sent while the pair is healthy is refused, and not kept
/// for later: when the secondary then freezes (SIGSTOP: its sockets neither
/// answer nor refuse), the primary holds, and stays holding. (Before the
/// state machine, the command was answered ok, queued, and fired at this
/// hold: the primary released output while the secondary could be taking
/// over.) Then the operator's `unprotect` ends the hold.
#[test]
fn unprotect_is_refused_while_protected_and_not_applied_at_the_next_hold() {
    let _g = serial();
    let c = Cluster::new("unprotect");
    let o = NodeOpts::default();
    let mut s = c.secondary("s", &o, None);
    let p = c.primary("p", &o, s.listen.expect("listen"));
    p.wait_status(T, |v| v["protection"] == "protected")
        .unwrap_or_else(|| panic!("never protected:\n{}", p.log_tail()));
    let r = p.command("unprotect").expect("reply");
    assert!(r.contains("\"ok\":false") && r.contains("not holding"), "unprotect while protected: {r}");
    assert_eq!(p.status().expect("p")["protection"], "protected");

    let stopped = std::process::Command::new("kill").args(["-STOP", &s.child.id().to_string()]).status();
    assert!(stopped.is_ok_and(|st| st.success()), "cannot SIGSTOP the secondary");
    p.wait_status(T, |v| v["protection"] == "holding")
        .unwrap_or_else(|| panic!("the primary did not hold:\n{}", p.log_tail()));
    std::thread::sleep(Duration::from_millis(2000));
    let st = p.status().expect("p");
    assert_eq!(st["protection"], "holding", "a frozen secondary ended the hold: {st}");
    assert!(st["held_outputs"].as_u64().is_some());
    // now the operator's unprotect applies: a hold is what it ends
    let r = p.command("unprotect").expect("reply");
    assert!(r.contains("\"ok\":true"), "unprotect while holding: {r}");
    p.wait_status(T, |v| v["protection"] == "unprotected")
        .unwrap_or_else(|| panic!("unprotect did not end the hold:\n{}", p.log_tail()));
    s.kill9();
}
