//! `castor run` end to end: real processes, real KVM.

use std::process::Command;

use serde_json::Value;

fn castor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_castor"))
}

fn run_json(args: &[&str]) -> Value {
    let out = castor().arg("run").args(args).arg("--json").output().expect("spawn castor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "castor run {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("a JSON line");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"))
}

fn check_run(tracker: &str) {
    let v = run_json(&["--guest", "dirty", "--tracker", tracker, "--seconds", "1.5", "--vcpus", "2"]);
    assert_eq!(v["tracker"], tracker);
    assert!(v["epochs"].as_u64().expect("epochs") >= 50, "{v}");
    assert!(v["dirty_pages_total"].as_u64().expect("dirty") > 1000, "{v}");
    assert_eq!(v["tracking_lost"], 0, "{v}");
    assert!(v["stop_us_p50"].as_f64().expect("stop") > 0.0);
    assert!(v["resume_us_p50"].as_f64().expect("resume") > 0.0);
}

#[test]
fn run_json_ring() {
    check_run("ring");
}

#[test]
fn run_json_bitmap() {
    check_run("bitmap");
}

#[test]
fn kv_guest_serves_and_answers_consistently() {
    let v = run_json(&["--guest", "kv", "--seconds", "1", "--kv-clients", "4"]);
    assert!(v["kv_acked_ops"].as_u64().expect("acked") > 100, "{v}");
    assert_eq!(v["kv_wrong_responses"], 0);
    assert_eq!(v["kv_unexpected_responses"], 0);
}

/// A running kv guest is paused, saved with its full state to a file, and a
/// fresh VM in a fresh process continues it: every key holds its value and the
/// guest's operation counter goes on from where it stopped.
#[test]
fn snapshot_then_restore_in_a_fresh_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snap = dir.path().join("kv.snap");
    let snap_s = snap.to_str().expect("utf8");
    let first = run_json(&["--guest", "kv", "--seconds", "1.5", "--kv-clients", "6", "--snapshot-out", snap_s]);
    let ops_saved = first["kv_ops_counter"].as_u64().expect("ops");
    assert!(ops_saved > 100, "{first}");
    assert!(first["snapshot_pages"].as_u64().expect("pages") > 0);
    let expect = format!("{snap_s}.kv.json");
    let second = run_json(&["--restore", snap_s, "--kv-verify", &expect, "--seconds", "1.5", "--kv-clients", "6"]);
    assert_eq!(second["guest"], "kv");
    let checked = second["kv_verify_checked"].as_u64().expect("checked");
    assert!(checked > 100, "too few keys verified: {second}");
    assert_eq!(second["kv_verify_mismatches"], 0, "{second}");
    assert_eq!(second["kv_ops_before_restore"], ops_saved);
    // the first thing the restored guest applies is operation ops_saved + 1
    assert_eq!(second["kv_first_ops_counter"], ops_saved + 1, "{second}");
    assert!(second["kv_ops_counter"].as_u64().expect("ops") > ops_saved + checked, "{second}");
    assert_eq!(second["kv_wrong_responses"], 0, "the continued clients saw wrong values: {second}");
}

#[test]
fn corrupt_or_truncated_snapshot_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snap = dir.path().join("idle.snap");
    run_json(&[
        "--guest",
        "idle",
        "--mem",
        "64M",
        "--vcpus",
        "1",
        "--seconds",
        "0.2",
        "--snapshot-out",
        snap.to_str().expect("utf8"),
    ]);
    let good = std::fs::read(&snap).expect("read");
    for (name, bytes, needle) in [
        (
            "flipped",
            {
                let mut b = good.clone();
                let n = b.len() / 2;
                b[n] ^= 0x40;
                b
            },
            "checksum",
        ),
        ("truncated", good[..good.len() - 100].to_vec(), "checksum"),
        ("garbage", b"definitely not a snapshot".to_vec(), "magic"),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, &bytes).expect("write");
        let out =
            castor().args(["run", "--restore", p.to_str().expect("utf8"), "--seconds", "0.1"]).output().expect("spawn");
        assert_eq!(out.status.code(), Some(5), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(err.contains(needle), "{name}: error does not say '{needle}': {err}");
    }
}

