//! Packed driver against packed device in one process and across threads; the packed
//! counterparts of the malformed rings of protocol.md §7.9 (each a `VirtqueueError`, never a
//! panic or an access outside memory); event suppression, dirty logging, the IOTLB; randomized
//! chains across many wraps and random ring bytes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};

use super::device::PackedDesc;
use super::*;
use crate::memory::{DirtyLog, GuestMemory, Iotlb, MemoryTable, LOG_PAGE_SIZE};
use crate::virtqueue::{
    Buffer, ChainBatch, RingAddressSpace, Segment, VirtqueueError, MAX_SEGMENTS, VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};

const MIB: u64 = 1 << 20;
const OK_BUF: u64 = 0x8000;
const NEXT: u16 = VIRTQ_DESC_F_NEXT;
const WRITE: u16 = VIRTQ_DESC_F_WRITE;
const INDIRECT: u16 = VIRTQ_DESC_F_INDIRECT;

struct Pair {
    mem: Arc<GuestMemory>,
    driver: PackedDriverQueue,
    device: PackedDeviceQueue,
}

fn config(driver: &PackedDriverQueue, event_idx: bool, indirect: bool, base: PackedBase) -> PackedQueueConfig {
    let (desc, driver_event, device_event) = driver.user_addrs();
    PackedQueueConfig {
        size: driver.ring().size,
        desc_addr: desc,
        driver_event_addr: driver_event,
        device_event_addr: device_event,
        addr_space: RingAddressSpace::User,
        event_idx,
        indirect,
        base,
    }
}

fn pair_with(size: u16, event_idx: bool, indirect: bool, layout: &[(u64, u64)]) -> Pair {
    let mem = Arc::new(GuestMemory::allocate(layout).unwrap());
    let driver = PackedDriverQueue::allocate(mem.clone(), size, event_idx, if indirect { 16 } else { 0 }).unwrap();
    let cfg = config(&driver, event_idx, indirect, PackedBase::START);
    let device = PackedDeviceQueue::new(Arc::new(mem.table().clone()), cfg).unwrap();
    Pair { mem, driver, device }
}

fn pair(size: u16) -> Pair {
    pair_with(size, false, true, &[(0, 4 * MIB)])
}

fn read_segments(segs: &[Segment]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in segs {
        let mut buf = vec![0u8; s.len as usize];
        // SAFETY: segment inside a live mapping.
        unsafe { std::ptr::copy_nonoverlapping(s.host, buf.as_mut_ptr(), buf.len()) };
        out.extend(buf);
    }
    out
}

fn fill_segments(segs: &[Segment], byte: u8) -> u32 {
    let mut n = 0;
    for s in segs {
        // SAFETY: segment inside a live mapping.
        unsafe { std::ptr::write_bytes(s.host, byte, s.len as usize) };
        n += s.len;
    }
    n
}

fn complete_all(q: &mut PackedDeviceQueue, b: &ChainBatch) -> Result<(), VirtqueueError> {
    b.chains().iter().try_for_each(|c| q.complete(b, c, 0))
}

#[test]
fn block_requests_round_trip_direct_and_indirect() {
    let mut p = pair(8);
    let mut batch = ChainBatch::new();
    let mut used = Vec::new();
    for indirect in [false, true, false] {
        let hdr = p.mem.alloc(16, 16).unwrap();
        let data = p.mem.alloc(4096, 4096).unwrap();
        let status = p.mem.alloc(1, 1).unwrap();
        p.mem.table().write(hdr, &[7u8; 16]).unwrap();
        let id = if indirect {
            p.driver.add_indirect(&[(hdr, 16)], &[(data, 4096), (status, 1)]).unwrap()
        } else {
            p.driver.add(&[(hdr, 16)], &[(data, 4096), (status, 1)]).unwrap()
        };
        assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 0, "not published yet");
        p.driver.publish();
        assert!(p.driver.kick_needed().unwrap());
        batch.clear();
        assert_eq!(p.device.pop_batch(&mut batch, 32).unwrap(), 1);
        let chain = batch.chains()[0];
        assert_eq!(chain.head, id);
        assert_eq!((chain.readable_len, chain.writable_len), (16, 4097));
        assert_eq!(read_segments(batch.readable(&chain)), vec![7u8; 16]);
        let written = fill_segments(batch.writable(&chain), 0xab);
        p.device.complete(&batch, &chain, written).unwrap();
        assert!(p.device.publish_used().unwrap(), "driver did not suppress interrupts");
        used.clear();
        assert_eq!(p.driver.reap(&mut used, 32).unwrap(), 1);
        assert_eq!(used[0], (id, 4097));
        let mut back = vec![0u8; 4096];
        p.mem.table().read(data, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0xab));
        assert_eq!(p.driver.num_free(), 8);
        assert_eq!(p.device.in_flight(), 0);
    }
    // 3 + 1 + 3 slots used: both sides agree where they are.
    assert_eq!(p.device.base().avail, RingPos { index: 7, wrap: true });
    assert_eq!(p.device.base().used, p.device.base().avail);
    assert_eq!(p.driver.next_avail(), p.driver.last_used());
}

#[test]
fn lists_wrap_the_ring_many_times_in_order_and_out_of_order() {
    // 13: any size is valid for packed rings, and an odd one puts lists across the ring's end.
    for reverse in [false, true] {
        let mut p = pair(13);
        let bufs: Vec<u64> = (0..16).map(|_| p.mem.alloc(64, 8).unwrap()).collect();
        let mut batch = ChainBatch::new();
        let mut used = Vec::new();
        for round in 0..500u32 {
            let mut expected = HashMap::new();
            // Lists of 1..=3 descriptors while there is room.
            let mut k = 0usize;
            loop {
                let n = (round as usize + k) % 3 + 1;
                if usize::from(p.driver.num_free()) < n {
                    break;
                }
                let w: Vec<Buffer> = bufs[k..k + n].iter().map(|&b| (b, 64)).collect();
                let id = p.driver.add(&[], &w).unwrap();
                expected.insert(id, w.clone());
                k += 1;
            }
            p.driver.publish();
            batch.clear();
            assert_eq!(p.device.pop_batch(&mut batch, 64).unwrap(), expected.len());
            let mut chains = batch.chains().to_vec();
            if reverse {
                chains.reverse();
            }
            for c in &chains {
                let got: Vec<Buffer> = batch.writable(c).iter().map(|s| (s.gpa, s.len)).collect();
                assert_eq!(Some(&got), expected.get(&c.head));
                p.device.complete(&batch, c, c.head.into()).unwrap();
            }
            p.device.publish_used().unwrap();
            used.clear();
            assert_eq!(p.driver.reap(&mut used, 64).unwrap(), expected.len());
            let order: Vec<u16> = used.iter().map(|u| u.0).collect();
            assert_eq!(order, chains.iter().map(|c| c.head).collect::<Vec<_>>(), "used in completion order");
            for (id, len) in &used {
                assert_eq!(u32::from(*id), *len);
            }
            assert_eq!(p.driver.num_free(), 13);
        }
        assert_eq!(p.device.base().avail, p.driver.next_avail());
        assert_eq!(p.device.base().used, p.driver.last_used());
    }
}

#[test]
fn completions_interleave_with_new_lists() {
    // Out-of-order completion while the driver keeps adding: used descriptors land in the slots
    // of lists already consumed, never on one the device has not read.
    let mut p = pair(8);
    let buf = p.mem.alloc(64, 8).unwrap();
    let mut batch = ChainBatch::new();
    let mut used = Vec::new();
    let mut held: VecDeque<u16> = VecDeque::new();
    for round in 0..400u32 {
        while p.driver.num_free() >= 2 {
            let n = if round % 2 == 0 { 1 } else { 2 };
            p.driver.add(&[(buf, 8); 2][..n], &[]).unwrap();
        }
        p.driver.publish();
        batch.clear();
        p.device.pop_batch(&mut batch, 8).unwrap();
        held.extend(batch.chains().iter().map(|c| c.head));
        // Complete every other held id, newest first.
        let keep = held.len() / 2;
        while held.len() > keep {
            let id = if round % 3 == 0 { held.pop_back() } else { held.pop_front() }.unwrap();
            p.device.add_used(id, 0).unwrap();
        }
        p.device.publish_used().unwrap();
        used.clear();
        p.driver.reap(&mut used, 8).unwrap();
        assert_eq!(p.driver.in_flight(), p.device.in_flight());
    }
}

