//! The driver side of a packed ring: what a front-end runs to drive a back-end. Free buffer ids,
//! lists written into consecutive slots (or one INDIRECT descriptor), a burst exposed by one
//! release store of its first descriptor's flags, the kick decision from the device event
//! suppression structure, and used descriptors reaped by id — checking that the device returns
//! only ids in flight, with lengths that fit.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use super::device::PackedDesc;
use super::{
    avail_bits, event_wants, is_used, used_bits, PackedBase, RingPos, EVENT_SUPPRESS_SIZE, FLAGS_OFFSET,
    MAX_PACKED_QUEUE_SIZE,
};
use super::{RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE};
use super::{VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED};
use crate::memory::GuestMemory;
use crate::virtqueue::error::VirtqueueError;
use crate::virtqueue::layout::{load_u16, store_u16, DESC_SIZE};
use crate::virtqueue::{Buffer, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

/// Where a packed driver ring lives (guest addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedDriverRing {
    /// Ring size.
    pub size: u16,
    /// Descriptor ring.
    pub desc: u64,
    /// Driver event suppression area (written by the driver).
    pub driver_event: u64,
    /// Device event suppression area (written by the device).
    pub device_event: u64,
    /// Indirect tables, `indirect_max` descriptors per buffer id (0 = none).
    pub indirect_tables: u64,
    /// Descriptors per indirect table.
    pub indirect_max: u16,
}

#[derive(Clone, Copy, Debug)]
struct IdState {
    /// Ring slots the list took.
    slots: u16,
    /// Where its first descriptor went (to write it again on a hand-over).
    start: RingPos,
    /// Capacity of the device-writable buffers.
    writable: u64,
    active: bool,
}

impl Default for IdState {
    fn default() -> IdState {
        IdState { slots: 0, start: RingPos::START, writable: 0, active: false }
    }
}

/// The driver side of one packed ring, over memory this process owns.
#[derive(Debug)]
pub struct PackedDriverQueue {
    memory: Arc<GuestMemory>,
    ring: PackedDriverRing,
    desc: *mut u8,
    driver_event: *mut u8,
    device_event: *mut u8,
    tables: *mut u8,
    next_avail: RingPos,
    kicked: RingPos,
    /// Slots made available since the last kick decision: past one lap, positions alone cannot
    /// say whether the device's event slot was crossed, so the decision is to kick.
    added_since_kick: u32,
    last_used: RingPos,
    /// Free ids, kept privately (the device could scribble on the ring). Last in, first out.
    free_ids: Vec<u16>,
    ids: Vec<IdState>,
    /// A private copy of every descriptor written (flags without AVAIL/USED): the device
    /// overwrites slots with used descriptors, so a hand-over to a new back-end
    /// ([`hand_over`](PackedDriverQueue::hand_over)) writes the chains still in flight from here.
    shadow: Vec<PackedDesc>,
    /// Free ring slots.
    num_free: u16,
    in_flight: u16,
    /// Slot and flags of the first descriptor added since the last publish: stored last.
    pending: Option<(u16, u16)>,
    event_idx: bool,
    interrupts: bool,
}

// SAFETY: the pointers point into `memory`, held by Arc for the queue's life.
unsafe impl Send for PackedDriverQueue {}

impl PackedDriverQueue {
    /// Allocates the ring, both event areas (and `indirect_max` descriptors of table per id when
    /// non-zero) in `memory` and initialises them.
    pub fn allocate(
        memory: Arc<GuestMemory>,
        size: u16,
        event_idx: bool,
        indirect_max: u16,
    ) -> Result<PackedDriverQueue, VirtqueueError> {
        if size == 0 || size > MAX_PACKED_QUEUE_SIZE {
            return Err(VirtqueueError::InvalidSize(size.into()));
        }
        let desc = memory.alloc(DESC_SIZE * u64::from(size), 16)?;
        let driver_event = memory.alloc(EVENT_SUPPRESS_SIZE, 4)?;
        let device_event = memory.alloc(EVENT_SUPPRESS_SIZE, 4)?;
        let indirect_tables = if indirect_max > 0 {
            memory.alloc(u64::from(size) * u64::from(indirect_max) * DESC_SIZE, 16)?
        } else {
            0
        };
        let ring = PackedDriverRing { size, desc, driver_event, device_event, indirect_tables, indirect_max };
        PackedDriverQueue::new(memory, ring, event_idx)
    }

