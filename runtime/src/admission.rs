//! Admission of connections that have not authenticated yet, fair across
//! their sources (issue 28, item 6).
//!
//! A listener that anyone can reach must not let strangers keep the real
//! peer out. A connection on its way to authenticating holds a slot (the
//! [`Permit`]) until it authenticates or fails; slots are bounded in all
//! ([`Limits::total`]) and per source ([`Limits::per_source`]). A
//! connection that finds no slot is not closed: it waits in its source's
//! FIFO queue, and as slots free the queues are served round-robin across
//! sources, so a flood from one source delays a second source by at most
//! one turn. Waiting is bounded too: per source ([`Limits::queued_per_source`],
//! the source's oldest waiting connection is closed for a newer one), in
//! time ([`Limits::wait`], the handshake deadline), and in the number of
//! sources waiting ([`Limits::sources`], a new source closes the waiting
//! connections of the source with the most waiting).
//!
//! A source is an IPv4 address, or the /64 prefix of an IPv6 address (one
//! host usually holds a whole /64).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::lograte::LogLimiter;

/// The bounds of one admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections admitted at once, all sources together.
    pub total: usize,
    /// Connections admitted at once from one source.
    pub per_source: usize,
    /// Connections of one source waiting for a slot; a newer one closes
    /// the oldest.
    pub queued_per_source: usize,
    /// Sources with connections waiting at once; a new one closes every
    /// connection waiting of the source with the most waiting.
    pub sources: usize,
    /// How long a connection may wait for a slot before it is closed.
    pub wait: Duration,
}

impl Limits {
    /// 16 slots, 4 per source, 8 waiting per source, 64 sources, 2 s wait.
    pub const DEFAULT: Limits =
        Limits { total: 16, per_source: 4, queued_per_source: 8, sources: 64, wait: Duration::from_secs(2) };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// Where a connection comes from, as far as fairness goes: an IPv4
/// address (IPv4-mapped IPv6 included), or an IPv6 /64 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(peer: SocketAddr) -> Source {
        match peer.ip() {
            IpAddr::V4(a) => Source(IpAddr::V4(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let s = a.segments();
                    Source(IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)))
                }
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// Why a waiting connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Its source had [`Limits::queued_per_source`] waiting: the oldest goes.
    SourceQueueFull,
    /// [`Limits::sources`] sources had connections waiting and a new one
    /// came: the source with the most waiting lost them all.
    TooManySources,
    /// It waited longer than [`Limits::wait`].
    Expired,
}

impl Closed {
    fn as_str(self) -> &'static str {
        match self {
            Closed::SourceQueueFull => "too many waiting from this source",
            Closed::TooManySources => "too many sources waiting",
            Closed::Expired => "waited past the deadline",
        }
    }
}

#[derive(Debug)]
struct Entry<T> {
    admitted: usize,
    waiting: VecDeque<(T, Instant)>,
}

/// The fair queue itself, without I/O: connections arrive, are admitted
/// in fair order while slots are free, and are released.
#[derive(Debug)]
pub struct Fair<T> {
    limits: Limits,
    admitted: usize,
    sources: HashMap<Source, Entry<T>>,
    /// Sources with connections waiting, in the order they are served.
    turns: VecDeque<Source>,
}

impl<T> Fair<T> {
    pub fn new(limits: Limits) -> Fair<T> {
        let limits = Limits {
            total: limits.total.max(1),
            per_source: limits.per_source.max(1),
            queued_per_source: limits.queued_per_source.max(1),
            sources: limits.sources.max(1),
            wait: limits.wait,
        };
        Fair { limits, admitted: 0, sources: HashMap::new(), turns: VecDeque::new() }
    }

    /// Connections admitted and not released.
    pub fn admitted(&self) -> usize {
        self.admitted
    }