#[test]
fn event_suppression_both_directions() {
    for event_idx in [false, true] {
        let mut p = pair_with(8, event_idx, false, &[(0, MIB)]);
        let buf = p.mem.alloc(64, 8).unwrap();
        let mut batch = ChainBatch::new();
        let mut used = vec![];
        // Fresh ring: device event structure zeroed = ENABLE.
        p.driver.add(&[(buf, 64)], &[]).unwrap();
        p.driver.publish();
        assert!(p.driver.kick_needed().unwrap());
        assert!(!p.driver.kick_needed().unwrap(), "nothing new");
        // The device polls: DISABLE, no kick.
        p.device.disable_notifications().unwrap();
        p.driver.add(&[(buf, 64)], &[]).unwrap();
        p.driver.publish();
        assert!(!p.driver.kick_needed().unwrap());
        // Re-arming sees the pending lists instead of sleeping on them.
        assert!(p.device.enable_notifications().unwrap());
        let notify = p.device.drain(&mut batch, 32, complete_all).unwrap();
        assert!(notify, "first signal after start is always sent");
        p.driver.reap(&mut used, 8).unwrap();
        // Re-armed (ENABLE, or DESC at the next available slot): the next list needs a kick.
        p.driver.add(&[(buf, 64)], &[]).unwrap();
        p.driver.publish();
        assert!(p.driver.kick_needed().unwrap());
        if event_idx {
            // DESC at slot 2: a second list at slot 3 does not need another kick.
            p.driver.add(&[(buf, 64)], &[]).unwrap();
            p.driver.publish();
            assert!(!p.driver.kick_needed().unwrap());
        }
        // The driver does not want interrupts.
        p.driver.set_interrupts(false);
        assert!(!p.device.drain(&mut batch, 32, complete_all).unwrap());
        used.clear();
        p.driver.reap(&mut used, 8).unwrap();
        p.driver.set_interrupts(true);
        p.driver.add(&[(buf, 64)], &[]).unwrap();
        p.driver.publish();
        assert!(p.device.drain(&mut batch, 32, complete_all).unwrap());
        if event_idx {
            // The driver asked for the used slot after the one it reaped last; a completion
            // further on (the driver did not reap in between) is not signalled again.
            p.driver.add(&[(buf, 64)], &[]).unwrap();
            p.driver.publish();
            assert!(!p.device.drain(&mut batch, 32, complete_all).unwrap());
            used.clear();
            assert_eq!(p.driver.reap(&mut used, 8).unwrap(), 2);
            p.driver.add(&[(buf, 64)], &[]).unwrap();
            p.driver.publish();
            assert!(p.device.drain(&mut batch, 32, complete_all).unwrap());
        }
    }
}

#[test]
fn buffers_straddling_adjacent_regions_are_split() {
    let mut p = pair_with(8, false, true, &[(0, MIB), (MIB, MIB), (2 * MIB, MIB)]);
    let addr = MIB - 100;
    p.mem.table().write(addr, &[5u8; 300]).unwrap();
    p.driver.add(&[(addr, 300)], &[]).unwrap();
    // An indirect table straddling a region boundary.
    let table_at = 2 * MIB - 16;
    let mut table = [0u8; 32];
    table[..16].copy_from_slice(&PackedDesc { addr: 0x1000, len: 8, id: 0, flags: 0 }.to_bytes());
    table[16..].copy_from_slice(&PackedDesc { addr: 0x2000, len: 8, id: 0, flags: WRITE }.to_bytes());
    p.mem.table().write(table_at, &table).unwrap();
    p.driver.publish();
    raw_list(&mut p, 1, true, &[PackedDesc { addr: table_at, len: 32, id: 5, flags: INDIRECT }]);
    let mut batch = ChainBatch::new();
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 2);
    let c = batch.chains()[0];
    assert_eq!(batch.readable(&c).len(), 2, "split at the region boundary");
    assert_eq!(read_segments(batch.readable(&c)), vec![5u8; 300]);
    let c2 = batch.chains()[1];
    assert_eq!(c2.head, 5);
    assert_eq!((c2.readable_len, c2.writable_len), (8, 8));
}

#[test]
fn iotlb_translates_and_a_miss_consumes_nothing() {
    let mut p = pair(8);
    let buf = 0x20000u64;
    p.mem.table().write(buf, &[9u8; 64]).unwrap();
    let uaddr = |gpa: u64| {
        let r = &p.mem.table().regions()[0];
        r.desc.user_addr + (gpa - r.desc.guest_addr)
    };
    let tlb = Arc::new(RwLock::new(Iotlb::new()));
    p.device.set_iotlb(Some(tlb.clone()));
    // IOVA 0x100000 not mapped yet.
    p.driver.add(&[(0x10_0000, 64)], &[]).unwrap();
    p.driver.publish();
    let mut batch = ChainBatch::new();
    assert!(matches!(p.device.pop_batch(&mut batch, 8), Err(VirtqueueError::IotlbMiss { iova: 0x10_0000, .. })));
    assert!(!p.device.is_broken() && batch.is_empty() && p.device.in_flight() == 0);
    tlb.write().unwrap().update(0x10_0000, 4096, uaddr(buf), crate::memory::IOTLB_READ).unwrap();
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 1);
    let c = batch.chains()[0];
    assert_eq!(read_segments(batch.readable(&c)), vec![9u8; 64]);
    assert_eq!(batch.readable(&c)[0].gpa, buf);
}

#[test]
fn dirty_log_marks_buffers_used_descriptors_and_the_device_event_area() {
    let mut p = pair(8);
    let log = DirtyLog::allocate(4 * MIB).unwrap();
    let ring = p.driver.ring();
    p.device.set_dirty_log(Some(log.clone()), Some((log.clone(), ring.device_event)));
    let buf = 0x30000;
    p.driver.add(&[], &[(buf, 3 * LOG_PAGE_SIZE as u32)]).unwrap();
    p.driver.publish();
    let mut batch = ChainBatch::new();
    p.device.pop_batch(&mut batch, 8).unwrap();
    let c = batch.chains()[0];
    p.device.complete_prefix(&batch, &c, LOG_PAGE_SIZE as u32 + 1).unwrap();
    p.device.publish_used().unwrap();
    let dirty = log.take_dirty();
    assert!(dirty.contains(&0x30) && dirty.contains(&0x31) && !dirty.contains(&0x32), "{dirty:x?}");
    assert!(dirty.contains(&(ring.desc / LOG_PAGE_SIZE)), "used descriptor logged where it was written");
    p.device.disable_notifications().unwrap();
    assert!(log.take_dirty().contains(&(ring.device_event / LOG_PAGE_SIZE)), "device event area logged");
    // `complete` logs the writable buffers whole.
    p.driver.reap(&mut Vec::new(), 8).unwrap();
    p.driver.add(&[], &[(buf, LOG_PAGE_SIZE as u32), (0x50000, 1)]).unwrap();
    p.driver.publish();
    batch.clear();
    p.device.pop_batch(&mut batch, 8).unwrap();
    let c = batch.chains()[0];
    p.device.complete(&batch, &c, 1).unwrap();
    let dirty = log.take_dirty();
    assert!(dirty.contains(&0x30) && dirty.contains(&0x50) && !dirty.contains(&0x31), "{dirty:x?}");
    // A log too small for the write is an error, not an overflow.
    let small = DirtyLog::from_fd(crate::memory::memfd("log", 4096).unwrap(), 1, 0).unwrap();
    p.device.set_dirty_log(Some(small), None);
    p.device.publish_used().unwrap();
    p.driver.reap(&mut Vec::new(), 8).unwrap();
    p.driver.add(&[], &[(buf, 8)]).unwrap();
    p.driver.publish();
    batch.clear();
    p.device.pop_batch(&mut batch, 8).unwrap();
    let c = batch.chains()[0];
    assert!(matches!(p.device.complete(&batch, &c, 8), Err(VirtqueueError::Memory(_))));
}