    /// A driver queue over ring parts already placed in `memory` (zeroes them: virtio 1.2
    /// §2.8.13 "The descriptor ring is zero-initialized").
    pub fn new(
        memory: Arc<GuestMemory>,
        ring: PackedDriverRing,
        event_idx: bool,
    ) -> Result<PackedDriverQueue, VirtqueueError> {
        let size = ring.size;
        if size == 0 || size > MAX_PACKED_QUEUE_SIZE {
            return Err(VirtqueueError::InvalidSize(size.into()));
        }
        let t = memory.table();
        let part = |name, addr: u64, len, align| {
            if addr % align != 0 {
                return Err(VirtqueueError::Misaligned { part: name, addr, align });
            }
            let host = t.translate(addr, len).map_err(|source| VirtqueueError::RingUnmapped { part: name, source })?;
            // Where the part is in this process too: descriptors are written a word at a time.
            if host as u64 % align != 0 {
                return Err(VirtqueueError::Misaligned { part: name, addr, align });
            }
            Ok(host)
        };
        let desc = part("desc", ring.desc, DESC_SIZE * u64::from(size), 16)?;
        let driver_event = part("driver event", ring.driver_event, EVENT_SUPPRESS_SIZE, 4)?;
        let device_event = part("device event", ring.device_event, EVENT_SUPPRESS_SIZE, 4)?;
        let tables = if ring.indirect_max > 0 {
            let len = u64::from(size) * u64::from(ring.indirect_max) * DESC_SIZE;
            part("indirect", ring.indirect_tables, len, 16)?
        } else {
            std::ptr::null_mut()
        };
        // SAFETY: all parts were translated with their full lengths.
        unsafe {
            std::ptr::write_bytes(desc, 0, (DESC_SIZE * u64::from(size)) as usize);
            std::ptr::write_bytes(driver_event, 0, EVENT_SUPPRESS_SIZE as usize);
            std::ptr::write_bytes(device_event, 0, EVENT_SUPPRESS_SIZE as usize);
        }
        Ok(PackedDriverQueue {
            memory,
            ring,
            desc,
            driver_event,
            device_event,
            tables,
            next_avail: RingPos::START,
            kicked: RingPos::START,
            added_since_kick: 0,
            last_used: RingPos::START,
            free_ids: (0..size).rev().collect(),
            ids: vec![IdState::default(); usize::from(size)],
            shadow: vec![PackedDesc::default(); usize::from(size)],
            num_free: size,
            in_flight: 0,
            pending: None,
            event_idx,
            interrupts: true,
        })
    }

    /// Where the ring lives.
    pub fn ring(&self) -> PackedDriverRing {
        self.ring
    }

    /// The memory the ring and its buffers live in.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Host addresses of the descriptor ring, driver event and device event areas: the
    /// front-end's user addresses for SET_VRING_ADDR (desc, avail, used respectively).
    pub fn user_addrs(&self) -> (u64, u64, u64) {
        (self.desc as u64, self.driver_event as u64, self.device_event as u64)
    }

    /// Free ring slots.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Buffers added and not reaped.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// Where the next descriptor goes (with the used position: SET_VRING_BASE's value).
    pub fn next_avail(&self) -> RingPos {
        self.next_avail
    }

    /// Where the next used descriptor is expected.
    pub fn last_used(&self) -> RingPos {
        self.last_used
    }

