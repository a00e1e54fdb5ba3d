//! The secondary's side of the link handshake, fed arbitrary bytes as the
//! first message: an error (never a panic, never a session).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async {
        let secret = common::auth::Secret::generate().expect("secret");
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let _ = a.write_all(data).await;
        drop(a);
        assert!(common::link::respond(&mut b, &secret).await.is_err(), "arbitrary bytes made a session");
    });
});