#[test]
fn stop_and_restart_from_the_packed_base() {
    let mut p = pair(8);
    let buf = p.mem.alloc(64, 8).unwrap();
    let mut batch = ChainBatch::new();
    let mut used = vec![];
    for _ in 0..3 {
        // 3 lists of 3 slots: the ring wraps once.
        p.driver.add(&[(buf, 8), (buf, 8), (buf, 8)], &[]).unwrap();
        p.driver.publish();
        p.device.drain(&mut batch, 32, complete_all).unwrap();
        p.driver.reap(&mut used, 8).unwrap();
    }
    let base = p.device.base();
    assert_eq!(base.avail, RingPos { index: 1, wrap: false });
    assert_eq!(base.used, base.avail);
    // GET_VRING_BASE → SET_VRING_BASE through the wire encoding.
    let num = base.encode();
    assert_eq!(num, 1 | (1 << 16));
    let cfg = config(&p.driver, false, true, PackedBase::decode(num));
    let mut device = PackedDeviceQueue::new(Arc::new(p.mem.table().clone()), cfg).unwrap();
    let id = p.driver.add(&[(buf, 8)], &[]).unwrap();
    p.driver.publish();
    batch.clear();
    assert_eq!(device.pop_batch(&mut batch, 8).unwrap(), 1);
    assert_eq!(batch.chains()[0].head, id);
    device.complete(&batch, &batch.chains()[0], 0).unwrap();
    device.publish_used().unwrap();
    used.clear();
    assert_eq!(p.driver.reap(&mut used, 8).unwrap(), 1);
    // A driver restarted from a base resumes there too.
    let pos = device.base().avail;
    p.driver.reset_to(pos).unwrap();
    assert_eq!((p.driver.next_avail(), p.driver.last_used()), (pos, pos));
    assert!(matches!(
        p.driver.reset_to(RingPos { index: 8, wrap: true }),
        Err(VirtqueueError::PositionOutOfRange { .. })
    ));
}

#[test]
fn driver_and_device_on_two_threads() {
    let p = pair_with(255, true, false, &[(0, 16 * MIB)]);
    let Pair { mem, mut driver, mut device } = p;
    const CHAINS: u32 = 100_000;
    let bufs: Vec<u64> = (0..256).map(|_| mem.alloc(64, 64).unwrap()).collect();
    let dev = std::thread::spawn(move || {
        let mut batch = ChainBatch::new();
        let mut done = 0u32;
        while done < CHAINS {
            batch.clear();
            let n = device.pop_batch(&mut batch, 32).unwrap();
            // Complete newest first: out of order on purpose.
            for c in batch.chains().iter().rev() {
                let seg = batch.readable(c)[0];
                let mut v = [0u8; 4];
                // SAFETY: the segment is inside a live mapping.
                unsafe { std::ptr::copy_nonoverlapping(seg.host, v.as_mut_ptr(), 4) };
                let out = (u32::from_le_bytes(v) + 1).to_le_bytes();
                let w = batch.writable(c)[0];
                // SAFETY: as above.
                unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), w.host, 4) };
                device.complete(&batch, c, 4).unwrap();
            }
            device.publish_used().unwrap();
            done += n as u32;
            if n == 0 {
                std::hint::spin_loop();
            }
        }
    });
    let (mut sent, mut got) = (0u32, 0u32);
    let mut used = Vec::new();
    let mut seq = HashMap::new();
    while got < CHAINS {
        while sent < CHAINS && driver.num_free() >= 2 {
            let buf = bufs[(sent % 256) as usize];
            mem.table().write(buf, &sent.to_le_bytes()).unwrap();
            let id = driver.add(&[(buf, 4)], &[(buf + 32, 4)]).unwrap();
            assert!(seq.insert(id, (buf, sent)).is_none());
            sent += 1;
            if sent % 32 == 0 {
                break;
            }
        }
        driver.publish();
        used.clear();
        got += driver.reap(&mut used, 64).unwrap() as u32;
        for (id, len) in &used {
            assert_eq!(*len, 4);
            let (buf, n) = seq.remove(id).unwrap();
            let mut v = [0u8; 4];
            mem.table().read(buf + 32, &mut v).unwrap();
            assert_eq!(u32::from_le_bytes(v), n + 1);
        }
    }
    dev.join().unwrap();
}

// ---- Malformed rings (protocol.md §7.9, packed counterparts) ----------------------------------

/// Writes `descs` as one list from `slot` (wrap counter `wrap` at `slot`, toggled past the end),
/// flags of the first last, bypassing the driver's checks. `flags` carry NEXT/WRITE/INDIRECT;
/// the AVAIL/USED bits are added.
fn raw_list(p: &mut Pair, slot: u16, wrap: bool, descs: &[PackedDesc]) {
    let size = p.driver.ring().size;
    let mut pos = RingPos { index: slot, wrap };
    let mut first = None;
    for d in descs {
        let mut d = *d;
        d.flags = PackedDesc::avail_flags(d.flags, pos.wrap);
        let at = p.driver.ring().desc + 16 * u64::from(pos.index);
        if first.is_none() {
            let mut held = d;
            held.flags = 0;
            p.mem.table().write(at, &held.to_bytes()).unwrap();
            first = Some((at, d.flags));
        } else {
            p.mem.table().write(at, &d.to_bytes()).unwrap();
        }
        pos = pos.advance(1, size);
    }
    if let Some((at, flags)) = first {
        p.mem.table().write(at + 14, &flags.to_le_bytes()).unwrap();
    }
}

fn raw_flags(p: &Pair, slot: u16, flags: u16) {
    p.mem.table().write(p.driver.ring().desc + 16 * u64::from(slot) + 14, &flags.to_le_bytes()).unwrap();
}

fn d(addr: u64, len: u32, id: u16, flags: u16) -> PackedDesc {
    PackedDesc { addr, len, id, flags }
}

fn table_with(p: &mut Pair, entries: &[PackedDesc]) -> u64 {
    let table = p.mem.alloc(16 * entries.len() as u64, 16).unwrap();
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_bytes()).collect();
    p.mem.table().write(table, &bytes).unwrap();
    table
}

fn expect_broken(p: &mut Pair, check: impl Fn(&VirtqueueError) -> bool) {
    let mut batch = ChainBatch::new();
    let err = p.device.pop_batch(&mut batch, 8).unwrap_err();
    assert!(check(&err), "unexpected error: {err}");
    assert!(p.device.is_broken());
    assert!(matches!(p.device.pop_batch(&mut batch, 8), Err(VirtqueueError::Broken)));
    assert!(batch.is_empty());
}

#[test]
fn hostile_id_out_of_range() {
    let mut p = pair(8);
    raw_list(&mut p, 0, true, &[d(OK_BUF, 8, 8, 0)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::HeadOutOfRange { head: 8, size: 8 }));
    let mut p = pair(8);
    raw_list(&mut p, 0, true, &[d(OK_BUF, 8, 0xffff, 0)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::HeadOutOfRange { head: 0xffff, .. }));
}

#[test]
fn hostile_id_already_in_flight_and_completions_not_in_flight() {
    let mut p = pair(8);
    let mut batch = ChainBatch::new();
    raw_list(&mut p, 0, true, &[d(OK_BUF, 8, 3, 0)]);
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 1);
    // CVE-2016-5403 class: the same id again while in flight.
    raw_list(&mut p, 1, true, &[d(OK_BUF, 8, 3, 0)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::HeadInFlight { head: 3, .. }));
    // The device side refuses to complete what it did not pop, and to complete twice.
    let mut p = pair(4);
    assert!(matches!(p.device.add_used(1, 0), Err(VirtqueueError::HeadInFlight { head: 1, .. })));
    assert!(matches!(p.device.add_used(9, 0), Err(VirtqueueError::HeadOutOfRange { head: 9, .. })));
    p.driver.add(&[(OK_BUF, 8)], &[]).unwrap();
    p.driver.publish();
    batch.clear();
    p.device.pop_batch(&mut batch, 8).unwrap();
    let c = batch.chains()[0];
    p.device.complete(&batch, &c, 0).unwrap();
    assert!(matches!(p.device.complete(&batch, &c, 0), Err(VirtqueueError::HeadInFlight { .. })));
}

