//! Instruction counts of the device side, for `valgrind --tool=callgrind` (stable on a loaded
//! machine where wall-clock benchmarks are not): the device part of one batch of 32 chains —
//! pop, complete, publish — run through `DeviceQueue` directly, through `AnyDeviceQueue` (what
//! the back-end's workers and devices call) on a split ring, and on a packed ring.
//!
//! ```text
//! cargo bench --bench ring_counts --no-run
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='ring_counts::device_*' \
//!     target/release/deps/ring_counts-* split-direct|split-any|packed-any [single|block]
//! ```
//! Divide the `Ir` total by 32 × the number of batches (2000) for instructions per chain.
//!
//! The driver side of the same batches — add, publish, kick decision, reap — is counted with
//! `--toggle-collect='ring_counts::driver_*'` instead (split-any or packed-any).

use std::hint::black_box;
use std::sync::Arc;

use vhostuser_rs::memory::GuestMemory;
use vhostuser_rs::virtqueue::{
    AnyDeviceQueue, AnyDriverQueue, ChainBatch, DeviceQueue, DriverQueue, PackedBase, PackedDeviceQueue,
    PackedDriverQueue, PackedQueueConfig, QueueConfig, RingAddressSpace,
};

const SIZE: u16 = 256;
const BATCH: usize = 32;
const BATCHES: usize = 2000;

type Request = (Vec<(u64, u32)>, Vec<(u64, u32)>);

fn requests(mem: &GuestMemory, block: bool) -> Vec<Request> {
    (0..BATCH)
        .map(|_| {
            if block {
                let hdr = mem.alloc(16, 16).unwrap();
                let data = mem.alloc(4096, 4096).unwrap();
                let status = mem.alloc(1, 1).unwrap();
                (vec![(hdr, 16)], vec![(data, 4096), (status, 1)])
            } else {
                (vec![(mem.alloc(64, 64).unwrap(), 64)], vec![])
            }
        })
        .collect()
}

#[inline(never)]
fn device_split_direct(q: &mut DeviceQueue, batch: &mut ChainBatch) -> usize {
    batch.clear();
    let n = q.pop_batch(batch, BATCH).unwrap();
    for chain in batch.chains() {
        q.complete(batch, chain, 0).unwrap();
    }
    black_box(q.publish_used().unwrap());
    n
}

#[inline(never)]
fn device_any(q: &mut AnyDeviceQueue, batch: &mut ChainBatch) -> usize {
    batch.clear();
    let n = q.pop_batch(batch, BATCH).unwrap();
    for chain in batch.chains() {
        q.complete(batch, chain, 0).unwrap();
    }
    black_box(q.publish_used().unwrap());
    n
}

#[inline(never)]
fn driver_submit(driver: &mut AnyDriverQueue, reqs: &[Request]) {
    for (r, w) in reqs {
        driver.add(r, w).unwrap();
    }
    driver.publish();
    black_box(driver.kick_needed().unwrap());
}

#[inline(never)]
fn driver_reap(driver: &mut AnyDriverQueue, used: &mut Vec<(u16, u32)>) -> usize {
    used.clear();
    driver.reap(used, BATCH).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` runs every bench target with `--bench`: nothing to do then.
    let Some(mode) = args.get(1).filter(|a| !a.starts_with('-')) else { return };
    let block = args.get(2).is_some_and(|a| a == "block");
    let mem = Arc::new(GuestMemory::allocate(&[(0, 64 << 20)]).unwrap());
    let table = Arc::new(mem.table().clone());
    let reqs = requests(&mem, block);
    let mut batch = ChainBatch::new();
    let mut used = Vec::new();
    let (mut driver, mut split, mut any) = match mode.as_str() {
        "split-direct" | "split-any" => {
            let d = DriverQueue::allocate(mem.clone(), SIZE, false, 0).unwrap();
            let r = d.ring();
            let cfg = QueueConfig {
                size: SIZE,
                desc_addr: r.desc,
                avail_addr: r.avail,
                used_addr: r.used,
                addr_space: RingAddressSpace::Guest,
                event_idx: false,
                indirect: false,
                next_avail: 0,
            };
            let q = DeviceQueue::new(table, cfg).unwrap();
            if mode == "split-direct" {
                (AnyDriverQueue::Split(d), Some(q), None)
            } else {
                (AnyDriverQueue::Split(d), None, Some(AnyDeviceQueue::Split(q)))
            }
        }
        "packed-any" => {
            let d = PackedDriverQueue::allocate(mem.clone(), SIZE, false, 0).unwrap();
            let r = d.ring();
            let cfg = PackedQueueConfig {
                size: SIZE,
                desc_addr: r.desc,
                driver_event_addr: r.driver_event,
                device_event_addr: r.device_event,
                addr_space: RingAddressSpace::Guest,
                event_idx: false,
                indirect: false,
                base: PackedBase::START,
            };
            let q = PackedDeviceQueue::new(table, cfg).unwrap();
            (AnyDriverQueue::Packed(d), None, Some(AnyDeviceQueue::Packed(q)))
        }
        other => panic!("unknown mode {other}: split-direct, split-any or packed-any"),
    };
    for _ in 0..BATCHES {
        driver_submit(&mut driver, &reqs);
        let n = match (&mut split, &mut any) {
            (Some(q), _) => device_split_direct(q, &mut batch),
            (_, Some(q)) => device_any(q, &mut batch),
            _ => unreachable!(),
        };
        assert_eq!(n, BATCH);
        assert_eq!(driver_reap(&mut driver, &mut used), BATCH);
    }
}
