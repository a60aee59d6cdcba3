//! Driver side against device side in one process and across threads, every malformed case of
//! protocol.md §7.9, dirty logging, and randomized chains.

use std::sync::Arc;

use super::*;
use crate::memory::{DirtyLog, GuestMemory, MemoryTable, LOG_PAGE_SIZE};

const MIB: u64 = 1 << 20;

struct Pair {
    mem: Arc<GuestMemory>,
    driver: DriverQueue,
    device: DeviceQueue,
}

fn pair_with(size: u16, event_idx: bool, indirect: bool, layout: &[(u64, u64)]) -> Pair {
    let mem = Arc::new(GuestMemory::allocate(layout).unwrap());
    let driver = DriverQueue::allocate(mem.clone(), size, event_idx, if indirect { 16 } else { 0 }).unwrap();
    let device = device_for(&mem, &driver, event_idx, indirect);
    Pair { mem, driver, device }
}

fn device_for(mem: &Arc<GuestMemory>, driver: &DriverQueue, event_idx: bool, indirect: bool) -> DeviceQueue {
    let (desc, avail, used) = driver.user_addrs();
    let cfg = QueueConfig {
        size: driver.ring().size,
        desc_addr: desc,
        avail_addr: avail,
        used_addr: used,
        addr_space: RingAddressSpace::User,
        event_idx,
        indirect,
        next_avail: 0,
    };
    DeviceQueue::new(Arc::new(mem.table().clone()), cfg).unwrap()
}

fn pair(size: u16) -> Pair {
    pair_with(size, false, true, &[(0, 4 * MIB)])
}

fn read_segments(batch: &ChainBatch, segs: &[Segment]) -> Vec<u8> {
    let _ = batch;
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

#[test]
fn block_requests_round_trip_direct_and_indirect() {
    let mut p = pair(8);
    let mut batch = ChainBatch::new();
    let mut used = Vec::new();
    for indirect in [false, true] {
        let hdr = p.mem.alloc(16, 16).unwrap();
        let data = p.mem.alloc(4096, 4096).unwrap();
        let status = p.mem.alloc(1, 1).unwrap();
        p.mem.table().write(hdr, &[7u8; 16]).unwrap();
        let head = if indirect {
            p.driver.add_indirect(&[(hdr, 16)], &[(data, 4096), (status, 1)]).unwrap()
        } else {
            p.driver.add(&[(hdr, 16)], &[(data, 4096), (status, 1)]).unwrap()
        };
        p.driver.publish();
        assert!(p.driver.kick_needed());
        batch.clear();
        assert_eq!(p.device.pop_batch(&mut batch, 32).unwrap(), 1);
        let chain = batch.chains()[0];
        assert_eq!(chain.head, head);
        assert_eq!((chain.readable_len, chain.writable_len), (16, 4097));
        assert_eq!(read_segments(&batch, batch.readable(&chain)), vec![7u8; 16]);
        let written = fill_segments(batch.writable(&chain), 0xab);
        p.device.complete(&batch, &chain, written).unwrap();
        assert!(p.device.publish_used().unwrap(), "driver did not suppress interrupts");
        used.clear();
        assert_eq!(p.driver.reap(&mut used, 32).unwrap(), 1);
        assert_eq!(used[0], (head, 4097));
        let mut back = vec![0u8; 4096];
        p.mem.table().read(data, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0xab));
        assert_eq!(p.driver.num_free(), 8);
        assert_eq!(p.device.in_flight(), 0);
    }
}

#[test]
fn batches_wrap_the_ring_many_times() {
    let mut p = pair(16);
    let bufs: Vec<u64> = (0..16).map(|_| p.mem.alloc(64, 8).unwrap()).collect();
    let mut batch = ChainBatch::new();
    let mut used = Vec::new();
    let mut expected = std::collections::VecDeque::new();
    for round in 0..1000u32 {
        let n = (round % 16 + 1) as usize;
        for (i, &buf) in bufs.iter().enumerate().take(n) {
            p.mem.table().write(buf, &round.to_le_bytes()).unwrap();
            expected.push_back(p.driver.add(&[], &[(buf, 64)]).unwrap());
            let _ = i;
        }
        p.driver.publish();
        batch.clear();
        assert_eq!(p.device.pop_batch(&mut batch, 32).unwrap(), n);
        for c in batch.chains().to_vec() {
            p.device.complete(&batch, &c, 8).unwrap();
        }
        p.device.publish_used().unwrap();
        used.clear();
        assert_eq!(p.driver.reap(&mut used, 64).unwrap(), n);
        for (head, len) in &used {
            assert_eq!(Some(*head), expected.pop_front());
            assert_eq!(*len, 8);
        }
    }
    assert_eq!(p.device.next_avail(), p.driver.avail_idx());
}

