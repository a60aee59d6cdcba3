//! The device side of a packed ring: what a back-end runs. Pops available lists (direct,
//! NEXT-chained in consecutive slots, or one INDIRECT descriptor) into the same
//! [`ChainBatch`] the split ring fills, writes one used descriptor per completed buffer (in any
//! order) and makes a burst visible with one release store — the first used descriptor's flags,
//! written last — then decides from the driver's event suppression structure whether to notify.

use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, RwLock};

use super::inflight::{PackedInflightQueue, SavedList};
use super::{avail_bits, event_wants, is_avail, used_bits, PackedBase, RingPos, FLAGS_OFFSET};
use super::{EVENT_SUPPRESS_SIZE, MAX_PACKED_QUEUE_SIZE, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE};
use super::{RING_EVENT_FLAGS_ENABLE, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED};
use crate::memory::{AddressSpace, DirtyLog, Iotlb, MemoryError, MemoryTable};
use crate::virtqueue::buffers::{Buffers, ChainAcc};
use crate::virtqueue::device::{prefix, Chain, ChainBatch, RingAddressSpace};
use crate::virtqueue::error::VirtqueueError;
use crate::virtqueue::layout::{load_u16, store_u16, DESC_SIZE};
use crate::virtqueue::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

/// What a device-side packed queue is set up from (SET_VRING_NUM / ADDR / BASE and features).
#[derive(Clone, Copy, Debug)]
pub struct PackedQueueConfig {
    /// Ring size (1..=32768, any value).
    pub size: u16,
    /// Descriptor ring address (SET_VRING_ADDR `desc_user_addr`).
    pub desc_addr: u64,
    /// Driver event suppression area (SET_VRING_ADDR `avail_user_addr`).
    pub driver_event_addr: u64,
    /// Device event suppression area (SET_VRING_ADDR `used_user_addr`).
    pub device_event_addr: u64,
    /// Address space of the three addresses.
    pub addr_space: RingAddressSpace,
    /// VIRTIO_F_RING_EVENT_IDX negotiated (enables RING_EVENT_FLAGS_DESC).
    pub event_idx: bool,
    /// VIRTIO_F_INDIRECT_DESC negotiated.
    pub indirect: bool,
    /// SET_VRING_BASE: where to read the next available and write the next used descriptor.
    pub base: PackedBase,
}

/// Per buffer id: popped and not completed, and how many ring slots its list took.
#[derive(Clone, Copy, Debug, Default)]
struct IdState {
    busy: bool,
    slots: u16,
}

/// The device side of one packed ring.
#[derive(Debug)]
pub struct PackedDeviceQueue {
    memory: Arc<MemoryTable>,
    size: u16,
    desc: *mut u8,
    driver_event: *mut u8,
    device_event: *mut u8,
    /// Guest address of the descriptor ring (used descriptors are logged there).
    desc_gpa: u64,
    next_avail: RingPos,
    next_used: RingPos,
    /// Where the driver last heard about (old position of the notification decision), `None`
    /// right after (re)start: then the first burst always notifies.
    signalled_used: Option<RingPos>,
    /// Slot and flags of the first used descriptor of the burst not yet published: its flags
    /// are stored last, with release, so the driver sees the whole burst at once.
    pending: Option<(u16, u16)>,
    in_flight: u16,
    /// Ring slots taken by the lists in flight (≤ size).
    in_flight_slots: u32,
    ids: Vec<IdState>,
    /// Device event flags as last written (ENABLE, DISABLE or DESC).
    event_flags: Option<u16>,
    event_idx: bool,
    indirect: bool,
    broken: bool,
    data_log: Option<DirtyLog>,
    ring_log: Option<(DirtyLog, u64)>,
    iotlb: Option<Arc<RwLock<Iotlb>>>,
    inflight: Option<Box<Inflight>>,
}

/// Inflight tracking state of a packed ring (see [`PackedDeviceQueue::attach_inflight`]).
#[derive(Debug)]
struct Inflight {
    region: PackedInflightQueue,
    counter: u64,
    /// Lists to hand out again before new available ones, oldest last (popped from the end).
    resubmit: Vec<SavedList>,
    /// Ids completed since the last publish.
    unpublished: Vec<u16>,
    /// The descriptors of the list being walked (copied into the region once it is popped).
    descs: Vec<PackedDesc>,
}

// SAFETY: the ring pointers point into mappings owned by `memory` (an Arc), which lives as long
// as the queue; all shared-memory access is through raw pointers and atomics.
unsafe impl Send for PackedDeviceQueue {}

