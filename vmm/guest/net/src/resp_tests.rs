//! Host tests of the RESP parser and the commands (`cargo test` in vmm/guest/net).

use super::*;
use std::string::String;
use std::vec;

fn conn() -> Conn {
    Conn::new(Limits::DEFAULT)
}

/// Feeds `chunks` one after the other, processing after each; returns all output.
fn run(c: &mut Conn, store: &mut Store, chunks: &[&[u8]]) -> String {
    let mut out = Vec::new();
    for ch in chunks {
        let mut rest: &[u8] = ch;
        while !rest.is_empty() {
            let n = c.feed(rest);
            rest = &rest[n..];
            c.process(store);
            let p = c.pending_out().len();
            out.extend_from_slice(c.pending_out());
            c.consumed_out(p);
            if n == 0 {
                break;
            }
        }
    }
    c.process(store);
    out.extend_from_slice(c.pending_out());
    let p = c.pending_out().len();
    c.consumed_out(p);
    String::from_utf8(out).unwrap()
}

fn one(req: &[u8]) -> String {
    let mut s = Store::new(1 << 20);
    run(&mut conn(), &mut s, &[req])
}

#[test]
fn ping_inline_and_multibulk() {
    assert_eq!(one(b"PING\r\n"), "+PONG\r\n");
    assert_eq!(one(b"ping\n"), "+PONG\r\n");
    assert_eq!(one(b"*1\r\n$4\r\nPING\r\n"), "+PONG\r\n");
    assert_eq!(one(b"*2\r\n$4\r\nPING\r\n$5\r\nhello\r\n"), "$5\r\nhello\r\n");
    assert_eq!(one(b"PING a b\r\n"), "-ERR wrong number of arguments for 'ping' command\r\n");
}

#[test]
fn set_get_del_exists() {
    let mut s = Store::new(1 << 20);
    let mut c = conn();
    let out = run(
        &mut c,
        &mut s,
        &[b"*3\r\n$3\r\nSET\r\n$13\r\nkey:000000042\r\n$3\r\nxxx\r\n*2\r\n$3\r\nGET\r\n$13\r\nkey:000000042\r\n"],
    );
    assert_eq!(out, "+OK\r\n$3\r\nxxx\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"GET nope\r\n"]), "$-1\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"EXISTS key:000000042 nope key:000000042\r\n"]), ":2\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"DEL key:000000042 nope\r\n"]), ":1\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"GET key:000000042\r\n"]), "$-1\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"SET k v NX\r\nSET k w NX\r\nSET z v XX\r\nGET k\r\n"]), "+OK\r\n$-1\r\n$-1\r\n$1\r\nv\r\n");
    assert!(run(&mut c, &mut s, &[b"SET k v EX 10\r\n"]).starts_with("-ERR"));
    assert_eq!(run(&mut c, &mut s, &[b"DBSIZE\r\nFLUSHALL\r\nDBSIZE\r\n"]), ":1\r\n+OK\r\n:0\r\n");
    assert_eq!(s.bytes, 0);
}

#[test]
fn binary_safe_values() {
    let mut s = Store::new(1 << 20);
    let mut c = conn();
    let out = run(&mut c, &mut s, &[b"*3\r\n$3\r\nset\r\n$1\r\nk\r\n$4\r\na\r\nb\r\n*2\r\n$3\r\nget\r\n$1\r\nk\r\n"]);
    assert_eq!(out, "+OK\r\n$4\r\na\r\nb\r\n");
}

#[test]
fn incr_counts_and_refuses_non_integers() {
    let mut s = Store::new(1 << 20);
    let mut c = conn();
    assert_eq!(run(&mut c, &mut s, &[b"INCR counter:1\r\nINCR counter:1\r\nDECR counter:1\r\n"]), ":1\r\n:2\r\n:1\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"INCRBY counter:1 41\r\nGET counter:1\r\n"]), ":42\r\n$2\r\n42\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"SET t xxx\r\nINCR t\r\n"]), "+OK\r\n-ERR value is not an integer or out of range\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"SET t 007\r\nINCR t\r\n"]), "+OK\r\n-ERR value is not an integer or out of range\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"SET m 9223372036854775807\r\nINCR m\r\n"]), "+OK\r\n-ERR increment or decrement would overflow\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"SET n -5\r\nINCR n\r\n"]), "+OK\r\n:-4\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"INCRBY n x\r\n"]), "-ERR value is not an integer or out of range\r\n");
}