#[test]
fn event_idx_suppresses_kicks_and_interrupts() {
    let mut p = pair_with(8, true, false, &[(0, MIB)]);
    let buf = p.mem.alloc(64, 8).unwrap();
    let mut batch = ChainBatch::new();
    // Device has not published avail_event yet (0): the first kick is needed.
    p.driver.add(&[(buf, 64)], &[]).unwrap();
    p.driver.publish();
    assert!(p.driver.kick_needed());
    // A second chain before the device re-armed: avail_event still 0, no kick needed.
    p.driver.add(&[(buf, 64)], &[]).unwrap();
    p.driver.publish();
    assert!(!p.driver.kick_needed());
    let notify = p
        .device
        .drain(&mut batch, 32, |q, b| {
            for c in b.chains().to_vec() {
                q.complete(b, &c, 0)?;
            }
            Ok(())
        })
        .unwrap();
    assert!(notify, "first signal after start is always sent");
    // The device re-armed with avail_event = 2: the next chain needs a kick.
    p.driver.add(&[(buf, 64)], &[]).unwrap();
    p.driver.publish();
    assert!(p.driver.kick_needed());
    // The driver does not want interrupts (used_event left behind): no signal.
    let mut used = vec![];
    p.driver.reap(&mut used, 8).unwrap();
    p.driver.set_interrupts(false);
    let notify = p
        .device
        .drain(&mut batch, 32, |q, b| {
            for c in b.chains().to_vec() {
                q.complete(b, &c, 0)?;
            }
            Ok(())
        })
        .unwrap();
    assert!(!notify);
    p.driver.reap(&mut used, 8).unwrap();
    p.driver.set_interrupts(true);
    p.driver.add(&[(buf, 64)], &[]).unwrap();
    p.driver.publish();
    let notify = p
        .device
        .drain(&mut batch, 32, |q, b| {
            for c in b.chains().to_vec() {
                q.complete(b, &c, 0)?;
            }
            Ok(())
        })
        .unwrap();
    assert!(notify);
}

#[test]
fn no_notify_flag_without_event_idx() {
    let mut p = pair_with(8, false, false, &[(0, MIB)]);
    let buf = p.mem.alloc(64, 8).unwrap();
    p.device.disable_notifications().unwrap();
    p.driver.add(&[(buf, 64)], &[]).unwrap();
    p.driver.publish();
    assert!(!p.driver.kick_needed(), "device polls: no kick");
    // Re-arming sees the pending chain instead of sleeping on it.
    assert!(p.device.enable_notifications().unwrap());
    p.driver.set_interrupts(false);
    let mut batch = ChainBatch::new();
    p.device.pop_batch(&mut batch, 8).unwrap();
    let c = batch.chains()[0];
    p.device.complete(&batch, &c, 0).unwrap();
    assert!(!p.device.publish_used().unwrap(), "driver asked for no interrupts");
    assert!(!p.device.publish_used().unwrap(), "nothing new");
}

#[test]
fn buffers_straddling_adjacent_regions_are_split() {
    let mut p = pair_with(8, false, true, &[(0, MIB), (MIB, MIB), (2 * MIB, MIB)]);
    let addr = MIB - 100;
    p.mem.table().write(addr, &[5u8; 300]).unwrap();
    p.driver.add(&[(addr, 300)], &[]).unwrap();
    p.driver.publish();
    // An indirect table straddling the same boundary (QEMU issue 2149).
    let table_at = 2 * MIB - 16;
    let mut table = [0u8; 32];
    // SAFETY: writing descriptor bytes into a local array.
    unsafe {
        Descriptor { addr: 0x1000, len: 8, flags: VIRTQ_DESC_F_NEXT, next: 1 }.write(table.as_mut_ptr());
        Descriptor { addr: 0x2000, len: 8, flags: VIRTQ_DESC_F_WRITE, next: 0 }.write(table.as_mut_ptr().add(16));
    }
    p.mem.table().write(table_at, &table).unwrap();
    let head = raw_add(&mut p, Descriptor { addr: table_at, len: 32, flags: VIRTQ_DESC_F_INDIRECT, next: 0 });
    let mut batch = ChainBatch::new();
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 2);
    let c = batch.chains()[0];
    assert_eq!(batch.readable(&c).len(), 2, "split at the region boundary");
    assert_eq!(read_segments(&batch, batch.readable(&c)), vec![5u8; 300]);
    let c2 = batch.chains()[1];
    assert_eq!(c2.head, head);
    assert_eq!((c2.readable_len, c2.writable_len), (8, 8));
}

/// Writes `d` into a free descriptor slot and publishes it as a one-descriptor chain, bypassing
/// the driver's checks (to build malformed rings). Returns the head.
fn raw_add(p: &mut Pair, d: Descriptor) -> u16 {
    raw_chain(p, &[d])
}

/// Writes descriptors at the end of the table (index N-k..N) and publishes the first as head.
fn raw_chain(p: &mut Pair, descs: &[Descriptor]) -> u16 {
    let ring = p.driver.ring();
    let base = ring.size - descs.len() as u16;
    for (i, d) in descs.iter().enumerate() {
        let mut b = [0u8; 16];
        // SAFETY: local array.
        unsafe { d.write(b.as_mut_ptr()) };
        p.mem.table().write(ring.desc + 16 * u64::from(base + i as u16), &b).unwrap();
    }
    raw_publish(p, base);
    base
}

fn raw_publish(p: &mut Pair, head: u16) {
    let ring = p.driver.ring();
    let idx = {
        let mut b = [0u8; 2];
        p.mem.table().read(ring.avail + 2, &mut b).unwrap();
        u16::from_le_bytes(b)
    };
    let slot = u64::from(idx & (ring.size - 1));
    p.mem.table().write(ring.avail + 4 + 2 * slot, &head.to_le_bytes()).unwrap();
    p.mem.table().write(ring.avail + 2, &idx.wrapping_add(1).to_le_bytes()).unwrap();
}