impl PackedDeviceQueue {
    /// Sets a ring up: validates the size, alignments (ring 16, event areas 4) and base, and
    /// translates the three parts once (each inside one mapping).
    pub fn new(memory: Arc<MemoryTable>, cfg: PackedQueueConfig) -> Result<PackedDeviceQueue, VirtqueueError> {
        let size = cfg.size;
        if size == 0 || size > MAX_PACKED_QUEUE_SIZE {
            return Err(VirtqueueError::InvalidSize(size.into()));
        }
        cfg.base.check(size)?;
        let parts = [
            ("desc", cfg.desc_addr, 16, DESC_SIZE * u64::from(size)),
            ("driver event", cfg.driver_event_addr, 4, EVENT_SUPPRESS_SIZE),
            ("device event", cfg.device_event_addr, 4, EVENT_SUPPRESS_SIZE),
        ];
        let mut ptrs = [std::ptr::null_mut(); 3];
        for (i, (part, addr, align, len)) in parts.into_iter().enumerate() {
            if addr % align != 0 {
                return Err(VirtqueueError::Misaligned { part, addr, align });
            }
            let p = match cfg.addr_space {
                RingAddressSpace::User => memory.translate_user(addr, len),
                RingAddressSpace::Guest => memory.translate(addr, len),
            };
            ptrs[i] = p.map_err(|source| VirtqueueError::RingUnmapped { part, source })?;
        }
        let desc_gpa = match cfg.addr_space {
            RingAddressSpace::Guest => cfg.desc_addr,
            // Translated just above, so the region is there.
            RingAddressSpace::User => memory.user_to_guest(cfg.desc_addr).unwrap_or_default(),
        };
        Ok(PackedDeviceQueue {
            memory,
            size,
            desc: ptrs[0],
            driver_event: ptrs[1],
            device_event: ptrs[2],
            desc_gpa,
            next_avail: cfg.base.avail,
            next_used: cfg.base.used,
            signalled_used: None,
            pending: None,
            in_flight: 0,
            in_flight_slots: 0,
            ids: vec![IdState::default(); usize::from(size)],
            event_flags: None,
            event_idx: cfg.event_idx,
            indirect: cfg.indirect,
            broken: false,
            data_log: None,
            ring_log: None,
            iotlb: None,
            inflight: None,
        })
    }

    /// Tracks this ring in an inflight buffer region (INFLIGHT_SHMFD, packed layout). Call
    /// before popping anything. A region left by an earlier back-end is validated and settled;
    /// its unfinished lists become in flight again and are popped first (rebuilt from the
    /// region's copies, checked as if the driver had just made them available), the used
    /// position becomes the region's and the available position follows the lists in flight
    /// (overriding SET_VRING_BASE, as for split rings). Returns the number of lists to resubmit.
    pub fn attach_inflight(&mut self, mut region: PackedInflightQueue) -> Result<usize, VirtqueueError> {
        if self.in_flight != 0 {
            return Err(VirtqueueError::InflightCorrupt("attached to a ring with chains in flight"));
        }
        let desc = self.desc;
        let recovery = region.recover(self.next_used, |slot| {
            // SAFETY: the region validated slot < size (its used index); inside the ring.
            unsafe { load_u16(desc.add(usize::from(slot) * 16 + FLAGS_OFFSET), Ordering::Acquire) }
        })?;
        let mut slots = 0u32;
        for l in &recovery.resubmit {
            // Ids and slot totals were checked by `recover` (unique, < size, ≤ size slots).
            self.ids[usize::from(l.id)] = IdState { busy: true, slots: l.slots };
            slots += u32::from(l.slots);
        }
        let n = recovery.resubmit.len();
        self.in_flight = n as u16;
        self.in_flight_slots = slots;
        self.next_used = recovery.used;
        self.next_avail = recovery.used.advance(slots as u16, self.size);
        self.signalled_used = None;
        let mut resubmit = recovery.resubmit;
        resubmit.reverse();
        self.inflight = Some(Box::new(Inflight {
            region,
            counter: recovery.counter,
            resubmit,
            unpublished: Vec::with_capacity(usize::from(self.size)),
            descs: Vec::new(),
        }));
        Ok(n)
    }

    /// ACCESS_PLATFORM: translate descriptor addresses (IOVAs) through `iotlb`; a miss makes
    /// `pop_batch` return [`VirtqueueError::IotlbMiss`] without consuming the list.
    pub fn set_iotlb(&mut self, iotlb: Option<Arc<RwLock<Iotlb>>>) {
        self.iotlb = iotlb;
    }

