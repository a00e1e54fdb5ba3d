//! The commands the RESP server knows (a subset of Redis, enough for
//! `redis-benchmark -t ping,set,get,incr` and an interactive `redis-cli`).

use crate::resp::{fmt_i64, parse_i64, ArgList, Reply, Store};

const WRONG_TYPE_INT: &[u8] = b"ERR value is not an integer or out of range";
const OOM: &[u8] = b"OOM command not allowed when used memory > 'maxmemory'.";

fn is(name: &[u8], want: &str) -> bool {
    name.eq_ignore_ascii_case(want.as_bytes())
}

fn wrong_args(r: &mut Reply<'_>, name: &[u8]) {
    let mut msg = [0u8; 96];
    let mut n = 0;
    let shown = &name[..name.len().min(32)];
    for (i, part) in [b"ERR wrong number of arguments for '".as_slice(), shown, b"' command"].iter().enumerate() {
        for &c in *part {
            if n < msg.len() {
                msg[n] = if i == 1 { c.to_ascii_lowercase() } else { c };
                n += 1;
            }
        }
    }
    r.error(&msg[..n]);
}

fn unknown(r: &mut Reply<'_>, name: &[u8]) {
    let mut msg = [0u8; 96];
    let mut n = 0;
    let shown = &name[..name.len().min(48)];
    for part in [b"ERR unknown command '".as_slice(), shown, b"'"] {
        for &c in part {
            if n < msg.len() {
                // keep the reply a valid simple string
                msg[n] = if c == b'\r' || c == b'\n' { b' ' } else { c };
                n += 1;
            }
        }
    }
    r.error(&msg[..n]);
}

/// Runs one command; returns true when the client asked to quit.
pub fn execute(args: &ArgList<'_>, store: &mut Store, r: &mut Reply<'_>) -> bool {
    let name = args.get(0);
    let argc = args.len();
    // (name, minimum argc, maximum argc or 0 = unbounded)
    let arity = |min: usize, max: usize| argc >= min && (max == 0 || argc <= max);
    if is(name, "PING") {
        match argc {
            1 => r.simple("PONG"),
            2 => r.bulk(args.get(1)),
            _ => wrong_args(r, name),
        }
    } else if is(name, "GET") {
        if !arity(2, 2) {
            wrong_args(r, name);
        } else {
            match store.get(args.get(1)) {
                Some(v) => r.bulk(v),
                None => r.nil(),
            }
        }
    } else if is(name, "SET") {
        set(args, store, r);
    } else if is(name, "INCR") || is(name, "DECR") {
        if !arity(2, 2) {
            wrong_args(r, name);
        } else {
            incr_by(store, r, args.get(1), if is(name, "INCR") { 1 } else { -1 });
        }
    } else if is(name, "INCRBY") || is(name, "DECRBY") {
        if !arity(3, 3) {
            wrong_args(r, name);
        } else {
            match parse_i64(args.get(2)) {
                None => r.error(WRONG_TYPE_INT),
                Some(d) if is(name, "INCRBY") => incr_by(store, r, args.get(1), d),
                Some(d) => match d.checked_neg() {
                    Some(d) => incr_by(store, r, args.get(1), d),
                    None => r.error(b"ERR decrement would overflow"),
                },
            }
        }
    } else if is(name, "DEL") || is(name, "EXISTS") {
        if !arity(2, 0) {
            wrong_args(r, name);
        } else {
            let del = is(name, "DEL");
            let mut n = 0;
            for i in 1..argc {
                let k = args.get(i);
                let hit = if del { store.remove(k) } else { store.get(k).is_some() };
                n += i64::from(hit);
            }
            r.int(n);
        }
    } else if is(name, "MGET") {
        if !arity(2, 0) {
            wrong_args(r, name);
        } else {
            r.array(argc - 1);
            for i in 1..argc {
                match store.get(args.get(i)) {
                    Some(v) => r.bulk(v),
                    None => r.nil(),
                }
            }
        }
    } else if is(name, "MSET") {
        if argc < 3 || argc.is_multiple_of(2) {
            wrong_args(r, name);
        } else {
            let mut ok = true;
            for i in (1..argc).step_by(2) {
                ok &= store.set(args.get(i), args.get(i + 1));
            }
            if ok {
                r.simple("OK");
            } else {
                r.error(OOM);
            }
        }
    } else if is(name, "ECHO") {
        if !arity(2, 2) {
            wrong_args(r, name);
        } else {
            r.bulk(args.get(1));
        }
    } else if is(name, "QUIT") {
        r.simple("OK");
        return true;
    } else if is(name, "SELECT") {
        if !arity(2, 2) {
            wrong_args(r, name);
        } else if parse_i64(args.get(1)) == Some(0) {
            r.simple("OK");
        } else {
            r.error(b"ERR DB index is out of range");
        }
    } else if is(name, "FLUSHALL") || is(name, "FLUSHDB") {
        store.clear();
        r.simple("OK");
    } else if is(name, "DBSIZE") {
        r.int(store.len() as i64);
    } else if is(name, "CONFIG") {
        config(args, r);
    } else if is(name, "COMMAND") {
        // redis-cli asks for COMMAND DOCS at start; an empty answer is enough.
        r.array(0);
    } else if is(name, "INFO") {
        let mut b = [0u8; 24];
        let mut text = [0u8; 160];
        let mut n = 0;
        for part in [
            b"# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\nserver:castor-guest\r\n# Keyspace\r\ndb0:keys=".as_slice(),
            fmt_i64(store.len() as i64, &mut b),
            b"\r\n",
        ] {
            text[n..n + part.len()].copy_from_slice(part);
            n += part.len();
        }
        r.bulk(&text[..n]);
    } else {
        unknown(r, name);
    }
    false
}

