//! The network row (part 5 of the bench): Debian's redis-benchmark against
//! the networked guest (redis), unprotected (a primary alone) and protected
//! (a pair), in the same run and namespace: requests/s and latency p50/p99
//! at 1, 16 and 64 connections, and the output hold inside castor (from the
//! protected primary's status). Skipped, with a note, where no namespace
//! can be made.

use std::path::Path;

use runtime::harness::NodeProc;
use runtime::netns::TestNet;
use serde::Serialize;

use super::BenchError;
use crate::demo::{node_args, start_node};

use runtime::netns::GUEST_IP;
const MAC: [u8; 6] = runtime::netns::guest_mac(2);

/// One redis-benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct NetRow {
    pub protected: bool,
    pub connections: u32,
    pub requests_per_s: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    /// Protected rows: the pair stayed protected through the run (no loss
    /// of the secondary, no resync). A row where it did not is reported
    /// but not compared.
    pub protected_throughout: bool,
}

/// The network row's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NetBench {
    pub rows: Vec<NetRow>,
    /// protected / unprotected requests/s at 64 connections.
    pub throughput_ratio_64: f64,
    /// protected minus unprotected p50 latency at 16 connections (ms).
    pub added_latency_ms_p50_16: f64,
    pub added_latency_ms_p99_16: f64,
    /// How long released output waited inside castor for its ack (protected).
    pub output_hold_us_p50: f64,
    pub output_hold_us_p99: f64,
    pub note: Option<String>,
}

/// Why a protected run does not count: the pair did not stay protected
/// through it (`before` and `after` are the primary's status around it).
fn pair_broke(before: Option<&serde_json::Value>, after: Option<&serde_json::Value>) -> Option<String> {
    let (Some(b), Some(a)) = (before, after) else {
        return Some("the primary's status could not be read".into());
    };
    if a["protection"] != "protected" {
        return Some(format!("the primary ended {} ({})", a["protection"], a["pair_error"]));
    }
    for k in ["syncs", "live_syncs", "tracking_lost"] {
        if a[k] != b[k] {
            return Some(format!("{k} {} -> {}: the pair synced again during the run", b[k], a[k]));
        }
    }
    None
}

