//! The raw page-chunk decoder.
#![no_main]
use bytes::Bytes;
use common::proto::{decode_chunk, encode_chunk, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = decode_chunk(Kind::PageChunk, Bytes::copy_from_slice(data)) {
        assert_eq!(&encode_chunk(&c)[..], data);
    }
});
