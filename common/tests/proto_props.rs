//! Property tests of the wire: every message round-trips, arbitrary bytes never
//! panic the decoders and always give an error, and chunking respects the frame
//! limit for any epoch size.

use bytes::{Bytes, BytesMut};
use common::frame::{FrameOpener, FrameSealer, MAX_FRAME, MAX_PAYLOAD, PROTOCOL_VERSION};
use common::proto::*;
use common::state::*;
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

fn state(n: u64) -> MachineState {
    MachineState {
        shape: VmShape { mem_bytes: 256 << 20, ram_ranges: vec![(0, 256 << 20)], vcpus: 1, image_id: n },
        boot: vec![n as u8; 3],
        vcpus: vec![VcpuState {
            id: 0,
            cpuid: vec![Default::default(); 2],
            msrs: vec![kvm_bindings::kvm_msr_entry { index: 0x10, data: n, ..Default::default() }],
            regs: kvm_bindings::kvm_regs { rip: n, ..Default::default() },
            sregs: Default::default(),
            xsave: vec![n as u32; 1024],
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            mp_state: Default::default(),
            vcpu_events: Default::default(),
            tsc_khz: Some(1000),
        }],
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        devices: DeviceState { console_lines: n, ..Default::default() },
        cpu: CpuModel {
            vendor: "GenuineIntel".into(),
            features: vec![(1, 0, 'd', n as u32)],
            tsc_khz: 1000,
            tsc_scaling: false,
        },
    }
}

fn page_strategy() -> impl Strategy<Value = Page> {
    (0u64..(1 << 40), proptest::option::of(any::<u8>())).prop_map(|(gfn, fill)| Page {
        gfn,
        data: fill.map_or(PageData::Zero, |b| PageData::Full(Bytes::from(vec![b; PAGE_SIZE]))),
    })
}

fn pair(v: u32) -> PairSettings {
    PairSettings {
        witness_vm: (!v.is_multiple_of(3)).then(|| format!("vm-{v}")),
        heartbeat_timeout_ms: u64::from(v),
        heartbeat_interval_ms: u64::from(v / 7),
        net_mac: (v.is_multiple_of(5)).then_some([2, 0, 0, 0, 0, v as u8]),
    }
}

fn message_strategy() -> impl Strategy<Value = Message> {
    let s = ".{0,40}";
    prop_oneof![
        (any::<u16>(), any::<u16>(), any::<u64>(), any::<u32>()).prop_map(|(a, b, g, v)| {
            Message::Hello(Hello {
                min_version: a,
                max_version: b,
                shape: state(u64::from(v)).shape,
                generation: g,
                channel: if v % 2 == 0 { Channel::Data } else { Channel::Heartbeat },
                pair: pair(v),
                cpu: CpuModel {
                    vendor: format!("v{v}"),
                    features: vec![(1, 0, 'c', v), (7, 0, 'b', !v)],
                    tsc_khz: v,
                    tsc_scaling: v.is_multiple_of(2),
                },
            })
        }),
        (any::<u16>(), any::<Option<u64>>(), any::<u64>()).prop_map(|(version, committed_epoch, generation)| {
            Message::HelloAck(HelloAck {
                version,
                committed_epoch,
                generation,
                node: format!("s{generation}"),
                pair: pair(generation as u32),
            })
        }),
        (any::<u64>(), proptest::collection::vec(page_strategy(), 0..20))
            .prop_map(|(epoch, pages)| Message::PageChunk(PageChunk { epoch, pages })),
        (any::<u64>(), proptest::collection::vec(page_strategy(), 0..5))
            .prop_map(|(epoch, pages)| Message::FullSyncChunk(PageChunk { epoch, pages })),
        (any::<u64>(), any::<u64>(), any::<bool>())
            .prop_map(|(epoch, page_count, full)| { Message::EpochBegin { epoch, page_count, full } }),
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<Option<u64>>(), 0..MAX_STATE_BYTES, any::<u32>()).prop_map(
            |(epoch, page_count, checksum, digest, state_len, state_crc)| {
                Message::EpochEnd(EpochTail { epoch, page_count, checksum, digest, state_len, state_crc })
            }
        ),
        (any::<u64>(), 0u64..1000, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(epoch, offset, data)| {
            let total = offset + data.len() as u64 + 5;
            Message::StateChunk(StateChunk { epoch, offset, total, data: Bytes::from(data) })
        }),
        any::<u64>().prop_map(|epoch| Message::EpochAck { epoch }),
        Just(Message::SyncBegin),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(generation, seq, time_us, received)| {
            Message::Heartbeat { generation, seq, time_us, received }
        }),
        (any::<u64>(), s).prop_map(|(generation, reason)| Message::Fence { generation, reason }),
        s.prop_map(|reason| Message::Shutdown { reason }),
        s.prop_map(|reason| Message::ResyncRequest { reason }),
        (
            prop_oneof![
                Just(RefuseCode::Version),
                Just(RefuseCode::Shape),
                Just(RefuseCode::Auth),
                Just(RefuseCode::StaleGeneration)
            ],
            s
        )
            .prop_map(|(code, reason)| Message::Refused { code, reason }),
    ]
}