/// SET key value [NX|XX]; expiry options are refused (no expiry here).
fn set(args: &ArgList<'_>, store: &mut Store, r: &mut Reply<'_>) {
    let argc = args.len();
    if argc < 3 {
        wrong_args(r, args.get(0));
        return;
    }
    let (mut nx, mut xx) = (false, false);
    for i in 3..argc {
        let o = args.get(i);
        if is(o, "NX") {
            nx = true;
        } else if is(o, "XX") {
            xx = true;
        } else if is(o, "EX") || is(o, "PX") || is(o, "EXAT") || is(o, "PXAT") || is(o, "KEEPTTL") {
            r.error(b"ERR expiry is not supported by this server");
            return;
        } else {
            r.error(b"ERR syntax error");
            return;
        }
    }
    if nx && xx {
        r.error(b"ERR syntax error");
        return;
    }
    let key = args.get(1);
    let exists = store.get(key).is_some();
    if (nx && exists) || (xx && !exists) {
        r.nil();
    } else if store.set(key, args.get(2)) {
        r.simple("OK");
    } else {
        r.error(OOM);
    }
}

fn incr_by(store: &mut Store, r: &mut Reply<'_>, key: &[u8], delta: i64) {
    let cur = match store.get(key) {
        None => 0,
        Some(v) => match parse_i64(v) {
            Some(n) => n,
            None => return r.error(WRONG_TYPE_INT),
        },
    };
    let Some(next) = cur.checked_add(delta) else {
        return r.error(b"ERR increment or decrement would overflow");
    };
    let mut b = [0u8; 24];
    if store.set(key, fmt_i64(next, &mut b)) {
        r.int(next);
    } else {
        r.error(OOM);
    }
}

/// CONFIG GET answers a few parameters redis-benchmark and redis-cli ask
/// about (exact names only; anything else is an empty array). Other
/// subcommands are refused.
fn config(args: &ArgList<'_>, r: &mut Reply<'_>) {
    if args.len() < 2 {
        return wrong_args(r, args.get(0));
    }
    let sub = args.get(1);
    if is(sub, "GET") {
        if args.len() < 3 {
            return wrong_args(r, b"config|get");
        }
        const KNOWN: [(&str, &[u8]); 4] = [("save", b""), ("appendonly", b"no"), ("databases", b"1"), ("maxmemory", b"0")];
        let mut hits = [None; 8];
        let mut n = 0;
        for i in 2..args.len().min(2 + hits.len()) {
            if let Some(k) = KNOWN.iter().position(|(k, _)| is(args.get(i), k)) {
                if !hits[..n].contains(&Some(k)) {
                    hits[n] = Some(k);
                    n += 1;
                }
            }
        }
        r.array(n * 2);
        for (name, value) in hits[..n].iter().flatten().map(|&k| KNOWN[k]) {
            r.bulk(name.as_bytes());
            r.bulk(value);
        }
    } else if is(sub, "RESETSTAT") {
        r.simple("OK");
    } else {
        r.error(b"ERR CONFIG subcommand not supported by this server");
    }
}