fn set_avail_idx(p: &mut Pair, idx: u16) {
    let ring = p.driver.ring();
    p.mem.table().write(ring.avail + 2, &idx.to_le_bytes()).unwrap();
}

fn expect_broken(p: &mut Pair, check: impl Fn(&VirtqueueError) -> bool) {
    let mut batch = ChainBatch::new();
    let err = p.device.pop_batch(&mut batch, 8).unwrap_err();
    assert!(check(&err), "unexpected error: {err}");
    assert!(p.device.is_broken());
    assert!(matches!(p.device.pop_batch(&mut batch, 8), Err(VirtqueueError::Broken)));
    assert!(batch.is_empty());
}

const OK_BUF: u64 = 0x8000;

fn d(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
    Descriptor { addr, len, flags, next }
}

#[test]
fn malformed_1_avail_index_jump() {
    let mut p = pair(8);
    set_avail_idx(&mut p, 9);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::AvailIndexJump { avail: 9, size: 8, .. }));
}

#[test]
fn malformed_2_head_out_of_range() {
    let mut p = pair(8);
    raw_publish(&mut p, 8);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::HeadOutOfRange { head: 8, .. }));
}

#[test]
fn malformed_3_next_out_of_range() {
    let mut p = pair(8);
    raw_add(&mut p, d(OK_BUF, 8, VIRTQ_DESC_F_NEXT, 8));
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::NextOutOfRange { next: 8, .. }));
    let mut p = pair(8);
    let table = p.mem.alloc(32, 16).unwrap();
    let mut b = [0u8; 32];
    // SAFETY: local array.
    unsafe { d(OK_BUF, 8, VIRTQ_DESC_F_NEXT, 2).write(b.as_mut_ptr()) };
    p.mem.table().write(table, &b).unwrap();
    raw_add(&mut p, d(table, 32, VIRTQ_DESC_F_INDIRECT, 0));
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::NextOutOfRange { next: 2, limit: 2, .. }));
}

#[test]
fn malformed_4_loops() {
    let mut p = pair(8);
    // 6 -> 7 -> 6 -> ...
    raw_chain(&mut p, &[d(OK_BUF, 8, VIRTQ_DESC_F_NEXT, 7), d(OK_BUF, 8, VIRTQ_DESC_F_NEXT, 6)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::ChainTooLong { limit: 8, .. }));
    let mut p = pair(8);
    let table = p.mem.alloc(16, 16).unwrap();
    let mut b = [0u8; 16];
    // SAFETY: local array.
    unsafe { d(OK_BUF, 8, VIRTQ_DESC_F_NEXT, 0).write(b.as_mut_ptr()) };
    p.mem.table().write(table, &b).unwrap();
    raw_add(&mut p, d(table, 16, VIRTQ_DESC_F_INDIRECT, 0));
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::ChainTooLong { limit: 1, .. }));
}

#[test]
fn malformed_5_length_overflow() {
    let mut p = pair_with(8, false, true, &[(0, 4 * MIB), (1 << 32, 1 << 32)]);
    // Two 3 GiB buffers inside a 4 GiB region: each valid, the sum is not.
    let big = 3 << 30;
    raw_chain(&mut p, &[d(1 << 32, big, VIRTQ_DESC_F_NEXT, 7), d(1 << 32, big, 0, 0)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::LengthOverflow { .. }));
}

#[test]
fn malformed_6_7_8_9_indirect_rules() {
    let table_with = |p: &mut Pair, inner: Descriptor| {
        let table = p.mem.alloc(16, 16).unwrap();
        let mut b = [0u8; 16];
        // SAFETY: local array.
        unsafe { inner.write(b.as_mut_ptr()) };
        p.mem.table().write(table, &b).unwrap();
        table
    };
    let mut p = pair(8);
    let t = table_with(&mut p, d(OK_BUF, 16, VIRTQ_DESC_F_INDIRECT, 0));
    raw_add(&mut p, d(t, 16, VIRTQ_DESC_F_INDIRECT, 0));
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::NestedIndirect { .. }));

    let mut p = pair(8);
    let t = table_with(&mut p, d(OK_BUF, 8, 0, 0));
    raw_add(&mut p, d(t, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 0));
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::IndirectWithNext { .. }));

    let mut p = pair_with(8, false, false, &[(0, MIB)]);
    let t = table_with(&mut p, d(OK_BUF, 8, 0, 0));
    raw_add(&mut p, d(t, 16, VIRTQ_DESC_F_INDIRECT, 0));
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::IndirectNotNegotiated { .. }));

    for len in [0u32, 24, 16 * 9] {
        let mut p = pair(8);
        let t = table_with(&mut p, d(OK_BUF, 8, 0, 0));
        raw_add(&mut p, d(t, len, VIRTQ_DESC_F_INDIRECT, 0));
        expect_broken(&mut p, |e| matches!(e, VirtqueueError::IndirectTableSize { .. }));
    }
    // A table outside mapped memory.
    let mut p = pair(8);
    raw_add(&mut p, d(64 * MIB, 16, VIRTQ_DESC_F_INDIRECT, 0));
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::BufferUnmapped { .. }));
}

#[test]
fn malformed_10_zero_length() {
    let mut p = pair(8);
    raw_add(&mut p, d(OK_BUF, 0, 0, 0));
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::ZeroLength { .. }));
}

#[test]
fn malformed_11_readable_after_writable() {
    let mut p = pair(8);
    raw_chain(&mut p, &[d(OK_BUF, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 7), d(OK_BUF, 8, 0, 0)]);
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::ReadableAfterWritable { .. }));
}

