//! A network namespace of castor's own, with a bridge, for the networked
//! guest's tests, benchmark and demo: the guest's TAP devices are moved in
//! (`--net ...,netns=NAME,bridge=br0`), the clients run inside it
//! ([`TestNet::command`]), and the namespace's own Linux stack is the
//! client end. Nothing of the guest's network exists outside it; it is
//! removed when dropped, and namespaces left by runs that died (their
//! process is gone) are removed when the next one is created.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Errors of setting a namespace up.
#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("cannot run ip: {0}")]
    Spawn(std::io::Error),
    #[error("`ip {args}` failed: {why}")]
    Ip { args: String, why: String },
    #[error("creating a network namespace needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); this process is uid {0}")]
    NotRoot(u32),
}

/// Every namespace this module makes is called `castor-<tag>-<pid>-<n>`.
const PREFIX: &str = "castor-";
/// The bridge inside the namespace.
pub const BRIDGE: &str = "br0";
/// The bridge's own (locally administered) MAC address.
pub const BRIDGE_MAC: &str = "02:ca:57:0e:00:01";
/// The namespace's own address on the bridge (the clients' end).
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The guests' subnet prefix.
pub const PREFIX_LEN: u8 = 24;
/// The address the demo, the bench and the tests give their networked
/// guest (each namespace holds one guest).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// A locally administered MAC for a guest's card; `n` tells the users apart
/// (their namespaces never meet, but a capture then names its source).
pub const fn guest_mac(n: u8) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0xca, 0x57, n]
}