#[test]
fn hostile_list_that_never_ends() {
    // Every slot of the ring says NEXT: bounded by the ring size, not by memory.
    let mut p = pair(8);
    raw_list(&mut p, 0, true, &[d(OK_BUF, 8, 0, NEXT); 8]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::ChainTooLong { head: 0, limit: 8 }));
    // Starting mid-ring: the list runs past the end into slots of the old lap (wrap mismatch).
    let mut p = pair(8);
    raw_list(&mut p, 0, true, &[d(OK_BUF, 8, 0, 0)]);
    let mut batch = ChainBatch::new();
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 1);
    raw_list(&mut p, 1, true, &[d(OK_BUF, 8, 1, NEXT); 7]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::NotAvailable { head: 1, slot: 0, wrap: false, .. }));
}

#[test]
fn hostile_indirect_rules() {
    // An indirect table inside an indirect table.
    let mut p = pair(8);
    let t = table_with(&mut p, &[d(OK_BUF, 16, 0, INDIRECT)]);
    raw_list(&mut p, 0, true, &[d(t, 16, 0, INDIRECT)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::NestedIndirect { .. }));
    // INDIRECT with NEXT.
    let mut p = pair(8);
    let t = table_with(&mut p, &[d(OK_BUF, 8, 0, 0)]);
    raw_list(&mut p, 0, true, &[d(t, 16, 0, INDIRECT | NEXT), d(OK_BUF, 8, 0, 0)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::IndirectWithNext { .. }));
    // INDIRECT after a NEXT-linked direct descriptor (virtio 1.2 §2.8.7 forbids mixing).
    let mut p = pair(8);
    let t = table_with(&mut p, &[d(OK_BUF, 8, 0, 0)]);
    raw_list(&mut p, 0, true, &[d(OK_BUF, 8, 0, NEXT), d(t, 16, 0, INDIRECT)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::IndirectInList { head: 0 }));
    // INDIRECT without VIRTIO_F_INDIRECT_DESC.
    let mut p = pair_with(8, false, false, &[(0, MIB)]);
    let t = table_with(&mut p, &[d(OK_BUF, 8, 0, 0)]);
    raw_list(&mut p, 0, true, &[d(t, 16, 0, INDIRECT)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::IndirectNotNegotiated { .. }));
    // Table length zero, not a multiple of 16, above the ring size.
    for len in [0u32, 24, 16 * 9] {
        let mut p = pair(8);
        let t = table_with(&mut p, &[d(OK_BUF, 8, 0, 0)]);
        raw_list(&mut p, 0, true, &[d(t, len, 0, INDIRECT)]);
        expect_broken(&mut p, |e| matches!(e, VirtqueueError::IndirectTableSize { .. }));
    }
    // A table outside memory.
    let mut p = pair(8);
    raw_list(&mut p, 0, true, &[d(64 * MIB, 16, 0, INDIRECT)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::BufferUnmapped { .. }));
    // Inside a table NEXT and ids are ignored (§2.8.7): entries are taken in a row.
    let mut p = pair(8);
    let t = table_with(&mut p, &[d(OK_BUF, 8, 77, NEXT), d(OK_BUF, 4, 99, WRITE | NEXT)]);
    raw_list(&mut p, 0, true, &[d(t, 32, 2, INDIRECT)]);
    let mut batch = ChainBatch::new();
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 1);
    let c = batch.chains()[0];
    assert_eq!((c.head, c.readable_len, c.writable_len), (2, 8, 4));
}

#[test]
fn hostile_wrap_counter_confusion() {
    // A later descriptor of the list carries the wrong wrap counter.
    let mut p = pair(8);
    raw_list(&mut p, 0, true, &[d(OK_BUF, 8, 0, NEXT), d(OK_BUF, 8, 0, 0)]);
    raw_flags(&p, 1, PackedDesc::avail_flags(0, false));
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::NotAvailable { head: 0, slot: 1, .. }));
    // A later descriptor marked used (AVAIL == USED).
    let mut p = pair(8);
    raw_list(&mut p, 0, true, &[d(OK_BUF, 8, 0, NEXT), d(OK_BUF, 8, 0, 0)]);
    raw_flags(&p, 1, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::NotAvailable { slot: 1, .. }));
    // A device told the wrong wrap counter (SET_VRING_BASE 0 instead of 0x8000) sees nothing,
    // and touches nothing.
    let mut p = pair(8);
    let cfg = config(&p.driver, false, true, PackedBase::decode(0));
    let mut confused = PackedDeviceQueue::new(Arc::new(p.mem.table().clone()), cfg).unwrap();
    p.driver.add(&[(OK_BUF, 8)], &[]).unwrap();
    p.driver.publish();
    let mut batch = ChainBatch::new();
    assert_eq!(confused.pop_batch(&mut batch, 8).unwrap(), 0);
    assert!(!confused.avail_pending());
    // A driver-side view of flags the device never wrote as used: nothing reaped.
    assert_eq!(p.driver.reap(&mut Vec::new(), 8).unwrap(), 0);
}

#[test]
fn hostile_driver_flips_bits_of_descriptors_the_device_owns() {
    let mut p = pair(4);
    let mut batch = ChainBatch::new();
    // Two lists of two slots fill the ring; the device owns all four slots.
    raw_list(&mut p, 0, true, &[d(OK_BUF, 64, 0, NEXT), d(OK_BUF + 64, 64, 0, 0)]);
    raw_list(&mut p, 2, true, &[d(OK_BUF, 8, 1, NEXT), d(OK_BUF, 8, 1, 0)]);
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 2);
    // The driver rewrites what the device consumed: new address, length, and the flags toggled
    // to every combination. The device read each descriptor once (§7.9 #16) and only looks at
    // its next slot: nothing changes and nothing is popped twice.
    for (slot, flags) in [(0u16, 0u16), (1, 0x8080), (2, 0x0080), (3, 0x8000)] {
        let at = p.driver.ring().desc + 16 * u64::from(slot);
        p.mem.table().write(at, &d(0xdead_0000_0000, 0xffff_ffff, 9, flags).to_bytes()).unwrap();
    }
    let c = batch.chains()[0];
    assert_eq!((batch.readable(&c)[0].gpa, batch.readable(&c)[0].len), (OK_BUF, 64));
    let mut again = ChainBatch::new();
    assert_eq!(p.device.pop_batch(&mut again, 8).unwrap(), 0);
    // Slot 0 made available again in the new lap while the device still owns it: five slots
    // would be in flight in a ring of four.
    raw_list(&mut p, 0, false, &[d(OK_BUF, 8, 2, 0)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::TooManyInFlight { size: 4 }));
}

#[test]
fn hostile_lengths_zero_order_and_overflow() {
    let mut p = pair_with(8, false, true, &[(0, 4 * MIB), (1 << 32, 1 << 32)]);
    // Two 3 GiB buffers: each valid, the sum overflows 32 bits (summed in u64).
    let big = 3 << 30;
    raw_list(&mut p, 0, true, &[d(1 << 32, big, 0, NEXT), d(1 << 32, big, 0, 0)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::LengthOverflow { .. }));
    let mut p = pair(8);
    raw_list(&mut p, 0, true, &[d(OK_BUF, 0, 0, 0)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::ZeroLength { .. }));
    let mut p = pair(8);
    raw_list(&mut p, 0, true, &[d(OK_BUF, 8, 0, WRITE | NEXT), d(OK_BUF, 8, 0, 0)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::ReadableAfterWritable { .. }));
    // DPDK's packed TX tables (the header and the entry at the list's slot index flagged
    // WRITE among readable entries): a table whose writable entries are not all at its end is
    // read as all readable — never as writable.
    for flags in [[WRITE, NEXT, 0], [WRITE, NEXT, WRITE], [0, WRITE, 0]] {
        let mut p = pair(8);
        let t =
            table_with(&mut p, &[d(OK_BUF, 12, 0, flags[0]), d(OK_BUF, 64, 0, flags[1]), d(OK_BUF, 8, 0, flags[2])]);
        raw_list(&mut p, 0, true, &[d(t, 48, 5, INDIRECT)]);
        let mut batch = ChainBatch::new();
        assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 1);
        let c = batch.chains()[0];
        assert_eq!((c.head, c.readable_len, c.writable_len), (5, 84, 0), "{flags:?}");
    }
    // A well-ordered table keeps its writable part.
    let mut p = pair(8);
    let t = table_with(&mut p, &[d(OK_BUF, 12, 0, 0), d(OK_BUF, 64, 0, WRITE), d(OK_BUF, 8, 0, WRITE)]);
    raw_list(&mut p, 0, true, &[d(t, 48, 5, INDIRECT)]);
    let mut batch = ChainBatch::new();
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 1);
    assert_eq!((batch.chains()[0].readable_len, batch.chains()[0].writable_len), (12, 72));
    // Too many segments through an indirect table.
    let mut p = pair_with(2048, false, true, &[(0, 4 * MIB)]);
    let n = MAX_SEGMENTS + 1;
    let t = table_with(&mut p, &vec![d(OK_BUF, 1, 0, 0); n]);
    raw_list(&mut p, 0, true, &[d(t, 16 * n as u32, 0, INDIRECT)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::TooManySegments { limit: MAX_SEGMENTS, .. }));
}

