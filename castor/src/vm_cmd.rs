//! `castor vm create|list|show|delete`: the pool's desired state in etcd,
//! and what the agents and the witness made of it.

use std::time::Duration;

use clap::{Args, Subcommand};
use witness::pool::store::{Store, StoreError};
use witness::pool::{protection, unix_ms, unprotected_for, Protection, View, VmSpec};

use crate::run::{parse_size, GuestArg};

/// `castor vm`.
#[derive(Debug, Args)]
pub struct VmArgs {
    /// The pool's etcd client URLs (`http://HOST:PORT[,...]`).
    #[arg(long, value_name = "URL[,URL...]", global = true)]
    witness: Option<String>,
    /// Deadline of one etcd request.
    #[arg(long, default_value_t = 500, global = true)]
    witness_timeout_ms: u64,
    #[command(subcommand)]
    cmd: VmCmd,
}

#[derive(Debug, Subcommand)]
enum VmCmd {
    /// Ask the pool to run and protect a VM (desired state).
    Create {
        name: String,
        /// The built-in guest: `kv`, or `redis` (the networked guest: needs
        /// `--ip`, and hosts whose agents have `--net-bridge`).
        #[arg(long, value_enum, default_value = "kv")]
        guest: GuestArg,
        /// The networked guest's static IPv4 address and prefix (`redis`).
        #[arg(long, value_name = "A.B.C.D/P")]
        ip: Option<String>,
        /// Its default gateway, if any (`redis`).
        #[arg(long, value_name = "A.B.C.D")]
        gw: Option<String>,
        /// Its MAC (`redis`); default: a locally administered one made from
        /// the VM's name (02:ca:57:..).
        #[arg(long, value_name = "MAC")]
        mac: Option<String>,
        /// Guest memory (K, M or G suffix).
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        mem: u64,
        #[arg(long, default_value_t = 2)]
        vcpus: u32,
    },
    /// Every VM: the hosts of its primary and secondary, protection, term,
    /// and why it is not protected.
    List {
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// One VM as one JSON object (spec, placement with addresses, witness).
    Show { name: String },
    /// Planned switchover: the VM's primary hands over to its secondary
    /// (refused unless protected); the pool then protects it again.
    Switchover {
        name: String,
        /// How long to wait for the handover.
        #[arg(long, default_value_t = 30)]
        wait_s: u64,
    },
    /// Stop a VM everywhere: its agents stop its nodes; once none runs,
    /// its witness history is cleared (the name may be created again).
    Delete {
        name: String,
        /// How long to wait for its nodes to stop.
        #[arg(long, default_value_t = 30)]
        wait_s: u64,
    },
}

/// Errors of `castor vm`.
#[derive(Debug, thiserror::Error)]
pub enum VmCmdError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Usage(String),
    /// Another VM of the pool has this address or MAC.
    #[error("{what} {value} is already vm {vm}'s (every VM of a pool needs its own address and MAC)")]
    NetTaken { what: &'static str, value: String, vm: String },
}

impl VmCmdError {
    /// 2 bad command line; 8 refused (exists, has a history, no such vm,
    /// still running); 9 etcd unreachable or holding what castor cannot read.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmCmdError::Usage(_) | VmCmdError::Store(StoreError::Config(_)) => 2,
            VmCmdError::Store(
                StoreError::VmExists(_)
                | StoreError::VmHasHistory { .. }
                | StoreError::NoVm(_)
                | StoreError::StillRunning { .. }
                | StoreError::Busy(_)
                | StoreError::HostTaken(_),
            ) => 8,
            VmCmdError::NetTaken { .. } => 8,
            VmCmdError::Store(StoreError::Unreachable(_) | StoreError::Corrupt { .. }) => 9,
        }
    }
}

/// A duration as the table shows it: `850ms`, `12.3s`, `4m05s`, `2h07m`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0..=999 => format!("{ms}ms"),
        1000..=59_999 => format!("{:.1}s", ms as f64 / 1e3),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// One VM as `list` and `show` report it, at `now_ms` (Unix ms): for how
