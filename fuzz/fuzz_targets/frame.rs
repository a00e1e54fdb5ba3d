//! The frame decoder: arbitrary bytes must give frames or errors, never a panic.
#![no_main]
use bytes::BytesMut;
use common::frame::{FrameCodec, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = FrameCodec::new(PROTOCOL_VERSION, [0u8; 32]);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = codec.decode(&mut buf) {}
    let _ = codec.decode_eof(&mut buf);
});