    /// Restarts from `base` (GET_VRING_BASE of a back-end that completed everything: the next
    /// available and used positions coincide). Buffers still in flight are forgotten.
    ///
    /// Every slot's AVAIL/USED bits are rewritten to read "used in the lap it last belonged
    /// to": slots before `base` in `base`'s lap, the others in the lap before. Without this a
    /// zeroed ring restarted with wrap counter 0 would read as full of used descriptors (both
    /// bits equal to the counter, virtio 1.2 §2.8.1) — to the driver, which reaps from there.
    pub fn reset_to(&mut self, base: RingPos) -> Result<(), VirtqueueError> {
        if base.index >= self.ring.size {
            return Err(VirtqueueError::PositionOutOfRange { part: "avail", index: base.index, size: self.ring.size });
        }
        for slot in 0..self.ring.size {
            let lap = if slot < base.index { base.wrap } else { !base.wrap };
            let at = usize::from(slot) * 16 + FLAGS_OFFSET;
            // SAFETY: slot < size, inside the ring; nobody else uses a ring being reset.
            unsafe {
                let f = load_u16(self.desc.add(at), Ordering::Relaxed);
                let f = (f & !(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) | used_bits(lap);
                store_u16(self.desc.add(at), f, Ordering::Relaxed);
            }
        }
        self.next_avail = base;
        self.kicked = base;
        self.added_since_kick = 0;
        self.last_used = base;
        self.free_ids = (0..self.ring.size).rev().collect();
        self.ids.iter_mut().for_each(|s| *s = IdState::default());
        self.num_free = self.ring.size;
        self.in_flight = 0;
        self.pending = None;
        Ok(())
    }

    /// Hands the ring to a new back-end with the buffers still in flight (the old one died
    /// without answering GET_VRING_BASE): returns the base to send with SET_VRING_BASE.
    ///
    /// A packed ring keeps no record of what was made available that a new device could
    /// re-read: the device writes used descriptors over slots it has read, so after an
    /// out-of-order completion the descriptors of a buffer still in flight may be gone from
    /// the ring. So: used descriptors the old device wrote and the driver has not reaped yet
    /// stay (they are reaped as usual); after them, every buffer still in flight is written
    /// again from this queue's private copy, in the order it was first made available, with
    /// the same id (the span they fill is the one they took before). Both halves of the base are that position
    /// (what QEMU restores a packed ring to: "last_avail = used", virtio 1.2 §2.8.21 gives the
    /// driver no avail index to send). A used descriptor naming an id not in flight, or twice,
    /// is an error and nothing is changed.
    pub fn hand_over(&mut self) -> Result<PackedBase, VirtqueueError> {
        let size = self.ring.size;
        // Used but not reaped: walk them without consuming anything.
        let mut pos = self.last_used;
        let mut done = vec![false; usize::from(size)];
        let mut walked = 0u16;
        while walked < self.in_flight {
            let at = usize::from(pos.index) * 16;
            // SAFETY: pos.index < size, inside the ring.
            let flags = unsafe { load_u16(self.desc.add(at + FLAGS_OFFSET), Ordering::Acquire) };
            if !is_used(flags, pos.wrap) {
                break;
            }
            // SAFETY: as above.
            let d = unsafe { PackedDesc::read(self.desc.add(at)) };
            let i = usize::from(d.id);
            let entry = self.ids.get(i).copied().unwrap_or_default();
            if !entry.active || done[i] {
                return Err(VirtqueueError::UsedIdNotInFlight { id: d.id.into() });
            }
            done[i] = true;
            pos = pos.advance(entry.slots, size);
            walked += 1;
        }
        // The rest, oldest first (distance back from the next available slot).
        let mut again: Vec<u16> =
            (0..size).filter(|&id| self.ids[usize::from(id)].active && !done[usize::from(id)]).collect();
        again
            .sort_by_key(|&id| std::cmp::Reverse(self.next_avail.distance_from(self.ids[usize::from(id)].start, size)));
        let mut lists: Vec<PackedDesc> = Vec::new();
        for &id in &again {
            let st = self.ids[usize::from(id)];
            let mut p = st.start;
            for _ in 0..st.slots {
                lists.push(self.shadow[usize::from(p.index)]);
                p = p.advance(1, size);
            }
        }
        let old_next = self.next_avail;
        let base = pos;
        self.pending = None;
        self.next_avail = pos;
        let mut k = 0;
        for &id in &again {
            let slots = self.ids[usize::from(id)].slots;
            self.ids[usize::from(id)].start = self.next_avail;
            for _ in 0..slots {
                let d = lists[k];
                k += 1;
                self.put(d);
            }
        }
        // Slots in flight span exactly from the last used position to the next available one,
        // so the lists fill that span again and end where the driver had got to.
        debug_assert_eq!(self.next_avail, old_next);
        self.publish();
        self.kicked = self.next_avail;
        self.added_since_kick = 0;
        self.write_driver_event();
        Ok(PackedBase { avail: base, used: base })
    }

    /// The id the next [`add`](Self::add) will return (`None`: no room for one descriptor).
    pub fn next_id(&self) -> Option<u16> {
        if self.num_free == 0 {
            return None;
        }
        self.free_ids.last().copied()
    }

    /// Writes an available descriptor at the next slot. The flags of the first descriptor
    /// since the last publish are held back (stored by [`publish`](Self::publish)).
    fn put(&mut self, d: PackedDesc) {
        let pos = self.next_avail;
        let flags = PackedDesc::avail_flags(d.flags, pos.wrap);
        if let Some(s) = self.shadow.get_mut(usize::from(pos.index)) {
            *s = d;
        }
        let mut held = self.pending.is_some();
        // SAFETY: pos.index < size.
        unsafe { self.write_avail(pos, d, flags, &mut held) };
        self.next_avail = pos.advance(1, self.ring.size);
        self.added_since_kick = self.added_since_kick.saturating_add(1);
    }

    fn take_id(&mut self, needed: usize) -> Result<u16, VirtqueueError> {
        if needed > usize::from(self.num_free) {
            return Err(VirtqueueError::RingFull { needed, free: self.num_free.into() });
        }
        // Ids in flight ≤ slots in flight < size, so one is free.
        self.free_ids.pop().ok_or(VirtqueueError::RingFull { needed, free: 0 })
    }

    /// Adds a buffer of device-readable elements followed by device-writable ones, in
    /// consecutive slots linked by NEXT; returns its id. Not visible until `publish`.
    pub fn add(&mut self, readable: &[Buffer], writable: &[Buffer]) -> Result<u16, VirtqueueError> {
        let n = readable.len() + writable.len();
        if n == 0 {
            return Err(VirtqueueError::InvalidChain("a chain needs at least one buffer"));
        }
        let id = self.take_id(n)?;
        let start = self.next_avail;
        if let ([(addr, len)], []) | ([], [(addr, len)]) = (readable, writable) {
            // One descriptor (the common net case): no list to keep state across.
            let (w, flags) = if writable.is_empty() { (0, 0) } else { (u64::from(*len), VIRTQ_DESC_F_WRITE) };
            self.put(PackedDesc { addr: *addr, len: *len, id, flags });
            self.commit(id, start, 1, w);
            return Ok(id);
        }
        let size = self.ring.size;
        // What `put` does per descriptor, with the position and the held-back flags kept in
        // locals across the list (this runs for every descriptor added).
        let mut pos = start;
        let mut held = self.pending.is_some();
        let mut cap = 0u64;
        for (i, &(addr, len)) in readable.iter().chain(writable).enumerate() {
            let w = i >= readable.len();
            if w {
                cap += u64::from(len);
            }
            let extra = if w { VIRTQ_DESC_F_WRITE } else { 0 } | if i + 1 < n { VIRTQ_DESC_F_NEXT } else { 0 };
            // The id goes in every descriptor; the device reads it from the last one.
            let d = PackedDesc { addr, len, id, flags: extra };
            if let Some(s) = self.shadow.get_mut(usize::from(pos.index)) {
                *s = d;
            }
            // SAFETY: pos.index < size, inside the ring (16-byte aligned, checked at set-up).
            unsafe { self.write_avail(pos, d, extra | avail_bits(pos.wrap), &mut held) };
            pos = pos.advance(1, size);
        }
        self.next_avail = pos;
        self.added_since_kick = self.added_since_kick.saturating_add(n as u32);
        self.commit(id, start, n as u16, cap);
        Ok(id)
    }

    /// Writes available descriptor `d` with `flags` at `pos`. Its flags are held back (for
    /// `publish`) unless `held` says an earlier descriptor's already are: then the device cannot
    /// reach this one before that release store (it reads available descriptors in ring order,
    /// virtio 1.2 §2.8.6).
    ///
    /// # Safety
    /// `pos.index < size`.
    #[inline(always)]
    unsafe fn write_avail(&mut self, pos: RingPos, d: PackedDesc, flags: u16, held: &mut bool) {
        let p = self.desc.add(usize::from(pos.index) * 16);
        std::ptr::write_volatile(p.cast::<u64>(), d.addr.to_le());
        std::ptr::write_volatile(p.add(8).cast::<u32>(), d.len.to_le());
        std::ptr::write_volatile(p.add(12).cast::<u16>(), d.id.to_le());
        if *held {
            store_u16(p.add(FLAGS_OFFSET), flags, Ordering::Relaxed);
        } else {
            self.pending = Some((pos.index, flags));
            *held = true;
        }
    }

    /// Adds a buffer as one INDIRECT descriptor pointing at this id's table (needs
    /// INDIRECT_DESC and `indirect_max` ≥ the number of elements).
    pub fn add_indirect(&mut self, readable: &[Buffer], writable: &[Buffer]) -> Result<u16, VirtqueueError> {
        let n = readable.len() + writable.len();
        if n == 0 {
            return Err(VirtqueueError::InvalidChain("a chain needs at least one buffer"));
        }
        if self.tables.is_null() || n > usize::from(self.ring.indirect_max) {
            return Err(VirtqueueError::InvalidChain("indirect table too small (see indirect_max)"));
        }
        let id = self.take_id(1)?;
        let stride = usize::from(self.ring.indirect_max) * 16;
        // SAFETY: id < size; each id owns `indirect_max` descriptors of table.
        let table = unsafe { self.tables.add(usize::from(id) * stride) };
        let mut cap = 0u64;
        for (i, &(addr, len)) in readable.iter().chain(writable).enumerate() {
            let w = i >= readable.len();
            if w {
                cap += u64::from(len);
            }
            // Only WRITE is valid inside a table (virtio 1.2 §2.8.7).
            let e = PackedDesc { addr, len, id: 0, flags: if w { VIRTQ_DESC_F_WRITE } else { 0 } };
            // SAFETY: i < indirect_max, inside this id's table.
            unsafe { std::ptr::write_volatile(table.add(i * 16).cast::<[u8; 16]>(), e.to_bytes()) };
        }
        let addr = self.ring.indirect_tables + (usize::from(id) * stride) as u64;
        let start = self.next_avail;
        self.put(PackedDesc { addr, len: (n * 16) as u32, id, flags: VIRTQ_DESC_F_INDIRECT });
        self.commit(id, start, 1, cap);
        Ok(id)
    }

    fn commit(&mut self, id: u16, start: RingPos, slots: u16, writable: u64) {
        self.ids[usize::from(id)] = IdState { slots, start, writable, active: true };
        self.num_free -= slots;
        self.in_flight += 1;
    }

    /// Makes every buffer added so far visible to the device: one release store, the flags of
    /// the first descriptor added since the last publish.
    pub fn publish(&mut self) {
        if let Some((slot, flags)) = self.pending.take() {
            // SAFETY: slot < size, inside the ring.
            unsafe { store_u16(self.desc.add(usize::from(slot) * 16 + FLAGS_OFFSET), flags, Ordering::Release) };
        }
    }

    /// Whether the device wants a notification for what was published since the last decision
    /// (device event suppression: ENABLE / DISABLE / DESC). A structure the device filled
    /// wrongly (reserved flags, DESC without EVENT_IDX, offset beyond the ring) is an error.
    pub fn kick_needed(&mut self) -> Result<bool, VirtqueueError> {
        let old = self.kicked;
        let new = self.next_avail;
        let added = std::mem::take(&mut self.added_since_kick);
        self.kicked = new;
        if added == 0 {
            return Ok(false);
        }
        if added > u32::from(self.ring.size) {
            return Ok(true);
        }
        // The flags store must be visible before reading the device's suppression state.
        fence(Ordering::SeqCst);
        // SAFETY: the device event area was translated with its 4 bytes, 4-byte aligned.
        unsafe { event_wants(self.device_event, "device", self.event_idx, self.ring.size, old, new) }
    }

    fn write_driver_event(&self) {
        // SAFETY: the driver event area was translated with its 4 bytes, 4-byte aligned.
        unsafe {
            if !self.interrupts {
                store_u16(self.driver_event.add(2), RING_EVENT_FLAGS_DISABLE, Ordering::Relaxed);
            } else if self.event_idx {
                store_u16(self.driver_event, self.last_used.encode(), Ordering::Relaxed);
                store_u16(self.driver_event.add(2), RING_EVENT_FLAGS_DESC, Ordering::Relaxed);
            } else {
                store_u16(self.driver_event.add(2), RING_EVENT_FLAGS_ENABLE, Ordering::Relaxed);
            }
        }
        fence(Ordering::SeqCst);
    }

    /// Asks the device for used buffer notifications (or not): the driver event suppression
    /// structure — DISABLE, ENABLE, or with EVENT_IDX DESC at the next used position.
    pub fn set_interrupts(&mut self, enabled: bool) {
        self.interrupts = enabled;
        self.write_driver_event();
    }

    /// Reaps up to `max` used descriptors into `out` as `(id, written_len)`, moving on by the
    /// slots each id's list took. An id not in flight, or a length larger than the buffer's
    /// writable capacity, is an error (the queue's state is left as before that descriptor).
    pub fn reap(&mut self, out: &mut Vec<(u16, u32)>, max: usize) -> Result<usize, VirtqueueError> {
        let mut n = 0;
        while n < max {
            let at = usize::from(self.last_used.index) * 16;
            // SAFETY: last_used.index < size, inside the ring; acquire pairs with the device's
            // release of the burst's first flags.
            let flags = unsafe { load_u16(self.desc.add(at + FLAGS_OFFSET), Ordering::Acquire) };
            if !is_used(flags, self.last_used.wrap) {
                break;
            }
            // SAFETY: as above. Only len and id: a used descriptor's address means nothing.
            let d = unsafe { UsedDesc::read(self.desc.add(at)) };
            let entry = self.ids.get(usize::from(d.id)).copied().unwrap_or_default();
            if !entry.active {
                return Err(VirtqueueError::UsedIdNotInFlight { id: d.id.into() });
            }
            // Without WRITE the length is reserved and ignored (virtio 1.2 §2.8.4).
            let len = if flags & VIRTQ_DESC_F_WRITE != 0 { d.len } else { 0 };
            if u64::from(len) > entry.writable {
                return Err(VirtqueueError::UsedLenTooLarge { id: d.id.into(), len, max: entry.writable });
            }
            self.ids[usize::from(d.id)].active = false;
            self.free_ids.push(d.id);
            self.num_free += entry.slots;
            self.in_flight -= 1;
            self.last_used = self.last_used.advance(entry.slots, self.ring.size);
            out.push((d.id, len));
            n += 1;
        }
        if n > 0 && self.event_idx && self.interrupts {
            // Ask to hear about the next used descriptor.
            self.write_driver_event();
        }
        Ok(n)
    }

    /// Copies `data` into guest memory (a convenience over the queue's memory).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), crate::memory::MemoryError> {
        self.memory.table().write(gpa, data)
    }
}