/// long it has been unprotected comes from its record in etcd (the time
/// the VM was created, or an agent first read it unprotected), not from
/// when this command first saw it.
pub fn vm_json(view: &View, vm: &str, now_ms: u64) -> serde_json::Value {
    let p = view.placement.get(vm).cloned().unwrap_or_default();
    let w = view.witness.get(vm).cloned().unwrap_or_default();
    let (protected, why) = match protection(view, vm) {
        Protection::Protected => ("protected", None),
        Protection::Unprotected(r) => ("unprotected", Some(r)),
    };
    let record = view.unprotected.get(vm).filter(|_| why.is_some());
    serde_json::json!({
        "name": vm,
        "spec": view.vms.get(vm),
        "primary": p.primary,
        "secondary": p.secondary,
        "protection": protected,
        "reason": why,
        "why": why.map(|r| r.to_string()),
        "unprotected_since_ms": record.map(|u| u.since_ms),
        "unprotected_for_ms": unprotected_for(view, vm, now_ms).map(|d| d.as_millis() as u64),
        "unprotected_recorded_by": record.map(|u| &u.by),
        "term": w.term,
        "witness_primary": w.primary.as_ref().map(|h| &h.node),
        "witness_sync": w.sync.as_ref().map(|h| &h.node),
    })
}

/// A locally administered MAC made from a VM's name (FNV-1a of the name,
/// so the same name gives the same MAC on every host and every run).
pub fn mac_for(name: &str) -> String {
    let h = name.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    let b = h.to_be_bytes();
    format!("02:ca:57:{:02x}:{:02x}:{:02x}", b[1], b[2], b[3])
}

/// The network identity of a `--guest redis` VM, checked as a node's
/// `--net` would be.
fn vm_net(
    name: &str,
    ip: Option<String>,
    gw: Option<String>,
    mac: Option<String>,
) -> Result<witness::pool::VmNet, VmCmdError> {
    let Some(ip) = ip else {
        return Err(VmCmdError::Usage("--guest redis needs --ip A.B.C.D/P (the guest's static address)".into()));
    };
    let mac = mac.unwrap_or_else(|| mac_for(name));
    if u8::from_str_radix(mac.get(..2).unwrap_or_default(), 16).is_ok_and(|b| b & 1 == 1) {
        return Err(VmCmdError::Usage(format!("--mac {mac}: a multicast address (its first byte is odd)")));
    }
    let gw_part = gw.as_ref().map(|g| format!(",gw={g}")).unwrap_or_default();
    format!("tap=check,mac={mac},ip={ip}{gw_part}")
        .parse::<crate::net_arg::NetArg>()
        .map_err(|e| VmCmdError::Usage(e.to_string()))?;
    Ok(witness::pool::VmNet { mac, ip, gw })
}

/// No other VM of the pool has `n`'s address or MAC (as etcd holds them
/// now: two creates racing with one address are not caught).
fn net_free(view: &View, n: &witness::pool::VmNet) -> Result<(), VmCmdError> {
    let addr = |ip: &str| ip.split('/').next().unwrap_or_default().to_string();
    for (vm, spec) in &view.vms {
        let Some(o) = &spec.net else { continue };
        if addr(&o.ip) == addr(&n.ip) {
            return Err(VmCmdError::NetTaken { what: "address", value: addr(&n.ip), vm: vm.clone() });
        }
        if o.mac.eq_ignore_ascii_case(&n.mac) {
            return Err(VmCmdError::NetTaken { what: "MAC", value: n.mac.clone(), vm: vm.clone() });
        }
    }
    Ok(())
}