#[test]
fn malformed_12_13_buffers_outside_memory() {
    for (addr, len) in [
        (4 * MIB, 1),            // just past the end
        (4 * MIB - 8, 16),       // straddles the end
        (u64::MAX - 4, 16),      // overflows
        (64 * MIB, 0xffff_ffff), // huge and unmapped (CVE-2016-7422 class)
        (0x10_0000_0000, 1),     // far away
    ] {
        let mut p = pair(8);
        raw_add(&mut p, d(addr, len, 0, 0));
        expect_broken(&mut p, |e| matches!(e, VirtqueueError::BufferUnmapped { .. }));
    }
    // CVE-2020-10725: an unmapped address with length 0 is still rejected (as zero-length).
    let mut p = pair(8);
    raw_add(&mut p, d(64 * MIB, 0, 0, 0));
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::ZeroLength { .. }));
}

#[test]
fn malformed_14_more_in_flight_than_the_ring() {
    let mut p = pair(4);
    let mut batch = ChainBatch::new();
    // The driver re-publishes a head that is still in flight (CVE-2016-5403).
    let head = raw_add(&mut p, d(OK_BUF, 8, 0, 0));
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 1);
    raw_add(&mut p, d(OK_BUF, 8, 0, 0));
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::HeadInFlight { head: h, .. } if *h == head));
    // The device side refuses to complete what it did not pop, and to complete twice.
    let mut p = pair(4);
    assert!(matches!(p.device.add_used(1, 0), Err(VirtqueueError::HeadInFlight { head: 1, .. })));
    assert!(matches!(p.device.add_used(9, 0), Err(VirtqueueError::HeadOutOfRange { head: 9, .. })));
    // Four distinct heads fill the ring; the device pops all four and the count stays bounded.
    let mut batch = ChainBatch::new();
    for _ in 0..4 {
        p.driver.add(&[(OK_BUF, 8)], &[]).unwrap();
    }
    p.driver.publish();
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 4);
    assert_eq!(p.device.in_flight(), 4);
    let c = batch.chains()[0];
    p.device.complete(&batch, &c, 0).unwrap();
    assert!(matches!(p.device.complete(&batch, &c, 0), Err(VirtqueueError::HeadInFlight { .. })));
}

#[test]
fn malformed_15_too_many_segments() {
    let mut p = pair_with(2048, false, true, &[(0, 4 * MIB)]);
    let n = MAX_SEGMENTS as u16 + 1;
    let table = p.mem.alloc(16 * u64::from(n), 16).unwrap();
    let mut bytes = vec![0u8; 16 * usize::from(n)];
    for i in 0..n {
        let flags = if i + 1 < n { VIRTQ_DESC_F_NEXT } else { 0 };
        // SAFETY: inside the local vector.
        unsafe { d(OK_BUF, 1, flags, i + 1).write(bytes.as_mut_ptr().add(16 * usize::from(i))) };
    }
    p.mem.table().write(table, &bytes).unwrap();
    raw_add(&mut p, d(table, 16 * u32::from(n), VIRTQ_DESC_F_INDIRECT, 0));
    expect_broken(&mut p, |e| matches!(e, VirtqueueError::TooManySegments { limit: MAX_SEGMENTS, .. }));
}

#[test]
fn malformed_16_descriptors_are_read_once() {
    // The walk copies each descriptor before validating it, and an indirect table before
    // walking it: after a pop, rewriting the ring cannot change what the device recorded.
    let mut p = pair(8);
    let head = raw_add(&mut p, d(OK_BUF, 64, 0, 0));
    let mut batch = ChainBatch::new();
    p.device.pop_batch(&mut batch, 8).unwrap();
    let ring = p.driver.ring();
    let mut evil = [0u8; 16];
    // SAFETY: local array.
    unsafe { d(0xdead_0000_0000, 0xffff_ffff, 0, 0).write(evil.as_mut_ptr()) };
    p.mem.table().write(ring.desc + 16 * u64::from(head), &evil).unwrap();
    let c = batch.chains()[0];
    assert_eq!(batch.readable(&c)[0].len, 64);
    assert_eq!(batch.readable(&c)[0].gpa, OK_BUF);
}