/// What the driver reads of a used descriptor (after its flags, loaded with acquire).
struct UsedDesc {
    len: u32,
    id: u16,
}

impl UsedDesc {
    /// Reads `len` and `id` of the descriptor at `p` once each.
    ///
    /// # Safety
    /// `p..p+16` must be inside the mapped ring, 16-byte aligned.
    #[inline(always)]
    unsafe fn read(p: *const u8) -> UsedDesc {
        UsedDesc {
            len: u32::from_le(std::ptr::read_volatile(p.add(8).cast::<u32>())),
            id: u16::from_le(std::ptr::read_volatile(p.add(12).cast::<u16>())),
        }
    }
}

#[cfg(test)]
mod hand_over_tests {
    use super::*;
    use crate::virtqueue::{ChainBatch, PackedDeviceQueue, PackedQueueConfig, RingAddressSpace};

    fn device(q: &PackedDriverQueue, base: PackedBase) -> PackedDeviceQueue {
        let (desc, drv, dev) = q.user_addrs();
        let cfg = PackedQueueConfig {
            size: q.ring().size,
            desc_addr: desc,
            driver_event_addr: drv,
            device_event_addr: dev,
            addr_space: RingAddressSpace::User,
            event_idx: false,
            indirect: true,
            base,
        };
        PackedDeviceQueue::new(Arc::new(q.memory().table().clone()), cfg).unwrap()
    }

