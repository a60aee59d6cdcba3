//! Encode and decode cost per message of the wire layer (criterion).
//!
//! Run: `cargo bench --bench protocol`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vhostuser_rs::protocol::*;

fn messages() -> Vec<(&'static str, Message, usize)> {
    let region = |i: u64| MemoryRegion {
        guest_addr: i << 32,
        size: 1 << 30,
        user_addr: 0x7f00_0000_0000 + (i << 32),
        mmap_offset: 0,
        xen: None,
    };
    vec![
        ("GET_FEATURES reply", Message::reply(FrontendRequest::GET_FEATURES, Payload::U64(0x1_7500_7e46)), 0),
        (
            "SET_VRING_ADDR",
            Message::request(
                FrontendRequest::SET_VRING_ADDR,
                Payload::VringAddr(VringAddr {
                    index: 0,
                    flags: 0,
                    desc_user_addr: 0x1000,
                    used_user_addr: 0x3000,
                    avail_user_addr: 0x2000,
                    log_guest_addr: 0,
                }),
            ),
            0,
        ),
        (
            "SET_VRING_KICK",
            Message::request(FrontendRequest::SET_VRING_KICK, Payload::VringFd(VringFd { index: 0, nofd: false })),
            1,
        ),
        (
            "SET_MEM_TABLE x8",
            Message::request(FrontendRequest::SET_MEM_TABLE, Payload::MemoryTable((0..8).map(region).collect())),
            8,
        ),
        (
            "GET_CONFIG reply 60B",
            Message::reply(
                FrontendRequest::GET_CONFIG,
                Payload::Config(DeviceConfig { offset: 0, flags: 0, data: vec![0; 60] }),
            ),
            0,
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("protocol");
    group.throughput(Throughput::Elements(1));
    for (name, msg, fds) in messages() {
        let bytes = msg.encode();
        group.bench_function(format!("decode {name}"), |b| {
            b.iter(|| decode(Channel::Main, black_box(&bytes), black_box(fds)).unwrap())
        });
        let mut buf = Vec::with_capacity(512);
        group.bench_function(format!("encode {name}"), |b| {
            b.iter(|| {
                buf.clear();
                black_box(&msg).encode_into(&mut buf);
                black_box(buf.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
