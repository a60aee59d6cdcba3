//! Fuzzes the packed-ring device side: the fuzzer fills the descriptor ring, one indirect table,
//! the driver event suppression structure, the vring base (positions and wrap counters) and the
//! queue setup; popping, completing in a fuzzer-chosen order, publishing and re-arming must
//! either work on segments that lie in mapped memory, or fail with a `VirtqueueError` — never
//! panic, hang or escape.
#![no_main]

use std::sync::{Arc, OnceLock, RwLock};

use libfuzzer_sys::fuzz_target;
use vhostuser_rs::memory::{GuestMemory, Iotlb};
use vhostuser_rs::virtqueue::{
    ChainBatch, PackedBase, PackedDeviceQueue, PackedQueueConfig, RingAddressSpace, VirtqueueError,
};

const MEM: u64 = 1 << 20;
const DESC: u64 = 0x1000;
const DRIVER_EVENT: u64 = 0x2000;
const DEVICE_EVENT: u64 = 0x3000;
const TABLE: u64 = 0x4000;

fn memory() -> &'static Arc<GuestMemory> {
    static MEMORY: OnceLock<Arc<GuestMemory>> = OnceLock::new();
    // Two adjacent regions so buffers can straddle a boundary.
    MEMORY.get_or_init(|| Arc::new(GuestMemory::allocate(&[(0, MEM), (MEM, MEM)]).unwrap()))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let mem = memory();
    let t = mem.table();
    // Any size (packed rings need not be powers of two): 1..=40.
    let size = u16::from(data[0] % 40) + 1;
    let flags = data[1];
    let mut base = PackedBase::decode(u32::from_le_bytes([data[2], data[3], data[4], data[5]]));
    base.avail.index %= size;
    base.used.index %= size;
    let event = [data[6], data[7], data[8], data[9]];
    let order = u16::from_le_bytes([data[10], data[11]]);
    let body = &data[12..];
    let desc_len = 16 * usize::from(size);
    let mut desc = vec![0u8; desc_len];
    let n = body.len().min(desc_len);
    desc[..n].copy_from_slice(&body[..n]);
    // Keep addresses mostly small so many buffers translate (bit 0 of flags).
    if flags & 1 != 0 {
        for d in desc.chunks_mut(16) {
            d[3..8].fill(0);
        }
    }
    t.write(DESC, &desc).unwrap();
    let rest = &body[n..];
    let mut table = vec![0u8; 256];
    let k = rest.len().min(256);
    table[..k].copy_from_slice(&rest[..k]);
    t.write(TABLE, &table).unwrap();
    t.write(DRIVER_EVENT, &event).unwrap();
    t.write(DEVICE_EVENT, &[0u8; 4]).unwrap();
    let cfg = PackedQueueConfig {
        size,
        desc_addr: DESC,
        driver_event_addr: DRIVER_EVENT,
        device_event_addr: DEVICE_EVENT,
        addr_space: RingAddressSpace::Guest,
        event_idx: flags & 2 != 0,
        indirect: flags & 4 != 0,
        base,
    };
    let mut q = PackedDeviceQueue::new(Arc::new(t.clone()), cfg).unwrap();
    if flags & 8 != 0 {
        // ACCESS_PLATFORM: up to 4 IOVA ranges (page, pages, guest page, perm) from the input.
        let rest = &rest[k..];
        let mut tlb = Iotlb::new();
        for e in rest.chunks_exact(4).take(4) {
            let gpa = u64::from(e[2]) * 4096 * 8 % (2 * MEM);
            let uaddr = t
                .regions()
                .iter()
                .find(|r| gpa >= r.desc.guest_addr && gpa < r.desc.guest_addr + r.desc.size)
                .map(|r| r.desc.user_addr + (gpa - r.desc.guest_addr))
                .unwrap();
            let _ = tlb.update(u64::from(e[0]) * 4096, u64::from(e[1] % 16 + 1) * 4096, uaddr, e[3] % 4);
        }
        q.set_iotlb(Some(Arc::new(RwLock::new(tlb))));
    }
    let mut batch = ChainBatch::new();
    for round in 0..3 {
        batch.clear();
        match q.pop_batch(&mut batch, 64) {
            Ok(_) => {}
            Err(VirtqueueError::IotlbMiss { .. }) => assert!(!q.is_broken()),
            Err(_) => assert!(q.is_broken()),
        }
        assert!(usize::from(q.in_flight()) <= usize::from(size));
        for c in batch.chains() {
            assert!(c.head < size);
            for s in batch.segments(c) {
                assert!(s.len > 0);
                assert_eq!(t.translate(s.gpa, u64::from(s.len)).ok(), Some(s.host));
            }
        }
        // Complete in the order the input picks (rotated), out of order included.
        let mut chains = batch.chains().to_vec();
        if !chains.is_empty() {
            let r = usize::from(order.rotate_left(round)) % chains.len();
            chains.rotate_left(r);
            if order & 1 != 0 {
                chains.reverse();
            }
        }
        for c in &chains {
            let _ = q.complete(&batch, c, c.writable_len);
        }
        let _ = q.publish_used();
        let _ = q.enable_notifications();
        let b = q.base();
        assert!(b.avail.index < size && b.used.index < size);
    }
});