    /// (id, [(gpa, len)]) of every chain the device pops.
    fn pop_all(dev: &mut PackedDeviceQueue) -> Vec<(u16, Vec<(u64, u32)>)> {
        let mut batch = ChainBatch::new();
        dev.pop_batch(&mut batch, 64).unwrap();
        batch.chains().iter().map(|c| (c.head, batch.segments(c).iter().map(|s| (s.gpa, s.len)).collect())).collect()
    }

    #[test]
    fn chains_in_flight_survive_a_new_device_after_out_of_order_completions() {
        // Each lap count puts the hand-over at a different place of the ring, across its end.
        for laps in 0..7u64 {
            let mem = Arc::new(GuestMemory::allocate(&[(0, 1 << 20)]).unwrap());
            let mut q = PackedDriverQueue::allocate(mem.clone(), 8, false, 4).unwrap();
            let buf = mem.alloc(4096, 64).unwrap();
            let mut dev = device(&q, PackedBase::START);
            let mut used = Vec::new();
            for _ in 0..laps {
                q.add(&[(buf, 16)], &[(buf + 16, 16)]).unwrap();
                q.publish();
                let [(id, _)] = pop_all(&mut dev)[..] else { panic!() };
                dev.complete_with(id, std::iter::empty(), 1).unwrap();
                dev.publish_used().unwrap();
                used.clear();
                q.reap(&mut used, 8).unwrap();
            }
            let a = q.add(&[(buf, 16)], &[(buf + 100, 10), (buf + 200, 20)]).unwrap();
            let b = q.add(&[(buf + 300, 30)], &[]).unwrap();
            let c = q.add_indirect(&[(buf + 400, 40)], &[(buf + 500, 50)]).unwrap();
            let d = q.add(&[(buf + 600, 60)], &[(buf + 700, 70)]).unwrap();
            q.publish();
            let popped = pop_all(&mut dev);
            assert_eq!(popped.len(), 4);
            let want: std::collections::HashMap<u16, Vec<(u64, u32)>> = popped.into_iter().collect();
            // B completes first and is reaped; D completes and is not reaped before the device dies.
            dev.complete_with(b, std::iter::empty(), 0).unwrap();
            dev.publish_used().unwrap();
            used.clear();
            assert_eq!(q.reap(&mut used, 1).unwrap(), 1);
            assert_eq!(used, vec![(b, 0)]);
            dev.complete_with(d, std::iter::empty(), 7).unwrap();
            dev.publish_used().unwrap();
            drop(dev);
            let base = q.hand_over().unwrap();
            assert_eq!(base.avail, base.used);
            let mut dev = device(&q, base);
            let again = pop_all(&mut dev);
            assert_eq!(again.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![a, c], "oldest first, same ids");
            for (id, segs) in &again {
                assert_eq!(segs, &want[id], "the same buffers");
            }
            dev.complete_with(c, std::iter::empty(), 50).unwrap();
            dev.complete_with(a, std::iter::empty(), 30).unwrap();
            dev.publish_used().unwrap();
            used.clear();
            q.reap(&mut used, 8).unwrap();
            assert_eq!(used, vec![(d, 7), (c, 50), (a, 30)], "the old device's completion, then the new one's");
            assert_eq!((q.in_flight(), q.num_free()), (0, 8));
            // The ring goes on normally.
            let e = q.add(&[(buf, 1)], &[]).unwrap();
            q.publish();
            assert_eq!(pop_all(&mut dev)[0].0, e);
        }
    }

