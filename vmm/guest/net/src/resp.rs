//! A RESP2 (Redis protocol) parser and executor over a plain in-memory store.
//!
//! No I/O here: a connection is fed the bytes its socket received
//! ([`Conn::feed`]), runs every complete command ([`Conn::process`]) and leaves
//! the replies in its output buffer. Everything a client controls is bounded
//! ([`Limits`]): a request that is malformed or too large gets an `-ERR
//! Protocol error` reply and the connection is marked for closing, never a
//! panic. Growth of buffers goes through `try_reserve`, so a full heap closes a
//! connection instead of aborting the guest.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::cmd;

/// Bounds on what one connection may make the server hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of received, not yet executed request data.
    pub max_input: usize,
    /// Largest bulk string argument.
    pub max_bulk: usize,
    /// Most arguments in one command.
    pub max_args: usize,
    /// Longest inline command line (and the `*n`/`$n` header lines).
    pub max_inline: usize,
    /// Replies pending beyond this many bytes stop command execution until the
    /// socket has taken them (backpressure on pipelining clients).
    pub out_soft: usize,
}

impl Limits {
    pub const DEFAULT: Limits =
        Limits { max_input: 96 << 10, max_bulk: 64 << 10, max_args: 1024, max_inline: 16 << 10, out_soft: 32 << 10 };
}

/// The key space: byte-string keys and values, bounded in bytes.
#[derive(Debug)]
pub struct Store {
    pub(crate) map: BTreeMap<Vec<u8>, Vec<u8>>,
    pub(crate) bytes: usize,
    pub(crate) max_bytes: usize,
}

/// Bytes charged per key beyond its key and value (tree node share, Vec headers).
pub(crate) const ENTRY_OVERHEAD: usize = 64;

impl Store {
    pub fn new(max_bytes: usize) -> Store {
        Store { map: BTreeMap::new(), bytes: 0, max_bytes }
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.map.get(key).map(|v| v.as_slice())
    }
    /// Stores `value` under `key`; false when the byte budget or the heap says no.
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> bool {
        if let Some(v) = self.map.get_mut(key) {
            let after = self.bytes - v.len() + value.len();
            if value.len() > v.len() && (after > self.max_bytes || v.try_reserve_exact(value.len() - v.len()).is_err())
            {
                return false;
            }
            v.clear();
            v.extend_from_slice(value);
            self.bytes = after;
            return true;
        }
        let cost = key.len() + value.len() + ENTRY_OVERHEAD;
        if self.bytes + cost > self.max_bytes {
            return false;
        }
        let (Some(k), Some(v)) = (try_copy(key), try_copy(value)) else { return false };
        self.map.insert(k, v);
        self.bytes += cost;
        true
    }
    pub fn remove(&mut self, key: &[u8]) -> bool {
        match self.map.remove(key) {
            Some(v) => {
                self.bytes -= key.len() + v.len() + ENTRY_OVERHEAD;
                true
            }
            None => false,
        }
    }
    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }
}

fn try_copy(b: &[u8]) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(b.len()).ok()?;
    v.extend_from_slice(b);
    Some(v)
}

/// One outcome of trying to parse a command at the front of the input.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A command of `args` (ranges into the input) ends `used` bytes in.
    /// `args` may be empty (an empty line, `*0`): nothing to run.
    Command { used: usize },
    /// The request is malformed or over a limit: reply and close.
    Error(&'static str),
}

/// One client connection's protocol state.
#[derive(Debug)]
pub struct Conn {
    input: Vec<u8>,
    args: Vec<(usize, usize)>,
    out: Vec<u8>,
    out_pos: usize,
    closing: bool,
    limits: Limits,
}

impl Conn {
    pub fn new(limits: Limits) -> Conn {
        Conn { input: Vec::new(), args: Vec::new(), out: Vec::new(), out_pos: 0, closing: false, limits }
    }

    /// Forgets everything (the socket is listening for a new client). Keeps
    /// small buffers for reuse.
    pub fn reset(&mut self) {
        self.input.clear();
        self.out.clear();
        self.out_pos = 0;
        self.closing = false;
        if self.input.capacity() > 4096 {
            self.input = Vec::new();
        }
        if self.out.capacity() > 4096 {
            self.out = Vec::new();
        }
    }

    /// True once the connection must be closed after its pending output.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// How many request bytes the connection accepts now (0 while closing or
    /// while replies pile up).
    pub fn want_input(&self) -> usize {
        if self.closing || self.pending_out().len() >= self.limits.out_soft {
            0
        } else {
            self.limits.max_input - self.input.len()
        }
    }

