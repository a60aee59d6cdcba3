//! The driver side of a packed ring: what a front-end runs to drive a back-end. Free buffer ids,
//! lists written into consecutive slots (or one INDIRECT descriptor), a burst exposed by one
//! release store of its first descriptor's flags, the kick decision from the device event
//! suppression structure, and used descriptors reaped by id — checking that the device returns
//! only ids in flight, with lengths that fit.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use super::device::PackedDesc;
use super::{event_wants, is_used, RingPos, EVENT_SUPPRESS_SIZE, FLAGS_OFFSET, MAX_PACKED_QUEUE_SIZE};
use super::{RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE};
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

#[derive(Clone, Copy, Debug, Default)]
struct IdState {
    /// Ring slots the list took.
    slots: u16,
    /// Capacity of the device-writable buffers.
    writable: u64,
    active: bool,
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
            t.translate(addr, len).map_err(|source| VirtqueueError::RingUnmapped { part: name, source })
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
    pub fn reset_to(&mut self, base: RingPos) -> Result<(), VirtqueueError> {
        if base.index >= self.ring.size {
            return Err(VirtqueueError::PositionOutOfRange { part: "avail", index: base.index, size: self.ring.size });
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
        let slot = self.next_avail.index;
        let flags = PackedDesc::avail_flags(d.flags, self.next_avail.wrap);
        let at = usize::from(slot) * 16;
        let raw = d.to_bytes();
        // SAFETY: slot < size, inside the ring; flags 2-byte aligned.
        unsafe {
            std::ptr::write_volatile(self.desc.add(at).cast::<[u8; 14]>(), raw[..14].try_into().unwrap_or([0; 14]));
            if self.pending.is_none() {
                self.pending = Some((slot, flags));
            } else {
                // Unreachable to the device until the burst's first flags are released.
                store_u16(self.desc.add(at + FLAGS_OFFSET), flags, Ordering::Relaxed);
            }
        }
        self.next_avail = self.next_avail.advance(1, self.ring.size);
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
        let mut cap = 0u64;
        for (i, &(addr, len)) in readable.iter().chain(writable).enumerate() {
            let w = i >= readable.len();
            if w {
                cap += u64::from(len);
            }
            let flags = if w { VIRTQ_DESC_F_WRITE } else { 0 } | if i + 1 < n { VIRTQ_DESC_F_NEXT } else { 0 };
            // The id goes in every descriptor; the device reads it from the last one.
            self.put(PackedDesc { addr, len, id, flags });
        }
        self.commit(id, n as u16, cap);
        Ok(id)
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
        self.put(PackedDesc { addr, len: (n * 16) as u32, id, flags: VIRTQ_DESC_F_INDIRECT });
        self.commit(id, 1, cap);
        Ok(id)
    }

    fn commit(&mut self, id: u16, slots: u16, writable: u64) {
        self.ids[usize::from(id)] = IdState { slots, writable, active: true };
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
            // SAFETY: as above.
            let d = unsafe { PackedDesc::read(self.desc.add(at)) };
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
