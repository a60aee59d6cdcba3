//! The driver side of a split ring: what a front-end runs to drive a back-end. A descriptor free
//! list, chains added direct or through an indirect table, avail entries published with one
//! release store, the kick decision, and used entries reaped in batches — checking that the
//! device returns only what is in flight, with lengths that fit.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use super::error::VirtqueueError;
use super::layout::*;
use crate::memory::{GuestMemory, MemoryError};

/// A buffer in guest memory: (guest address, length).
pub type Buffer = (u64, u32);

/// Where a driver ring lives: guest addresses of its parts and of the indirect tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverRing {
    /// Ring size.
    pub size: u16,
    /// Descriptor table (guest address).
    pub desc: u64,
    /// Available ring (guest address).
    pub avail: u64,
    /// Used ring (guest address).
    pub used: u64,
    /// Indirect tables, `indirect_max` descriptors per head (0 = none).
    pub indirect_tables: u64,
    /// Descriptors per indirect table.
    pub indirect_max: u16,
}

#[derive(Clone, Copy, Debug, Default)]
struct InFlight {
    /// Descriptors the chain uses in the ring (1 when indirect).
    ndesc: u16,
    /// Last descriptor of the chain in the ring.
    tail: u16,
    /// Capacity of the device-writable buffers.
    writable: u64,
    active: bool,
}

/// The driver side of one split ring, over memory this process owns.
#[derive(Debug)]
pub struct DriverQueue {
    memory: Arc<GuestMemory>,
    ring: DriverRing,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    tables: *mut u8,
    /// Free list, kept privately: the device could scribble on the shared table. First in,
    /// first out: a device that completes in order gets the same descriptors back in the same
    /// avail slots lap after lap, so [`DriverQueue::add`] finds them already written and leaves
    /// the cache lines the device reads alone.
    next_free: Vec<u16>,
    free_head: u16,
    free_tail: u16,
    num_free: u16,
    inflight: Vec<InFlight>,
    avail_idx: u16,
    kicked_avail: u16,
    last_used: u16,
    in_flight: u16,
    event_idx: bool,
    /// Whether the driver wants call notifications (kept up to date in used_event on reap).
    interrupts: bool,
}

// SAFETY: the pointers point into `memory`, held by Arc for the queue's life.
unsafe impl Send for DriverQueue {}

