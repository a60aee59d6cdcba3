//! Split-ring cost per chain (criterion), side by side with rust-vmm's `virtio-queue` on the same
//! rings in the same memory, and the same workloads on packed rings (`-- packed`).
//!
//! Run: `cargo bench --bench virtqueue`. Every figure is per batch of 32 chains (criterion's
//! throughput line gives chains/s); divide the time by 32 for ns per chain.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use vhostuser_rs::memory::GuestMemory;
use vhostuser_rs::virtqueue::{
    ChainBatch, DeviceQueue, DriverQueue, PackedBase, PackedDeviceQueue, PackedDriverQueue, PackedQueueConfig,
    QueueConfig, RingAddressSpace,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

const SIZE: u16 = 256;
const BATCH: usize = 32;
const MEM: u64 = 64 << 20;

/// (readable, writable) buffers of one request.
type Request = (Vec<(u64, u32)>, Vec<(u64, u32)>);

struct Setup {
    mem: Arc<GuestMemory>,
    driver: DriverQueue,
    device: DeviceQueue,
    /// (readable, writable) buffers of each request.
    requests: Vec<Request>,
}

#[derive(Clone, Copy)]
enum Shape {
    /// One 64-byte readable descriptor.
    Single,
    /// virtio-blk read: 16-byte header, 4 KiB writable data, 1-byte status.
    Block,
}

fn setup(shape: Shape) -> Setup {
    let mem = Arc::new(GuestMemory::allocate(&[(0, MEM)]).unwrap());
    let driver = DriverQueue::allocate(mem.clone(), SIZE, false, 0).unwrap();
    let r = driver.ring();
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
    let device = DeviceQueue::new(Arc::new(mem.table().clone()), cfg).unwrap();
    let requests = (0..BATCH)
        .map(|_| match shape {
            Shape::Single => (vec![(mem.alloc(64, 64).unwrap(), 64)], vec![]),
            Shape::Block => {
                let hdr = mem.alloc(16, 16).unwrap();
                let data = mem.alloc(4096, 4096).unwrap();
                let status = mem.alloc(1, 1).unwrap();
                (vec![(hdr, 16)], vec![(data, 4096), (status, 1)])
            }
        })
        .collect();
    Setup { mem, driver, device, requests }
}

fn fill(s: &mut Setup) {
    for (r, w) in &s.requests {
        s.driver.add(r, w).unwrap();
    }
    s.driver.publish();
}

fn recycle(s: &mut Setup, used: &mut Vec<(u16, u32)>) {
    used.clear();
    s.driver.reap(used, BATCH).unwrap();
}

/// Device side: pop 32 chains, complete them (optionally copying 4 KiB into each data buffer),
/// publish the used index once. Only the device part is timed.
fn device_side(c: &mut Criterion, name: &str, shape: Shape, copy: bool) {
    let mut s = setup(shape);
    let mut batch = ChainBatch::new();
    let mut used = Vec::new();
    let payload = vec![0x5au8; 4096];
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fill(&mut s);
                let start = Instant::now();
                batch.clear();
                let n = s.device.pop_batch(&mut batch, BATCH).unwrap();
                for chain in batch.chains() {
                    let mut written = 0;
                    if copy {
                        if let Some(seg) = batch.writable(chain).first() {
                            let n = (seg.len as usize).min(payload.len());
                            // SAFETY: the segment lies inside a live mapping.
                            unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), seg.host, n) };
                            written = n as u32;
                        }
                    }
                    s.device.complete(&batch, chain, written).unwrap();
                }
                black_box(s.device.publish_used().unwrap());
                total += start.elapsed();
                assert_eq!(n, BATCH);
                recycle(&mut s, &mut used);
            }
            total
        })
    });
}

/// The same device-side workload through rust-vmm's virtio-queue over the same memfd.
fn virtio_queue_side(c: &mut Criterion, name: &str, shape: Shape) {
    let mut s = setup(shape);
    let region = &s.mem.table().regions()[0];
    let file = std::fs::File::from(region.mapping().fd().unwrap().try_clone_to_owned().unwrap());
    let mmap = MmapRegion::<()>::from_file(FileOffset::new(file, 0), MEM as usize).unwrap();
    let vmem = GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(mmap, GuestAddress(0)).unwrap()]).unwrap();
    let r = s.driver.ring();
    let mut q = Queue::new(SIZE).unwrap();
    q.try_set_size(SIZE).unwrap();
    q.try_set_desc_table_address(GuestAddress(r.desc)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(r.avail)).unwrap();
    q.try_set_used_ring_address(GuestAddress(r.used)).unwrap();
    q.set_ready(true);
    let mut used = Vec::new();
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fill(&mut s);
                let start = Instant::now();
                let mut n = 0;
                while let Some(chain) = q.pop_descriptor_chain(&vmem) {
                    let head = chain.head_index();
                    let mut segs = 0u32;
                    for d in chain {
                        segs += black_box(d.len());
                    }
                    black_box(segs);
                    q.add_used(&vmem, head, 0).unwrap();
                    n += 1;
                }
                black_box(q.needs_notification(&vmem).unwrap());
                total += start.elapsed();
                assert_eq!(n, BATCH);
                recycle(&mut s, &mut used);
            }
            total
        })
    });
}