    /// Appends received bytes (at most [`Conn::want_input`] of them are taken;
    /// returns how many were).
    pub fn feed(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.want_input());
        if n == 0 {
            return 0;
        }
        if self.input.try_reserve(n).is_err() {
            self.fail("-ERR out of memory\r\n");
            return 0;
        }
        self.input.extend_from_slice(&data[..n]);
        n
    }

    /// Replies not yet handed to the socket.
    pub fn pending_out(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    /// The socket took `n` bytes of [`Conn::pending_out`].
    pub fn consumed_out(&mut self, n: usize) {
        self.out_pos += n;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos > 8192 && self.out_pos * 2 > self.out.len() {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
    }

    /// Runs every complete command in the input (until replies exceed the
    /// soft limit or the connection is closing). Returns the commands run.
    pub fn process(&mut self, store: &mut Store) -> usize {
        let mut start = 0;
        let mut ran = 0;
        while !self.closing && self.pending_out().len() < self.limits.out_soft && start < self.input.len() {
            self.args.clear();
            let parsed = parse(&self.input[start..], &self.limits, &mut self.args);
            match parsed {
                Parsed::Incomplete => {
                    if self.input.len() - start >= self.limits.max_input {
                        self.fail("-ERR Protocol error: request too large\r\n");
                    }
                    break;
                }
                Parsed::Error(msg) => {
                    self.fail(msg);
                    break;
                }
                Parsed::Command { used } => {
                    if !self.args.is_empty() {
                        let mut reply = Reply { out: &mut self.out, oom: false };
                        let input = &self.input[start..start + used];
                        let args: ArgList<'_> = ArgList { input, ranges: &self.args };
                        let quit = cmd::execute(&args, store, &mut reply);
                        let oom = reply.oom;
                        ran += 1;
                        if oom {
                            self.fail("-ERR out of memory\r\n");
                        } else if quit {
                            self.closing = true;
                        }
                    }
                    start += used;
                }
            }
        }
        if start > 0 {
            self.input.drain(..start);
        }
        ran
    }

    /// Queues an error reply (best effort) and marks the connection closing.
    fn fail(&mut self, msg: &str) {
        if self.out.try_reserve(msg.len()).is_ok() {
            self.out.extend_from_slice(msg.as_bytes());
        }
        self.closing = true;
    }
}

/// The arguments of one command: slices of the connection's input.
#[derive(Debug)]
pub struct ArgList<'a> {
    input: &'a [u8],
    ranges: &'a [(usize, usize)],
}

impl<'a> ArgList<'a> {
    pub fn len(&self) -> usize {
        self.ranges.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
    pub fn get(&self, i: usize) -> &'a [u8] {
        let (s, e) = self.ranges[i];
        &self.input[s..e]
    }
}

/// Appends RESP2 replies to a connection's output; a failed reservation sets
/// `oom` (the caller closes the connection).
#[derive(Debug)]
pub struct Reply<'a> {
    out: &'a mut Vec<u8>,
    oom: bool,
}

impl Reply<'_> {
    fn put(&mut self, parts: &[&[u8]]) {
        let n: usize = parts.iter().map(|p| p.len()).sum();
        if self.oom || self.out.try_reserve(n).is_err() {
            self.oom = true;
            return;
        }
        for p in parts {
            self.out.extend_from_slice(p);
        }
    }
    pub fn simple(&mut self, s: &str) {
        self.put(&[b"+", s.as_bytes(), b"\r\n"]);
    }
    pub fn error(&mut self, s: &[u8]) {
        self.put(&[b"-", s, b"\r\n"]);
    }
    pub fn int(&mut self, v: i64) {
        let mut b = [0u8; 24];
        let s = fmt_i64(v, &mut b);
        self.put(&[b":", s, b"\r\n"]);
    }
    pub fn bulk(&mut self, v: &[u8]) {
        let mut b = [0u8; 24];
        let s = fmt_i64(v.len() as i64, &mut b);
        self.put(&[b"$", s, b"\r\n", v, b"\r\n"]);
    }
    pub fn nil(&mut self) {
        self.put(&[b"$-1\r\n"]);
    }
    pub fn array(&mut self, n: usize) {
        let mut b = [0u8; 24];
        let s = fmt_i64(n as i64, &mut b);
        self.put(&[b"*", s, b"\r\n"]);
    }
}