#[test]
fn hostile_buffers_outside_memory() {
    for (addr, len) in
        [(4 * MIB, 1), (4 * MIB - 8, 16), (u64::MAX - 4, 16), (64 * MIB, 0xffff_ffff), (0x10_0000_0000, 1)]
    {
        let mut p = pair(8);
        raw_list(&mut p, 0, true, &[d(addr, len, 0, 0)]);
        expect_broken(&mut p, |e| matches!(e, VirtqueueError::BufferUnmapped { .. }));
    }
    // CVE-2020-10725 (DPDK's packed path): an unmapped address with length 0.
    let mut p = pair(8);
    raw_list(&mut p, 0, true, &[d(64 * MIB, 0, 0, 0)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::ZeroLength { .. }));
}

#[test]
fn hostile_event_suppression_structures() {
    let write_event = |p: &Pair, at: u64, off_wrap: u16, flags: u16| {
        let mut b = [0u8; 4];
        b[..2].copy_from_slice(&off_wrap.to_le_bytes());
        b[2..].copy_from_slice(&flags.to_le_bytes());
        p.mem.table().write(at, &b).unwrap();
    };
    let mut batch = ChainBatch::new();
    // Driver event: offset beyond the ring, reserved flags, DESC without EVENT_IDX.
    for (event_idx, off_wrap, flags) in
        [(true, 8u16, RING_EVENT_FLAGS_DESC), (true, 0, 3), (false, 1, RING_EVENT_FLAGS_DESC)]
    {
        let mut p = pair_with(8, event_idx, false, &[(0, MIB)]);
        for _ in 0..2 {
            p.driver.add(&[(OK_BUF, 8)], &[]).unwrap();
        }
        p.driver.publish();
        batch.clear();
        p.device.pop_batch(&mut batch, 8).unwrap();
        // The first burst after start always notifies without reading the structure.
        p.device.add_used(batch.chains()[0].head, 0).unwrap();
        assert!(p.device.publish_used().unwrap());
        write_event(&p, p.driver.ring().driver_event, off_wrap, flags);
        p.device.add_used(batch.chains()[1].head, 0).unwrap();
        let err = p.device.publish_used().unwrap_err();
        assert!(
            matches!(err, VirtqueueError::EventOffsetOutOfRange { part: "driver", offset: 8, size: 8 })
                || matches!(err, VirtqueueError::EventFlagsInvalid { part: "driver", .. }),
            "{err}"
        );
        assert!(p.device.is_broken());
        // What was completed is still delivered.
        assert_eq!(p.driver.reap(&mut Vec::new(), 8).unwrap(), 2);
    }
    // Device event, read by the driver's kick decision.
    for (event_idx, off_wrap, flags) in
        [(true, 0x7fff, RING_EVENT_FLAGS_DESC), (true, 0, 3), (false, 0, RING_EVENT_FLAGS_DESC)]
    {
        let mut p = pair_with(8, event_idx, false, &[(0, MIB)]);
        write_event(&p, p.driver.ring().device_event, off_wrap, flags);
        p.driver.add(&[(OK_BUF, 8)], &[]).unwrap();
        p.driver.publish();
        let err = p.driver.kick_needed().unwrap_err();
        assert!(
            matches!(err, VirtqueueError::EventOffsetOutOfRange { part: "device", .. })
                || matches!(err, VirtqueueError::EventFlagsInvalid { part: "device", .. }),
            "{err}"
        );
    }
}