/// Driver side: add 32 chains, publish, reap them (the device part is untimed).
fn driver_side(c: &mut Criterion, name: &str, shape: Shape) {
    let mut s = setup(shape);
    let mut batch = ChainBatch::new();
    let mut used = Vec::new();
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                fill(&mut s);
                black_box(s.driver.kick_needed());
                total += start.elapsed();
                batch.clear();
                s.device.pop_batch(&mut batch, BATCH).unwrap();
                for chain in batch.chains() {
                    s.device.complete(&batch, chain, 0).unwrap();
                }
                s.device.publish_used().unwrap();
                let start = Instant::now();
                recycle(&mut s, &mut used);
                total += start.elapsed();
                assert_eq!(used.len(), BATCH);
            }
            total
        })
    });
}

/// Driver on one thread, device on another, both busy-polling: time for `iters` batches.
fn two_threads(c: &mut Criterion, name: &str, shape: Shape, batch_size: usize, copy: bool) {
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut s = setup(shape);
            let chains = iters * batch_size as u64;
            let stop = Arc::new(AtomicBool::new(false));
            let mut device = {
                // Move the device queue out; the driver keeps the rest.
                let r = s.driver.ring();
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
                DeviceQueue::new(Arc::new(s.mem.table().clone()), cfg).unwrap()
            };
            let stop2 = stop.clone();
            let dev = std::thread::spawn(move || {
                let mut batch = ChainBatch::new();
                let payload = vec![0x5au8; 4096];
                while !stop2.load(Ordering::Relaxed) {
                    batch.clear();
                    let n = device.pop_batch(&mut batch, BATCH).unwrap();
                    if n == 0 {
                        std::hint::spin_loop();
                        continue;
                    }
                    for chain in batch.chains() {
                        let mut written = 0;
                        if copy {
                            if let Some(seg) = batch.writable(chain).first() {
                                let n = (seg.len as usize).min(payload.len());
                                // SAFETY: inside a live mapping.
                                unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), seg.host, n) };
                                written = n as u32;
                            }
                        }
                        device.complete(&batch, chain, written).unwrap();
                    }
                    device.publish_used().unwrap();
                }
            });
            let mut used = Vec::new();
            let start = Instant::now();
            let (mut sent, mut done) = (0u64, 0u64);
            let reqs = s.requests.clone();
            while done < chains {
                let mut added = 0;
                while sent < chains && added < batch_size && s.driver.num_free() >= 3 {
                    let (r, w) = &reqs[(sent % BATCH as u64) as usize];
                    s.driver.add(r, w).unwrap();
                    sent += 1;
                    added += 1;
                }
                s.driver.publish();
                used.clear();
                done += s.driver.reap(&mut used, BATCH).unwrap() as u64;
            }
            let elapsed = start.elapsed();
            stop.store(true, Ordering::Relaxed);
            dev.join().unwrap();
            elapsed
        })
    });
}

/// The same rings, packed layout.
struct PackedSetup {
    driver: PackedDriverQueue,
    device: PackedDeviceQueue,
    requests: Vec<Request>,
}

fn packed_setup(shape: Shape) -> PackedSetup {
    let s = setup(shape);
    let driver = PackedDriverQueue::allocate(s.mem.clone(), SIZE, false, 0).unwrap();
    let r = driver.ring();
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
    let device = PackedDeviceQueue::new(Arc::new(s.mem.table().clone()), cfg).unwrap();
    PackedSetup { driver, device, requests: s.requests }
}

fn packed_fill(s: &mut PackedSetup) {
    for (r, w) in &s.requests {
        s.driver.add(r, w).unwrap();
    }
    s.driver.publish();
}

/// Packed device side: the workload of [`device_side`].
fn packed_device_side(c: &mut Criterion, name: &str, shape: Shape, copy: bool) {
    let mut s = packed_setup(shape);
    let mut batch = ChainBatch::new();
    let mut used = Vec::new();
    let payload = vec![0x5au8; 4096];
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                packed_fill(&mut s);
                let start = Instant::now();
                batch.clear();
                let n = s.device.pop_batch(&mut batch, BATCH).unwrap();
                for chain in batch.chains() {
                    let mut written = 0;
                    if copy {
                        if let Some(seg) = batch.writable(chain).first() {
                            let n = (seg.len as usize).min(payload.len());
                            // SAFETY: the segment lies inside a live mapping.
                            unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), seg.host, n) };
                            written = n as u32;
                        }
                    }
                    s.device.complete(&batch, chain, written).unwrap();
                }
                black_box(s.device.publish_used().unwrap());
                total += start.elapsed();
                assert_eq!(n, BATCH);
                used.clear();
                s.driver.reap(&mut used, BATCH).unwrap();
            }
            total
        })
    });
}