fn link() -> (common::link::Transport, common::link::Transport) {
    common::link::pair(&common::auth::Secret::generate().expect("secret")).expect("link")
}

/// Messages have no PartialEq (machine state holds KVM structs): compare encodings.
fn same(a: &Message, b: &Message) -> bool {
    a.kind() == b.kind() && a.payload() == b.payload()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips_through_a_frame(m in message_strategy()) {
        let (i, r) = link();
        let mut tx = FrameSealer::new(PROTOCOL_VERSION, i);
        let mut rx = FrameOpener::new(PROTOCOL_VERSION, r);
        let mut buf = BytesMut::new();
        tx.encode(m.to_frame(), &mut buf).expect("encode");
        prop_assert!(buf.len() <= MAX_FRAME);
        let f = rx.decode(&mut buf).expect("decode").expect("one frame");
        let back = Message::decode(f.kind, f.payload).expect("message");
        prop_assert!(same(&m, &back), "{:?} != {:?}", m.kind(), back.kind());
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut rx = FrameOpener::new(PROTOCOL_VERSION, link().1);
        let mut buf = BytesMut::from(&bytes[..]);
        // random bytes are never a valid frame (they do not open); at EOF
        // they must be an error or nothing
        match rx.decode_eof(&mut buf) {
            Ok(None) => prop_assert!(bytes.is_empty()),
            Ok(Some(_)) => prop_assert!(false, "random bytes accepted as a frame"),
            Err(_) => {}
        }
    }

    #[test]
    fn arbitrary_payloads_never_panic_the_message_decoder(kind in 0u16..20, bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Message::decode(kind, Bytes::from(bytes));
    }

    #[test]
    fn mutated_valid_payloads_give_errors_not_panics(m in message_strategy(), pos in any::<prop::sample::Index>(), cut in any::<bool>(), byte in any::<u8>()) {
        let mut p = m.payload().to_vec();
        if p.is_empty() { return Ok(()); }
        let i = pos.index(p.len());
        if cut { p.truncate(i); } else { p[i] = byte; }
        let _ = Message::decode(m.kind() as u16, Bytes::from(p));
    }

    #[test]
    fn chunking_respects_the_frame_limit(n in 0usize..2000, zero_every in 1usize..5, epoch in any::<u64>()) {
        // zero pages, whole pages and deltas of every size up to the limit
        let pages: Vec<Page> = (0..n).map(|i| Page {
            gfn: i as u64 * 3,
            data: if i % zero_every == 0 {
                PageData::Zero
            } else if i % 2 == 0 {
                let base = vec![0u8; PAGE_SIZE];
                let mut new = base.clone();
                for k in 0..(i * 7) % 1000 {
                    new[k * 4] = 1;
                }
                let mut d = BytesMut::new();
                if delta::encode(&base, &new, &mut d) { PageData::Delta(d.freeze()) } else { PageData::Full(Bytes::from(new)) }
            } else {
                PageData::Full(Bytes::from(vec![i as u8; PAGE_SIZE]))
            },
        }).collect();
        let chunks = chunk_pages(epoch, pages.clone());
        let mut back = Vec::new();
        for c in &chunks {
            prop_assert!(!c.pages.is_empty());
            prop_assert_eq!(c.epoch, epoch);
            let payload = encode_chunk(c);
            prop_assert!(payload.len() <= MAX_PAYLOAD, "chunk of {} bytes", payload.len());
            back.extend(decode_chunk(Kind::PageChunk, payload).expect("decode").pages);
        }
        prop_assert_eq!(back, pages);
    }
}

#[test]
fn a_full_chunk_is_exactly_at_the_limit() {
    let pages: Vec<Page> =
        (0..PAGES_PER_CHUNK as u64 + 1).map(|g| Page::full(g, Bytes::from(vec![1u8; PAGE_SIZE]))).collect();
    let chunks = chunk_pages(1, pages);
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[0].pages.len(), PAGES_PER_CHUNK);
    assert!(encode_chunk(&chunks[0]).len() <= MAX_PAYLOAD);
}

