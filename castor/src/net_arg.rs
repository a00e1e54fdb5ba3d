//! `--net tap=NAME,mac=MAC[,ip=A.B.C.D/P][,gw=A.B.C.D][,bridge=BR]`: how a
//! node reaches the guest's network (docs/operations.md).
//!
//! * `tap`: the host's TAP device for the guest's card (created if missing,
//!   brought up);
//! * `mac`: the guest's MAC, the same on both nodes of a pair (checked at
//!   the Hello);
//! * `ip`: the guest's static IPv4 address and prefix (the primary that
//!   boots the guest; a secondary takes the guest's from its state);
//! * `gw`: the guest's default gateway, if any;
//! * `bridge`: put the TAP on this existing bridge (`ip link set TAP master BR`);
//! * `netns`: first move the TAP into this existing network namespace (the
//!   bridge is then that namespace's): the guest's network lives there
//!   while the node's own sockets (replication, control, witness) stay in
//!   the node's namespace. The tests and the demo use it.

use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::Arc;

use vmm::net::tap::Tap;

/// A parsed `--net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetArg {
    pub tap: String,
    pub mac: [u8; 6],
    pub ip: Option<(Ipv4Addr, u8)>,
    pub gateway: Option<Ipv4Addr>,
    pub bridge: Option<String>,
    pub netns: Option<String>,
}

/// Errors of `--net` and of setting the network up.
#[derive(Debug, thiserror::Error)]
pub enum NetArgError {
    #[error(
        "--net: {0} (the form is tap=NAME,mac=52:54:00:12:34:56[,ip=10.0.0.2/24][,gw=10.0.0.1][,bridge=BR][,netns=NS])"
    )]
    Syntax(String),
    #[error(transparent)]
    Tap(#[from] vmm::net::NetError),
    #[error("cannot set TAP {tap} up ({step}): {why}")]
    Setup { tap: String, step: String, why: String },
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (b, p) in m.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

fn valid_ifname(s: &str) -> bool {
    !s.is_empty() && s.len() < 16 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn valid_nsname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl FromStr for NetArg {
    type Err = NetArgError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |m: String| NetArgError::Syntax(m);
        let (mut tap, mut mac, mut ip, mut gateway, mut bridge, mut netns) = (None, None, None, None, None, None);
        for item in s.split(',') {
            let (k, v) = item.split_once('=').ok_or_else(|| bad(format!("{item:?} is not key=value")))?;
            match k {
                "tap" if valid_ifname(v) => tap = Some(v.to_string()),
                "tap" => return Err(bad(format!("{v:?} is not an interface name (1-15 of a-z, 0-9, -, _, .)"))),
                "mac" => {
                    let m = parse_mac(v).ok_or_else(|| bad(format!("{v:?} is not a MAC address")))?;
                    if m[0] & 1 != 0 {
                        return Err(bad(format!("{v} is a multicast address")));
                    }
                    mac = Some(m);
                }
                "ip" => {
                    let (a, p) =
                        v.split_once('/').ok_or_else(|| bad(format!("ip {v:?} needs a prefix, as 10.0.0.2/24")))?;
                    let a: Ipv4Addr = a.parse().map_err(|_| bad(format!("{a:?} is not an IPv4 address")))?;
                    let p: u8 = p
                        .parse()
                        .ok()
                        .filter(|p| (1..=30).contains(p))
                        .ok_or_else(|| bad(format!("prefix {p:?} is not 1-30")))?;
                    ip = Some((a, p));
                }
                "gw" => gateway = Some(v.parse().map_err(|_| bad(format!("gw {v:?} is not an IPv4 address")))?),
                "bridge" if valid_ifname(v) => bridge = Some(v.to_string()),
                "bridge" => return Err(bad(format!("{v:?} is not an interface name"))),
                "netns" if valid_nsname(v) => netns = Some(v.to_string()),
                "netns" => return Err(bad(format!("{v:?} is not a namespace name"))),
                _ => return Err(bad(format!("unknown key {k:?}"))),
            }
        }
        Ok(NetArg {
            tap: tap.ok_or_else(|| bad("tap= is missing".into()))?,
            mac: mac.ok_or_else(|| bad("mac= is missing".into()))?,
            ip,
            gateway,
            bridge,
            netns,
        })
    }
}

impl NetArg {
    /// Opens the TAP (created if missing, brought up), moves it into the
    /// namespace and puts it on the bridge, if they are named.
    pub fn open(&self) -> Result<Arc<Tap>, NetArgError> {
        let tap = Tap::open(&self.tap)?;
        let ip = |args: &[&str]| -> Result<(), NetArgError> {
            let err =
                |why: String| NetArgError::Setup { tap: self.tap.clone(), step: format!("ip {}", args.join(" ")), why };
            let out =
                std::process::Command::new("ip").args(args).output().map_err(|e| err(format!("cannot run ip: {e}")))?;
            if !out.status.success() {
                return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
            }
            Ok(())
        };
        let mut ns = Vec::new();
        if let Some(n) = &self.netns {
            // the open file stays the TAP's wherever the interface lives
            ip(&["link", "set", "dev", &self.tap, "netns", n])?;
            ns = vec!["-n", n.as_str()];
        }
        let mut up = ns.clone();
        up.extend(["link", "set", "dev", &self.tap]);
        if let Some(br) = &self.bridge {
            up.extend(["master", br.as_str()]);
        }
        up.push("up");
        ip(&up)?;
        Ok(tap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_net_option_parses_and_names_what_is_wrong() {
        let n: NetArg =
            "tap=ct0,mac=52:54:00:12:34:56,ip=10.0.0.2/24,gw=10.0.0.1,bridge=br-c,netns=ns1".parse().expect("parse");
        assert_eq!(n.netns.as_deref(), Some("ns1"));
        assert_eq!(n.tap, "ct0");
        assert_eq!(n.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(n.ip, Some((Ipv4Addr::new(10, 0, 0, 2), 24)));
        assert_eq!(n.gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(n.bridge.as_deref(), Some("br-c"));
        let short: NetArg = "mac=52:54:00:12:34:56,tap=t".parse().expect("parse");
        assert_eq!((short.ip, short.bridge), (None, None));
        for (bad, says) in [
            ("tap=t", "mac= is missing"),
            ("mac=52:54:00:12:34:56", "tap= is missing"),
            ("tap=t,mac=52:54:00:12:34", "not a MAC"),
            ("tap=t,mac=01:00:5e:00:00:01", "multicast"),
            ("tap=t,mac=52:54:00:12:34:56,ip=10.0.0.2", "needs a prefix"),
            ("tap=t,mac=52:54:00:12:34:56,ip=10.0.0.2/31", "prefix"),
            ("tap=t,mac=52:54:00:12:34:56,ip=10.0.0.300/24", "not an IPv4"),
            ("tap=a-name-far-too-long,mac=52:54:00:12:34:56", "interface name"),
            ("tap=t;rm,mac=52:54:00:12:34:56", "interface name"),
            ("tap=t,mac=52:54:00:12:34:56,colour=red", "unknown key"),
            ("tap", "key=value"),
            ("tap=t,mac=52:54:00:12:34:56,netns=../x", "namespace name"),
        ] {
            let e = bad.parse::<NetArg>().expect_err(bad).to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(e.contains("the form is"), "{e}");
        }
    }
}