    #[test]
    fn a_ring_restarted_at_any_position_reads_empty_then_runs() {
        // Wrap counter 0 is the case a zeroed ring gets wrong (flags 0 = used in lap 0).
        for base in
            [RingPos { index: 0, wrap: false }, RingPos { index: 3, wrap: false }, RingPos { index: 5, wrap: true }]
        {
            let mem = Arc::new(GuestMemory::allocate(&[(0, 1 << 20)]).unwrap());
            let mut q = PackedDriverQueue::allocate(mem.clone(), 6, false, 0).unwrap();
            let buf = mem.alloc(4096, 64).unwrap();
            q.reset_to(base).unwrap();
            let mut dev = device(&q, PackedBase { avail: base, used: base });
            let mut used = Vec::new();
            assert_eq!(q.reap(&mut used, 8).unwrap(), 0, "nothing is used yet");
            assert!(pop_all(&mut dev).is_empty(), "nothing is available yet");
            for round in 0..10u32 {
                let a = q.add(&[(buf, 8)], &[(buf + 64, 64)]).unwrap();
                q.publish();
                let [(id, _)] = pop_all(&mut dev)[..] else { panic!("round {round}") };
                assert_eq!(id, a);
                dev.complete_with(id, std::iter::empty(), round).unwrap();
                dev.publish_used().unwrap();
                used.clear();
                assert_eq!(q.reap(&mut used, 8).unwrap(), 1);
                assert_eq!(used, vec![(a, round)]);
            }
        }
    }

    #[test]
    fn a_used_id_not_in_flight_stops_the_hand_over() {
        let mem = Arc::new(GuestMemory::allocate(&[(0, 1 << 20)]).unwrap());
        let mut q = PackedDriverQueue::allocate(mem.clone(), 4, false, 0).unwrap();
        let buf = mem.alloc(64, 64).unwrap();
        q.add(&[(buf, 8)], &[]).unwrap();
        q.publish();
        // A used descriptor at slot 0 naming id 3, never made available.
        let (desc, _, _) = q.user_addrs();
        let raw = {
            let mut r = [0u8; 16];
            r[12..14].copy_from_slice(&3u16.to_le_bytes());
            r[14..16].copy_from_slice(&super::super::used_bits(true).to_le_bytes());
            r
        };
        // SAFETY: slot 0 of the ring this queue allocated.
        unsafe { std::ptr::write_volatile(desc as *mut [u8; 16], raw) };
        assert!(matches!(q.hand_over(), Err(VirtqueueError::UsedIdNotInFlight { id: 3 })));
        assert_eq!(q.in_flight(), 1, "nothing changed");
    }
}