/// `castor keygen FILE`: 32 random bytes in a new mode-0600 file, which a
/// node accepts as its link key; an existing file is refused (exit 5, the
/// file unchanged) unless `--force`; a passphrase file is refused by a node
/// with a pointer to keygen (exit 5).
#[test]
fn keygen_makes_a_private_key_and_never_overwrites_unforced() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key");
    let out = castor().arg("keygen").arg(&key).output().expect("spawn");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let meta = std::fs::metadata(&key).expect("key file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let first = std::fs::read(&key).expect("read");
    assert_eq!(first.len(), 32);
    common::auth::Secret::from_file(&key).expect("keygen output is a link key");
    let out = castor().arg("keygen").arg(&key).output().expect("spawn");
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&key).expect("read"), first, "an unforced keygen changed the key");
    let out = castor().args(["keygen", "--force"]).arg(&key).output().expect("spawn");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(std::fs::read(&key).expect("read"), first);
    // a node given a passphrase refuses it and says what to run
    let pass = dir.path().join("pass");
    common::auth::write_secret_file(&pass, b"a-passphrase-of-enough-bytes\n").expect("pass");
    let out = castor()
        .args(["secondary", "--listen", "127.0.0.1:0", "--service-listen", "127.0.0.1:0", "--secret-file"])
        .arg(&pass)
        .args(["--control", &dir.path().join("s.ctl").display().to_string()])
        .output()
        .expect("spawn");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("castor keygen"), "{err}");
}