#[test]
fn hostile_device_is_detected_by_the_driver() {
    let mut p = pair(8);
    let buf = p.mem.alloc(64, 8).unwrap();
    let id = p.driver.add(&[], &[(buf, 64)]).unwrap();
    p.driver.publish();
    let mut out = Vec::new();
    let ring = p.driver.ring().desc;
    let write_used = |p: &Pair, slot: u64, id: u16, len: u32, flags: u16| {
        p.mem.table().write(ring + 16 * slot, &d(0, len, id, flags).to_bytes()).unwrap();
    };
    let used_flags = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED | WRITE;
    write_used(&p, 0, 5, 0, used_flags);
    assert!(matches!(p.driver.reap(&mut out, 8), Err(VirtqueueError::UsedIdNotInFlight { id: 5 })));
    write_used(&p, 0, 1000, 0, used_flags);
    assert!(matches!(p.driver.reap(&mut out, 8), Err(VirtqueueError::UsedIdNotInFlight { id: 1000 })));
    write_used(&p, 0, id, 65, used_flags);
    assert!(matches!(p.driver.reap(&mut out, 8), Err(VirtqueueError::UsedLenTooLarge { len: 65, max: 64, .. })));
    // Wrong wrap counter or AVAIL != USED: not used yet.
    write_used(&p, 0, id, 64, WRITE);
    assert_eq!(p.driver.reap(&mut out, 8).unwrap(), 0);
    write_used(&p, 0, id, 64, VIRTQ_DESC_F_USED | WRITE);
    assert_eq!(p.driver.reap(&mut out, 8).unwrap(), 0);
    // Without WRITE the length is ignored (virtio 1.2 §2.8.4).
    write_used(&p, 0, id, 0xffff_ffff, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
    assert_eq!(p.driver.reap(&mut out, 8).unwrap(), 1);
    assert_eq!(out, vec![(id, 0)]);
    // The same id again at the next slot: no longer in flight.
    write_used(&p, 1, id, 1, used_flags);
    assert!(matches!(p.driver.reap(&mut out, 8), Err(VirtqueueError::UsedIdNotInFlight { .. })));
}

#[test]
fn hostile_setup() {
    let mem = Arc::new(GuestMemory::allocate(&[(0, MIB)]).unwrap());
    let table = Arc::new(mem.table().clone());
    let cfg = |size, desc, drv, dev| PackedQueueConfig {
        size,
        desc_addr: desc,
        driver_event_addr: drv,
        device_event_addr: dev,
        addr_space: RingAddressSpace::Guest,
        event_idx: true,
        indirect: false,
        base: PackedBase::START,
    };
    assert!(matches!(
        PackedDeviceQueue::new(table.clone(), cfg(0, 0, 0x1000, 0x2000)),
        Err(VirtqueueError::InvalidSize(0))
    ));
    assert!(PackedDeviceQueue::new(table.clone(), cfg(100, 0, 0x1000, 0x2000)).is_ok(), "any size");
    assert!(PackedDeviceQueue::new(table.clone(), cfg(32768, 0, 0x80000, 0x90000)).is_ok());
    let err = PackedDeviceQueue::new(table.clone(), cfg(8, 8, 0x1000, 0x2000)).unwrap_err();
    assert!(matches!(err, VirtqueueError::Misaligned { part: "desc", .. }));
    let err = PackedDeviceQueue::new(table.clone(), cfg(8, 0, 0x1002, 0x2000)).unwrap_err();
    assert!(matches!(err, VirtqueueError::Misaligned { part: "driver event", .. }));
    let err = PackedDeviceQueue::new(table.clone(), cfg(8, 0, 0x1000, 0x2001)).unwrap_err();
    assert!(matches!(err, VirtqueueError::Misaligned { part: "device event", .. }));
    let err = PackedDeviceQueue::new(table.clone(), cfg(8, MIB - 64, 0x1000, 0x2000)).unwrap_err();
    assert!(matches!(err, VirtqueueError::RingUnmapped { part: "desc", .. }));
    let err = PackedDeviceQueue::new(table.clone(), cfg(8, 0, MIB, 0x2000)).unwrap_err();
    assert!(matches!(err, VirtqueueError::RingUnmapped { part: "driver event", .. }));
    let mut c = cfg(8, 0, 0x1000, 0x2000);
    c.base = PackedBase::decode(8 | (8 << 16));
    assert!(matches!(
        PackedDeviceQueue::new(table.clone(), c),
        Err(VirtqueueError::PositionOutOfRange { part: "avail", .. })
    ));
    c.base = PackedBase::decode(7 | (9 << 16));
    assert!(matches!(
        PackedDeviceQueue::new(table.clone(), c),
        Err(VirtqueueError::PositionOutOfRange { part: "used", .. })
    ));
    let empty = Arc::new(MemoryTable::new());
    let mut c = cfg(8, 0, 0x1000, 0x2000);
    c.addr_space = RingAddressSpace::User;
    assert!(matches!(PackedDeviceQueue::new(empty, c), Err(VirtqueueError::RingUnmapped { .. })));
    assert!(matches!(PackedDriverQueue::allocate(mem.clone(), 0, false, 0), Err(VirtqueueError::InvalidSize(0))));
    assert!(matches!(PackedDriverQueue::allocate(mem, 40000, false, 0), Err(VirtqueueError::InvalidSize(40000))));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Random lists (direct or indirect, 1..6 buffers, random readable/writable split and
        /// lengths), added in bursts and completed in a random order, arrive intact at the
        /// device and come back whole to the driver across many wraps of an odd-sized ring.
        #[test]
        fn random_chains_arrive_intact_across_wraps(
            size in 5u16..40,
            bursts in proptest::collection::vec(
                (proptest::collection::vec((1usize..6, 0usize..6, 1u32..3000, any::<bool>()), 1..8), any::<u64>()),
                1..40),
        ) {
            let mut p = pair_with(size, false, true, &[(0, 16 * MIB)]);
            let pool: Vec<u64> = (0..6).map(|_| p.mem.alloc(3000, 8).unwrap()).collect();
            let mut batch = ChainBatch::new();
            let mut used = vec![];
            for (lists, seed) in bursts {
                let mut want = HashMap::new();
                for (n, split, len, indirect) in lists {
                    let split = split.min(n);
                    let bufs: Vec<Buffer> = pool[..n].iter().map(|&a| (a, len)).collect();
                    let (r, w) = bufs.split_at(split);
                    let added = if indirect { p.driver.add_indirect(r, w) } else { p.driver.add(r, w) };
                    let Ok(id) = added else { break };
                    let segs: Vec<(u64, u32, bool)> = r.iter().map(|b| (b.0, b.1, false)).chain(w.iter().map(|b| (b.0, b.1, true))).collect();
                    want.insert(id, segs);
                }
                p.driver.publish();
                batch.clear();
                prop_assert_eq!(p.device.pop_batch(&mut batch, 64).unwrap(), want.len());
                let mut chains = batch.chains().to_vec();
                // A random completion order from the seed.
                let mut s = seed | 1;
                for i in (1..chains.len()).rev() {
                    s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                    chains.swap(i, (s % (i as u64 + 1)) as usize);
                }
                for c in &chains {
                    let got: Vec<(u64, u32, bool)> = batch.segments(c).iter().map(|s| (s.gpa, s.len, s.writable)).collect();
                    prop_assert_eq!(Some(&got), want.get(&c.head));
                    p.device.complete(&batch, c, c.writable_len).unwrap();
                }
                p.device.publish_used().unwrap();
                used.clear();
                prop_assert_eq!(p.driver.reap(&mut used, 64).unwrap(), chains.len());
                let back: Vec<(u16, u32)> = chains.iter().map(|c| (c.head, c.writable_len)).collect();
                prop_assert_eq!(&used, &back);
                prop_assert_eq!(p.driver.num_free(), size);
            }
            prop_assert_eq!(p.device.base().avail, p.driver.next_avail());
            prop_assert_eq!(p.device.base().used, p.driver.last_used());
        }

        /// A device writing random descriptors over the ring (random ids, lengths, flags):
        /// the driver reaps only ids it has in flight, with lengths that fit, never more slots
        /// than it gave, and reports anything else as an error — never a panic.
        #[test]
        fn random_used_descriptors_never_confuse_the_driver(
            size in 2u16..20,
            adds in proptest::collection::vec((1usize..4, any::<bool>()), 1..12),
            garbage in proptest::collection::vec((0u16..24, 0u16..24, 0u32..300, any::<u16>()), 1..24),
        ) {
            let mut p = pair_with(size, false, true, &[(0, MIB)]);
            let buf = p.mem.alloc(4096, 8).unwrap();
            let mut caps = HashMap::new();
            for (n, indirect) in adds {
                let w: Vec<Buffer> = (0..n).map(|i| (buf + 256 * i as u64, 100)).collect();
                let added = if indirect { p.driver.add_indirect(&[], &w) } else { p.driver.add(&[], &w) };
                if let Ok(id) = added {
                    caps.insert(id, 100 * n as u32);
                }
            }
            p.driver.publish();
            for (slot, id, len, flags) in garbage {
                let slot = u64::from(slot % size);
                let at = p.driver.ring().desc + 16 * slot;
                p.mem.table().write(at, &d(0, len, id, flags).to_bytes()).unwrap();
            }
            let mut out = Vec::new();
            for _ in 0..4 {
                let before = out.len();
                let r = p.driver.reap(&mut out, 64);
                for (id, len) in &out[before..] {
                    let cap = caps.remove(id);
                    prop_assert!(cap.is_some(), "id {} reaped but not in flight", id);
                    prop_assert!(*len <= cap.unwrap());
                }
                prop_assert!(p.driver.num_free() <= size);
                prop_assert_eq!(usize::from(p.driver.in_flight()), caps.len());
                if r.is_err() {
                    break;
                }
            }
        }

        /// Random bytes in the descriptor ring, random positions and wrap counters, a random
        /// indirect table: the device pops lists whose every segment is mapped memory, or
        /// reports an error — never a panic, a hang or an access outside the ring.
        #[test]
        fn random_rings_never_escape(
            ring in proptest::collection::vec(any::<u8>(), 16 * 16),
            table in proptest::collection::vec(any::<u8>(), 16 * 4),
            base in any::<u32>(),
            event in any::<[u8; 4]>(),
            event_idx in any::<bool>(),
        ) {
            let p = pair_with(16, event_idx, true, &[(0, 4 * MIB)]);
            let r = p.driver.ring();
            // Small addresses so that some buffers (and the table at 0x1000) are valid.
            let mut ring = ring;
            for (i, e) in ring.chunks_mut(16).enumerate() {
                e[3..8].fill(0);
                if i % 3 == 0 {
                    e[..8].copy_from_slice(&0x1000u64.to_le_bytes());
                }
            }
            p.mem.table().write(r.desc, &ring).unwrap();
            p.mem.table().write(0x1000, &table).unwrap();
            p.mem.table().write(r.driver_event, &event).unwrap();
            let mut b = PackedBase::decode(base);
            b.avail.index %= 16;
            b.used.index %= 16;
            let cfg = config(&p.driver, event_idx, true, b);
            let mut q = PackedDeviceQueue::new(Arc::new(p.mem.table().clone()), cfg).unwrap();
            let mut batch = ChainBatch::new();
            let mut total = 0;
            for _ in 0..4 {
                batch.clear();
                if let Ok(n) = q.pop_batch(&mut batch, 64) {
                    total += n;
                }
                for s in batch.chains().iter().flat_map(|c| batch.segments(c)) {
                    prop_assert!(p.mem.table().translate(s.gpa, u64::from(s.len)).is_ok());
                }
                for c in batch.chains().to_vec() {
                    let _ = q.complete(&batch, &c, c.writable_len);
                }
                let _ = q.publish_used();
                let _ = q.enable_notifications();
            }
            prop_assert!(total <= 16);
        }
    }
}

#[test]
fn kick_decision_after_more_than_a_lap_without_one() {
    // The device asked (DESC) for a kick when slot 2 of the first lap is made available. The
    // driver adds one list and decides (no kick: slot 0 only), then adds nine more across two
    // laps without deciding: the positions alone (1 → 2, same wrap counter) would say "no";
    // the slot was crossed, so the answer is to kick.
    let mut p = pair_with(4, true, false, &[(0, MIB)]);
    let ring = p.driver.ring();
    let mut ev = [0u8; 4];
    ev[..2].copy_from_slice(&(2u16 | 0x8000).to_le_bytes());
    ev[2..].copy_from_slice(&RING_EVENT_FLAGS_DESC.to_le_bytes());
    p.mem.table().write(ring.device_event, &ev).unwrap();
    p.driver.add(&[(OK_BUF, 8)], &[]).unwrap();
    p.driver.publish();
    assert!(!p.driver.kick_needed().unwrap());
    let mut batch = ChainBatch::new();
    let mut used = Vec::new();
    for _ in 0..9 {
        p.driver.add(&[(OK_BUF, 8)], &[]).unwrap();
        p.driver.publish();
        batch.clear();
        p.device.pop_batch(&mut batch, 8).unwrap();
        complete_all(&mut p.device, &batch).unwrap();
        p.device.publish_used().unwrap();
        p.driver.reap(&mut used, 8).unwrap();
    }
    assert_eq!(p.driver.next_avail(), RingPos { index: 2, wrap: true });
    assert!(p.driver.kick_needed().unwrap());
    assert!(!p.driver.kick_needed().unwrap(), "nothing new since");
}

#[test]
fn a_burst_becomes_visible_at_once_with_its_first_flags() {
    // Lists completed out of order are written as they complete; the driver sees none of them
    // until publish_used stores the burst's first flags (the one release store).
    let mut p = pair(8);
    let ids: Vec<u16> = (0..3).map(|_| p.driver.add(&[(OK_BUF, 8)], &[(OK_BUF + 64, 8)]).unwrap()).collect();
    p.driver.publish();
    let mut batch = ChainBatch::new();
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 3);
    for c in batch.chains().iter().rev() {
        p.device.complete(&batch, c, 4).unwrap();
    }
    let mut used = Vec::new();
    assert_eq!(p.driver.reap(&mut used, 8).unwrap(), 0, "first flags held back");
    // Two slots per list: the used descriptors go to slots 0, 2 and 4 (each list's first slot
    // in completion order). Slots 2 and 4 already carry used flags; slot 0 still the driver's
    // available ones.
    let flags_at = |slot: u64| {
        let mut b = [0u8; 2];
        p.mem.table().read(p.driver.ring().desc + 16 * slot + 14, &mut b).unwrap();
        u16::from_le_bytes(b)
    };
    assert_eq!(flags_at(0) & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED), VIRTQ_DESC_F_AVAIL);
    for slot in [2, 4] {
        assert_eq!(flags_at(slot) & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED), VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
    }
    assert!(p.device.publish_used().unwrap());
    assert_eq!(p.driver.reap(&mut used, 8).unwrap(), 3);
    assert_eq!(used, vec![(ids[2], 4), (ids[1], 4), (ids[0], 4)]);
    assert!(!p.device.publish_used().unwrap(), "nothing new");
}