/// Packed driver side: the workload of [`driver_side`].
fn packed_driver_side(c: &mut Criterion, name: &str, shape: Shape) {
    let mut s = packed_setup(shape);
    let mut batch = ChainBatch::new();
    let mut used = Vec::new();
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                packed_fill(&mut s);
                black_box(s.driver.kick_needed().unwrap());
                total += start.elapsed();
                batch.clear();
                s.device.pop_batch(&mut batch, BATCH).unwrap();
                for chain in batch.chains() {
                    s.device.complete(&batch, chain, 0).unwrap();
                }
                s.device.publish_used().unwrap();
                let start = Instant::now();
                used.clear();
                s.driver.reap(&mut used, BATCH).unwrap();
                total += start.elapsed();
                assert_eq!(used.len(), BATCH);
            }
            total
        })
    });
}

/// Packed rings on two threads: the workload of [`two_threads`] (the issue's "driver ↔ device
/// on two threads ≥ the split ring's chains per second").
fn packed_two_threads(c: &mut Criterion, name: &str, shape: Shape, batch_size: usize, copy: bool) {
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let PackedSetup { mut driver, mut device, requests } = packed_setup(shape);
            let chains = iters * batch_size as u64;
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = stop.clone();
            let dev = std::thread::spawn(move || {
                let mut batch = ChainBatch::new();
                let payload = vec![0x5au8; 4096];
                while !stop2.load(Ordering::Relaxed) {
                    batch.clear();
                    let n = device.pop_batch(&mut batch, BATCH).unwrap();
                    if n == 0 {
                        std::hint::spin_loop();
                        continue;
                    }
                    for chain in batch.chains() {
                        let mut written = 0;
                        if copy {
                            if let Some(seg) = batch.writable(chain).first() {
                                let n = (seg.len as usize).min(payload.len());
                                // SAFETY: inside a live mapping.
                                unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), seg.host, n) };
                                written = n as u32;
                            }
                        }
                        device.complete(&batch, chain, written).unwrap();
                    }
                    device.publish_used().unwrap();
                }
            });
            let mut used = Vec::new();
            let start = Instant::now();
            let (mut sent, mut done) = (0u64, 0u64);
            while done < chains {
                let mut added = 0;
                while sent < chains && added < batch_size && driver.num_free() >= 3 {
                    let (r, w) = &requests[(sent % BATCH as u64) as usize];
                    driver.add(r, w).unwrap();
                    sent += 1;
                    added += 1;
                }
                driver.publish();
                used.clear();
                done += driver.reap(&mut used, BATCH).unwrap() as u64;
            }
            let elapsed = start.elapsed();
            stop.store(true, Ordering::Relaxed);
            dev.join().unwrap();
            elapsed
        })
    });
}

fn benches(c: &mut Criterion) {
    device_side(c, "device: 32 x 1-desc 64B chains", Shape::Single, false);
    device_side(c, "device: 32 x 3-desc block chains", Shape::Block, false);
    device_side(c, "device: 32 x 3-desc block chains + 4KiB copy", Shape::Block, true);
    virtio_queue_side(c, "virtio-queue: 32 x 1-desc 64B chains", Shape::Single);
    virtio_queue_side(c, "virtio-queue: 32 x 3-desc block chains", Shape::Block);
    driver_side(c, "driver: 32 x 1-desc 64B chains", Shape::Single);
    driver_side(c, "driver: 32 x 3-desc block chains", Shape::Block);
    two_threads(c, "two threads: batches of 32 x 1-desc", Shape::Single, BATCH, false);
    two_threads(c, "two threads: batches of 1 x 1-desc", Shape::Single, 1, false);
    two_threads(c, "two threads: batches of 32 x block + 4KiB copy", Shape::Block, BATCH, true);
    packed_device_side(c, "packed device: 32 x 1-desc 64B chains", Shape::Single, false);
    packed_device_side(c, "packed device: 32 x 3-desc block chains", Shape::Block, false);
    packed_device_side(c, "packed device: 32 x 3-desc block chains + 4KiB copy", Shape::Block, true);
    packed_driver_side(c, "packed driver: 32 x 1-desc 64B chains", Shape::Single);
    packed_driver_side(c, "packed driver: 32 x 3-desc block chains", Shape::Block);
    packed_two_threads(c, "packed two threads: batches of 32 x 1-desc", Shape::Single, BATCH, false);
    packed_two_threads(c, "packed two threads: batches of 1 x 1-desc", Shape::Single, 1, false);
    packed_two_threads(c, "packed two threads: batches of 32 x block + 4KiB copy", Shape::Block, BATCH, true);
}

criterion_group! {
    name = group;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(30);
    targets = benches
}
criterion_main!(group);