#[test]
fn impossible_machines_are_refused_with_exit_3() {
    for args in [&["--vcpus", "9"][..], &["--mem", "1M"][..], &["--tracker", "ring", "--ring-entries", "1000"][..]] {
        let out = castor().arg("run").args(args).args(["--seconds", "0.1"]).output().expect("spawn");
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A node refuses a dirty ring so small that it overflows all the time
/// (exit 2, naming docs/machine.md), unless the test hooks are on.
#[test]
fn nodes_refuse_rings_under_2048_entries() {
    for (role, extra) in [("primary", &[][..]), ("secondary", &["--listen", "127.0.0.1:0"][..])] {
        let base = [role, "--secret-file", "/nonexistent/secret", "--service-listen", "127.0.0.1:0"];
        let out = castor().args(base).args(extra).args(["--ring-entries", "1024"]).output().expect("spawn");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{role}: {err}");
        assert!(err.contains("--ring-entries 1024") && err.contains("docs/machine.md"), "{role}: {err}");
        // with the test hooks the ring passes and the missing secret is what stops it (exit 5)
        let out =
            castor().args(base).args(extra).args(["--ring-entries", "1024", "--test-hooks"]).output().expect("spawn");
        assert_eq!(out.status.code(), Some(5), "{role}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The control commands' exit codes: a command the node's mode refuses
/// exits 8 with the node's reason; a taken address exits 4; a bad enumerated
/// option exits 2.
#[test]
fn control_commands_report_refusals_and_listeners_report_their_ports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    common::auth::generate_secret_file(&secret, false).expect("secret");
    let secret = secret.display().to_string();
    let spec = runtime::harness::Spec {
        exe: env!("CARGO_BIN_EXE_castor").into(),
        name: "p".into(),
        args: ["primary", "--guest", "idle", "--mem", "64M", "--vcpus", "1", "--secret-file", &secret]
            .iter()
            .map(|s| s.to_string())
            .chain(
                ["--service-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--control"].map(String::from),
            )
            .chain([dir.path().join("p.ctl").display().to_string()])
            .collect(),
        dir: dir.path().to_path_buf(),
        env: vec![],
    };
    let p = spec.start().expect("primary starts and reports its listeners");
    assert_eq!(p.control, runtime::control::ControlAddr::Unix(dir.path().join("p.ctl")));
    assert_ne!(p.service.port(), 0);
    assert!(p.metrics.is_some_and(|m| m.port() != 0));
    let ctl = p.control.to_string();
    let st = castor().args(["status", "--control", &ctl]).output().expect("status");
    assert!(st.status.success());
    let v: Value = serde_json::from_slice(&st.stdout).expect("status JSON");
    assert_eq!(v["role"], "primary");
    assert_eq!(v["protection"], "unprotected");

    let un = castor().args(["unprotect", "--control", &ctl]).output().expect("unprotect");
    assert_eq!(un.status.code(), Some(8), "{}", String::from_utf8_lossy(&un.stderr));
    assert!(String::from_utf8_lossy(&un.stderr).contains("not holding"), "{}", String::from_utf8_lossy(&un.stderr));
    let fo = castor().args(["failover", "--control", &ctl]).output().expect("failover");
    assert_eq!(fo.status.code(), Some(8));
    assert!(String::from_utf8_lossy(&fo.stderr).contains("primary"));
    let so = castor().args(["switchover", "--control", &ctl]).output().expect("switchover");
    assert_eq!(so.status.code(), Some(8));
    assert!(String::from_utf8_lossy(&so.stderr).contains("not protected"), "{}", String::from_utf8_lossy(&so.stderr));
    // a bare TCP address is not taken as a control address without asking
    let bare = castor().args(["status", "--control", "127.0.0.1:9"]).output().expect("status");
    assert_eq!(bare.status.code(), Some(2), "{}", String::from_utf8_lossy(&bare.stderr));
    assert!(String::from_utf8_lossy(&bare.stderr).contains("tcp:"), "{}", String::from_utf8_lossy(&bare.stderr));

    // the service address is taken: a second node cannot bind it
    let taken = p.service.to_string();
    let out = castor()
        .args(["primary", "--guest", "idle", "--mem", "64M", "--vcpus", "1", "--secret-file", &secret])
        .args(["--service-listen", &taken])
        .output()
        .expect("second primary");
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&taken));

    let bad = castor()
        .args(["primary", "--unprotected", "sometimes", "--secret-file", &secret, "--service-listen", "127.0.0.1:0"])
        .output()
        .expect("bad option");
    assert_eq!(bad.status.code(), Some(2));
}

/// `castor primary --witness`: a second primary of a live VM id, a VM id
/// with a history without `--replace`, an unreachable witness and a bad URL
/// are refused with exit 9 (2 for the URL's missing --vm-id); with
/// `--replace` (and the old primary gone) it starts at the next term.
#[test]
fn witness_claims_are_refused_with_exit_9_unless_they_are_safe() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = witness::server::Etcd::start(&dir.path().join("etcd")).expect("etcd (scripts/deps.sh installs it)");
    let secret = dir.path().join("secret");
    common::auth::generate_secret_file(&secret, false).expect("secret");
    let secret = secret.display().to_string();
    let n = std::cell::Cell::new(0);
    let args = |vm: &str, url: &str, extra: &[&str]| -> Vec<String> {
        n.set(n.get() + 1);
        let ctl = dir.path().join(format!("c{}.ctl", n.get())).display().to_string();
        ["primary", "--guest", "idle", "--mem", "64M", "--vcpus", "1", "--secret-file", &secret]
            .iter()
            .chain(["--service-listen", "127.0.0.1:0", "--control", &ctl].iter())
            .chain(["--witness", url, "--vm-id", vm].iter())
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let spec = |name: &str, a: Vec<String>| runtime::harness::Spec {
        exe: env!("CARGO_BIN_EXE_castor").into(),
        name: name.into(),
        args: a,
        dir: dir.path().to_path_buf(),
        env: vec![],
    };
    let mut p = spec("p", args("vm", &etcd.url, &[])).start().expect("the first primary claims term 1");
    let st = p.status().expect("status");
    assert_eq!(st["generation"], 1, "{st}");
    assert_eq!(st["witness"]["state"], "ok", "{st}");

    let second = castor().args(args("vm", &etcd.url, &["--replace"])).output().expect("second primary");
    assert_eq!(second.status.code(), Some(9), "{}", String::from_utf8_lossy(&second.stderr));
    assert!(String::from_utf8_lossy(&second.stderr).contains("is alive"));

    p.kill9();
    // its lease outlives it for a few seconds; then the VM id still has a
    // history: refused without --replace, started at term 2 with it
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let err = loop {
        let out = castor().args(args("vm", &etcd.url, &[])).output().expect("restart");
        let e = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(9), "{e}");
        if !e.contains("is alive") || std::time::Instant::now() > end {
            break e;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert!(err.contains("--replace"), "{err}");
    let p2 = spec("p2", args("vm", &etcd.url, &["--replace"])).start().expect("--replace starts it");
    assert_eq!(p2.status().expect("status")["generation"], 2);

    // a witness that does not answer, and a witness URL that is not one
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent = format!("http://{}", l.local_addr().expect("addr"));
    let out = castor().args(args("other", &silent, &["--witness-timeout-ms", "200"])).output().expect("silent");
    assert_eq!(out.status.code(), Some(9), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unreachable"));
    let out = castor().args(args("other", "127.0.0.1:2379", &[])).output().expect("bad url");
    assert_eq!(out.status.code(), Some(9), "{}", String::from_utf8_lossy(&out.stderr));
    let out = castor()
        .args(["primary", "--secret-file", &secret, "--service-listen", "127.0.0.1:0", "--witness", &etcd.url])
        .output()
        .expect("no vm id");
    assert_eq!(out.status.code(), Some(2), "--witness needs --vm-id");
}

/// The control socket refuses another uid (issue 12): first by its mode
/// (0600), and, if someone loosens the mode, by the peer's uid
/// (SO_PEERCRED). TCP control needs the bearer token. Needs root (CI is),
/// to run the client as `nobody`.
#[test]
fn the_control_socket_refuses_other_uids_and_tcp_needs_the_token() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let secret = dir.path().join("secret");
    common::auth::generate_secret_file(&secret, false).expect("secret");
    let token = dir.path().join("token");
    common::auth::write_secret_file(&token, b"control-token-0123456789").expect("token");
    let (secret, token_s) = (secret.display().to_string(), token.display().to_string());
    let ctl = dir.path().join("p.ctl");
    let spec = |name: &str, control: &str, extra: &[&str]| runtime::harness::Spec {
        exe: env!("CARGO_BIN_EXE_castor").into(),
        name: name.into(),
        args: ["primary", "--guest", "idle", "--mem", "64M", "--vcpus", "1", "--secret-file", &secret]
            .iter()
            .chain(["--service-listen", "127.0.0.1:0", "--control", control].iter())
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect(),
        dir: dir.path().to_path_buf(),
        env: vec![],
    };
    let p = spec("p", &ctl.display().to_string(), &[]).start().expect("primary");
    assert_eq!(std::fs::metadata(&ctl).expect("socket").permissions().mode() & 0o777, 0o600);

    // the client as another uid: a copy of the binary anyone can run
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false);
    if root {
        let exe = dir.path().join("castor-copy");
        std::fs::copy(env!("CARGO_BIN_EXE_castor"), &exe).expect("copy");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let as_nobody = |cmd: &str| {
            std::process::Command::new(&exe)
                .args([cmd, "--control", &ctl.display().to_string()])
                .uid(65534)
                .gid(65534)
                .output()
                .expect("run as nobody")
        };
        let out = as_nobody("status");
        assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("ermission denied"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // someone loosens the socket's mode: the peer's uid still decides
        std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o666)).expect("chmod socket");
        for cmd in ["status", "unprotect"] {
            let out = as_nobody(cmd);
            assert_eq!(out.status.code(), Some(8), "{}", String::from_utf8_lossy(&out.stderr));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("uid 65534 may not use this control socket"), "{err}");
        }
        eprintln!("another uid: refused by the socket's mode, and by its uid once the mode was loosened");
    } else {
        eprintln!("not root: the other-uid part of this test needs root to run a client as nobody (CI runs as root)");
    }
    // root (or the owner) is served
    let st = castor().args(["status", "--control", &ctl.display().to_string()]).output().expect("status");
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    drop(p);

    // TCP: only with a token file, and every request must carry it
    let refused = castor()
        .args(["primary", "--guest", "idle", "--mem", "64M", "--vcpus", "1", "--secret-file", &secret])
        .args(["--service-listen", "127.0.0.1:0", "--control", "tcp:127.0.0.1:0"])
        .output()
        .expect("primary without token");
    assert_eq!(refused.status.code(), Some(4), "{}", String::from_utf8_lossy(&refused.stderr));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--control-token"));
    let t = spec("t", "tcp:127.0.0.1:0", &["--control-token", &token_s]).start().expect("tcp primary");
    let addr = t.control.to_string();
    assert!(addr.starts_with("tcp:127.0.0.1:") && !addr.ends_with(":0"), "{addr}");
    let no = castor().args(["status", "--control", &addr]).output().expect("status");
    assert_eq!(no.status.code(), Some(8), "{}", String::from_utf8_lossy(&no.stderr));
    assert!(String::from_utf8_lossy(&no.stderr).contains("bearer token"));
    let yes = castor().args(["status", "--control", &addr, "--control-token", &token_s]).output().expect("status");
    assert!(yes.status.success(), "{}", String::from_utf8_lossy(&yes.stderr));
    let v: Value = serde_json::from_slice(&yes.stdout).expect("status JSON");
    assert_eq!(v["role"], "primary");
}

