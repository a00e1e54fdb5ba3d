//! The message decoder: any kind and payload.
#![no_main]
use bytes::Bytes;
use common::proto::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let kind = u16::from_le_bytes([data[0], data[1]]);
    if let Ok(m) = Message::decode(kind, Bytes::copy_from_slice(&data[2..])) {
        // what decodes must re-encode to something that decodes again
        let again = Message::decode(m.kind() as u16, m.payload()).expect("re-encoded message decodes");
        assert_eq!(again.payload(), m.payload());
    }
});