#[test]
fn malformed_19_to_22_setup() {
    let mem = Arc::new(GuestMemory::allocate(&[(0, MIB)]).unwrap());
    let table = Arc::new(mem.table().clone());
    let cfg = |size, desc, avail, used| QueueConfig {
        size,
        desc_addr: desc,
        avail_addr: avail,
        used_addr: used,
        addr_space: RingAddressSpace::Guest,
        event_idx: true,
        indirect: false,
        next_avail: 0,
    };
    for size in [0u16, 3, 100] {
        assert!(matches!(
            DeviceQueue::new(table.clone(), cfg(size, 0, 0x1000, 0x2000)),
            Err(VirtqueueError::InvalidSize(_))
        ));
    }
    assert!(DeviceQueue::new(table.clone(), cfg(32768, 0, 0x80000, 0x90000)).is_ok());
    let err = DeviceQueue::new(table.clone(), cfg(8, 8, 0x1000, 0x2000)).unwrap_err();
    assert!(matches!(err, VirtqueueError::Misaligned { part: "desc", .. }));
    let err = DeviceQueue::new(table.clone(), cfg(8, 0, 0x1001, 0x2000)).unwrap_err();
    assert!(matches!(err, VirtqueueError::Misaligned { part: "avail", .. }));
    let err = DeviceQueue::new(table.clone(), cfg(8, 0, 0x1000, 0x2002)).unwrap_err();
    assert!(matches!(err, VirtqueueError::Misaligned { part: "used", .. }));
    // The used ring ends 2 bytes past the memory: refused with EVENT_IDX (avail_event needed).
    let end = MIB - used_ring_size(8) + 2;
    let err = DeviceQueue::new(table.clone(), cfg(8, 0, 0x1000, end)).unwrap_err();
    assert!(matches!(err, VirtqueueError::RingUnmapped { part: "used", .. }));
    let err = DeviceQueue::new(table.clone(), cfg(8, 2 * MIB, 0x1000, 0x2000)).unwrap_err();
    assert!(matches!(err, VirtqueueError::RingUnmapped { part: "desc", .. }));
    // A user-address ring against an empty table (memory not sent yet).
    let empty = Arc::new(MemoryTable::new());
    let mut c = cfg(8, 0, 0x1000, 0x2000);
    c.addr_space = RingAddressSpace::User;
    assert!(matches!(DeviceQueue::new(empty, c), Err(VirtqueueError::RingUnmapped { .. })));
}

#[test]
fn dirty_log_marks_buffers_and_used_ring() {
    let mut p = pair(8);
    let log = DirtyLog::allocate(4 * MIB).unwrap();
    let used_gpa = p.driver.ring().used;
    p.device.set_dirty_log(Some(log.clone()), Some((log.clone(), used_gpa)));
    let buf = 0x30000;
    p.driver.add(&[], &[(buf, 3 * LOG_PAGE_SIZE as u32)]).unwrap();
    p.driver.publish();
    let mut batch = ChainBatch::new();
    p.device.pop_batch(&mut batch, 8).unwrap();
    let c = batch.chains()[0];
    // The device wrote exactly 4097 bytes from the start: pages 0x30 and 0x31, not 0x32.
    p.device.complete_prefix(&batch, &c, LOG_PAGE_SIZE as u32 + 1).unwrap();
    p.device.publish_used().unwrap();
    let dirty = log.take_dirty();
    assert!(dirty.contains(&0x30) && dirty.contains(&0x31) && !dirty.contains(&0x32), "{dirty:x?}");
    assert!(dirty.contains(&(used_gpa / LOG_PAGE_SIZE)), "used ring logged");
    // `complete` logs every writable buffer whole, whatever the used length says (a device may
    // write past it: virtio-blk's status byte is the chain's last).
    p.driver.reap(&mut Vec::new(), 8).unwrap();
    p.driver.add(&[], &[(buf, LOG_PAGE_SIZE as u32), (0x50000, 1)]).unwrap();
    p.driver.publish();
    batch.clear();
    p.device.pop_batch(&mut batch, 8).unwrap();
    let c = batch.chains()[0];
    p.device.complete(&batch, &c, 1).unwrap();
    let dirty = log.take_dirty();
    assert!(dirty.contains(&0x30) && dirty.contains(&0x50) && !dirty.contains(&0x31), "{dirty:x?}");
    // CVE-2019-14835 class: a log too small for the write is an error, not an overflow.
    // One byte of log: 8 pages, while the buffer is at page 0x30.
    let small = DirtyLog::from_fd(crate::memory::memfd("log", 4096).unwrap(), 1, 0).unwrap();
    p.device.set_dirty_log(Some(small), None);
    p.driver.add(&[], &[(buf, 8)]).unwrap();
    p.driver.publish();
    batch.clear();
    p.device.pop_batch(&mut batch, 8).unwrap();
    let c = batch.chains()[0];
    assert!(matches!(p.device.complete(&batch, &c, 8), Err(VirtqueueError::Memory(_))));
}

#[test]
fn misbehaving_device_is_detected_by_the_driver() {
    let mut p = pair(8);
    let buf = p.mem.alloc(64, 8).unwrap();
    let head = p.driver.add(&[], &[(buf, 64)]).unwrap();
    p.driver.publish();
    let ring = p.driver.ring();
    let write_used = |p: &Pair, slot: u64, id: u32, len: u32, idx: u16| {
        let mut e = [0u8; 8];
        e[..4].copy_from_slice(&id.to_le_bytes());
        e[4..].copy_from_slice(&len.to_le_bytes());
        p.mem.table().write(ring.used + 4 + 8 * slot, &e).unwrap();
        p.mem.table().write(ring.used + 2, &idx.to_le_bytes()).unwrap();
    };
    let mut out = vec![];
    write_used(&p, 0, 5, 0, 1);
    assert!(matches!(p.driver.reap(&mut out, 8), Err(VirtqueueError::UsedIdNotInFlight { id: 5 })));
    write_used(&p, 0, 1000, 0, 1);
    assert!(matches!(p.driver.reap(&mut out, 8), Err(VirtqueueError::UsedIdNotInFlight { id: 1000 })));
    write_used(&p, 0, head.into(), 65, 1);
    assert!(matches!(p.driver.reap(&mut out, 8), Err(VirtqueueError::UsedLenTooLarge { len: 65, max: 64, .. })));
    write_used(&p, 0, head.into(), 64, 2);
    assert!(matches!(p.driver.reap(&mut out, 8), Err(VirtqueueError::UsedIndexJump { .. })));
    write_used(&p, 0, head.into(), 64, 1);
    assert_eq!(p.driver.reap(&mut out, 8).unwrap(), 1);
    // The same id again: no longer in flight.
    write_used(&p, 1, head.into(), 1, 2);
    assert!(matches!(p.driver.reap(&mut out, 8), Err(VirtqueueError::UsedIndexJump { .. })));
}

