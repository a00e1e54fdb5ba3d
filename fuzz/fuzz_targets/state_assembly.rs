//! The state assembler (StateChunk pieces, then EpochEnd): any sequence of
//! decoded pieces and tails gives an error or a state, never a panic, and
//! never holds more than the state limit.
#![no_main]
use bytes::Bytes;
use common::proto::{Kind, Message, StateAssembler};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut asm = StateAssembler::default();
    // the input is a sequence of (kind byte, u16 length, payload) records
    let mut rest = data;
    while rest.len() >= 3 {
        let kind = if rest[0] % 2 == 0 { Kind::StateChunk } else { Kind::EpochEnd };
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let payload = Bytes::copy_from_slice(&rest[3..3 + len]);
        rest = &rest[3 + len..];
        match Message::decode(kind as u16, payload) {
            Ok(Message::StateChunk(c)) => {
                let _ = asm.push(c);
            }
            Ok(Message::EpochEnd(t)) => {
                let _ = asm.finish(t);
            }
            _ => {}
        }
    }
});