    /// The IOTLB set by [`set_iotlb`](Self::set_iotlb).
    pub fn iotlb(&self) -> Option<&Arc<RwLock<Iotlb>>> {
        self.iotlb.as_ref()
    }

    /// LOG_ALL: log every byte written into guest buffers in `data`. VHOST_VRING_F_LOG: log the
    /// ring writes in `ring`, whose address is SET_VRING_ADDR's `log_guest_addr` — for a packed
    /// ring the guest address of the device event area (what `used_user_addr` points at); used
    /// descriptors are logged at the descriptor ring's own guest address, since that is where
    /// the device writes them.
    pub fn set_dirty_log(&mut self, data: Option<DirtyLog>, ring: Option<(DirtyLog, u64)>) {
        self.data_log = data.filter(|_| !crate::memory::data_logging_disabled_for_tests());
        self.ring_log = ring;
    }

    /// Ring size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// GET_VRING_BASE's answer: next available and next used positions with their wrap counters.
    pub fn base(&self) -> PackedBase {
        PackedBase { avail: self.next_avail, used: self.next_used }
    }

    /// Lists popped and not completed.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// Whether an earlier error stopped this queue.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Stops processing this queue.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// The memory table the ring was translated against.
    pub fn memory(&self) -> &Arc<MemoryTable> {
        &self.memory
    }

    fn fail(&mut self, err: VirtqueueError) -> VirtqueueError {
        self.broken = true;
        err
    }

    /// Flags of slot `slot`, loaded with acquire: seeing them available makes the list's other
    /// descriptors (written before, flags of the first last) visible too.
    #[inline(always)]
    fn flags_acquire(&self, slot: u16) -> u16 {
        // SAFETY: slot < size, inside the translated ring; flags are 2-byte aligned.
        unsafe { load_u16(self.desc.add(usize::from(slot) * 16 + FLAGS_OFFSET), Ordering::Acquire) }
    }

    /// Whether the driver made a descriptor available that was not popped yet (one acquire
    /// load; what a polling worker checks instead of sleeping on the kick eventfd).
    pub fn avail_pending(&self) -> bool {
        !self.broken && is_avail(self.flags_acquire(self.next_avail.index), self.next_avail.wrap)
    }

    /// Pops up to `max` available lists into `batch` (appending); `Chain::head` is the buffer
    /// id. A malformed list breaks the queue and is reported; lists popped before it in this
    /// call stay in the batch and may still be completed.
    pub fn pop_batch(&mut self, batch: &mut ChainBatch, max: usize) -> Result<usize, VirtqueueError> {
        if self.broken {
            return Err(VirtqueueError::Broken);
        }
        if self.inflight.is_some() {
            return self.pop_batch_tracked(batch, max);
        }
        // The common case, no inflight region: `walk` inlined with nothing to save.
        let mut popped = 0usize;
        while popped < max {
            let pos = self.next_avail;
            let flags = self.flags_acquire(pos.index);
            if !is_avail(flags, pos.wrap) {
                break;
            }
            let first = batch.segments.len();
            match self.walk(batch, first, pos, flags, None) {
                Ok(()) => popped += 1,
                Err(e) => return self.pop_failed(batch, first, popped, e),
            }
        }
        Ok(popped)
    }

    /// `pop_batch` with an inflight region: every list popped is copied into it.
    #[inline(never)]
    fn pop_batch_tracked(&mut self, batch: &mut ChainBatch, max: usize) -> Result<usize, VirtqueueError> {
        let mut popped = 0usize;
        if self.inflight.as_ref().is_some_and(|i| !i.resubmit.is_empty()) {
            popped = self.pop_resubmitted(batch, max)?;
        }
        while popped < max {
            let pos = self.next_avail;
            let flags = self.flags_acquire(pos.index);
            if !is_avail(flags, pos.wrap) {
                break;
            }
            let first = batch.segments.len();
            let Some(mut descs) = self.inflight.as_mut().map(|i| std::mem::take(&mut i.descs)) else { break };
            let walked = self.walk(batch, first, pos, flags, Some(&mut descs));
            let Some(inf) = self.inflight.as_mut() else { break };
            let walked = match walked {
                Ok(()) => {
                    // `walk` pushed the chain: its head is the buffer id.
                    let id = batch.chains.last().map_or(0, |c| c.head);
                    inf.counter += 1;
                    let r = inf.region.fetched(id, inf.counter, &descs);
                    if r.is_err() {
                        // Not popped after all: the region could not record it.
                        batch.chains.pop();
                        self.undo_last_pop(id);
                    }
                    r
                }
                Err(e) => Err(e),
            };
            descs.clear();
            if let Some(inf) = self.inflight.as_mut() {
                inf.descs = descs;
            }
            match walked {
                Ok(()) => popped += 1,
                Err(e) => return self.pop_failed(batch, first, popped, e),
            }
        }
        Ok(popped)
    }

