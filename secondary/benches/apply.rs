//! Encode + frame + decode + stage + verify + apply of one epoch, for 1024 and
//! 16384 dirty pages, in bytes/s, beside this machine's memcpy of the same
//! pages (the physical floor). Run: `cargo bench -p castor-secondary --bench apply`.

use bytes::{Bytes, BytesMut};
use common::frame::{FrameCodec, PROTOCOL_VERSION};
use common::proto::{chunk_pages, EpochChecksum, EpochEnd, Message, Page, PAGE_SIZE};
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
    }
}

fn pages(n: usize) -> Vec<Page> {
    (0..n as u64)
        .map(|i| Page { gfn: 0x1000 + i * 3, data: Some(Bytes::from(vec![(i % 251) as u8 + 1; PAGE_SIZE])) })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("epoch");
    g.sample_size(20);
    for n in [1024usize, 16384] {
        let src = pages(n);
        g.throughput(Throughput::Bytes((n * PAGE_SIZE) as u64));
        let mut replica = Replica::new(shape()).expect("replica");
        replica.full_sync_chunk(&common::proto::PageChunk { epoch: 0, pages: pages(1) }).expect("sync");
        let mut epoch = 0u64;
        let key = [5u8; 32];
        g.bench_with_input(BenchmarkId::new("encode_decode_apply", n), &n, |b, _| {
            b.iter(|| {
                let mut tx = FrameCodec::new(PROTOCOL_VERSION, key);
                let mut rx = FrameCodec::new(PROTOCOL_VERSION, key);
                let mut wire = BytesMut::new();
                let mut sum = EpochChecksum::default();
                src.iter().for_each(|p| sum.add(p));
                tx.encode(Message::EpochBegin { epoch, page_count: n as u64, full: false }.to_frame(), &mut wire)
                    .expect("enc");
                for ch in chunk_pages(epoch, src.clone()) {
                    tx.encode(Message::PageChunk(ch).to_frame(), &mut wire).expect("enc");
                }
                let end = EpochEnd { epoch, page_count: n as u64, checksum: sum.value(), digest: None, state: state() };
                tx.encode(Message::EpochEnd(Box::new(end)).to_frame(), &mut wire).expect("enc");
                while let Some(f) = rx.decode(&mut wire).expect("dec") {
                    match Message::decode(f.kind, f.payload).expect("msg") {
                        Message::EpochBegin { epoch, page_count, full } => {
                            replica.begin_epoch(epoch, page_count, full).expect("begin")
                        }
                        Message::PageChunk(c) => replica.chunk(c).expect("chunk"),
                        Message::EpochEnd(e) => {
                            replica.end_epoch(*e).expect("end");
                        }
                        _ => unreachable!(),
                    }
                }
                epoch += 1;
            })
        });
        let flat: Vec<u8> = src.iter().flat_map(|p| p.data.as_ref().expect("data").to_vec()).collect();
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