/// Formats `v` in decimal into `buf`, returning the digits.
pub fn fmt_i64(v: i64, buf: &mut [u8; 24]) -> &[u8] {
    let mut i = buf.len();
    let neg = v < 0;
    let mut u = v.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    if neg {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

/// Parses a decimal i64 the way Redis does (optional '-', digits only, no
/// leading '+', no spaces, no leading zeros except "0", in range).
pub fn parse_i64(b: &[u8]) -> Option<i64> {
    let (neg, digits) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, b),
    };
    if digits.is_empty() || digits.len() > 19 || (digits.len() > 1 && digits[0] == b'0') {
        return None;
    }
    if neg && digits == b"0" {
        return None;
    }
    let mut v: i64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        let d = i64::from(c - b'0');
        v = v.checked_mul(10)?;
        v = if neg { v.checked_sub(d)? } else { v.checked_add(d)? };
    }
    Some(v)
}

fn find_crlf(b: &[u8], from: usize) -> Option<usize> {
    b.get(from..)?.windows(2).position(|w| w == b"\r\n").map(|p| p + from)
}

/// Parses the header line of `*n` / `$n` starting at `at` (the type byte):
/// returns the number and the offset after its CRLF.
fn header(b: &[u8], at: usize, lim: &Limits, too_big: &'static str) -> Result<Option<(i64, usize)>, &'static str> {
    match find_crlf(b, at + 1) {
        None if b.len() - at > lim.max_inline => Err(too_big),
        None => Ok(None),
        Some(e) => match parse_i64(&b[at + 1..e]) {
            Some(n) => Ok(Some((n, e + 2))),
            None => Err(too_big),
        },
    }
}

/// Parses one command at the front of `b` into `args`.
fn parse(b: &[u8], lim: &Limits, args: &mut Vec<(usize, usize)>) -> Parsed {
    if b.first() == Some(&b'*') {
        parse_multibulk(b, lim, args)
    } else {
        parse_inline(b, lim, args)
    }
}

fn parse_multibulk(b: &[u8], lim: &Limits, args: &mut Vec<(usize, usize)>) -> Parsed {
    const BAD_COUNT: &str = "-ERR Protocol error: invalid multibulk length\r\n";
    const BAD_LEN: &str = "-ERR Protocol error: invalid bulk length\r\n";
    let (n, mut pos) = match header(b, 0, lim, BAD_COUNT) {
        Err(e) => return Parsed::Error(e),
        Ok(None) => return Parsed::Incomplete,
        Ok(Some(h)) => h,
    };
    if n <= 0 {
        return Parsed::Command { used: pos };
    }
    if n as usize > lim.max_args {
        return Parsed::Error(BAD_COUNT);
    }
    for _ in 0..n {
        match b.get(pos) {
            None => return Parsed::Incomplete,
            Some(b'$') => {}
            Some(_) => return Parsed::Error("-ERR Protocol error: expected '$'\r\n"),
        }
        let (len, data) = match header(b, pos, lim, BAD_LEN) {
            Err(e) => return Parsed::Error(e),
            Ok(None) => return Parsed::Incomplete,
            Ok(Some(h)) => h,
        };
        if len < 0 || len as usize > lim.max_bulk {
            return Parsed::Error(BAD_LEN);
        }
        let end = data + len as usize;
        if b.len() < end + 2 {
            return Parsed::Incomplete;
        }
        if &b[end..end + 2] != b"\r\n" {
            return Parsed::Error("-ERR Protocol error: bulk string not terminated by CRLF\r\n");
        }
        if args.try_reserve(1).is_err() {
            return Parsed::Error("-ERR out of memory\r\n");
        }
        args.push((data, end));
        pos = end + 2;
    }
    Parsed::Command { used: pos }
}

fn parse_inline(b: &[u8], lim: &Limits, args: &mut Vec<(usize, usize)>) -> Parsed {
    let Some(nl) = b.iter().position(|&c| c == b'\n') else {
        return if b.len() > lim.max_inline {
            Parsed::Error("-ERR Protocol error: too big inline request\r\n")
        } else {
            Parsed::Incomplete
        };
    };
    if nl > lim.max_inline {
        return Parsed::Error("-ERR Protocol error: too big inline request\r\n");
    }
    let line_end = if nl > 0 && b[nl - 1] == b'\r' { nl - 1 } else { nl };
    let mut i = 0;
    while i < line_end {
        while i < line_end && (b[i] == b' ' || b[i] == b'\t') {
            i += 1;
        }
        if i == line_end {
            break;
        }
        let s = i;
        while i < line_end && b[i] != b' ' && b[i] != b'\t' {
            i += 1;
        }
        if args.len() >= lim.max_args {
            return Parsed::Error("-ERR Protocol error: too many arguments\r\n");
        }
        if args.try_reserve(1).is_err() {
            return Parsed::Error("-ERR out of memory\r\n");
        }
        args.push((s, i));
    }
    Parsed::Command { used: nl + 1 }
}

#[cfg(test)]
#[path = "resp_tests.rs"]
mod tests;