    /// A list could not be popped: its segments are dropped; an IOTLB miss leaves it to be
    /// walked again once the entry arrives, anything else breaks the queue.
    #[cold]
    fn pop_failed(
        &mut self,
        batch: &mut ChainBatch,
        first: usize,
        popped: usize,
        e: VirtqueueError,
    ) -> Result<usize, VirtqueueError> {
        batch.segments.truncate(first);
        if let VirtqueueError::IotlbMiss { .. } = e {
            return if popped > 0 { Ok(popped) } else { Err(e) };
        }
        Err(self.fail(e))
    }

    /// Reverts the bookkeeping of the list just popped (buffer `id`), for `pop_batch_tracked`.
    #[cold]
    fn undo_last_pop(&mut self, id: u16) {
        let Some(s) = self.ids.get_mut(usize::from(id)) else { return };
        let slots = s.slots;
        *s = IdState::default();
        self.in_flight -= 1;
        self.in_flight_slots -= u32::from(slots);
        self.next_avail = self.next_avail.retreat(slots, self.size);
    }

    /// Pops lists a crashed back-end left in flight (already counted in flight), oldest first.
    fn pop_resubmitted(&mut self, batch: &mut ChainBatch, max: usize) -> Result<usize, VirtqueueError> {
        let mut popped = 0;
        while popped < max {
            let Some(list) = self.inflight.as_mut().and_then(|i| i.resubmit.pop()) else { break };
            let first = batch.segments.len();
            match self.walk_saved(batch, first, &list) {
                Ok(()) => popped += 1,
                Err(e) => {
                    batch.segments.truncate(first);
                    if let VirtqueueError::IotlbMiss { .. } = e {
                        // Walked again once the entry arrives.
                        if let Some(i) = self.inflight.as_mut() {
                            i.resubmit.push(list);
                        }
                        return if popped > 0 { Ok(popped) } else { Err(e) };
                    }
                    return Err(self.fail(e));
                }
            }
        }
        Ok(popped)
    }