    /// Connections waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.sources.values().map(|e| e.waiting.len()).sum()
    }

    /// Sources with connections waiting.
    pub fn sources_waiting(&self) -> usize {
        self.turns.len()
    }

    /// Sources tracked (admitted or waiting): at most
    /// [`Limits::sources`] + [`Limits::total`].
    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    /// When the oldest waiting connection's wait ends.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.turns
            .iter()
            .filter_map(|s| self.sources.get(s)?.waiting.front().map(|(_, at)| *at + self.limits.wait))
            .min()
    }

    /// A connection from `source` arrives at `now`: it waits for its turn
    /// ([`Fair::admit_next`]). Returns the connections closed to make room (maybe
    /// this one).
    pub fn arrive(&mut self, conn: T, source: Source, now: Instant) -> Vec<(T, Source, Closed)> {
        let mut closed = Vec::new();
        if !self.turns.contains(&source) && self.turns.len() >= self.limits.sources {
            // the source with the most waiting (ties: the one whose oldest
            // waited longest, then the first in turn) loses everything it
            // has waiting
            let victim = self
                .turns
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    let e = self.sources.get(s)?;
                    let key = (e.waiting.len(), std::cmp::Reverse(e.waiting.front()?.1), std::cmp::Reverse(i));
                    Some((key, *s))
                })
                .max_by_key(|(k, _)| *k)
                .map(|(_, s)| s);
            if let Some(v) = victim {
                if let Some(e) = self.sources.get_mut(&v) {
                    closed.extend(e.waiting.drain(..).map(|(c, _)| (c, v, Closed::TooManySources)));
                }
                self.forget_if_idle(v);
            }
        }
        let limit = self.limits.queued_per_source;
        let e = self.sources.entry(source).or_insert_with(|| Entry { admitted: 0, waiting: VecDeque::new() });
        if e.waiting.len() >= limit {
            closed.extend(e.waiting.pop_front().map(|(c, _)| (c, source, Closed::SourceQueueFull)));
        }
        if e.waiting.is_empty() {
            self.turns.push_back(source);
        }
        e.waiting.push_back((conn, now));
        closed
    }

    /// The next connection to admit, if a slot is free: the first source in
    /// turn that is under its own limit gives its oldest, and goes to the
    /// back of the turns.
    pub fn admit_next(&mut self) -> Option<(T, Source)> {
        if self.admitted >= self.limits.total {
            return None;
        }
        let per_source = self.limits.per_source;
        let i = self.turns.iter().position(|s| self.sources.get(s).is_some_and(|e| e.admitted < per_source))?;
        let source = self.turns.remove(i)?;
        let e = self.sources.get_mut(&source)?;
        let (conn, _) = e.waiting.pop_front()?;
        e.admitted += 1;
        self.admitted += 1;
        if !e.waiting.is_empty() {
            self.turns.push_back(source);
        }
        Some((conn, source))
    }

    /// A connection of `source` admitted earlier is done with its slot.
    pub fn release(&mut self, source: Source) {
        if let Some(e) = self.sources.get_mut(&source) {
            if e.admitted > 0 {
                e.admitted -= 1;
                self.admitted -= 1;
            }
        }
        self.forget_if_idle(source);
    }

    /// Closes the connections that waited past [`Limits::wait`] at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<(T, Source)> {
        let wait = self.limits.wait;
        let mut out = Vec::new();
        for s in self.turns.clone() {
            let Some(e) = self.sources.get_mut(&s) else { continue };
            while e.waiting.front().is_some_and(|(_, at)| now.saturating_duration_since(*at) >= wait) {
                if let Some((c, _)) = e.waiting.pop_front() {
                    out.push((c, s));
                }
            }
            self.forget_if_idle(s);
        }
        out
    }

    /// Drops `source` from the turns once nothing of it waits, and from the
    /// table once nothing of it is admitted either.
    fn forget_if_idle(&mut self, source: Source) {
        let Some(e) = self.sources.get(&source) else { return };
        if e.waiting.is_empty() {
            self.turns.retain(|s| *s != source);
            if e.admitted == 0 {
                self.sources.remove(&source);
            }
        }
    }
}