#[test]
fn stop_and_restart_from_the_base() {
    let mut p = pair(8);
    let buf = p.mem.alloc(64, 8).unwrap();
    let mut batch = ChainBatch::new();
    for _ in 0..3 {
        p.driver.add(&[(buf, 8)], &[]).unwrap();
    }
    p.driver.publish();
    p.device.drain(&mut batch, 32, |q, b| b.chains().iter().try_for_each(|c| q.complete(b, c, 0))).unwrap();
    let base = p.device.next_avail();
    assert_eq!(base, 3);
    let mut used = vec![];
    p.driver.reap(&mut used, 8).unwrap();
    // GET_VRING_BASE → SET_VRING_BASE: a new device queue resumes where the old one stopped.
    let (desc, avail, usedp) = p.driver.user_addrs();
    let cfg = QueueConfig {
        size: 8,
        desc_addr: desc,
        avail_addr: avail,
        used_addr: usedp,
        addr_space: RingAddressSpace::User,
        event_idx: false,
        indirect: true,
        next_avail: base,
    };
    let mut device = DeviceQueue::new(Arc::new(p.mem.table().clone()), cfg).unwrap();
    assert_eq!(device.next_used(), 3, "used index read back from the ring");
    p.driver.add(&[(buf, 8)], &[]).unwrap();
    p.driver.publish();
    batch.clear();
    assert_eq!(device.pop_batch(&mut batch, 8).unwrap(), 1);
}

#[test]
fn driver_and_device_on_two_threads() {
    let p = pair_with(256, true, false, &[(0, 16 * MIB)]);
    let Pair { mem, mut driver, mut device } = p;
    const CHAINS: u32 = 100_000;
    let bufs: Vec<u64> = (0..256).map(|_| mem.alloc(64, 64).unwrap()).collect();
    let dev = std::thread::spawn(move || {
        let mut batch = ChainBatch::new();
        let mut done = 0u32;
        while done < CHAINS {
            batch.clear();
            let n = device.pop_batch(&mut batch, 32).unwrap();
            for c in batch.chains().to_vec() {
                // Echo: read the 4-byte sequence number, write it back +1 into the same buffer.
                let seg = batch.readable(&c)[0];
                let mut v = [0u8; 4];
                // SAFETY: the segment is inside a live mapping.
                unsafe { std::ptr::copy_nonoverlapping(seg.host, v.as_mut_ptr(), 4) };
                let out = (u32::from_le_bytes(v) + 1).to_le_bytes();
                let w = batch.writable(&c)[0];
                // SAFETY: as above.
                unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), w.host, 4) };
                device.complete(&batch, &c, 4).unwrap();
            }
            device.publish_used().unwrap();
            done += n as u32;
            if n == 0 {
                std::hint::spin_loop();
            }
        }
    });
    let mut sent = 0u32;
    let mut got = 0u32;
    let mut used = Vec::new();
    let mut seq = std::collections::HashMap::new();
    while got < CHAINS {
        while sent < CHAINS && driver.num_free() >= 2 {
            let i = (sent % 256) as usize;
            let buf = bufs[i];
            mem.table().write(buf, &sent.to_le_bytes()).unwrap();
            let head = driver.add(&[(buf, 4)], &[(buf + 32, 4)]).unwrap();
            seq.insert(head, (buf, sent));
            sent += 1;
            if sent % 32 == 0 {
                break;
            }
        }
        driver.publish();
        used.clear();
        got += driver.reap(&mut used, 64).unwrap() as u32;
        for (head, len) in &used {
            assert_eq!(*len, 4);
            let (buf, n) = seq.remove(head).unwrap();
            let mut v = [0u8; 4];
            mem.table().read(buf + 32, &mut v).unwrap();
            assert_eq!(u32::from_le_bytes(v), n + 1);
        }
    }
    dev.join().unwrap();
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Random chains (direct or indirect, 1..6 buffers, random readable/writable split and
        /// lengths) arrive at the device exactly as the driver added them.
        #[test]
        fn random_chains_arrive_intact(
            chains in proptest::collection::vec((1usize..6, 0usize..6, 1u32..5000, any::<bool>()), 1..40)
        ) {
            let mut p = pair_with(64, false, true, &[(0, 8 * MIB)]);
            let mut batch = ChainBatch::new();
            let mut used = vec![];
            for (n, split, len, indirect) in chains {
                let split = split.min(n);
                let bufs: Vec<Buffer> = (0..n).map(|i| (p.mem.alloc(u64::from(len), 8).unwrap(), len + i as u32 - i as u32)).collect();
                let (r, w) = bufs.split_at(split);
                let head = if indirect { p.driver.add_indirect(r, w).unwrap() } else { p.driver.add(r, w).unwrap() };
                p.driver.publish();
                batch.clear();
                prop_assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 1);
                let c = batch.chains()[0];
                prop_assert_eq!(c.head, head);
                let got: Vec<(u64, u32, bool)> = batch.segments(&c).iter().map(|s| (s.gpa, s.len, s.writable)).collect();
                let want: Vec<(u64, u32, bool)> = r.iter().map(|b| (b.0, b.1, false)).chain(w.iter().map(|b| (b.0, b.1, true))).collect();
                prop_assert_eq!(got, want);
                p.device.complete(&batch, &c, c.writable_len).unwrap();
                p.device.publish_used().unwrap();
                used.clear();
                p.driver.reap(&mut used, 8).unwrap();
                prop_assert_eq!(used[0], (head, c.writable_len));
            }
        }

        /// Random bytes in the descriptor table and avail ring never make the device touch
        /// memory outside the table, panic, or hang: it pops chains or reports an error.
        #[test]
        fn random_rings_never_escape(desc in proptest::collection::vec(any::<u8>(), 16 * 16), heads in proptest::collection::vec(0u16..20, 1..16), jump in 0u16..3) {
            let mut p = pair(16);
            let ring = p.driver.ring();
            // Point the random descriptors at small addresses so some are valid.
            let mut desc = desc;
            for i in 0..16 {
                desc[i * 16 + 2..i * 16 + 8].fill(0);
                desc[i * 16 + 10..i * 16 + 12].fill(0);
            }
            p.mem.table().write(ring.desc, &desc).unwrap();
            for h in &heads {
                raw_publish(&mut p, *h);
            }
            if jump > 1 {
                set_avail_idx(&mut p, 40);
            }
            let mut batch = ChainBatch::new();
            let mut total = 0;
            for _ in 0..4 {
                match p.device.pop_batch(&mut batch, 64) {
                    Ok(n) => total += n,
                    Err(_) => break,
                }
            }
            prop_assert!(total <= heads.len());
            for s in batch.chains().iter().flat_map(|c| batch.segments(c)) {
                prop_assert!(p.mem.table().translate(s.gpa, u64::from(s.len)).is_ok());
            }
        }
    }
}