impl DriverQueue {
    /// Allocates the three ring parts (and `indirect_max` descriptors of indirect table per head
    /// when non-zero) in `memory` and initialises them (zeroed rings, full free list).
    pub fn allocate(
        memory: Arc<GuestMemory>,
        size: u16,
        event_idx: bool,
        indirect_max: u16,
    ) -> Result<DriverQueue, VirtqueueError> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(VirtqueueError::InvalidSize(size.into()));
        }
        let desc = memory.alloc(DESC_SIZE * u64::from(size), 16)?;
        let avail = memory.alloc(avail_ring_size(size), 2)?;
        let used = memory.alloc(used_ring_size(size), 4)?;
        let indirect_tables = if indirect_max > 0 {
            memory.alloc(u64::from(size) * u64::from(indirect_max) * DESC_SIZE, 16)?
        } else {
            0
        };
        let ring = DriverRing { size, desc, avail, used, indirect_tables, indirect_max };
        DriverQueue::new(memory, ring, event_idx)
    }

    /// A driver queue over ring parts already placed in `memory` (zeroes them).
    pub fn new(memory: Arc<GuestMemory>, ring: DriverRing, event_idx: bool) -> Result<DriverQueue, VirtqueueError> {
        let size = ring.size;
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(VirtqueueError::InvalidSize(size.into()));
        }
        let t = memory.table();
        let part = |name, addr, len| {
            t.translate(addr, len).map_err(|source| VirtqueueError::RingUnmapped { part: name, source })
        };
        let desc = part("desc", ring.desc, DESC_SIZE * u64::from(size))?;
        let avail = part("avail", ring.avail, avail_ring_size(size))?;
        let used = part("used", ring.used, used_ring_size(size))?;
        // The spec's alignments (virtio 1.x §2.7), checked where the parts are in this process:
        // the descriptor table is accessed a word at a time.
        for (name, addr, host, align) in
            [("desc", ring.desc, desc, 16), ("avail", ring.avail, avail, 2), ("used", ring.used, used, 4)]
        {
            if host as usize % align != 0 {
                return Err(VirtqueueError::Misaligned { part: name, addr, align: align as u64 });
            }
        }
        let tables = if ring.indirect_max > 0 {
            part("indirect", ring.indirect_tables, u64::from(size) * u64::from(ring.indirect_max) * DESC_SIZE)?
        } else {
            std::ptr::null_mut()
        };
        // SAFETY: all three parts were translated with their full lengths.
        unsafe {
            std::ptr::write_bytes(desc, 0, (DESC_SIZE * u64::from(size)) as usize);
            std::ptr::write_bytes(avail, 0, avail_ring_size(size) as usize);
            std::ptr::write_bytes(used, 0, used_ring_size(size) as usize);
        }
        let next_free = (1..=size).map(|i| i % size).collect();
        Ok(DriverQueue {
            memory,
            ring,
            desc,
            avail,
            used,
            tables,
            next_free,
            free_head: 0,
            free_tail: size - 1,
            num_free: size,
            inflight: vec![InFlight::default(); usize::from(size)],
            avail_idx: 0,
            kicked_avail: 0,
            last_used: 0,
            in_flight: 0,
            event_idx,
            interrupts: true,
        })
    }

    /// Where the ring lives (for SET_VRING_ADDR, translated to user addresses by the caller).
    pub fn ring(&self) -> DriverRing {
        self.ring
    }

    /// The memory the ring and its buffers live in.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Host addresses of desc, avail and used: the front-end's user addresses for SET_VRING_ADDR.
    pub fn user_addrs(&self) -> (u64, u64, u64) {
        (self.desc as u64, self.avail as u64, self.used as u64)
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains added and not reaped.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// The next available index (SET_VRING_BASE after a restart).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// `used.idx` as the device last published it (read from the ring): the base a front-end
    /// restarts a ring from when the back-end died without answering GET_VRING_BASE.
    pub fn used_idx(&self) -> u16 {
        // SAFETY: the used ring was allocated with at least 4 bytes.
        unsafe { load_u16(self.used.add(2), Ordering::Acquire) }
    }

    /// Restarts from the base GET_VRING_BASE returned: the device will next read `base`.
    /// Chains still in flight are forgotten (the device dropped them when it stopped).
    pub fn reset_to(&mut self, base: u16) {
        self.avail_idx = base;
        self.kicked_avail = base;
        self.last_used = base;
        let size = self.ring.size;
        self.next_free = (1..=size).map(|i| i % size).collect();
        self.free_head = 0;
        self.free_tail = size - 1;
        self.num_free = size;
        self.in_flight = 0;
        self.inflight.iter_mut().for_each(|f| *f = InFlight::default());
        // Event indices start at the base too: a ring restarted at `base` behaves like a fresh
        // ring at 0 (the first chain needs a kick, the first completion an interrupt).
        let n = usize::from(self.ring.size);
        // SAFETY: avail and used were translated at setup with their EVENT_IDX tails.
        unsafe {
            store_u16(self.avail.add(4 + 2 * n), base, Ordering::Relaxed);
            store_u16(self.used.add(4 + 8 * n), base, Ordering::Relaxed);
            store_u16(self.avail.add(2), base, Ordering::Release);
            store_u16(self.used.add(2), base, Ordering::Release);
        }
    }

    /// The head the next [`add`](Self::add) or [`add_indirect`](Self::add_indirect) will
    /// return (`None`: the ring is full). Lets a caller tie a buffer to a descriptor.
    pub fn next_head(&self) -> Option<u16> {
        (self.num_free > 0).then_some(self.free_head)
    }

    fn take_free(&mut self) -> u16 {
        let d = self.free_head;
        self.free_head = self.next_free[usize::from(d)];
        self.num_free -= 1;
        d
    }

    /// Adds a chain of device-readable buffers followed by device-writable ones; returns its
    /// head. Not visible to the device until [`publish`](Self::publish).
    pub fn add(&mut self, readable: &[Buffer], writable: &[Buffer]) -> Result<u16, VirtqueueError> {
        let n = readable.len() + writable.len();
        if n == 0 {
            return Err(VirtqueueError::InvalidChain("a chain needs at least one buffer"));
        }
        if n > usize::from(self.num_free) {
            return Err(VirtqueueError::RingFull { needed: n, free: self.num_free.into() });
        }
        let head = self.free_head;
        let mut cap = 0u64;
        let mut tail = head;
        for (i, &(addr, len)) in readable.iter().chain(writable).enumerate() {
            let d = self.take_free();
            let w = i >= readable.len();
            if w {
                cap += u64::from(len);
            }
            let flags = if w { VIRTQ_DESC_F_WRITE } else { 0 } | if i + 1 < n { VIRTQ_DESC_F_NEXT } else { 0 };
            let next = if i + 1 < n { self.free_head } else { 0 };
            // SAFETY: d < N, inside the descriptor table.
            unsafe { write_if_changed(Descriptor { addr, len, flags, next }, self.desc.add(usize::from(d) * 16)) };
            tail = d;
        }
        self.inflight[usize::from(head)] = InFlight { ndesc: n as u16, tail, writable: cap, active: true };
        self.push_avail(head);
        Ok(head)
    }

    /// Adds a chain as one descriptor pointing at an indirect table (needs INDIRECT_DESC and a
    /// queue allocated with `indirect_max` ≥ the number of buffers).
    pub fn add_indirect(&mut self, readable: &[Buffer], writable: &[Buffer]) -> Result<u16, VirtqueueError> {
        let n = readable.len() + writable.len();
        if n == 0 {
            return Err(VirtqueueError::InvalidChain("a chain needs at least one buffer"));
        }
        if self.tables.is_null() || n > usize::from(self.ring.indirect_max) {
            return Err(VirtqueueError::InvalidChain("indirect table too small (see indirect_max)"));
        }
        if self.num_free == 0 {
            return Err(VirtqueueError::RingFull { needed: 1, free: 0 });
        }
        let head = self.take_free();
        let stride = usize::from(self.ring.indirect_max) * 16;
        // SAFETY: head < N; each head owns `indirect_max` descriptors of table.
        let table = unsafe { self.tables.add(usize::from(head) * stride) };
        let mut cap = 0u64;
        for (i, &(addr, len)) in readable.iter().chain(writable).enumerate() {
            let w = i >= readable.len();
            if w {
                cap += u64::from(len);
            }
            let more = i + 1 < n;
            let flags = if w { VIRTQ_DESC_F_WRITE } else { 0 } | if more { VIRTQ_DESC_F_NEXT } else { 0 };
            // SAFETY: i < indirect_max, inside this head's table.
            unsafe {
                Descriptor { addr, len, flags, next: if more { i as u16 + 1 } else { 0 } }.write(table.add(i * 16))
            };
        }
        let table_gpa = self.ring.indirect_tables + (usize::from(head) * stride) as u64;
        let d = Descriptor { addr: table_gpa, len: (n * 16) as u32, flags: VIRTQ_DESC_F_INDIRECT, next: 0 };
        // SAFETY: head < N.
        unsafe { write_if_changed(d, self.desc.add(usize::from(head) * 16)) };
        self.inflight[usize::from(head)] = InFlight { ndesc: 1, tail: head, writable: cap, active: true };
        self.push_avail(head);
        Ok(head)
    }

    fn push_avail(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx & (self.ring.size - 1));
        // SAFETY: slot < N, inside the avail ring.
        unsafe {
            let p = self.avail.add(4 + 2 * slot).cast::<u16>();
            // Only the driver writes avail entries; leaving one that already holds `head`
            // keeps the device's cached copy of the line valid.
            if std::ptr::read_volatile(p) != head.to_le() {
                std::ptr::write_volatile(p, head.to_le());
            }
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.in_flight += 1;
    }

    /// Makes every chain added so far visible to the device: one release store of avail.idx.
    pub fn publish(&mut self) {
        // SAFETY: avail.idx is inside the avail ring.
        unsafe { store_u16(self.avail.add(2), self.avail_idx, Ordering::Release) };
    }

    /// Whether the device wants a kick for what was published since the last kick decision
    /// (VRING_USED_F_NO_NOTIFY, or avail_event with EVENT_IDX).
    pub fn kick_needed(&mut self) -> bool {
        let old = self.kicked_avail;
        let new = self.avail_idx;
        self.kicked_avail = new;
        if old == new {
            return false;
        }
        fence(Ordering::SeqCst);
        if self.event_idx {
            let off = 4 + 8 * usize::from(self.ring.size);
            // SAFETY: avail_event is the last u16 of the used ring.
            let event = unsafe { load_u16(self.used.add(off), Ordering::Relaxed) };
            need_event(event, new, old)
        } else {
            // SAFETY: used.flags is the first u16 of the used ring.
            unsafe { load_u16(self.used, Ordering::Relaxed) & VIRTQ_USED_F_NO_NOTIFY == 0 }
        }
    }

    /// Asks the device for interrupts (or not): avail.flags NO_INTERRUPT, or with EVENT_IDX
    /// used_event = the next used index to hear about.
    pub fn set_interrupts(&mut self, enabled: bool) {
        self.interrupts = enabled;
        // SAFETY: flags and used_event are inside the avail ring.
        unsafe {
            if self.event_idx {
                let off = 4 + 2 * usize::from(self.ring.size);
                let event = if enabled { self.last_used } else { self.last_used.wrapping_sub(1) };
                store_u16(self.avail.add(off), event, Ordering::Relaxed);
            } else {
                store_u16(self.avail, if enabled { 0 } else { VIRTQ_AVAIL_F_NO_INTERRUPT }, Ordering::Relaxed);
            }
        }
        fence(Ordering::SeqCst);
    }

    /// Reaps up to `max` used entries into `out` as `(head, written_len)`, returning their
    /// descriptors to the free list. A device that returns an id not in flight, a length larger
    /// than the chain's writable buffers, or moves used.idx past what is in flight, is an error.
    pub fn reap(&mut self, out: &mut Vec<(u16, u32)>, max: usize) -> Result<usize, VirtqueueError> {
        // SAFETY: used.idx is inside the used ring.
        let used_idx = unsafe { load_u16(self.used.add(2), Ordering::Acquire) };
        let ready = used_idx.wrapping_sub(self.last_used);
        if ready > self.in_flight {
            return Err(VirtqueueError::UsedIndexJump {
                last: self.last_used,
                used: used_idx,
                in_flight: self.in_flight,
            });
        }
        let mask = self.ring.size - 1;
        let mut n = 0;
        while n < max && self.last_used != used_idx {
            let slot = usize::from(self.last_used & mask);
            // SAFETY: slot < N, inside the used ring.
            let elem: [u8; 8] = unsafe { std::ptr::read_volatile(self.used.add(4 + 8 * slot).cast::<[u8; 8]>()) };
            let id = u32::from_le_bytes([elem[0], elem[1], elem[2], elem[3]]);
            let len = u32::from_le_bytes([elem[4], elem[5], elem[6], elem[7]]);
            let entry = usize::try_from(id).ok().and_then(|i| self.inflight.get(i)).copied().unwrap_or_default();
            if !entry.active {
                return Err(VirtqueueError::UsedIdNotInFlight { id });
            }
            if u64::from(len) > entry.writable {
                return Err(VirtqueueError::UsedLenTooLarge { id, len, max: entry.writable });
            }
            let head = id as u16;
            self.inflight[usize::from(head)].active = false;
            // Return the chain to the end of the free list: it was taken as a run head..tail
            // of the list, still linked inside.
            if self.num_free == 0 {
                self.free_head = head;
            } else {
                self.next_free[usize::from(self.free_tail)] = head;
            }
            self.free_tail = entry.tail;
            self.num_free += entry.ndesc;
            self.in_flight -= 1;
            self.last_used = self.last_used.wrapping_add(1);
            out.push((head, len));
            n += 1;
        }
        if n > 0 && self.event_idx && self.interrupts {
            // Ask to be interrupted for the next completion (what Linux's virtqueue does).
            let off = 4 + 2 * usize::from(self.ring.size);
            // SAFETY: used_event is the last u16 of the avail ring.
            unsafe { store_u16(self.avail.add(off), self.last_used, Ordering::Relaxed) };
            fence(Ordering::SeqCst);
        }
        Ok(n)
    }

    /// Copies `data` into guest memory (a convenience over the queue's memory).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.memory.table().write(gpa, data)
    }
}

/// Writes `d` at `p` unless it is there already. The device only reads descriptors: a line left
/// untouched stays valid in its cache (a driver recycling the same buffers in the same
/// descriptors, as a TX ring of fixed slots does, writes nothing here in the steady state).
///
/// # Safety
/// `p..p+16` must be inside the mapped descriptor table.
#[inline(always)]
unsafe fn write_if_changed(d: Descriptor, p: *mut u8) {
    // Compared as two little-endian words (the layout of virtq_desc), not decoded: this runs
    // for every descriptor added, and byte-wise volatile accesses measured 25 % slower.
    let new = [d.addr.to_le(), (u64::from(d.len) | u64::from(d.flags) << 32 | u64::from(d.next) << 48).to_le()];
    let p = p.cast::<u64>();
    let old = [std::ptr::read_volatile(p), std::ptr::read_volatile(p.add(1))];
    if old != new {
        std::ptr::write_volatile(p, new[0]);
        std::ptr::write_volatile(p.add(1), new[1]);
    }
}