/// A state far over one frame (a long epoch's undrained output): it travels
/// in chunks that each fit a frame, and is put back together exactly.
#[test]
fn a_large_state_travels_in_chunks_and_is_put_back_together() {
    let mut st = state(9);
    st.devices.outbox = (0..200_000u32).map(|i| Output::Console { cpu: i % 4, line: format!("line {i:08}") }).collect();
    let encoded = common::codec::encode(&st).expect("encode");
    assert!(encoded.len() > 3 * MAX_PAYLOAD, "state of {} bytes", encoded.len());
    let end = EpochEnd { epoch: 9, page_count: 0, checksum: 7, digest: Some(5), state: st };
    let msgs = end.into_messages().expect("messages");
    let chunks = msgs.iter().filter(|m| m.kind() == Kind::StateChunk).count();
    assert!(chunks >= 4, "{chunks} chunks");
    assert_eq!(msgs.last().map(Message::kind), Some(Kind::EpochEnd));
    let (i, r) = link();
    let (mut tx, mut rx) = (FrameSealer::new(PROTOCOL_VERSION, i), FrameOpener::new(PROTOCOL_VERSION, r));
    let mut asm = StateAssembler::default();
    let mut done = None;
    for m in msgs {
        let mut buf = BytesMut::new();
        tx.encode(m.to_frame(), &mut buf).expect("every message fits a frame");
        let f = rx.decode(&mut buf).expect("decode").expect("frame");
        match Message::decode(f.kind, f.payload).expect("message") {
            Message::StateChunk(c) => asm.push(c).expect("chunk"),
            Message::EpochEnd(t) => done = Some(asm.finish(t).expect("assembled")),
            other => panic!("unexpected {:?}", other.kind()),
        }
    }
    let back = done.expect("an end");
    assert_eq!((back.epoch, back.checksum, back.digest), (9, 7, Some(5)));
    assert_eq!(common::codec::encode(&back.state).expect("encode"), encoded);
}

#[test]
fn the_state_assembler_refuses_gaps_strangers_and_bad_tails() {
    let mut st = state(3);
    st.devices.outbox = (0..100_000u32).map(|i| Output::Mark { cpu: 0, value: i }).collect();
    let msgs = EpochEnd { epoch: 3, page_count: 0, checksum: 0, digest: None, state: st }.into_messages().expect("m");
    let chunks: Vec<StateChunk> = msgs
        .iter()
        .filter_map(|m| match m {
            Message::StateChunk(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    let Some(Message::EpochEnd(tail)) = msgs.last().cloned() else { panic!("no tail") };
    assert!(chunks.len() >= 2);
    // a gap
    let mut a = StateAssembler::default();
    a.push(chunks[0].clone()).expect("first");
    assert!(a.push(chunks[0].clone()).is_err(), "the same chunk twice");
    let mut a = StateAssembler::default();
    assert!(a.push(chunks[1].clone()).is_err(), "a chunk that does not start the state");
    // another epoch's chunk in the middle
    let mut a = StateAssembler::default();
    a.push(chunks[0].clone()).expect("first");
    assert!(a.push(StateChunk { epoch: 4, ..chunks[1].clone() }).is_err());
    // a tail for the wrong epoch, a short state, a wrong CRC
    let full = |a: &mut StateAssembler| chunks.iter().for_each(|c| a.push(c.clone()).expect("chunk"));
    let mut a = StateAssembler::default();
    full(&mut a);
    assert!(a.finish(EpochTail { epoch: 4, ..tail.clone() }).is_err());
    let mut a = StateAssembler::default();
    a.push(chunks[0].clone()).expect("first");
    assert!(a.finish(tail.clone()).is_err(), "ended before the whole state arrived");
    let mut a = StateAssembler::default();
    full(&mut a);
    assert!(a.finish(EpochTail { state_crc: tail.state_crc ^ 1, ..tail.clone() }).is_err());
    let mut a = StateAssembler::default();
    assert!(a.finish(tail.clone()).is_err(), "a tail with no state at all");
    // and the good sequence works after all of that
    let mut a = StateAssembler::default();
    full(&mut a);
    assert_eq!(a.finish(tail).expect("good").epoch, 3);
    // the decoder refuses states over the limit and chunks past their total
    let over = Message::StateChunk(StateChunk { epoch: 1, offset: 0, total: MAX_STATE_BYTES + 1, data: Bytes::new() });
    assert!(Message::decode(Kind::StateChunk as u16, over.payload()).is_err());
    let past = Message::StateChunk(StateChunk { epoch: 1, offset: 10, total: 12, data: Bytes::from_static(b"abc") });
    assert!(Message::decode(Kind::StateChunk as u16, past.payload()).is_err());
}
