//! Fuzzes the device-side ring walker: the fuzzer fills the descriptor table, the avail ring,
//! one indirect table and the queue setup; popping must either yield chains whose every segment
//! lies in mapped memory, or fail with a `VirtqueueError` — never panic, hang or escape.
#![no_main]

use std::sync::{Arc, OnceLock, RwLock};

use libfuzzer_sys::fuzz_target;
use vhostuser_rs::memory::{GuestMemory, Iotlb};
use vhostuser_rs::virtqueue::{ChainBatch, DeviceQueue, QueueConfig, RingAddressSpace, VirtqueueError};

const MEM: u64 = 1 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const TABLE: u64 = 0x4000;

fn memory() -> &'static Arc<GuestMemory> {
    static MEMORY: OnceLock<Arc<GuestMemory>> = OnceLock::new();
    // Two adjacent regions so buffers can straddle a boundary.
    MEMORY.get_or_init(|| Arc::new(GuestMemory::allocate(&[(0, MEM), (MEM, MEM)]).unwrap()))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mem = memory();
    let t = mem.table();
    let size = 1u16 << (data[0] % 6); // 1..32
    let flags = data[1];
    let next_avail = u16::from_le_bytes([data[2], data[3]]);
    let body = &data[4..];
    // Descriptor table, avail ring and an indirect table from the input (rest zero).
    let desc_len = 16 * usize::from(size);
    let mut desc = vec![0u8; desc_len];
    let n = body.len().min(desc_len);
    desc[..n].copy_from_slice(&body[..n]);
    // Keep addresses mostly small so many buffers translate (bytes 3..8 of each addr cleared
    // when bit 0 of flags is set).
    if flags & 1 != 0 {
        for d in desc.chunks_mut(16) {
            d[3..8].fill(0);
        }
    }
    t.write(DESC, &desc).unwrap();
    let rest = &body[n..];
    let avail_len = 6 + 2 * usize::from(size);
    let mut avail = vec![0u8; avail_len];
    let m = rest.len().min(avail_len);
    avail[..m].copy_from_slice(&rest[..m]);
    t.write(AVAIL, &avail).unwrap();
    let rest = &rest[m..];
    let mut table = vec![0u8; 256];
    let k = rest.len().min(256);
    table[..k].copy_from_slice(&rest[..k]);
    t.write(TABLE, &table).unwrap();
    t.write(USED, &[0u8; 6 + 8 * 32]).unwrap();
    let cfg = QueueConfig {
        size,
        desc_addr: DESC,
        avail_addr: AVAIL,
        used_addr: USED,
        addr_space: RingAddressSpace::Guest,
        event_idx: flags & 2 != 0,
        indirect: flags & 4 != 0,
        next_avail,
    };
    let mut q = DeviceQueue::new(Arc::new(t.clone()), cfg).unwrap();
    if flags & 8 != 0 {
        // ACCESS_PLATFORM: descriptor addresses are IOVAs; the input maps up to 4 IOVA ranges
        // (page, pages, guest page, perm) onto guest memory through front-end addresses.
        let rest = &rest[k..];
        let mut tlb = Iotlb::new();
        for e in rest.chunks_exact(4).take(4) {
            let gpa = u64::from(e[2]) * 4096 * 8 % (2 * MEM);
            let uaddr = t.regions().iter().find(|r| gpa >= r.desc.guest_addr && gpa < r.desc.guest_addr + r.desc.size)
                .map(|r| r.desc.user_addr + (gpa - r.desc.guest_addr))
                .unwrap();
            let _ = tlb.update(u64::from(e[0]) * 4096, u64::from(e[1] % 16 + 1) * 4096, uaddr, e[3] % 4);
        }
        q.set_iotlb(Some(Arc::new(RwLock::new(tlb))));
    }
    let mut batch = ChainBatch::new();
    for _ in 0..3 {
        batch.clear();
        match q.pop_batch(&mut batch, 64) {
            Ok(_) => {}
            Err(VirtqueueError::IotlbMiss { .. }) => assert!(!q.is_broken()),
            Err(_) => assert!(q.is_broken()),
        }
        for c in batch.chains() {
            for s in batch.segments(c) {
                assert!(s.len > 0);
                // Every segment is mapped guest memory, whichever way it was translated.
                assert_eq!(t.translate(s.gpa, u64::from(s.len)).ok(), Some(s.host));
            }
        }
        for c in batch.chains().to_vec() {
            let _ = q.complete(&batch, &c, c.writable_len);
        }
        let _ = q.publish_used();
        let _ = q.enable_notifications();
    }
});