pub fn vm(a: VmArgs) -> Result<(), VmCmdError> {
    let Some(urls) = a.witness.clone() else {
        return Err(VmCmdError::Usage("--witness URL[,URL...] is needed (the pool's etcd)".into()));
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let store = rt.block_on(Store::connect(&urls, Duration::from_millis(a.witness_timeout_ms.max(10))))?;
    match a.cmd {
        VmCmd::Create { name, guest, mem, vcpus, ip, gw, mac } => {
            if vcpus == 0 {
                return Err(VmCmdError::Usage("--vcpus must be at least 1".into()));
            }
            let (guest, net) = match guest {
                GuestArg::Kv if ip.is_none() && gw.is_none() && mac.is_none() => ("kv", None),
                GuestArg::Kv => {
                    return Err(VmCmdError::Usage(
                        "--ip, --gw and --mac are for --guest redis (kv has no network card)".into(),
                    ))
                }
                GuestArg::Redis => {
                    let n = vm_net(&name, ip, gw, mac)?;
                    net_free(&rt.block_on(store.read())?, &n)?;
                    ("redis", Some(n))
                }
                other => {
                    return Err(VmCmdError::Usage(format!(
                        "--guest {other:?}: the pool runs the kv and redis guests (the others are benchmarks)"
                    )))
                }
            };
            rt.block_on(store.create_vm(&name, &VmSpec { guest: guest.into(), mem, vcpus, net }))?;
            println!("{}", serde_json::json!({"ok": true, "name": name}));
        }
        VmCmd::List { json } => {
            let view = rt.block_on(store.read())?;
            let now = unix_ms();
            let rows: Vec<serde_json::Value> = view.vms.keys().map(|vm| vm_json(&view, vm, now)).collect();
            if json {
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<16} {:<12} {:<12} {:<12} {:>5} {:>8}  WHY",
                    "NAME", "PRIMARY", "SECONDARY", "PROTECTION", "TERM", "FOR"
                );
                let host = |v: &serde_json::Value| v["host"].as_str().unwrap_or("-").to_string();
                for r in rows {
                    // unprotected but not recorded yet (no agent has read it so): "?"
                    let for_ = match (&r["reason"], r["unprotected_for_ms"].as_u64()) {
                        (serde_json::Value::Null, _) => "-".to_string(),
                        (_, Some(ms)) => human(Duration::from_millis(ms)),
                        (_, None) => "?".to_string(),
                    };
                    println!(
                        "{:<16} {:<12} {:<12} {:<12} {:>5} {:>8}  {}",
                        r["name"].as_str().unwrap_or(""),
                        host(&r["primary"]),
                        host(&r["secondary"]),
                        r["protection"].as_str().unwrap_or(""),
                        r["term"].as_u64().unwrap_or(0),
                        for_,
                        r["why"].as_str().unwrap_or("-"),
                    );
                }
            }
        }
        VmCmd::Show { name } => {
            let view = rt.block_on(store.read())?;
            if !view.vms.contains_key(&name) {
                return Err(StoreError::NoVm(name).into());
            }
            println!("{}", vm_json(&view, &name, unix_ms()));
        }
        VmCmd::Switchover { name, wait_s } => {
            let view = rt.block_on(store.read())?;
            if !view.vms.contains_key(&name) {
                return Err(StoreError::NoVm(name).into());
            }
            if let Protection::Unprotected(why) = protection(&view, &name) {
                return Err(StoreError::Busy(format!("{name} is not protected: {why}")).into());
            }
            let term = view.witness.get(&name).map_or(0, |w| w.term);
            let from = view.placement.get(&name).and_then(|p| p.primary.as_ref()).map(|p| p.host.clone());
            let after = rt.block_on(store.switchover(&name, term, Duration::from_secs(wait_s)))?;
            let to = after.witness.get(&name).and_then(|w| w.primary.as_ref()).map(|h| h.node.clone());
            println!(
                "{}",
                serde_json::json!({"ok": true, "name": name, "from_host": from, "term": after.witness[&name].term, "primary": to})
            );
        }
        VmCmd::Delete { name, wait_s } => {
            rt.block_on(store.delete_vm(&name, Duration::from_secs(wait_s)))?;
            println!("{}", serde_json::json!({"ok": true, "name": name}));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_networked_vm_needs_a_valid_address_and_gets_a_stable_local_mac() {
        let n = vm_net("web", Some("10.0.0.2/24".into()), None, None).expect("valid");
        assert_eq!(n.mac, mac_for("web"));
        assert_eq!(mac_for("web"), mac_for("web"));
        assert_ne!(mac_for("web"), mac_for("web2"));
        assert!(n.mac.starts_with("02:"), "locally administered, unicast");
        assert!(matches!(vm_net("web", None, None, None), Err(VmCmdError::Usage(_))), "--ip is needed");
        for bad in ["10.0.0.2", "10.0.0.300/24", "10.0.0.2/40"] {
            assert!(vm_net("web", Some(bad.into()), None, None).is_err(), "{bad}");
        }
        assert!(vm_net("web", Some("10.0.0.2/24".into()), Some("nope".into()), None).is_err());
        assert!(vm_net("web", Some("10.0.0.2/24".into()), None, Some("52:54:00:12:34".into())).is_err());
        let n = vm_net("web", Some("10.0.0.2/24".into()), Some("10.0.0.1".into()), Some("52:54:00:12:34:56".into()))
            .expect("valid");
        assert_eq!((n.mac.as_str(), n.gw.as_deref()), ("52:54:00:12:34:56", Some("10.0.0.1")));
        assert!(
            vm_net("web", Some("10.0.0.2/24".into()), None, Some("01:00:5e:00:00:01".into())).is_err(),
            "multicast"
        );
    }

    #[test]
    fn two_vms_never_share_an_address_or_a_mac() {
        let mut v = View::default();
        let taken = vm_net("a", Some("10.0.0.2/24".into()), None, None).unwrap();
        v.vms.insert("a".into(), VmSpec { guest: "redis".into(), mem: 64 << 20, vcpus: 1, net: Some(taken.clone()) });
        v.vms.insert("k".into(), VmSpec { guest: "kv".into(), mem: 64 << 20, vcpus: 1, net: None });
        let same_ip = vm_net("b", Some("10.0.0.2/16".into()), None, None).unwrap();
        assert!(matches!(net_free(&v, &same_ip), Err(VmCmdError::NetTaken { what: "address", .. })));
        let same_mac = vm_net("b", Some("10.0.0.3/24".into()), None, Some(taken.mac.to_uppercase())).unwrap();
        assert!(matches!(net_free(&v, &same_mac), Err(VmCmdError::NetTaken { what: "MAC", .. })));
        assert!(net_free(&v, &vm_net("b", Some("10.0.0.3/24".into()), None, None).unwrap()).is_ok());
        assert_eq!(VmCmdError::NetTaken { what: "MAC", value: String::new(), vm: String::new() }.exit_code(), 8);
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(human(Duration::from_millis(0)), "0ms");
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(human(Duration::from_millis(245_000)), "4m05s");
        assert_eq!(human(Duration::from_secs(2 * 3600 + 7 * 60 + 5)), "2h07m");
    }

    #[test]
    fn list_tells_for_how_long_and_why_from_the_record_in_etcd() {
        let mut v = View::default();
        v.hosts.insert("a".into(), witness::pool::HostInfo { capacity: 1, net: false });
        v.vms.insert("vm".into(), VmSpec { guest: "kv".into(), mem: 64 << 20, vcpus: 1, net: None });
        let placed = |host: &str, port| witness::pool::Placed {
            host: host.into(),
            addr: Some(([127, 0, 0, 1], port).into()),
            service: Some(([127, 0, 0, 1], port + 1).into()),
        };
        v.placement
            .insert("vm".into(), witness::pool::VmPlacement { primary: Some(placed("a", 7000)), secondary: None });
        let node = |n: &str| Some(witness::Holder { node: n.into(), term: 1 });
        v.witness.insert("vm".into(), witness::pool::WitnessView { term: 1, sync: None, primary: node("p") });
        let j = vm_json(&v, "vm", 10_000);
        assert_eq!(j["reason"], "no_host_for_secondary");
        assert_eq!(j["unprotected_for_ms"], serde_json::Value::Null, "not recorded yet: unknown");
        v.unprotected.insert("vm".into(), witness::pool::Unprotected { since_ms: 2_500, by: "a".into() });
        let j = vm_json(&v, "vm", 10_000);
        assert_eq!((j["unprotected_since_ms"].as_u64(), j["unprotected_for_ms"].as_u64()), (Some(2_500), Some(7_500)));
        assert_eq!(j["unprotected_recorded_by"], "a");
        assert!(j["why"].as_str().unwrap().starts_with("no host with capacity"), "{j}");
        // protected (a stale record not removed yet is not shown)
        v.placement.get_mut("vm").unwrap().secondary = Some(placed("b", 7100));
        v.witness.get_mut("vm").unwrap().sync = node("s");
        let j = vm_json(&v, "vm", 10_000);
        assert_eq!(j["protection"], "protected");
        assert_eq!(
            (&j["unprotected_for_ms"], &j["unprotected_since_ms"]),
            (&serde_json::Value::Null, &serde_json::Value::Null)
        );
    }
}
