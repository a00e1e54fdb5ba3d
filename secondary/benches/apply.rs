//! Encode + seal + open + decode + stage + verify + apply of one epoch, for
//! 1024 and 16384 dirty pages, in bytes/s, beside version 1's MAC-only
//! framing (CRC32 + BLAKE3 MAC, no encryption) and this machine's memcpy of
//! the same pages (the physical floor), all in the same run.
//! Run: `cargo bench -p castor-secondary --bench apply`.

use bytes::{Bytes, BytesMut};
use common::frame::{FrameOpener, FrameSealer, PROTOCOL_VERSION};
use common::proto::{chunk_pages, EpochChecksum, EpochEnd, Message, Page, StateAssembler, PAGE_SIZE};
use common::state::{DeviceState, MachineState, VmShape, VmState};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use secondary::replica::Replica;
use tokio_util::codec::{Decoder, Encoder};

const MEM: u64 = 256 << 20;

fn shape() -> VmShape {
    VmShape { mem_bytes: MEM, ram_ranges: vmm::memory::ram_ranges(MEM), vcpus: 1, image_id: 0 }
}

fn state() -> MachineState {
    MachineState {
        shape: shape(),
        boot: vec![],
        vcpus: vec![],
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        devices: DeviceState::default(),
        cpu: Default::default(),
    }
}

fn pages(n: usize) -> Vec<Page> {
    (0..n as u64).map(|i| Page::full(0x1000 + i * 3, Bytes::from(vec![(i % 251) as u8 + 1; PAGE_SIZE]))).collect()
}

/// One epoch's messages (begin, chunks, end) as frames.
fn epoch_frames(epoch: u64, src: &[Page]) -> Vec<common::frame::OutFrame> {
    let n = src.len() as u64;
    let mut sum = EpochChecksum::default();
    src.iter().for_each(|p| sum.add(p));
    let mut v = vec![Message::EpochBegin { epoch, page_count: n, full: false }.to_frame()];
    v.extend(chunk_pages(epoch, src.to_vec()).into_iter().map(|ch| Message::PageChunk(ch).to_frame()));
    let end = EpochEnd { epoch, page_count: n, checksum: sum.value(), digest: None, state: state() };
    v.extend(end.into_messages().expect("end").iter().map(Message::to_frame));
    v
}

fn apply(replica: &mut Replica, asm: &mut StateAssembler, m: Message) {
    match m {
        Message::EpochBegin { epoch, page_count, full } => replica.begin_epoch(epoch, page_count, full).expect("begin"),
        Message::PageChunk(c) => replica.chunk(c).expect("chunk"),
        Message::StateChunk(c) => asm.push(c).expect("state"),
        Message::EpochEnd(t) => {
            replica.end_epoch(asm.finish(t).expect("state")).expect("end");
        }
        _ => unreachable!(),
    }
}

/// Version 1's link, for comparison in the same run: every frame in clear
/// with a CRC32 and a BLAKE3 keyed MAC, computed by the sender and checked
/// by the receiver.
fn mac_only_v1(frames: Vec<common::frame::OutFrame>, replica: &mut Replica) {
    let key = [5u8; 32];
    let mut wire = BytesMut::new();
    for f in &frames {
        let start = wire.len();
        wire.extend_from_slice(&[0u8; 20]);
        wire.extend_from_slice(&f.payload);
        let crc = crc32fast::hash(&wire[start..]);
        let mac = *blake3::keyed_hash(&key, &wire[start..]).as_bytes();
        wire.extend_from_slice(&crc.to_le_bytes());
        wire.extend_from_slice(&mac);
    }
    let mut off = 0;
    let mut asm = StateAssembler::default();
    for f in frames {
        let body = 20 + f.payload.len();
        let frame = &wire[off..off + body];
        assert_eq!(crc32fast::hash(frame).to_le_bytes(), wire[off + body..off + body + 4]);
        let mac = blake3::keyed_hash(&key, frame);
        assert_eq!(mac.as_bytes()[..], wire[off + body + 4..off + body + 36]);
        let payload = Bytes::copy_from_slice(&frame[20..]);
        apply(replica, &mut asm, Message::decode(f.kind, payload).expect("msg"));
        off += body + 36;
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("epoch");
    g.sample_size(20);
    let secret = common::auth::Secret::generate().expect("secret");
    for n in [1024usize, 16384] {
        let src = pages(n);
        g.throughput(Throughput::Bytes((n * PAGE_SIZE) as u64));
        let mut replica = Replica::new(shape()).expect("replica");
        replica.full_sync_chunk(&common::proto::PageChunk { epoch: 0, pages: pages(1) }).expect("sync");
        let mut epoch = 0u64;
        let (i, r) = common::link::pair(&secret).expect("link");
        let mut tx = FrameSealer::new(PROTOCOL_VERSION, i);
        let mut rx = FrameOpener::new(PROTOCOL_VERSION, r);
        g.bench_with_input(BenchmarkId::new("encrypted_encode_decode_apply", n), &n, |b, _| {
            let mut asm = StateAssembler::default();
            b.iter(|| {
                let mut wire = BytesMut::new();
                for f in epoch_frames(epoch, &src) {
                    tx.encode(f, &mut wire).expect("enc");
                }
                while let Some(f) = rx.decode(&mut wire).expect("dec") {
                    apply(&mut replica, &mut asm, Message::decode(f.kind, f.payload).expect("msg"));
                }
                epoch += 1;
            })
        });
        g.bench_with_input(BenchmarkId::new("mac_only_v1_encode_decode_apply", n), &n, |b, _| {
            b.iter(|| {
                mac_only_v1(epoch_frames(epoch, &src), &mut replica);
                epoch += 1;
            })
        });
        let flat: Vec<u8> = src.iter().flat_map(|p| p.full_data().expect("data").to_vec()).collect();
        let mut dst = vec![0u8; flat.len()];
        g.bench_with_input(BenchmarkId::new("memcpy_floor", n), &n, |b, _| {
            b.iter(|| {
                dst.copy_from_slice(std::hint::black_box(&flat));
                std::hint::black_box(&dst);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