fn ip(args: &[&str]) -> Result<String, NetNsError> {
    let out = Command::new("ip").args(args).output().map_err(NetNsError::Spawn)?;
    if !out.status.success() {
        return Err(NetNsError::Ip { args: args.join(" "), why: String::from_utf8_lossy(&out.stderr).trim().into() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces of this module whose process is gone. Returns how many.
pub fn remove_stale() -> usize {
    let Ok(list) = ip(&["netns", "list"]) else { return 0 };
    let mut n = 0;
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let pid = rest.split('-').rev().nth(1).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !alive(p)) && ip(&["netns", "delete", name]).is_ok() {
            n += 1;
        }
    }
    n
}

/// Moves the calling thread (only it) into the namespace `name`.
pub fn enter(name: &str) -> Result<(), NetNsError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{name}")).map_err(NetNsError::Spawn)?;
    // SAFETY: setns takes a file descriptor we own (open for the call) and
    // a flag; it changes only this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetNsError::Spawn(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A namespace with a bridge ([`BRIDGE`], address [`HOST_IP`]/24) and its
/// loopback up.
#[derive(Debug)]
pub struct TestNet {
    pub name: String,
}

impl TestNet {
    /// Creates `castor-<tag>-<pid>-<n>` (after removing stale ones).
    pub fn create(tag: &str) -> Result<TestNet, NetNsError> {
        // SAFETY: geteuid takes no arguments and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if uid != 0 {
            return Err(NetNsError::NotRoot(uid));
        }
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let stale = remove_stale();
        if stale > 0 {
            tracing::info!(stale, "removed network namespaces left by earlier runs");
        }
        let name = format!("{PREFIX}{tag}-{}-{}", std::process::id(), COUNT.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name])?;
        let net = TestNet { name };
        let n = net.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        // IPv4 only: no IPv6 neighbour discovery or MLD chatter on the bridge
        let out = net
            .command("sysctl")
            .args(["-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
            .output()
            .map_err(NetNsError::Spawn)?;
        if !out.status.success() {
            tracing::debug!(netns = n, "cannot turn IPv6 off: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        // a fixed address: a bridge whose address is not set takes its
        // ports' lowest, and changes it when a port goes (a node's TAP at its
        // exit), and the guest's neighbour entry for the clients would then
        // name an address no one answers to
        ip(&["-n", n, "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge"])?;
        ip(&["-n", n, "addr", "add", &format!("{HOST_IP}/{PREFIX_LEN}"), "dev", BRIDGE])?;
        ip(&["-n", n, "link", "set", BRIDGE, "up"])?;
        Ok(net)
    }

    /// `program` to run inside the namespace (`ip netns exec NAME program`;
    /// the process keeps its pid).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Moves the calling thread (only it) into the namespace: sockets it
    /// opens afterwards live there. For a client thread of a test.
    pub fn enter_this_thread(&self) -> Result<(), NetNsError> {
        enter(&self.name)
    }

    /// Moves the calling thread into the namespace until the returned
    /// scope is dropped, when it goes back to the namespace it was in.
    /// Processes and threads it starts meanwhile stay in the namespace
    /// (children and new threads inherit the creating thread's): a demo or a
    /// test enters it before it starts etcd, the nodes and any runtime whose
    /// threads connect to them, so their loopback sockets are the
    /// namespace's own.
    pub fn scope(&self) -> Result<NetNsScope, NetNsError> {
        let back = std::fs::File::open("/proc/thread-self/ns/net").map_err(NetNsError::Spawn)?;
        enter(&self.name)?;
        Ok(NetNsScope { back, _here: std::marker::PhantomData })
    }

    /// The `--net` value for a node's TAP `tap` in this namespace.
    pub fn net_arg(&self, tap: &str, mac: [u8; 6], guest_ip: Option<Ipv4Addr>) -> String {
        let mac = common::state::mac_text(&mac);
        let ip = guest_ip.map(|a| format!(",ip={a}/{PREFIX_LEN}")).unwrap_or_default();
        format!("tap={tap},mac={mac}{ip},bridge={BRIDGE},netns={}", self.name)
    }
}

/// The calling thread's stay in a [`TestNet`] (see [`TestNet::scope`]).
#[derive(Debug)]
pub struct NetNsScope {
    back: std::fs::File,
    /// Not `Send`: dropped on another thread, it would move that thread.
    _here: std::marker::PhantomData<*const ()>,
}

impl Drop for NetNsScope {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: setns takes the namespace file this scope opened (and still
        // owns) and a flag; it changes only this thread's network namespace.
        let rc = unsafe { libc::setns(self.back.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot return to the network namespace this thread left");
        }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            tracing::warn!(netns = %self.name, error = %e, "cannot remove the network namespace");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_is_made_with_its_bridge_and_removed() {
        let Ok(net) = TestNet::create("unit") else {
            // SAFETY: geteuid takes no arguments and cannot fail.
            assert_ne!(unsafe { libc::geteuid() }, 0, "root can create namespaces");
            return;
        };
        let name = net.name.clone();
        let links = ip(&["-n", &name, "-o", "addr", "show", "dev", BRIDGE]).expect("bridge");
        assert!(links.contains("10.77.0.1/24"), "{links}");
        let link = ip(&["-n", &name, "-o", "link", "show", "dev", BRIDGE]).expect("bridge");
        assert!(link.contains(BRIDGE_MAC), "a fixed bridge address: {link}");
        let out = net.command("ip").args(["-o", "link", "show", "lo"]).output().expect("ip netns exec");
        assert!(String::from_utf8_lossy(&out.stdout).contains("UP"), "loopback up inside");
        drop(net);
        assert!(!ip(&["netns", "list"]).expect("list").contains(&name), "removed on drop");
        // a namespace of a process that is gone is removed by the next run
        let dead = format!("{PREFIX}unit-999999999-0");
        ip(&["netns", "add", &dead]).expect("add");
        assert!(remove_stale() >= 1);
        assert!(!ip(&["netns", "list"]).expect("list").contains(&dead));
    }

    fn ns_of_this_thread() -> std::path::PathBuf {
        std::fs::read_link("/proc/thread-self/ns/net").expect("readlink")
    }

    #[test]
    fn a_scope_holds_the_thread_and_what_it_starts_inside_until_dropped() {
        let Ok(net) = TestNet::create("scope") else {
            // SAFETY: geteuid takes no arguments and cannot fail.
            assert_ne!(unsafe { libc::geteuid() }, 0, "root can create namespaces");
            return;
        };
        let root = ns_of_this_thread();
        let scope = net.scope().expect("enter");
        let inside = ns_of_this_thread();
        assert_ne!(inside, root);
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind on the namespace's loopback");
        let addr = l.local_addr().expect("addr");
        // a thread started inside stays inside, and reaches the listener
        let t = std::thread::spawn(move || (ns_of_this_thread(), std::net::TcpStream::connect(addr).is_ok()));
        let (child_ns, reached) = t.join().expect("join");
        assert_eq!(child_ns, inside);
        assert!(reached, "a thread started in the scope reaches the namespace's loopback");
        // a child process too
        let out = Command::new("readlink").arg("/proc/self/ns/net").output().expect("readlink");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), inside.to_string_lossy());
        drop(scope);
        assert_eq!(ns_of_this_thread(), root, "back where it was");
        drop(l);
    }
}