#[test]
fn commands_split_at_every_byte() {
    let req: &[u8] = b"*3\r\n$3\r\nSET\r\n$3\r\nfoo\r\n$3\r\nbar\r\nGET foo\r\n*2\r\n$4\r\nINCR\r\n$1\r\nc\r\n";
    let want = "+OK\r\n$3\r\nbar\r\n:1\r\n";
    for cut in 1..req.len() {
        let mut s = Store::new(1 << 20);
        let got = run(&mut conn(), &mut s, &[&req[..cut], &req[cut..]]);
        assert_eq!(got, want, "split at {cut}");
    }
    // one byte at a time
    let mut s = Store::new(1 << 20);
    let chunks: Vec<&[u8]> = req.chunks(1).collect();
    assert_eq!(run(&mut conn(), &mut s, &chunks), want);
}

#[test]
fn pipelines_answer_in_order() {
    let mut req = Vec::new();
    let mut want = String::new();
    for i in 0..500 {
        let k = std::format!("key:{i:012}");
        req.extend_from_slice(std::format!("*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n$3\r\nxxx\r\n", k.len()).as_bytes());
        req.extend_from_slice(std::format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len()).as_bytes());
        req.extend_from_slice(b"PING\r\n");
        want.push_str("+OK\r\n$3\r\nxxx\r\n+PONG\r\n");
    }
    let mut s = Store::new(1 << 20);
    assert_eq!(run(&mut conn(), &mut s, &[&req]), want);
    assert_eq!(s.len(), 500);
}

