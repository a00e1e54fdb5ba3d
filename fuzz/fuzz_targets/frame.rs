//! The frame decoder: arbitrary bytes must give frames or errors, never a
//! panic (the decoder of an established session: record headers, nonces,
//! sealed records that do not open).
#![no_main]
use bytes::BytesMut;
use common::frame::{FrameOpener, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let secret = common::auth::Secret::generate().expect("secret");
    let (_, r) = common::link::pair(&secret).expect("link");
    let mut codec = FrameOpener::new(PROTOCOL_VERSION, r);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = codec.decode(&mut buf) {}
    let _ = codec.decode_eof(&mut buf);
});