fn bench_one(net: &TestNet, c: u32, n: u32) -> Result<(f64, f64, f64), BenchError> {
    let out = net
        .command("redis-benchmark")
        .args([
            "-h",
            &GUEST_IP.to_string(),
            "-c",
            &c.to_string(),
            "-n",
            &n.to_string(),
            "-t",
            "incr",
            "-r",
            "1000",
            "--csv",
        ])
        .output()
        .map_err(|e| BenchError::E2e(format!("redis-benchmark (scripts/deps.sh installs redis-tools): {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let row = text.lines().find(|l| l.starts_with("\"INCR\"")).ok_or_else(|| {
        BenchError::E2e(format!("redis-benchmark printed no INCR row: {text} {}", String::from_utf8_lossy(&out.stderr)))
    })?;
    let v: Vec<f64> = row.split(',').skip(1).filter_map(|x| x.trim_matches('"').parse().ok()).collect();
    if v.len() < 6 {
        return Err(BenchError::E2e(format!("unexpected redis-benchmark row {row}")));
    }
    Ok((v[0], v[3], v[5]))
}

fn nodes(net: &TestNet, dir: &Path, protected: bool) -> Result<Vec<NodeProc>, BenchError> {
    let secret = dir.join("secret");
    common::auth::generate_secret_file(&secret, true).map_err(|e| BenchError::Io(e.to_string()))?;
    let tag = std::process::id() % 10_000;
    let err = |e: crate::demo::DemoError| BenchError::E2e(e.to_string());
    let mut v = Vec::new();
    let mut pargs = node_args(Some("primary"), &secret);
    pargs.extend(["--guest".into(), "redis".into(), "--vcpus".into(), "1".into()]);
    pargs.extend(["--net".into(), net.net_arg(&format!("cba{tag}"), MAC, Some(GUEST_IP))]);
    if protected {
        let mut sargs = node_args(Some("secondary"), &secret);
        sargs.extend(["--listen".into(), "127.0.0.1:0".into()]);
        sargs.extend(["--net".into(), net.net_arg(&format!("cbb{tag}"), MAC, None)]);
        let s = start_node("bench-net-s", &sargs, dir).map_err(err)?;
        pargs.extend(["--peer".into(), s.listen.map(|a| a.to_string()).unwrap_or_default()]);
        v.push(s);
    }
    let p = start_node("bench-net-p", &pargs, dir).map_err(err)?;
    let want = if protected { "protected" } else { "unprotected" };
    if p.wait_status(std::time::Duration::from_secs(60), |s| s["protection"] == want).is_none() {
        return Err(BenchError::E2e(format!("the networked primary never became {want}:\n{}", p.log_tail())));
    }
    v.push(p);
    Ok(v)
}

pub(super) fn network(quick: bool, live: &dyn Fn(String)) -> Result<NetBench, BenchError> {
    let net = match TestNet::create("bench") {
        Ok(n) => n,
        Err(e) => {
            let note = format!("network row skipped: {e}");
            live(note.clone());
            return Ok(NetBench { note: Some(note), ..Default::default() });
        }
    };
    // the nodes run inside it (their sockets on its loopback)
    let _inside = net.scope().map_err(|e| BenchError::E2e(e.to_string()))?;
    let dir = std::env::temp_dir().join(format!("castor-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Io(e.to_string()))?;
    let mut b = NetBench::default();
    for protected in [false, true] {
        let ns = nodes(&net, &dir, protected)?;
        for c in [1u32, 16, 64] {
            let n = if quick { 1000 } else { 5000 } * if c == 1 { 1 } else { 2 };
            let before = ns.last().and_then(NodeProc::status);
            let (rps, p50, p99) = bench_one(&net, c, n)?;
            let broke = if protected {
                pair_broke(before.as_ref(), ns.last().and_then(NodeProc::status).as_ref())
            } else {
                None
            };
            live(format!(
                "network: {} {c:>2} connections: {rps:>8.0} INCR/s, latency p50 {p50:.2} ms p99 {p99:.2} ms{}",
                if protected { "protected  " } else { "unprotected" },
                broke.as_deref().map(|w| format!(" (NOT COMPARED: {w})")).unwrap_or_default()
            ));
            if let Some(why) = &broke {
                tracing::warn!(connections = c, %why, "the pair did not stay protected through a network bench run");
            }
            b.rows.push(NetRow {
                protected,
                connections: c,
                requests_per_s: rps,
                latency_ms_p50: p50,
                latency_ms_p99: p99,
                protected_throughout: protected && broke.is_none(),
            });
        }
        if protected {
            if let Some(s) = ns.last().and_then(NodeProc::status) {
                b.output_hold_us_p50 = s["output_hold_us_p50"].as_f64().unwrap_or(0.0);
                b.output_hold_us_p99 = s["output_hold_us_p99"].as_f64().unwrap_or(0.0);
            }
        }
        drop(ns);
    }
    // (a protected row whose pair broke is not compared)
    let get = |p: bool, c: u32| {
        b.rows.iter().find(|r| r.protected == p && r.connections == c && (!p || r.protected_throughout)).cloned()
    };
    let ratio = match get(false, 64).zip(get(true, 64)) {
        Some((u, p)) => {
            b.throughput_ratio_64 = p.requests_per_s / u.requests_per_s.max(1e-9);
            format!("{:.2}", b.throughput_ratio_64)
        }
        None => "not compared".into(),
    };
    let added = match get(false, 16).zip(get(true, 16)) {
        Some((u, p)) => {
            b.added_latency_ms_p50_16 = p.latency_ms_p50 - u.latency_ms_p50;
            b.added_latency_ms_p99_16 = p.latency_ms_p99 - u.latency_ms_p99;
            format!("p50 {:.2} ms, p99 {:.2} ms", b.added_latency_ms_p50_16, b.added_latency_ms_p99_16)
        }
        None => "not compared".into(),
    };
    live(format!(
        "network: protected/unprotected INCR/s at 64 connections {ratio}; added latency at 16 connections {added}; output hold inside castor p50 {:.0} us, p99 {:.0} us",
        b.output_hold_us_p50, b.output_hold_us_p99
    ));
    if b.rows.iter().any(|r| r.protected && !r.protected_throughout) {
        // the nodes' logs stay for a look at why
        let note =
            format!("the pair did not stay protected through every run; the nodes' logs are kept in {}", dir.display());
        live(format!("network: {note}"));
        b.note = Some(note);
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::pair_broke;
    use serde_json::json;

    #[test]
    fn a_protected_run_counts_only_if_the_pair_stayed_protected() {
        let s = |p: &str, syncs: u64, live: u64, lost: u64| json!({"protection": p, "pair_error": null, "syncs": syncs, "live_syncs": live, "tracking_lost": lost});
        let ok = s("protected", 1, 0, 0);
        assert_eq!(pair_broke(Some(&ok), Some(&ok)), None);
        assert!(pair_broke(Some(&ok), Some(&s("unprotected", 1, 0, 0))).is_some(), "lost its secondary");
        assert!(pair_broke(Some(&ok), Some(&s("protected", 2, 0, 0))).is_some(), "synced again in between");
        assert!(pair_broke(Some(&ok), Some(&s("protected", 1, 1, 0))).is_some(), "a live resync");
        assert!(pair_broke(Some(&ok), Some(&s("protected", 1, 0, 1))).is_some(), "tracking lost");
        assert!(pair_broke(None, Some(&ok)).is_some(), "no status");
    }
}