/// A connection's slot: dropping it frees the slot for the next in turn.
#[derive(Debug)]
pub struct Permit {
    source: Source,
    release: mpsc::UnboundedSender<Source>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let _ = self.release.send(self.source);
    }
}

/// An admitted connection, with its slot.
#[derive(Debug)]
pub struct Admitted<T> {
    pub conn: T,
    pub peer: SocketAddr,
    pub permit: Permit,
}

/// The connections `listener` accepts, with their peers.
pub fn accepted(listener: TcpListener) -> impl Stream<Item = (TcpStream, SocketAddr)> + Send + Unpin + 'static {
    Box::pin(futures::stream::unfold(listener, |l| async move {
        let c = common::retry::accept(|| l.accept()).await;
        Some((c, l))
    }))
}

/// Admits what `arrivals` yields through a [`Fair`] queue with `limits`,
/// on a task of its own: admitted connections come out of the receiver in
/// fair order, each with its [`Permit`]. Connections closed while waiting
/// are logged (`what` names the listener), at most once per source and
/// reason every 10 s. The task ends when the receiver is dropped or
/// `arrivals` ends.
pub fn admit<T, S>(arrivals: S, what: &'static str, limits: Limits) -> mpsc::Receiver<Admitted<T>>
where
    T: Send + 'static,
    S: Stream<Item = (T, SocketAddr)> + Send + Unpin + 'static,
{
    // every item holds a slot: the channel never holds more than `total`
    let (out, rx) = mpsc::channel(limits.total.max(1));
    tokio::spawn(run(arrivals, what, limits, out));
    rx
}

async fn run<T, S>(mut arrivals: S, what: &'static str, limits: Limits, out: mpsc::Sender<Admitted<T>>)
where
    T: Send + 'static,
    S: Stream<Item = (T, SocketAddr)> + Send + Unpin + 'static,
{
    let mut fair: Fair<(T, SocketAddr)> = Fair::new(limits);
    let (release, mut released) = mpsc::unbounded_channel::<Source>();
    let log = LogLimiter::new(Duration::from_secs(10));
    let said = |source: Source, why: Closed| {
        if let Some(skipped) = log.allow(&format!("{} {source}", why.as_str())) {
            tracing::warn!(listener = what, %source, skipped, why = why.as_str(), "a connection waiting to authenticate was closed");
        }
    };
    loop {
        let deadline = fair.next_deadline();
        tokio::select! {
            a = arrivals.next() => {
                let Some((conn, peer)) = a else { return };
                for (closed, source, why) in fair.arrive((conn, peer), Source::of(peer), Instant::now()) {
                    drop(closed);
                    said(source, why);
                }
            }
            Some(source) = released.recv() => fair.release(source),
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline.unwrap_or_else(Instant::now))), if deadline.is_some() => {
                for (closed, source) in fair.expire(Instant::now()) {
                    drop(closed);
                    said(source, Closed::Expired);
                }
            }
            _ = out.closed() => return,
        }
        while let Some(((conn, peer), source)) = fair.admit_next() {
            let permit = Permit { source, release: release.clone() };
            if out.try_send(Admitted { conn, peer, permit }).is_err() {
                // closed (the permit, dropped, frees the slot again)
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(last: u8) -> Source {
        Source::of(SocketAddr::from(([127, 0, 0, last], 1000)))
    }

    fn limits() -> Limits {
        Limits { total: 4, per_source: 2, queued_per_source: 3, sources: 4, wait: Duration::from_secs(2) }
    }

    #[test]
    fn a_flood_from_one_source_does_not_starve_another() {
        let mut f = Fair::new(Limits { total: 4, per_source: 4, ..limits() });
        let now = Instant::now();
        let mut closed = 0;
        for i in 0..100 {
            closed += f.arrive(("flood", i), src(2), now).len();
        }
        assert_eq!(closed, 97, "the flood's own oldest are closed, 3 wait");
        // the flood takes every free slot
        while f.admit_next().is_some() {}
        assert_eq!(f.admitted(), 3, "only 3 were left waiting");
        assert!(f.arrive(("flood", 100), src(2), now).is_empty());
        assert!(f.admit_next().is_some());
        assert_eq!(f.admitted(), 4);
        // the peer arrives while every slot is held and the flood still waits
        for i in 101..104 {
            f.arrive(("flood", i), src(2), now);
        }
        assert!(f.arrive(("peer", 0), src(1), now).is_empty(), "the peer waits, it is not closed");
        assert!(f.admit_next().is_none(), "no slot free");
        f.release(src(2));
        let (c, s) = f.admit_next().expect("a slot freed");
        assert_eq!((c.0, s), ("flood", src(2)), "the flood's turn came first");
        f.release(src(2));
        let (c, s) = f.admit_next().expect("a slot freed");
        assert_eq!((c.0, s), ("peer", src(1)), "then the peer's, before the rest of the flood");
    }

    #[test]
    fn per_source_cap_leaves_slots_to_others() {
        let mut f = Fair::new(limits());
        let now = Instant::now();
        for i in 0..3 {
            f.arrive(i, src(2), now);
        }
        assert!(f.admit_next().is_some());
        assert!(f.admit_next().is_some());
        assert!(f.admit_next().is_none(), "2 per source, the third waits though 2 slots are free");
        assert_eq!(f.waiting(), 1);
        f.arrive(10, src(1), now);
        assert_eq!(f.admit_next(), Some((10, src(1))), "another source gets a free slot at once");
        f.release(src(2));
        assert_eq!(f.admit_next(), Some((2, src(2))), "the source's own released slot serves its next");
    }

    #[test]
    fn the_oldest_of_a_full_source_queue_is_closed() {
        let mut f = Fair::new(Limits { total: 1, ..limits() });
        let now = Instant::now();
        f.arrive(0, src(2), now);
        assert_eq!(f.admit_next(), Some((0, src(2))));
        for i in 1..=3 {
            assert!(f.arrive(i, src(2), now).is_empty());
        }
        assert_eq!(f.arrive(4, src(2), now), vec![(1, src(2), Closed::SourceQueueFull)]);
        assert_eq!(f.waiting(), 3);
        f.release(src(2));
        assert_eq!(f.admit_next(), Some((2, src(2))), "FIFO within a source");
    }

    #[test]
    fn sources_waiting_are_bounded_and_the_heaviest_pays() {
        let mut f = Fair::new(Limits { total: 1, ..limits() });
        let now = Instant::now();
        f.arrive(0, src(9), now);
        assert_eq!(f.admit_next(), Some((0, src(9))), "src 9 holds the only slot");
        for i in 1..=3 {
            f.arrive(i, src(2), now);
        }
        f.arrive(10, src(3), now);
        f.arrive(11, src(3), now);
        f.arrive(20, src(4), now);
        f.arrive(30, src(5), now);
        assert_eq!(f.sources_waiting(), 4);
        let closed = f.arrive(40, src(6), now);
        let mut want: Vec<_> = (1..=3).map(|i| (i, src(2), Closed::TooManySources)).collect();
        assert_eq!(closed, want, "the source with the most waiting loses them all");
        assert_eq!(f.sources_waiting(), 4);
        assert_eq!(f.sources(), 5, "4 waiting, src 9 admitted");
        // ties: the source whose oldest waited longest
        let later = now + Duration::from_millis(1);
        f.arrive(21, src(4), later);
        f.arrive(31, src(5), later);
        f.arrive(41, src(6), later);
        want = vec![(10, src(3), Closed::TooManySources), (11, src(3), Closed::TooManySources)];
        assert_eq!(f.arrive(50, src(7), later), want);
        // a source already waiting does not count as new
        assert!(f.arrive(51, src(7), later).is_empty());
        // in turn: src 4, 5, 6, 7 (src 9 holds the slot)
        f.release(src(9));
        assert_eq!(f.admit_next(), Some((20, src(4))));
    }

    #[test]
    fn fair_under_interleaved_sources() {
        // three sources, one slot: served in turn, whatever their volume
        let mut f = Fair::new(Limits { total: 1, per_source: 1, queued_per_source: 8, sources: 8, ..limits() });
        let now = Instant::now();
        for i in 0..8 {
            f.arrive(i, src(2), now);
        }
        f.arrive(100, src(3), now);
        f.arrive(200, src(4), now);
        f.arrive(201, src(4), now);
        let mut order = Vec::new();
        while let Some((c, s)) = f.admit_next() {
            order.push(c);
            f.release(s);
        }
        assert_eq!(order, vec![0, 100, 200, 1, 201, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn waiting_past_the_deadline_closes() {
        let mut f = Fair::new(Limits { total: 1, ..limits() });
        let t0 = Instant::now();
        f.arrive(0, src(2), t0);
        f.admit_next();
        f.arrive(1, src(2), t0);
        f.arrive(2, src(3), t0 + Duration::from_secs(1));
        assert_eq!(f.next_deadline(), Some(t0 + Duration::from_secs(2)));
        assert_eq!(f.expire(t0 + Duration::from_millis(1999)), vec![]);
        assert_eq!(f.expire(t0 + Duration::from_secs(2)), vec![(1, src(2))]);
        assert_eq!(f.next_deadline(), Some(t0 + Duration::from_secs(3)));
        assert_eq!(f.expire(t0 + Duration::from_secs(3)), vec![(2, src(3))]);
        assert_eq!(f.waiting(), 0);
        assert_eq!(f.sources(), 1, "src 2 still holds its slot");
        f.release(src(2));
        assert_eq!(f.sources(), 0);
        assert_eq!(f.next_deadline(), None);
    }

    #[test]
    fn ipv6_sources_are_their_64_prefix() {
        let a: SocketAddr = "[2001:db8:1:2::1]:5".parse().expect("addr");
        let b: SocketAddr = "[2001:db8:1:2:ffff::9]:6".parse().expect("addr");
        let c: SocketAddr = "[2001:db8:1:3::1]:5".parse().expect("addr");
        let m: SocketAddr = "[::ffff:10.0.0.1]:5".parse().expect("addr");
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        assert_eq!(Source::of(m), Source::of("10.0.0.1:7".parse().expect("addr")));
        assert_eq!(Source::of(a).to_string(), "2001:db8:1:2::/64");
    }

    /// Through real sockets: a flood of idle connections from 127.0.0.2
    /// holds its slots, and a connection from 127.0.0.1 is still admitted
    /// at once.
    #[tokio::test]
    async fn the_task_admits_a_second_source_through_a_flood() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut rx = admit(accepted(l), "test", Limits { total: 4, per_source: 2, ..limits() });
        let mut held = Vec::new();
        for _ in 0..20 {
            let s = tokio::net::TcpSocket::new_v4().expect("socket");
            s.bind("127.0.0.2:0".parse().expect("addr")).expect("bind 127.0.0.2");
            held.push(s.connect(addr).await.expect("connect"));
        }
        let mut admitted = Vec::new();
        for _ in 0..2 {
            let a = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await.expect("admitted").expect("open");
            assert_eq!(a.peer.ip(), IpAddr::from([127, 0, 0, 2]));
            admitted.push(a);
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(200), rx.recv()).await.is_err(),
            "the flood has its 2 per source"
        );
        let _peer = TcpStream::connect(addr).await.expect("connect");
        let a = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await.expect("admitted").expect("open");
        assert_eq!(a.peer.ip(), IpAddr::from([127, 0, 0, 1]), "the second source gets in at once");
        drop(admitted.pop());
        let a = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await.expect("admitted").expect("open");
        assert_eq!(a.peer.ip(), IpAddr::from([127, 0, 0, 2]), "a released slot serves the flood's next");
    }
}
