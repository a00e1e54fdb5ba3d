//! `castor demo --pool 3 --json`, once, as a user runs it: three agents,
//! two VMs under load, a host killed with everything it runs; the report
//! must show both VMs served and protected again with nothing acknowledged
//! lost or applied twice, and the demo must leave no process or temporary
//! directory behind.

use std::process::Command;

use failover_tests::{castor_bin, serial};

#[test]
fn the_pool_demo_kills_a_host_and_reports_both_vms_protected_again_with_nothing_lost() {
    let _g = serial();
    let out = Command::new(castor_bin())
        .args(["demo", "--pool", "3", "--json", "--mem", "64M", "--seconds", "6", "--clients", "8"])
        .output()
        .expect("castor demo");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprint!("{stderr}");
    assert_eq!(out.status.code(), Some(0), "castor demo --pool 3 failed:\n{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    let r: serde_json::Value = serde_json::from_str(last).expect("the last line is one JSON object");
    eprintln!("{r}");
    assert_eq!(r["ok"], true, "{r}");
    let dead = r["killed_host"].as_str().expect("killed_host");
    let vms = r["vms"].as_array().expect("vms");
    assert_eq!(vms.iter().map(|v| v["name"].as_str().unwrap()).collect::<Vec<_>>(), ["vm1", "vm2"]);
    for v in vms {
        assert_eq!((v["lost_acked_ops"].as_u64(), v["duplicate_ops"].as_u64()), (Some(0), Some(0)), "{v}");
        assert!(v["acked_ops"].as_u64().is_some_and(|n| n > 100), "{v}");
        assert!(v["keys_checked"].as_u64().is_some_and(|n| n > 0), "{v}");
        // protected again, on hosts other than the dead one
        assert!(v["reprotected_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{v}");
        assert!(v["primary_host"] != dead && v["secondary_host"] != dead && v["primary_host"] != v["secondary_host"]);
        if !v["lost_node"].is_null() {
            assert!(v["failover_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{v}");
            assert!(v["reprotected_ms"].as_f64().unwrap() > 0.0, "{v}");
        }
    }
    // the host killed held a primary: that VM failed over (a new term)
    let failed_over: Vec<&serde_json::Value> = vms.iter().filter(|v| v["lost_node"] == "primary").collect();
    assert!(!failed_over.is_empty(), "the killed host held a primary: {r}");
    assert!(failed_over.iter().all(|v| v["term"].as_u64() == Some(2)), "{r}");
    // nothing left behind: no process of the demo, no temporary directory
    let demo_dir = stderr
        .lines()
        .find_map(|l| l.split("logs in ").nth(1))
        .map(|s| s.split_whitespace().next().unwrap_or_default().to_string())
        .expect("the demo names its directory");
    assert!(!std::path::Path::new(&demo_dir).exists(), "{demo_dir} removed");
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(!cmdline.contains(&demo_dir), "a process of the demo was left running: {cmdline}");
    }
}