#[test]
fn kept_lists_handed_back_rewind_the_ring() {
    let mut p = pair(5);
    let mut batch = ChainBatch::new();
    let b = p.mem.alloc(256, 64).unwrap();
    // Lists of 1, 2 and 2 slots: the last crosses the ring's end.
    p.driver.add(&[], &[(b, 64)]).unwrap();
    p.driver.publish();
    p.device.pop_batch(&mut batch, 8).unwrap();
    complete_all(&mut p.device, &batch).unwrap();
    p.device.publish_used().unwrap();
    p.driver.reap(&mut Vec::new(), 8).unwrap();
    let i0 = p.driver.add(&[], &[(b, 64)]).unwrap();
    let i1 = p.driver.add(&[], &[(b, 64), (b + 64, 64)]).unwrap();
    let i2 = p.driver.add(&[], &[(b, 64), (b + 64, 64)]).unwrap();
    p.driver.publish();
    batch.clear();
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 3);
    assert_eq!(p.device.base().avail, RingPos { index: 1, wrap: false });
    // Out of pop order, an id not popped, or not the last ones: refused, nothing changes.
    assert!(!p.device.return_chains(&[i2, i1]));
    assert!(!p.device.return_chains(&[i1]));
    assert!(!p.device.return_chains(&[4, i2]));
    assert_eq!((p.device.base().avail, p.device.in_flight()), (RingPos { index: 1, wrap: false }, 3));
    // The first is used; the other two are handed back and popped again, the same lists.
    p.device.add_used(i0, 0).unwrap();
    assert!(p.device.return_chains(&[i1, i2]));
    assert_eq!((p.device.base().avail, p.device.in_flight()), (RingPos { index: 2, wrap: true }, 0));
    batch.clear();
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 2);
    let got: Vec<(u16, u32)> = batch.chains().iter().map(|c| (c.head, c.writable_len)).collect();
    assert_eq!(got, vec![(i1, 128), (i2, 128)]);
    complete_all(&mut p.device, &batch).unwrap();
    p.device.publish_used().unwrap();
    let mut used = Vec::new();
    assert_eq!(p.driver.reap(&mut used, 8).unwrap(), 3);
    assert_eq!(p.driver.num_free(), 5);
}

// ---- Inflight tracking (INFLIGHT_SHMFD, packed layout) ----

use crate::virtqueue::InflightBuffer;

/// A device on the same ring as `p.driver`, as a restarted back-end sets it up: SET_VRING_BASE
/// from a front-end that did not hear from the crashed one (a fresh ring's base), then the
/// inflight region.
fn restarted(p: &Pair, buffer: &InflightBuffer) -> (PackedDeviceQueue, usize) {
    let cfg = config(&p.driver, false, true, PackedBase::START);
    let mut device = PackedDeviceQueue::new(Arc::new(p.mem.table().clone()), cfg).unwrap();
    let n = device.attach_inflight(buffer.packed_queue(0).unwrap()).unwrap();
    (device, n)
}

