//! The TCP side: a smoltcp interface with a static IPv4 address, one listening
//! socket per possible connection (smoltcp has no backlog), and the RESP
//! connections behind them.

use alloc::vec;
use alloc::vec::Vec;

use smoltcp::iface::{Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};


use crate::abi::BootInfo;
use crate::resp::{Conn, Limits, Store};

/// Connections served at once (one smoltcp socket each). smoltcp has no
/// backlog: a SYN finds a listening socket or is refused. A client that
/// replaces its connections at once (redis-benchmark opens new ones for each
/// test) sends its new SYNs while the old sockets are still closing, so 64
/// connections need twice that: with 80, `redis-benchmark -c 64 -t ping`
/// hung at its second test with 48 connections refused.
pub const SOCKETS: usize = 160;
const SOCK_RX: usize = 16 << 10;
const SOCK_TX: usize = 16 << 10;
/// Bytes of keys and values the store may hold.
pub const STORE_BYTES: usize = 8 << 20;

/// Network settings from the boot info.
#[derive(Debug, Clone, Copy)]
pub struct NetConfig {
    pub ip: [u8; 4],
    pub prefix: u8,
    pub gateway: Option<[u8; 4]>,
    pub port: u16,
}

impl NetConfig {
    pub fn from_boot(bi: &BootInfo) -> Result<NetConfig, &'static str> {
        if bi.net_ipv4 == [0; 4] {
            return Err("no IPv4 address in the boot info");
        }
        if bi.net_prefix == 0 || bi.net_prefix > 32 {
            return Err("bad IPv4 prefix length");
        }
        let port = if bi.net_port == 0 { crate::abi::NET_DEFAULT_PORT } else { bi.net_port as u16 };
        if bi.net_port > 0xffff {
            return Err("bad TCP port");
        }
        let gateway = (bi.net_gateway != [0; 4]).then_some(bi.net_gateway);
        Ok(NetConfig { ip: bi.net_ipv4, prefix: bi.net_prefix as u8, gateway, port })
    }
}

/// The interface, its sockets and the RESP state.
pub struct Server {
    iface: Interface,
    sockets: SocketSet<'static>,
    handles: Vec<SocketHandle>,
    conns: Vec<Conn>,
    store: Store,
    port: u16,
}

impl core::fmt::Debug for Server {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Server").field("port", &self.port).field("keys", &self.store.len()).finish_non_exhaustive()
    }
}

fn configure(s: &mut tcp::Socket<'_>) {
    s.set_ack_delay(None);
    s.set_nagle_enabled(false);
    // a vanished client frees its socket: probes when idle, abort when unanswered
    s.set_keep_alive(Some(Duration::from_secs(30)));
    s.set_timeout(Some(Duration::from_secs(90)));
}

impl Server {
    /// An interface with `mac` and `cfg`'s address over `dev`, and
    /// [`SOCKETS`] sockets listening on `cfg.port`.
    pub fn new<D: Device>(dev: &mut D, mac: [u8; 6], cfg: &NetConfig, seed: u64, now: Instant) -> Server {
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        config.random_seed = seed;
        let mut iface = Interface::new(config, dev, now);
        let [a, b, c, d] = cfg.ip;
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::v4(a, b, c, d), cfg.prefix));
        });
        if let Some([a, b, c, d]) = cfg.gateway {
            let _ = iface.routes_mut().add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
        }
        let mut sockets = SocketSet::new(Vec::new());
        let mut handles = Vec::with_capacity(SOCKETS);
        let mut conns = Vec::with_capacity(SOCKETS);
        for _ in 0..SOCKETS {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0u8; SOCK_RX]),
                tcp::SocketBuffer::new(vec![0u8; SOCK_TX]),
            );
            configure(&mut s);
            let _ = s.listen(cfg.port);
            handles.push(sockets.add(s));
            conns.push(Conn::new(Limits::DEFAULT));
        }
        Server { iface, sockets, handles, conns, store: Store::new(STORE_BYTES), port: cfg.port }
    }

    /// Moves bytes between sockets and connections, runs commands, closes
    /// and re-arms sockets. Returns true if anything happened.
    fn serve_sockets(&mut self) -> bool {
        let mut busy = false;
        for (h, c) in self.handles.iter().zip(self.conns.iter_mut()) {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            if !s.is_open() {
                // Closed or TIME-WAIT: listen for the next client at once
                c.reset();
                configure(s);
                let _ = s.listen(self.port);
                continue;
            }
            // twice: the receive ring may wrap
            for _ in 0..2 {
                if !s.can_recv() || c.want_input() == 0 {
                    break;
                }
                let n = s.recv(|data| {
                    let n = c.feed(data);
                    (n, n)
                });
                busy |= matches!(n, Ok(n) if n > 0);
            }
            // run commands and hand replies to the socket until one of
            // them stops (a pipeline may need several rounds of out_soft)
            loop {
                let ran = c.process(&mut self.store);
                busy |= ran > 0;
                while !c.pending_out().is_empty() && s.can_send() {
                    match s.send_slice(c.pending_out()) {
                        Ok(n) if n > 0 => {
                            c.consumed_out(n);
                            busy = true;
                        }
                        _ => break,
                    }
                }
                if ran == 0 || !c.pending_out().is_empty() {
                    break;
                }
            }
            let peer_done = !s.may_recv();
            if (c.closing() || peer_done) && c.pending_out().is_empty() && s.may_send() {
                s.close();
                busy = true;
            }
        }
        busy
    }

    /// One round: frames in, commands run, replies out. True if anything
    /// happened (call again before sleeping). The replies are written
    /// between ingress and egress, so a reply carries the ACK of its request
    /// (one frame, not an ACK and then the reply: half the frames to hold,
    /// release and deliver).
    pub fn poll<D: Device>(&mut self, now: Instant, dev: &mut D) -> bool {
        self.iface.poll_maintenance(now);
        let mut changed = false;
        loop {
            match self.iface.poll_ingress_single(now, dev, &mut self.sockets) {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed => {}
                PollIngressSingleResult::SocketStateChanged => changed = true,
            }
        }
        let busy = self.serve_sockets();
        while self.iface.poll_egress(now, dev, &mut self.sockets) == PollResult::SocketStateChanged {
            changed = true;
        }
        busy || changed
    }

    /// When smoltcp next wants to be polled (None: only when a frame comes).
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        self.iface.poll_delay(now, &self.sockets)
    }

    /// Keys in the store.
    pub fn keys(&self) -> usize {
        self.store.len()
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