#[test]
fn redis_benchmark_shapes() {
    // what redis-benchmark 7 sends: CONFIG GET on its own connection, then the tests
    let mut s = Store::new(1 << 20);
    let mut c = conn();
    let cfg = run(&mut c, &mut s, &[b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$4\r\nsave\r\n*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$10\r\nappendonly\r\n"]);
    assert_eq!(cfg, "*2\r\n$4\r\nsave\r\n$0\r\n\r\n*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"CONFIG GET nosuch\r\n"]), "*0\r\n");
    assert!(run(&mut c, &mut s, &[b"CONFIG SET save x\r\n"]).starts_with("-ERR"));
    let shapes: &[(&[u8], &str)] = &[
        (b"PING\r\n", "+PONG\r\n"),
        (b"*1\r\n$4\r\nPING\r\n", "+PONG\r\n"),
        (b"*3\r\n$3\r\nSET\r\n$16\r\nkey:__rand_int__\r\n$3\r\nxxx\r\n", "+OK\r\n"),
        (b"*2\r\n$3\r\nGET\r\n$16\r\nkey:__rand_int__\r\n", "$3\r\nxxx\r\n"),
        (b"*2\r\n$4\r\nINCR\r\n$20\r\ncounter:__rand_int__\r\n", ":1\r\n"),
        (b"*2\r\n$4\r\nINCR\r\n$20\r\ncounter:__rand_int__\r\n", ":2\r\n"),
    ];
    for (req, want) in shapes {
        assert_eq!(run(&mut c, &mut s, &[req]), *want);
    }
}

#[test]
fn redis_cli_start_and_misc() {
    let mut s = Store::new(1 << 20);
    let mut c = conn();
    assert_eq!(run(&mut c, &mut s, &[b"*2\r\n$7\r\nCOMMAND\r\n$4\r\nDOCS\r\n"]), "*0\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"COMMAND\r\n"]), "*0\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"ECHO hi\r\nSELECT 0\r\nSELECT 3\r\n"]), "$2\r\nhi\r\n+OK\r\n-ERR DB index is out of range\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"HELLO 3\r\n"]), "-ERR unknown command 'HELLO'\r\n");
    assert_eq!(run(&mut c, &mut s, &[b"MSET a 1 b 2\r\nMGET a b c\r\n"]), "+OK\r\n*3\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n");
    assert!(run(&mut c, &mut s, &[b"INFO\r\n"]).contains("db0:keys=2"));
    // blank lines and *0 are ignored
    assert_eq!(run(&mut c, &mut s, &[b"\r\n\n*0\r\nPING\r\n"]), "+PONG\r\n");
    assert!(!c.closing());
}

#[test]
fn quit_closes_after_reply_and_ignores_the_rest() {
    let mut s = Store::new(1 << 20);
    let mut c = conn();
    assert_eq!(run(&mut c, &mut s, &[b"PING\r\nQUIT\r\nPING\r\n"]), "+PONG\r\n+OK\r\n");
    assert!(c.closing());
    assert_eq!(c.feed(b"PING\r\n"), 0);
    c.reset();
    assert!(!c.closing());
    assert_eq!(run(&mut c, &mut s, &[b"PING\r\n"]), "+PONG\r\n");
}

#[test]
fn garbage_and_oversize_requests_close_with_an_error() {
    let cases: &[&[u8]] = &[
        b"*x\r\n",
        b"*2\r\n$3\r\nGET\r\n:1\r\n",
        b"*1\r\n$-5\r\n",
        b"*1\r\n$99999999999\r\n",
        b"*1\r\n$4\r\nPINGxx",
        b"*99999\r\n",
        b"*1\r\n$1048576\r\n",
    ];
    for req in cases {
        let mut s = Store::new(1 << 20);
        let mut c = conn();
        let out = run(&mut c, &mut s, &[req]);
        assert!(out.starts_with("-ERR Protocol error"), "{:?} -> {out:?}", String::from_utf8_lossy(req));
        assert!(c.closing());
    }
    // an endless inline line
    let mut s = Store::new(1 << 20);
    let mut c = conn();
    let junk = vec![b'a'; 40 << 10];
    let out = run(&mut c, &mut s, &[&junk]);
    assert!(out.starts_with("-ERR Protocol error: too big inline"), "{out}");
    assert!(c.closing());
    // a bulk that is allowed but whose request never ends within max_input
    let lim = Limits { max_input: 1024, max_bulk: 4096, ..Limits::DEFAULT };
    let mut c = Conn::new(lim);
    let mut req = b"*1\r\n$4000\r\n".to_vec();
    req.extend(vec![b'z'; 2000]);
    let out = run(&mut c, &mut s, &[&req]);
    assert!(out.starts_with("-ERR Protocol error: request too large"), "{out}");
    // binary noise never panics
    let mut x = 0x1234_5678_9abc_def0u64;
    for _ in 0..2000 {
        let mut noise = Vec::new();
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            noise.push(b"*$\r\n0123-9 abcPINGSET"[(x % 21) as usize]);
        }
        let mut c = conn();
        let _ = run(&mut c, &mut s, &[&noise]);
    }
}

#[test]
fn store_budget_refuses_with_oom() {
    let mut s = Store::new(200);
    let mut c = conn();
    assert_eq!(run(&mut c, &mut s, &[b"SET a 1\r\n"]), "+OK\r\n");
    let big = std::format!("SET b {}\r\n", "v".repeat(150));
    assert!(run(&mut c, &mut s, &[big.as_bytes()]).starts_with("-OOM"));
    assert_eq!(run(&mut c, &mut s, &[b"GET b\r\nDEL a\r\n"]), "$-1\r\n:1\r\n");
    assert_eq!(s.bytes, 0);
}

#[test]
fn output_backpressure_pauses_execution() {
    let lim = Limits { out_soft: 64, ..Limits::DEFAULT };
    let mut c = Conn::new(lim);
    let mut s = Store::new(1 << 20);
    let req = b"PING\r\n".repeat(100);
    assert_eq!(c.feed(&req), req.len());
    c.process(&mut s);
    assert!(c.pending_out().len() >= 64 && c.pending_out().len() < 100 * 7);
    assert_eq!(c.want_input(), 0);
    let mut total = 0;
    while !c.pending_out().is_empty() {
        let n = c.pending_out().len();
        total += n;
        c.consumed_out(n);
        c.process(&mut s);
    }
    assert_eq!(total, 700);
}

#[test]
fn integers_parse_like_redis() {
    assert_eq!(parse_i64(b"0"), Some(0));
    assert_eq!(parse_i64(b"-12"), Some(-12));
    assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
    assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
    for bad in [&b""[..], b"-", b"+1", b"01", b"-0", b" 1", b"1a", b"9223372036854775808"] {
        assert_eq!(parse_i64(bad), None, "{bad:?}");
    }
    let mut b = [0u8; 24];
    assert_eq!(fmt_i64(i64::MIN, &mut b), b"-9223372036854775808");
}