#[test]
fn inflight_lists_are_resubmitted_after_a_restart() {
    // 5 slots: positions cross the ring's end and the wrap counters matter.
    let mut p = pair(5);
    let buffer = InflightBuffer::allocate_for(1, 5, true).unwrap();
    assert_eq!(buffer.mmap_size(), packed_queue_region_size(5));
    assert_eq!(p.device.attach_inflight(buffer.packed_queue(0).unwrap()).unwrap(), 0);
    let bufs: Vec<u64> = (0..4).map(|_| p.mem.alloc(64, 8).unwrap()).collect();
    let mut batch = ChainBatch::new();
    let mut used = Vec::new();
    // One lap and a bit first, so the lists in flight straddle the ring's end.
    for _ in 0..2 {
        p.driver.add(&[(bufs[0], 8)], &[(bufs[1], 8), (bufs[2], 8)]).unwrap();
        p.driver.publish();
        p.device.drain(&mut batch, 8, complete_all).unwrap();
        used.clear();
        assert_eq!(p.driver.reap(&mut used, 8).unwrap(), 1);
    }
    // In flight: a (2 slots), b (indirect, 1 slot), c (1 slot); only b completes and is
    // published before the "crash".
    p.mem.table().write(bufs[3], b"resubmit").unwrap();
    let a = p.driver.add(&[(bufs[3], 8)], &[(bufs[1], 16)]).unwrap();
    let b = p.driver.add_indirect(&[(bufs[0], 8)], &[(bufs[2], 8)]).unwrap();
    let c = p.driver.add(&[], &[(bufs[2], 4)]).unwrap();
    p.driver.publish();
    batch.clear();
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 3);
    let chain_b = batch.chains()[1];
    p.device.complete(&batch, &chain_b, 8).unwrap();
    p.device.publish_used().unwrap();
    used.clear();
    assert_eq!(p.driver.reap(&mut used, 8).unwrap(), 1);
    assert_eq!(used[0], (b, 8));
    let before = p.device.base();
    // The "crash": the device goes away without completing a and c.
    let (mut device, n) = restarted(&p, &buffer);
    assert_eq!(n, 2);
    // The positions come from the region, not from SET_VRING_BASE.
    assert_eq!(device.base(), before);
    batch.clear();
    assert_eq!(device.pop_batch(&mut batch, 8).unwrap(), 2);
    let heads: Vec<u16> = batch.chains().iter().map(|c| c.head).collect();
    assert_eq!(heads, vec![a, c], "oldest first");
    assert_eq!(read_segments(batch.readable(&batch.chains()[0])), b"resubmit");
    assert_eq!(batch.chains()[0].writable_len, 16);
    for ch in batch.chains().iter().rev() {
        device.complete(&batch, ch, 0).unwrap();
    }
    device.publish_used().unwrap();
    used.clear();
    assert_eq!(p.driver.reap(&mut used, 8).unwrap(), 2);
    assert_eq!(used, vec![(c, 0), (a, 0)]);
    // And the ring goes on with new lists from where the driver is.
    let d = p.driver.add(&[(bufs[0], 8)], &[]).unwrap();
    p.driver.publish();
    batch.clear();
    assert_eq!(device.pop_batch(&mut batch, 8).unwrap(), 1);
    assert_eq!(batch.chains()[0].head, d);
    complete_all(&mut device, &batch).unwrap();
    device.publish_used().unwrap();
    used.clear();
    assert_eq!(p.driver.reap(&mut used, 8).unwrap(), 1);
    assert_eq!((device.in_flight(), p.driver.in_flight()), (0, 0));
    // A clean stop leaves nothing to resubmit.
    assert_eq!(restarted(&p, &buffer).1, 0);
}

#[test]
fn inflight_a_crash_during_a_publish_is_settled_from_the_ring() {
    let size = 4u16;
    let start = RingPos::START;
    let list = |id: u16| vec![d(0x1000 + u64::from(id) * 64, 8, id, avail_bits(true))];
    // (what the slot at the old used position holds, whether the publish was released)
    let avail_w = avail_bits(true); // the driver's descriptor the device consumed: not released
    let used_w = used_bits(true); // the device's used descriptor: released
    let avail_next_lap = avail_bits(false); // released and already reused by the driver
    for (slot_flags, released) in [(avail_w, false), (used_w, true), (avail_next_lap, true)] {
        let buffer = InflightBuffer::allocate_for(1, size, true).unwrap();
        let mut region = buffer.packed_queue(0).unwrap();
        region.recover(start, |_| 0).unwrap();
        for (i, id) in [2u16, 0, 3].into_iter().enumerate() {
            region.fetched(id, i as u64 + 1, &list(id)).unwrap();
        }
        // id 0 then 2 completed; the crash comes after `publishing`, before `published`.
        region.completed(0);
        region.completed(2);
        let after = start.advance(2, size);
        region.publishing(after);
        let r = buffer.packed_queue(0).unwrap().recover(start, |slot| {
            assert_eq!(slot, 0);
            slot_flags
        });
        let r = r.unwrap();
        let ids: Vec<u16> = r.resubmit.iter().map(|l| l.id).collect();
        if released {
            assert_eq!((r.used, ids), (after, vec![3]));
        } else {
            assert_eq!((r.used, ids), (start, vec![2, 0, 3]));
        }
        assert_eq!(r.counter, 4);
        assert_eq!(r.resubmit.last().unwrap().descs, list(3));
        // Settled: recovering again gives the same answer whatever the ring says now.
        let again = buffer.packed_queue(0).unwrap().recover(start, |_| used_bits(false)).unwrap();
        assert_eq!(again, r);
    }
}

#[test]
fn inflight_hostile_regions_are_refused() {
    let size = 8u16;
    let fresh = || {
        let b = InflightBuffer::allocate_for(1, size, true).unwrap();
        let mut r = b.packed_queue(0).unwrap();
        r.recover(RingPos::START, |_| 0).unwrap();
        r.fetched(1, 1, &[d(0x1000, 8, 0, NEXT), d(0x2000, 8, 1, 0)]).unwrap();
        b
    };
    let poke = |b: &InflightBuffer, off: usize, bytes: &[u8]| {
        let fd = b.fd().unwrap();
        let file = std::fs::File::from(fd.try_clone_to_owned().unwrap());
        std::os::unix::fs::FileExt::write_all_at(&file, bytes, off as u64).unwrap();
    };
    let corrupt = |b: &InflightBuffer| {
        matches!(b.packed_queue(0).unwrap().recover(RingPos::START, |_| 0), Err(VirtqueueError::InflightCorrupt(_)))
    };
    let first = 32; // `fetched` takes entries from the top of the free stack: 0, then 1
    let cases: &[(&str, usize, &[u8])] = &[
        ("version", 8, &[9, 0]),
        ("desc_num", 10, &[16, 0]),
        ("used index beyond the ring", 16, &[8, 0]),
        ("old used index beyond the ring", 18, &[200, 0]),
        ("wrap counter 2", 20, &[2]),
        ("inflight flag 3", first, &[3]),
        ("id out of range", first + 16, &[8, 0]),
        ("zero slots", first + 6, &[0, 0]),
        ("more slots than the ring", first + 6, &[9, 0]),
        ("next outside the region", first + 2, &[0xff, 0x7f]),
        ("next back to itself", first + 2, &[0, 0]),
    ];
    for (what, off, bytes) in cases {
        let b = fresh();
        assert!(b.packed_queue(0).unwrap().recover(RingPos::START, |_| 0).is_ok(), "{what}: the base case");
        poke(&b, *off, bytes);
        assert!(corrupt(&b), "{what}");
    }
    // Two lists claiming the same id, or sharing an entry.
    let b = fresh();
    let mut r = b.packed_queue(0).unwrap();
    r.recover(RingPos::START, |_| 0).unwrap();
    r.fetched(2, 2, &[d(0x3000, 8, 2, 0)]).unwrap();
    poke(&b, 32 + 32 * 2 + 16, &[1, 0]);
    assert!(corrupt(&b), "the same id twice");
    let b = fresh();
    let mut r = b.packed_queue(0).unwrap();
    r.recover(RingPos::START, |_| 0).unwrap();
    r.fetched(2, 2, &[d(0x3000, 8, 2, NEXT), d(0x3000, 8, 2, 0)]).unwrap();
    poke(&b, 32 + 32 * 2 + 2, &[1, 0]);
    assert!(corrupt(&b), "two lists sharing an entry");
    // A saved list whose descriptors break the ring rules is refused when it is popped, like
    // one on the ring: it breaks the queue, nothing is read outside memory.
    let p = pair(8);
    let b = InflightBuffer::allocate_for(1, 8, true).unwrap();
    let mut r = b.packed_queue(0).unwrap();
    r.recover(RingPos::START, |_| 0).unwrap();
    r.fetched(3, 1, &[d(u64::MAX - 4, 64, 3, 0)]).unwrap();
    let (mut device, n) = restarted(&p, &b);
    assert_eq!(n, 1);
    let mut batch = ChainBatch::new();
    assert!(device.pop_batch(&mut batch, 8).is_err());
    assert!(device.is_broken());
    // A region for another ring format or size cannot be attached by mistake.
    let split = InflightBuffer::allocate(1, 8).unwrap();
    assert!(split.packed_queue(0).is_none());
    assert!(b.queue(0).is_none());
    assert!(InflightBuffer::allocate_for(1, 0, true).is_err());
    assert_eq!(InflightBuffer::allocate_for(1, 7, true).unwrap().queue_size(), 7);
    let fd = crate::memory::memfd("t", 64).unwrap();
    assert!(InflightBuffer::from_fd_for(fd, 64, 0, 1, 8, true).is_err(), "too small for 8 packed entries");
}