    /// A list saved in the inflight region, checked as a ring list is (the region is as
    /// untrusted as the ring).
    fn walk_saved(&self, batch: &mut ChainBatch, first: usize, list: &SavedList) -> Result<(), VirtqueueError> {
        let buffers = Buffers { memory: &self.memory, iotlb: self.iotlb.as_deref() };
        let head = list.id;
        let mut acc = ChainAcc::new(first);
        for (k, d) in list.descs.iter().enumerate() {
            if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if !self.indirect {
                    return Err(VirtqueueError::IndirectNotNegotiated { head });
                }
                if d.flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(VirtqueueError::IndirectWithNext { head });
                }
                if k > 0 || list.descs.len() > 1 {
                    return Err(VirtqueueError::IndirectInList { head });
                }
                self.walk_table(&buffers, &mut acc, batch, head, d)?;
            } else {
                acc.add(&buffers, head, d.addr, d.len, d.flags & VIRTQ_DESC_F_WRITE != 0, &mut batch.segments)?;
            }
        }
        let chain: Chain = acc.finish(head, &batch.segments);
        batch.chains.push(chain);
        Ok(())
    }

    /// Hands lists back to the driver unused: if `ids` are exactly the last lists popped, in
    /// pop order (what a device that kept RX buffers holds when its ring stops), the available
    /// position is rewound over their slots — which still hold the driver's descriptors: used
    /// descriptors only ever land in slots of lists consumed before them — so GET_VRING_BASE
    /// resumes with them. Returns false, changing nothing, otherwise.
    pub fn return_chains(&mut self, ids: &[u16]) -> bool {
        if ids.is_empty() {
            return true;
        }
        if ids.len() > usize::from(self.in_flight) || self.broken {
            return false;
        }
        let size = self.size;
        let mut pos = self.next_avail;
        let mut slots_back = 0u32;
        for &id in ids.iter().rev() {
            let Some(&IdState { busy: true, slots }) = self.ids.get(usize::from(id)) else { return false };
            slots_back += u32::from(slots);
            if slots_back > self.in_flight_slots {
                return false;
            }
            // The list's last slot carries its id.
            let last = pos.retreat(1, size);
            pos = pos.retreat(slots, size);
            // SAFETY: last.index < size, inside the ring.
            let d = unsafe { PackedDesc::read(self.desc.add(usize::from(last.index) * 16)) };
            if d.id != id || !is_avail(d.flags, last.wrap) {
                return false;
            }
        }
        for &id in ids {
            self.ids[usize::from(id)].busy = false;
            if let Some(inf) = self.inflight.as_mut() {
                inf.region.returned(id);
            }
        }
        self.next_avail = pos;
        self.in_flight -= ids.len() as u16;
        self.in_flight_slots -= slots_back;
        true
    }

    /// Walks the list at `pos`, whose first descriptor's flags `flags` were loaded with acquire
    /// and are available: each descriptor read once into a local copy and checked there (the
    /// first one's flags are the acquired ones, not read again). On success the chain is in
    /// `batch` and the list popped (id busy, counted in flight, `next_avail` past it); on error
    /// nothing is committed. With `saved`, every descriptor read is appended to it too (for the
    /// inflight region).
    #[inline(always)]
    fn walk(
        &mut self,
        batch: &mut ChainBatch,
        first: usize,
        mut pos: RingPos,
        flags: u16,
        mut saved: Option<&mut Vec<PackedDesc>>,
    ) -> Result<(), VirtqueueError> {
        let buffers = Buffers { memory: &self.memory, iotlb: self.iotlb.as_deref() };
        let size = self.size;
        let head = pos.index;
        let mut acc = ChainAcc::new(first);
        let mut slots = 0u16;
        // SAFETY: pos.index < size, inside the translated ring.
        let mut d = unsafe { PackedDesc::read_after_flags(self.desc.add(usize::from(pos.index) * 16), flags) };
        let (id, end) = loop {
            slots += 1;
            if let Some(v) = saved.as_mut() {
                v.push(d);
            }
            pos = pos.advance(1, size);
            if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if !self.indirect {
                    return Err(VirtqueueError::IndirectNotNegotiated { head });
                }
                if d.flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(VirtqueueError::IndirectWithNext { head });
                }
                if slots > 1 {
                    return Err(VirtqueueError::IndirectInList { head });
                }
                self.walk_table(&buffers, &mut acc, batch, head, &d)?;
                break (d.id, pos);
            }
            let writable = d.flags & VIRTQ_DESC_F_WRITE != 0;
            acc.add(&buffers, head, d.addr, d.len, writable, &mut batch.segments)?;
            if d.flags & VIRTQ_DESC_F_NEXT == 0 {
                // The buffer id is in the list's last descriptor.
                break (d.id, pos);
            }
            // A list never ends if the driver keeps setting NEXT: at most `size` slots (§7.9 #4;
            // virtio 1.2 §2.8.17 "MUST NOT create a descriptor list longer than the Queue Size").
            if slots == size {
                return Err(VirtqueueError::ChainTooLong { head, limit: size.into() });
            }
            // SAFETY: pos.index < size, inside the translated ring.
            d = unsafe { PackedDesc::read(self.desc.add(usize::from(pos.index) * 16)) };
            // Every descriptor of the list carries the driver's wrap counter of its own slot
            // (virtio 1.2 §2.8.6): a list running into slots of another lap is not the
            // driver's to give. (The first descriptor's flags, stored last by the driver with
            // release, make the others visible: §2.8.21.)
            if !is_avail(d.flags, pos.wrap) {
                return Err(VirtqueueError::NotAvailable { head, slot: pos.index, flags: d.flags, wrap: pos.wrap });
            }
        };
        // Ids name per-buffer state; virtio 1.2 §2.8.22's reference driver keeps them below the
        // queue size, as every driver does.
        let state = match self.ids.get_mut(usize::from(id)) {
            None => return Err(VirtqueueError::HeadOutOfRange { head: id, size }),
            // CVE-2016-5403 class: an id handed out twice.
            Some(s) if s.busy => return Err(VirtqueueError::HeadInFlight { head: id, state: "already in flight" }),
            Some(s) => s,
        };
        // The slots between next_used and next_avail belong to the device; more than the ring
        // means the driver reused slots the device has not given back.
        let in_flight_slots = self.in_flight_slots + u32::from(slots);
        if in_flight_slots > u32::from(size) {
            return Err(VirtqueueError::TooManyInFlight { size });
        }
        *state = IdState { busy: true, slots };
        self.in_flight_slots = in_flight_slots;
        self.in_flight += 1;
        self.next_avail = end;
        let chain: Chain = acc.finish(id, &batch.segments);
        batch.chains.push(chain);
        Ok(())
    }

    /// An indirect table: `len / 16` packed descriptors in a row, copied privately first. Only
    /// WRITE is meaningful inside (virtio 1.2 §2.8.7: NEXT and the id are ignored), INDIRECT is
    /// refused (one level only, §7.9 #6).
    fn walk_table(
        &self,
        buffers: &Buffers<'_>,
        acc: &mut ChainAcc,
        batch: &mut ChainBatch,
        head: u16,
        d: &PackedDesc,
    ) -> Result<(), VirtqueueError> {
        let max = u32::from(self.size) * 16;
        if d.len == 0 || d.len % 16 != 0 || d.len > max {
            return Err(VirtqueueError::IndirectTableSize { head, len: d.len, max });
        }
        let mut table = std::mem::take(&mut batch.scratch);
        table.resize(d.len as usize, 0);
        let result = buffers.read_table(head, d.addr, d.len, &mut table).and_then(|()| {
            // Peer quirk (DPDK's virtio PMD, packed TX through an indirect table): entries keep
            // the WRITE flag their set-up gave them — the net header (entry 0), and the entry
            // whose index equals the list's ring slot, whose flags it skips writing — among
            // readable ones. Writable entries come last (virtio 1.2 §2.8.18), so a table with a
            // readable entry after a writable one has no consistent writable part: it is read
            // as all readable. This only ever takes write access away from the device.
            let mut seen_write = false;
            let misordered = table.chunks_exact(16).any(|raw| {
                let write = raw[14] & (VIRTQ_DESC_F_WRITE as u8) != 0;
                let after = seen_write && !write;
                seen_write |= write;
                after
            });
            let write_mask = if misordered { 0 } else { VIRTQ_DESC_F_WRITE };
            for raw in table.chunks_exact(16) {
                let e = PackedDesc::from_bytes(raw.try_into().map_err(|_| VirtqueueError::Broken)?);
                if e.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                    return Err(VirtqueueError::NestedIndirect { head });
                }
                acc.add(buffers, head, e.addr, e.len, e.flags & write_mask != 0, &mut batch.segments)?;
            }
            Ok(())
        });
        batch.scratch = table;
        result
    }

    /// Writes one used descriptor for buffer `id` (not yet visible to the driver if it is the
    /// first of the burst: see [`publish_used`](Self::publish_used)) and moves the used
    /// position on by the slots the list took (virtio 1.2 §2.8.6).
    pub fn add_used(&mut self, id: u16, len: u32) -> Result<(), VirtqueueError> {
        if self.broken {
            return Err(VirtqueueError::Broken);
        }
        let slots = match self.ids.get_mut(usize::from(id)) {
            None => return Err(VirtqueueError::HeadOutOfRange { head: id, size: self.size }),
            Some(s) if !s.busy => return Err(VirtqueueError::HeadInFlight { head: id, state: "not in flight" }),
            Some(s) => {
                s.busy = false;
                s.slots
            }
        };
        let slot = self.next_used.index;
        // WRITE in a used descriptor says the device wrote something (§2.8.4): len is valid.
        let flags = used_bits(self.next_used.wrap) | if len > 0 { VIRTQ_DESC_F_WRITE } else { 0 };
        let at = usize::from(slot) * 16;
        // SAFETY: slot < size, inside the translated ring.
        unsafe {
            let p = self.desc.add(at + 8);
            if self.pending.is_none() {
                // The burst's first: its flags are stored last, by publish_used.
                std::ptr::write_volatile(p.cast::<[u8; 4]>(), len.to_le_bytes());
                std::ptr::write_volatile(p.add(4).cast::<[u8; 2]>(), id.to_le_bytes());
                self.pending = Some((slot, flags));
            } else {
                // Unreachable to the driver until the burst's first flags are released (the
                // driver reads used descriptors in ring order, §2.8.6): len, id and flags in
                // one store.
                let v = u64::from(len) | u64::from(id) << 32 | u64::from(flags) << 48;
                std::ptr::write_volatile(p.cast::<[u8; 8]>(), v.to_le_bytes());
            }
        }
        if self.ring_log.is_some() || self.inflight.is_some() {
            self.add_used_extras(id, at)?;
        }
        self.next_used = self.next_used.advance(slots, self.size);
        // The id was busy: its list is counted in both (≥ 1 and ≥ its slots).
        self.in_flight = self.in_flight.wrapping_sub(1);
        self.in_flight_slots = self.in_flight_slots.wrapping_sub(u32::from(slots));
        Ok(())
    }

    /// The optional parts of `add_used` (VHOST_VRING_F_LOG, inflight region), out of line so
    /// the common path keeps few registers.
    #[inline(never)]
    fn add_used_extras(&mut self, id: u16, at: usize) -> Result<(), VirtqueueError> {
        self.log_ring(self.desc_gpa, at as u64 + 8, 8)?;
        if let Some(inf) = self.inflight.as_mut() {
            inf.region.completed(id);
            inf.unpublished.push(id);
        }
        Ok(())
    }

    /// Completes a chain of `batch` with used length `len`; with LOG_ALL logs every writable
    /// buffer of the chain whole (as the split ring's `complete` does, for the same reason).
    pub fn complete(&mut self, batch: &ChainBatch, chain: &Chain, len: u32) -> Result<(), VirtqueueError> {
        let len = len.min(chain.writable_len);
        self.complete_with(chain.head, batch.writable(chain).iter().map(|s| (s.gpa, s.len)), len)
    }

    /// Completes a chain whose device wrote exactly its first `len` writable bytes: only those
    /// are logged.
    pub fn complete_prefix(&mut self, batch: &ChainBatch, chain: &Chain, len: u32) -> Result<(), VirtqueueError> {
        let len = len.min(chain.writable_len);
        self.complete_with(chain.head, prefix(batch.writable(chain).iter().map(|s| (s.gpa, s.len)), len), len)
    }

    /// Completes buffer `id` with used length `len`, logging `written` first (LOG_ALL).
    pub fn complete_with(
        &mut self,
        id: u16,
        written: impl IntoIterator<Item = (u64, u32)>,
        len: u32,
    ) -> Result<(), VirtqueueError> {
        if let Some(log) = &self.data_log {
            for (gpa, n) in written {
                log.mark(gpa, u64::from(n))?;
            }
        }
        self.add_used(id, len)
    }

    fn log_ring(&self, base: u64, offset: u64, len: u64) -> Result<(), VirtqueueError> {
        if let Some((log, _)) = &self.ring_log {
            let gpa = base.checked_add(offset).ok_or(MemoryError::Overflow {
                space: AddressSpace::Guest,
                addr: base,
                len: offset,
            })?;
            log.mark(gpa, len)?;
        }
        Ok(())
    }

    /// Makes the used descriptors written since the last call visible (one release store: the
    /// first one's flags) and says whether the driver must be notified, from the driver event
    /// suppression structure. An invalid structure (reserved flags, offset beyond the ring) is
    /// reported after the descriptors are published, and breaks the queue.
    pub fn publish_used(&mut self) -> Result<bool, VirtqueueError> {
        let Some((slot, flags)) = self.pending.take() else { return Ok(false) };
        if let Some(inf) = self.inflight.as_ref() {
            inf.region.publishing(self.next_used);
        }
        // SAFETY: slot < size, inside the ring.
        unsafe { store_u16(self.desc.add(usize::from(slot) * 16 + FLAGS_OFFSET), flags, Ordering::Release) };
        if let Some(inf) = self.inflight.as_mut() {
            inf.region.published(&inf.unpublished, self.next_used);
            inf.unpublished.clear();
        }
        self.log_ring(self.desc_gpa, u64::from(slot) * 16 + 8, 8)?;
        let old = self.signalled_used.replace(self.next_used);
        // The flags store must be visible before reading the driver's suppression state.
        fence(Ordering::SeqCst);
        let Some(old) = old else { return Ok(true) };
        // SAFETY: the driver event area was translated with its 4 bytes, 4-byte aligned.
        let wants = unsafe { event_wants(self.driver_event, "driver", self.event_idx, self.size, old, self.next_used) };
        wants.map_err(|e| self.fail(e))
    }

    fn write_device_event(&mut self, off_wrap: Option<u16>, flags: u16) -> Result<(), VirtqueueError> {
        // SAFETY: the device event area was translated with its 4 bytes, 4-byte aligned.
        unsafe {
            if let Some(v) = off_wrap {
                store_u16(self.device_event, v, Ordering::Relaxed);
            }
            if self.event_flags != Some(flags) {
                store_u16(self.device_event.add(2), flags, Ordering::Relaxed);
                self.event_flags = Some(flags);
            }
        }
        if let Some((_, event_gpa)) = &self.ring_log {
            self.log_ring(*event_gpa, 0, EVENT_SUPPRESS_SIZE)?;
        }
        Ok(())
    }

    /// Asks the driver not to notify (RING_EVENT_FLAGS_DISABLE) while the device polls anyway.
    pub fn disable_notifications(&mut self) -> Result<(), VirtqueueError> {
        if !self.broken && self.event_flags != Some(RING_EVENT_FLAGS_DISABLE) {
            self.write_device_event(None, RING_EVENT_FLAGS_DISABLE)?;
        }
        Ok(())
    }

    /// Re-arms notifications (ENABLE, or with EVENT_IDX DESC at the next available position),
    /// then re-reads the next slot after a full barrier: `true` means more arrived meanwhile and
    /// the caller must drain again instead of sleeping (no lost notification).
    pub fn enable_notifications(&mut self) -> Result<bool, VirtqueueError> {
        if self.broken {
            return Err(VirtqueueError::Broken);
        }
        if self.event_idx {
            self.write_device_event(Some(self.next_avail.encode()), RING_EVENT_FLAGS_DESC)?;
        } else {
            self.write_device_event(None, RING_EVENT_FLAGS_ENABLE)?;
        }
        fence(Ordering::SeqCst);
        Ok(self.avail_pending())
    }

    /// The disable → drain → enable → re-check loop, as [`crate::virtqueue::DeviceQueue::drain`].
    pub fn drain<F>(&mut self, batch: &mut ChainBatch, max_batch: usize, mut handle: F) -> Result<bool, VirtqueueError>
    where
        F: FnMut(&mut PackedDeviceQueue, &ChainBatch) -> Result<(), VirtqueueError>,
    {
        let mut notify = false;
        loop {
            self.disable_notifications()?;
            loop {
                batch.clear();
                let n = self.pop_batch(batch, max_batch)?;
                if n == 0 {
                    break;
                }
                handle(self, batch)?;
                notify |= self.publish_used()?;
            }
            if !self.enable_notifications()? {
                return Ok(notify);
            }
        }
    }
}