#[test]
fn inflight_heads_are_resubmitted_by_a_new_device() {
    let mut p = pair(8);
    let buffer = InflightBuffer::allocate(1, 8).unwrap();
    assert_eq!(p.device.attach_inflight(buffer.queue(0).unwrap()).unwrap(), 0);
    let mut heads = Vec::new();
    for i in 0..3u8 {
        let a = p.mem.alloc(64, 8).unwrap();
        p.mem.table().write(a, &[i; 64]).unwrap();
        heads.push(p.driver.add(&[(a, 64)], &[]).unwrap());
    }
    p.driver.publish();
    let mut batch = ChainBatch::new();
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 3);
    // The middle request completes; the device then "crashes" with two in flight.
    let c = batch.chains()[1];
    p.device.complete(&batch, &c, 0).unwrap();
    p.device.publish_used().unwrap();
    let mut used = Vec::new();
    p.driver.reap(&mut used, 8).unwrap();
    assert_eq!(used, vec![(heads[1], 0)]);

    // A new device on the same ring and buffer, told base 1 (what QEMU restores: used.idx).
    let mut fresh = device_for(&p.mem, &p.driver, false, true);
    assert_eq!(fresh.attach_inflight(buffer.queue(0).unwrap()).unwrap(), 2);
    assert_eq!(fresh.next_avail(), 3);
    assert_eq!(fresh.in_flight(), 2);
    let mut again = ChainBatch::new();
    assert_eq!(fresh.pop_batch(&mut again, 8).unwrap(), 2);
    let got: Vec<(u16, u8)> =
        again.chains().iter().map(|c| (c.head, read_segments(&again, again.readable(c))[0])).collect();
    assert_eq!(got, vec![(heads[0], 0), (heads[2], 2)]);
    for c in again.chains().to_vec() {
        fresh.complete(&again, &c, 0).unwrap();
    }
    fresh.publish_used().unwrap();
    used.clear();
    p.driver.reap(&mut used, 8).unwrap();
    assert_eq!(used.len(), 2);
    // New requests flow after the resubmitted ones; nothing is handed out twice.
    let a = p.mem.alloc(64, 8).unwrap();
    let h = p.driver.add(&[(a, 64)], &[]).unwrap();
    p.driver.publish();
    again.clear();
    assert_eq!(fresh.pop_batch(&mut again, 8).unwrap(), 1);
    assert_eq!(again.chains()[0].head, h);
    // And a third device finds nothing to resubmit but that one.
    let mut third = device_for(&p.mem, &p.driver, false, true);
    assert_eq!(third.attach_inflight(buffer.queue(0).unwrap()).unwrap(), 1);
}

#[test]
fn spans_cover_a_range_across_pieces() {
    let mut a = [0u8; 4];
    let mut b = [0u8; 3];
    let pieces = [(a.as_mut_ptr(), 4usize), (b.as_mut_ptr(), 3usize)];
    let mut seen = Vec::new();
    assert_eq!(for_each_span(pieces, 2, 4, |h, at, n| seen.push((h, at, n))), 4);
    assert_eq!(seen, vec![(a.as_mut_ptr().wrapping_add(2), 0, 2), (b.as_mut_ptr(), 2, 2)]);
    // A range running past the pieces stops where they end; a skip past them covers nothing.
    assert_eq!(for_each_span(pieces, 5, 10, |_, _, _| {}), 2);
    assert_eq!(for_each_span(pieces, 9, 1, |_, _, _| panic!("nothing to cover")), 0);
}