/// `castor vm`: the exit codes of docs/operations.md against a real etcd
/// (2 bad command line, 8 refused, 9 unreachable) and `list --json`.
#[test]
fn vm_commands_answer_with_their_documented_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = witness::server::Etcd::start(&dir.path().join("etcd")).expect("etcd (scripts/deps.sh installs it)");
    let vm = |args: &[&str]| {
        let o = castor().arg("vm").args(args).output().expect("castor vm");
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let url = etcd.url.as_str();
    assert_eq!(vm(&["list"]).0, Some(2), "no --witness");
    assert_eq!(vm(&["create", "a/b", "--witness", url]).0, Some(2), "a bad name");
    assert_eq!(vm(&["create", "pool", "--witness", url]).0, Some(2), "a reserved name");
    assert_eq!(vm(&["create", "x", "--guest", "redis", "--witness", url]).0, Some(2), "the pool runs kv");
    let (code, out, err) = vm(&["create", "web1", "--witness", url, "--mem", "64M", "--vcpus", "1"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(vm(&["create", "web1", "--witness", url]).0, Some(8), "exists");
    let (code, out, _) = vm(&["list", "--witness", url, "--json"]);
    assert_eq!(code, Some(0));
    let rows: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON array");
    assert_eq!(rows[0]["name"], "web1");
    assert_eq!(rows[0]["spec"]["mem"], 64 << 20);
    assert_eq!(rows[0]["protection"], "unprotected");
    assert_eq!(rows[0]["reason"], "no_host_for_primary", "no agent runs: {rows}");
    assert_eq!(vm(&["show", "nope", "--witness", url]).0, Some(8));
    assert_eq!(vm(&["switchover", "web1", "--witness", url]).0, Some(8), "not protected");
    let (code, out, err) = vm(&["delete", "web1", "--witness", url, "--wait-s", "5"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(vm(&["delete", "web1", "--witness", url]).0, Some(8), "gone");
    // nothing listens on port 1
    assert_eq!(vm(&["list", "--witness", "http://127.0.0.1:1", "--witness-timeout-ms", "200"]).0, Some(9));
}