/// A packed descriptor as read (once) from guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedDesc {
    /// Buffer address (unused in a used descriptor).
    pub addr: u64,
    /// Buffer length (written length in a used descriptor).
    pub len: u32,
    /// Buffer id (meaningful in the last descriptor of a list).
    pub id: u16,
    /// NEXT / WRITE / INDIRECT / AVAIL / USED.
    pub flags: u16,
}

impl PackedDesc {
    /// Reads the 16 bytes at `p` once.
    ///
    /// # Safety
    /// `p..p+16` must be inside a live mapping.
    #[inline(always)]
    pub unsafe fn read(p: *const u8) -> PackedDesc {
        let raw: [u8; 16] = std::ptr::read_volatile(p.cast::<[u8; 16]>());
        PackedDesc::from_bytes(&raw)
    }

    /// Reads the 12 bytes before the flags at `p` once; `flags` are the ones already loaded
    /// (with acquire: the rest of the descriptor is read after them).
    ///
    /// # Safety
    /// `p..p+16` must be inside a live mapping.
    #[inline(always)]
    pub unsafe fn read_after_flags(p: *const u8, flags: u16) -> PackedDesc {
        let addr: [u8; 8] = std::ptr::read_volatile(p.cast::<[u8; 8]>());
        let rest: [u8; 4] = std::ptr::read_volatile(p.add(8).cast::<[u8; 4]>());
        let id: [u8; 2] = std::ptr::read_volatile(p.add(12).cast::<[u8; 2]>());
        PackedDesc { addr: u64::from_le_bytes(addr), len: u32::from_le_bytes(rest), id: u16::from_le_bytes(id), flags }
    }

    /// Decodes 16 little-endian bytes.
    #[inline(always)]
    pub fn from_bytes(raw: &[u8; 16]) -> PackedDesc {
        PackedDesc {
            addr: u64::from_le_bytes([raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7]]),
            len: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            id: u16::from_le_bytes([raw[12], raw[13]]),
            flags: u16::from_le_bytes([raw[14], raw[15]]),
        }
    }

    /// The 16 little-endian bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&self.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&self.len.to_le_bytes());
        raw[12..14].copy_from_slice(&self.id.to_le_bytes());
        raw[14..16].copy_from_slice(&self.flags.to_le_bytes());
        raw
    }

    /// An available descriptor's flags: `extra` (NEXT/WRITE/INDIRECT) plus AVAIL/USED for
    /// driver wrap counter `wrap`.
    pub fn avail_flags(extra: u16, wrap: bool) -> u16 {
        (extra & !(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) | avail_bits(wrap)
    }
}