#[test]
fn kept_chains_complete_later_and_unused_ones_rewind_the_ring() {
    let mut p = pair(8);
    let mut batch = ChainBatch::new();
    let mut kept = KeptChains::new();
    let bufs: Vec<u64> = (0..4).map(|_| p.mem.alloc(256, 64).unwrap()).collect();
    let heads: Vec<u16> = bufs.iter().map(|&b| p.driver.add(&[], &[(b, 256)]).unwrap()).collect();
    p.driver.publish();
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 4);
    kept.keep_all(&batch);
    batch.clear();
    assert_eq!(kept.len(), 4);
    // The batch is gone; the oldest kept chain is completed later, through its own segments.
    let first = kept.take().unwrap();
    assert_eq!(first.head, heads[0]);
    assert_eq!(fill_segments(first.writable(), 0xab), 256);
    p.device.complete_with(first.head, first.writable().iter().map(|s| (s.gpa, s.len)), 100).unwrap();
    kept.recycle(first);
    assert!(p.device.publish_used().unwrap());
    let mut used = Vec::new();
    p.driver.reap(&mut used, 8).unwrap();
    assert_eq!(used, vec![(heads[0], 100)]);
    let mut got = [0u8; 4];
    p.mem.table().read(bufs[0], &mut got).unwrap();
    assert_eq!(got, [0xab; 4]);
    // The three others were never used: handed back, the avail index rewinds over them and
    // nothing is in flight (what GET_VRING_BASE then reports).
    let rest: Vec<u16> = kept.heads().collect();
    assert!(p.device.return_chains(&rest));
    kept.clear();
    assert_eq!((p.device.next_avail(), p.device.in_flight()), (1, 0));
    // Popped again, in the same order.
    assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 3);
    assert_eq!(batch.chains().iter().map(|c| c.head).collect::<Vec<_>>(), rest);
}

#[test]
fn returning_chains_that_are_not_the_last_popped_changes_nothing() {
    let mut p = pair(8);
    let mut batch = ChainBatch::new();
    let b = p.mem.alloc(64, 64).unwrap();
    let h0 = p.driver.add(&[], &[(b, 64)]).unwrap();
    let h1 = p.driver.add(&[], &[(b, 64)]).unwrap();
    p.driver.publish();
    p.device.pop_batch(&mut batch, 8).unwrap();
    // Out of pop order, or a head never popped: refused.
    assert!(!p.device.return_chains(&[h1, h0]));
    assert!(!p.device.return_chains(&[h0]));
    assert!(!p.device.return_chains(&[7, h1]));
    assert_eq!((p.device.next_avail(), p.device.in_flight()), (2, 2));
    assert!(p.device.return_chains(&[h1]));
    assert_eq!((p.device.next_avail(), p.device.in_flight()), (1, 1));
}

#[test]
fn in_order_completion_recycles_the_same_heads_in_the_same_avail_slots() {
    // The free list is first in, first out: a device completing in order gets descriptor i in
    // avail slot i on every lap (what lets the driver skip rewriting descriptors and entries).
    let mut p = pair(8);
    let buf = p.mem.alloc(64, 8).unwrap();
    let mut batch = ChainBatch::new();
    let mut used = Vec::new();
    for lap in 0..3u16 {
        for i in 0..8u16 {
            assert_eq!(p.driver.next_head(), Some(i));
            assert_eq!(p.driver.add(&[(buf, 64)], &[]).unwrap(), i, "lap {lap}");
        }
        assert_eq!(p.driver.next_head(), None, "full");
        p.driver.publish();
        batch.clear();
        assert_eq!(p.device.pop_batch(&mut batch, 8).unwrap(), 8);
        for c in batch.chains().to_vec() {
            p.device.complete(&batch, &c, 0).unwrap();
        }
        p.device.publish_used().unwrap();
        used.clear();
        assert_eq!(p.driver.reap(&mut used, 8).unwrap(), 8);
        assert_eq!(used.iter().map(|u| u.0).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>());
    }
    // Two-descriptor chains completed out of order still come back whole.
    let a = p.driver.add(&[(buf, 8), (buf + 8, 8)], &[]).unwrap();
    let b = p.driver.add(&[(buf, 8), (buf + 8, 8)], &[]).unwrap();
    p.driver.publish();
    batch.clear();
    p.device.pop_batch(&mut batch, 8).unwrap();
    let chains = batch.chains().to_vec();
    assert_eq!((chains[0].head, chains[1].head), (a, b));
    p.device.complete(&batch, &chains[1], 0).unwrap();
    p.device.complete(&batch, &chains[0], 0).unwrap();
    p.device.publish_used().unwrap();
    used.clear();
    p.driver.reap(&mut used, 8).unwrap();
    assert_eq!(p.driver.num_free(), 8);
    let heads: Vec<u16> = (0..4).map(|_| p.driver.add(&[(buf, 8), (buf + 8, 8)], &[]).unwrap()).collect();
    assert_eq!(heads.len(), 4);
    assert_eq!(p.driver.num_free(), 0);
}

#[test]
fn prefix_takes_the_first_bytes_across_pieces() {
    let pieces = [(0x1000, 4), (0x9000, 0), (0x2000, 8), (0x3000, 8)];
    assert_eq!(prefix(pieces, 10).collect::<Vec<_>>(), [(0x1000, 4), (0x9000, 0), (0x2000, 6)]);
    assert_eq!(prefix(pieces, 100).collect::<Vec<_>>(), pieces);
    assert_eq!(prefix(pieces, 0).count(), 0);
}
