//! The device side of a split ring: what a back-end runs. Pops available chains in batches,
//! walks them (direct and indirect) into readable and writable segments, writes used entries and
//! publishes `used.idx` once per batch, and decides when to notify the driver.

use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, RwLock};

use super::buffers::{Buffers, ChainAcc};
use super::error::VirtqueueError;
use super::inflight::InflightQueue;
use super::layout::*;
use crate::memory::Iotlb;
use crate::memory::{DirtyLog, MemoryError, MemoryTable};

/// Most segments one chain may have (QEMU's and libvhost-user's limit, §7.9 #15).
pub const MAX_SEGMENTS: usize = 1024;

/// Which address space SET_VRING_ADDR's ring addresses are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingAddressSpace {
    /// Front-end user addresses (the default).
    User,
    /// Guest physical addresses (GPA_ADDRESSES, or a front-end driving its own memory).
    Guest,
}

/// What a device-side queue is set up from (SET_VRING_NUM / ADDR / BASE and the features).
#[derive(Clone, Copy, Debug)]
pub struct QueueConfig {
    /// Ring size (power of two, ≤ 32768).
    pub size: u16,
    /// Descriptor table address.
    pub desc_addr: u64,
    /// Available ring address.
    pub avail_addr: u64,
    /// Used ring address.
    pub used_addr: u64,
    /// Address space of the three addresses.
    pub addr_space: RingAddressSpace,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// VIRTIO_RING_F_INDIRECT_DESC negotiated.
    pub indirect: bool,
    /// SET_VRING_BASE: the next available index to process.
    pub next_avail: u16,
}

/// Walks the bytes `[skip, skip + len)` of a buffer made of `pieces` (host address, length):
/// calls `f(host, at, n)` for each run of `n` bytes at `host` that holds bytes `at..at + n` of
/// the range. Returns how many bytes the pieces held (less than `len` if they end first).
pub fn for_each_span(
    pieces: impl IntoIterator<Item = (*mut u8, usize)>,
    skip: usize,
    len: usize,
    mut f: impl FnMut(*mut u8, usize, usize),
) -> usize {
    let (mut skip, mut done) = (skip, 0usize);
    for (host, piece) in pieces {
        if done == len {
            break;
        }
        if skip >= piece {
            skip -= piece;
            continue;
        }
        let n = (piece - skip).min(len - done);
        // wrapping_add: only an address computation; `f` decides what to do with it.
        f(host.wrapping_add(skip), done, n);
        done += n;
        skip = 0;
    }
    done
}

/// The first `len` bytes of a buffer made of `pieces` (guest address, length), as ranges: what
/// a device that wrote exactly that prefix logs.
pub fn prefix(pieces: impl IntoIterator<Item = (u64, u32)>, len: u32) -> impl Iterator<Item = (u64, u32)> {
    let mut left = len;
    pieces.into_iter().map_while(move |(gpa, n)| {
        if left == 0 {
            return None;
        }
        let take = n.min(left);
        left -= take;
        Some((gpa, take))
    })
}

/// One contiguous piece of a buffer, already translated.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    /// Host address of the first byte (inside a mapping the queue keeps alive).
    pub host: *mut u8,
    /// Bytes.
    pub len: u32,
    /// Guest address of the first byte (for dirty logging).
    pub gpa: u64,
    /// Device-writable.
    pub writable: bool,
}

/// A popped chain: its head and where its segments are in the batch.
#[derive(Clone, Copy, Debug)]
pub struct Chain {
    /// Head descriptor index (what the used entry returns).
    pub head: u16,
    pub(super) first: u32,
    pub(super) readable: u32,
    pub(super) total: u32,
    /// Total bytes of the device-readable buffers.
    pub readable_len: u32,
    /// Total bytes of the device-writable buffers.
    pub writable_len: u32,
}

impl Chain {
    /// A chain with these lengths and no segments, for tests of code that only looks at the
    /// lengths.
    #[doc(hidden)]
    pub fn for_tests(head: u16, readable_len: u32, writable_len: u32) -> Chain {
        Chain { head, first: 0, readable: 0, total: 0, readable_len, writable_len }
    }
}

/// Reusable storage for a batch of chains, so popping allocates nothing once warmed up.
#[derive(Debug, Default)]
pub struct ChainBatch {
    pub(super) chains: Vec<Chain>,
    pub(super) segments: Vec<Segment>,
    /// Private copy of the indirect table being walked.
    pub(super) scratch: Vec<u8>,
}

// SAFETY: the raw pointers in segments point into mappings kept alive by the queue's
// `Arc<MemoryTable>`; a batch is only meaningful next to its queue.
unsafe impl Send for ChainBatch {}

impl ChainBatch {
    /// An empty batch.
    pub fn new() -> ChainBatch {
        ChainBatch::default()
    }

    /// Forgets the chains (keeps the storage).
    pub fn clear(&mut self) {
        self.chains.clear();
        self.segments.clear();
    }

    /// The chains popped into this batch.
    pub fn chains(&self) -> &[Chain] {
        &self.chains
    }

    /// Number of chains.
    pub fn len(&self) -> usize {
        self.chains.len()
    }

    /// Whether the batch has no chain.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// All segments of a chain, readable first.
    pub fn segments(&self, chain: &Chain) -> &[Segment] {
        &self.segments[chain.first as usize..(chain.first + chain.total) as usize]
    }

    /// The device-readable segments of a chain.
    pub fn readable(&self, chain: &Chain) -> &[Segment] {
        &self.segments[chain.first as usize..(chain.first + chain.readable) as usize]
    }

    /// The device-writable segments of a chain.
    pub fn writable(&self, chain: &Chain) -> &[Segment] {
        &self.segments[(chain.first + chain.readable) as usize..(chain.first + chain.total) as usize]
    }
}

/// The device side of one split ring.
#[derive(Debug)]
pub struct DeviceQueue {
    memory: Arc<MemoryTable>,
    size: u16,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    next_avail: u16,
    next_used: u16,
    published_used: u16,
    signalled_used: Option<u16>,
    in_flight: u16,
    /// Which heads are popped and not completed (one byte each: no allocation per chain).
    busy: Vec<bool>,
    event_idx: bool,
    indirect: bool,
    broken: bool,
    data_log: Option<DirtyLog>,
    used_log: Option<(DirtyLog, u64)>,
    inflight: Option<Inflight>,
    /// ACCESS_PLATFORM: descriptor addresses are IOVAs translated through this IOTLB.
    iotlb: Option<Arc<RwLock<Iotlb>>>,
}

/// Inflight tracking state of a ring (see [`DeviceQueue::attach_inflight`]).
#[derive(Debug)]
struct Inflight {
    region: InflightQueue,
    counter: u64,
    /// Heads to hand out again before new avail entries, oldest first (reversed: popped from
    /// the end).
    resubmit: Vec<u16>,
    /// Heads completed since the last publish.
    unpublished: Vec<u16>,
}

// SAFETY: the ring pointers point into mappings owned by `memory` (an Arc), which lives as long
// as the queue; all shared-memory access is through raw pointers and atomics.
unsafe impl Send for DeviceQueue {}

impl DeviceQueue {
    /// Sets a ring up: validates the size and alignments, translates the three ring parts once
    /// (each must lie inside one mapping), and reads the used index from the ring as
    /// libvhost-user does (SET_VRING_BASE only carries the available index).
    pub fn new(memory: Arc<MemoryTable>, cfg: QueueConfig) -> Result<DeviceQueue, VirtqueueError> {
        let size = cfg.size;
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(VirtqueueError::InvalidSize(size.into()));
        }
        let extra = if cfg.event_idx { 0 } else { 2 };
        let parts = [
            ("desc", cfg.desc_addr, 16, DESC_SIZE * u64::from(size)),
            ("avail", cfg.avail_addr, 2, avail_ring_size(size) - extra),
            ("used", cfg.used_addr, 4, used_ring_size(size) - extra),
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
        // SAFETY: the used ring was translated with at least 4 bytes.
        let next_used = unsafe { load_u16(ptrs[2].add(2), Ordering::Acquire) };
        Ok(DeviceQueue {
            memory,
            size,
            desc: ptrs[0],
            avail: ptrs[1],
            used: ptrs[2],
            next_avail: cfg.next_avail,
            next_used,
            published_used: next_used,
            signalled_used: None,
            in_flight: 0,
            busy: vec![false; usize::from(size)],
            event_idx: cfg.event_idx,
            indirect: cfg.indirect,
            broken: false,
            data_log: None,
            used_log: None,
            inflight: None,
            iotlb: None,
        })
    }

    /// ACCESS_PLATFORM: translate descriptor addresses (IOVAs) through `iotlb`. A buffer without
    /// an entry makes `pop_batch` return [`VirtqueueError::IotlbMiss`] without consuming the
    /// chain or breaking the queue: send a MISS, wait for the UPDATE, pop again.
    pub fn set_iotlb(&mut self, iotlb: Option<Arc<RwLock<Iotlb>>>) {
        self.iotlb = iotlb;
    }

    /// The IOTLB set by [`set_iotlb`](Self::set_iotlb).
    pub fn iotlb(&self) -> Option<&Arc<RwLock<Iotlb>>> {
        self.iotlb.as_ref()
    }

    /// Tracks this ring in an inflight buffer region (INFLIGHT_SHMFD). Call before popping
    /// anything. A region left by an earlier back-end is repaired, its unfinished heads become
    /// in flight again and are popped first, and the next avail index becomes
    /// `used.idx + unfinished` (overriding SET_VRING_BASE, as libvhost-user does: the front-end
    /// cannot know how far the crashed back-end got). Returns the number of heads to resubmit.
    pub fn attach_inflight(&mut self, mut region: InflightQueue) -> Result<usize, VirtqueueError> {
        if self.in_flight != 0 {
            return Err(VirtqueueError::InflightCorrupt("attached to a ring with chains in flight"));
        }
        let recovery = region.recover(self.next_used)?;
        let n = recovery.resubmit.len();
        for &head in &recovery.resubmit {
            self.busy[usize::from(head)] = true;
        }
        self.in_flight = n as u16;
        self.next_avail = self.next_used.wrapping_add(n as u16);
        let mut resubmit = recovery.resubmit;
        resubmit.reverse();
        self.inflight = Some(Inflight {
            region,
            counter: recovery.counter,
            resubmit,
            unpublished: Vec::with_capacity(usize::from(self.size)),
        });
        Ok(n)
    }

    /// Ring size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The next available index the device will process (GET_VRING_BASE's answer).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The next used index the device will write.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Chains popped and not completed yet.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// Whether an earlier error stopped this queue.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The memory table the ring was translated against.
    pub fn memory(&self) -> &Arc<MemoryTable> {
        &self.memory
    }

    /// LOG_ALL: log every byte written into guest buffers in `data`; VHOST_VRING_F_LOG: log
    /// used-ring writes at `log_guest_addr` + offset in `used`. (The test-only switch
    /// [`crate::memory::data_logging_disabled_for_tests`] drops `data`.)
    pub fn set_dirty_log(&mut self, data: Option<DirtyLog>, used: Option<(DirtyLog, u64)>) {
        self.data_log = data.filter(|_| !crate::memory::data_logging_disabled_for_tests());
        self.used_log = used;
    }

    /// Whether the driver has made chains available that were not popped yet (one acquire load;
    /// what a polling worker checks instead of sleeping on the kick eventfd).
    pub fn avail_pending(&self) -> bool {
        if self.broken {
            return false;
        }
        if self.inflight.as_ref().is_some_and(|f| !f.resubmit.is_empty()) {
            return true;
        }
        // SAFETY: avail.idx is inside the translated avail ring.
        unsafe { load_u16(self.avail.add(2), Ordering::Acquire) != self.next_avail }
    }

    /// Stops processing this queue (a ring the back-end cannot use, e.g. memory the front-end
    /// never maps through the IOTLB).
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    fn fail(&mut self, err: VirtqueueError) -> VirtqueueError {
        self.broken = true;
        err
    }

    /// Pops up to `max` available chains into `batch` (appending). One acquire load of
    /// `avail.idx` per call. A malformed chain breaks the queue and is reported; chains popped
    /// before it in this call stay in the batch and may still be completed.
    pub fn pop_batch(&mut self, batch: &mut ChainBatch, max: usize) -> Result<usize, VirtqueueError> {
        if self.broken {
            return Err(VirtqueueError::Broken);
        }
        let mut popped = 0usize;
        while popped < max {
            let Some(head) = self.inflight.as_mut().and_then(|f| f.resubmit.pop()) else { break };
            // Already marked busy and counted in flight by attach_inflight.
            if let Err(e) = self.walk(head, batch) {
                if let VirtqueueError::IotlbMiss { .. } = e {
                    if let Some(f) = self.inflight.as_mut() {
                        f.resubmit.push(head);
                    }
                    return if popped > 0 { Ok(popped) } else { Err(e) };
                }
                return Err(self.fail(e));
            }
            popped += 1;
        }
        // SAFETY: avail was translated with at least 4 + 2N bytes.
        let avail_idx = unsafe { load_u16(self.avail.add(2), Ordering::Acquire) };
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending > self.size {
            let err = VirtqueueError::AvailIndexJump { last: self.next_avail, avail: avail_idx, size: self.size };
            return Err(self.fail(err));
        }
        let mask = self.size - 1;
        while popped < max && self.next_avail != avail_idx {
            if self.in_flight >= self.size {
                return Err(self.fail(VirtqueueError::TooManyInFlight { size: self.size }));
            }
            let slot = usize::from(self.next_avail & mask);
            // SAFETY: slot < N, inside the translated avail ring.
            let head = unsafe { u16::from_le(std::ptr::read_volatile(self.avail.add(4 + 2 * slot).cast::<u16>())) };
            if self.busy.get(usize::from(head)).copied().unwrap_or(false) {
                return Err(self.fail(VirtqueueError::HeadInFlight { head, state: "already in flight" }));
            }
            if let Err(e) = self.walk(head, batch) {
                if let VirtqueueError::IotlbMiss { .. } = e {
                    // Not consumed: the same chain is walked again once the entry arrives.
                    return if popped > 0 { Ok(popped) } else { Err(e) };
                }
                return Err(self.fail(e));
            }
            self.busy[usize::from(head)] = true;
            if let Some(f) = &mut self.inflight {
                f.region.fetched(head, f.counter);
                f.counter += 1;
            }
            self.next_avail = self.next_avail.wrapping_add(1);
            self.in_flight += 1;
            popped += 1;
        }
        Ok(popped)
    }

    /// Hands chains back to the driver unused: if `heads` are exactly the last chains popped,
    /// in pop order (what a device that kept RX buffers holds when its ring stops), the avail
    /// index is rewound over them so the driver's GET_VRING_BASE resumes with them and they are
    /// no longer in flight. Returns false, changing nothing, otherwise (they stay in flight and
    /// are accounted for in the inflight buffer, if any).
    pub fn return_chains(&mut self, heads: &[u16]) -> bool {
        let n = heads.len();
        if n == 0 {
            return true;
        }
        if n > usize::from(self.in_flight) || self.broken {
            return false;
        }
        let mask = self.size - 1;
        let first = self.next_avail.wrapping_sub(n as u16);
        for (k, &head) in heads.iter().enumerate() {
            let slot = usize::from(first.wrapping_add(k as u16) & mask);
            // SAFETY: slot < N, inside the translated avail ring.
            let at = unsafe { u16::from_le(std::ptr::read_volatile(self.avail.add(4 + 2 * slot).cast::<u16>())) };
            if at != head || !self.busy.get(usize::from(head)).copied().unwrap_or(false) {
                return false;
            }
        }
        for &head in heads {
            self.busy[usize::from(head)] = false;
            if let Some(f) = &self.inflight {
                f.region.returned(head);
            }
        }
        self.next_avail = first;
        self.in_flight -= n as u16;
        true
    }

    /// Walks one chain into `batch`, reading each descriptor once and validating the copy.
    fn walk(&self, head: u16, batch: &mut ChainBatch) -> Result<(), VirtqueueError> {
        if head >= self.size {
            return Err(VirtqueueError::HeadOutOfRange { head, size: self.size });
        }
        let first = batch.segments.len();
        let result = self.walk_into(head, batch, first);
        if result.is_err() {
            batch.segments.truncate(first);
        }
        result
    }

    fn buffers(&self) -> Buffers<'_> {
        Buffers { memory: &self.memory, iotlb: self.iotlb.as_deref() }
    }

    fn walk_into(&self, head: u16, batch: &mut ChainBatch, first: usize) -> Result<(), VirtqueueError> {
        let buffers = self.buffers();
        let mut acc = ChainAcc::new(first);
        let mut limit = u32::from(self.size);
        let mut idx = head;
        let mut count = 0u32;
        let mut in_table = false;
        loop {
            count += 1;
            if count > limit {
                return Err(VirtqueueError::ChainTooLong { head, limit });
            }
            let d = if in_table {
                let at = usize::from(idx) * 16;
                let raw: &[u8; 16] = batch.scratch[at..at + 16].try_into().map_err(|_| VirtqueueError::Broken)?;
                Descriptor::from_bytes(raw)
            } else {
                // SAFETY: idx < N (checked on entry and for every next), inside the table.
                unsafe { Descriptor::read(self.desc.add(usize::from(idx) * 16)) }
            };
            if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if in_table {
                    return Err(VirtqueueError::NestedIndirect { head });
                }
                if !self.indirect {
                    return Err(VirtqueueError::IndirectNotNegotiated { head });
                }
                if d.flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(VirtqueueError::IndirectWithNext { head });
                }
                let max = u32::from(self.size) * 16;
                if d.len == 0 || d.len % 16 != 0 || d.len > max {
                    return Err(VirtqueueError::IndirectTableSize { head, len: d.len, max });
                }
                // Copy the table once (it may straddle regions); its entries are then read from
                // the private copy only.
                batch.scratch.resize(d.len as usize, 0);
                buffers.read_table(head, d.addr, d.len, &mut batch.scratch)?;
                in_table = true;
                limit = d.len / 16;
                idx = 0;
                count = 0;
                continue;
            }
            let writable = d.flags & VIRTQ_DESC_F_WRITE != 0;
            acc.add(&buffers, head, d.addr, d.len, writable, &mut batch.segments)?;
            if d.flags & VIRTQ_DESC_F_NEXT == 0 {
                break;
            }
            if u32::from(d.next) >= limit {
                return Err(VirtqueueError::NextOutOfRange { head, next: d.next, limit });
            }
            idx = d.next;
        }
        let chain = acc.finish(head, &batch.segments);
        batch.chains.push(chain);
        Ok(())
    }

    /// Writes one used entry (not yet visible to the driver: see [`publish_used`](Self::publish_used)).
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), VirtqueueError> {
        if self.broken {
            return Err(VirtqueueError::Broken);
        }
        match self.busy.get_mut(usize::from(head)) {
            None => return Err(VirtqueueError::HeadOutOfRange { head, size: self.size }),
            Some(busy) if !*busy => return Err(VirtqueueError::HeadInFlight { head, state: "not in flight" }),
            Some(busy) => *busy = false,
        }
        let slot = usize::from(self.next_used & (self.size - 1));
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        let off = 4 + 8 * slot;
        // SAFETY: slot < N, inside the translated used ring; 4-byte aligned.
        unsafe { std::ptr::write_volatile(self.used.add(off).cast::<[u8; 8]>(), elem) };
        self.log_used(off as u64, 8)?;
        if let Some(f) = &mut self.inflight {
            f.region.completed(head);
            f.unpublished.push(head);
        }
        self.next_used = self.next_used.wrapping_add(1);
        self.in_flight = self.in_flight.saturating_sub(1);
        Ok(())
    }

    /// Completes a chain of `batch` with used length `len` and, when LOG_ALL is on, logs **every
    /// writable buffer of the chain**, whole. The used length cannot say what the device wrote:
    /// it only promises the first `len` bytes, and the device "MAY write more" (virtio 1.2
    /// §2.7.8.2) — virtio-blk puts its status in the *last* writable byte, after data it may not
    /// have filled (IOERR, a short GET_ID), and a Python device writes anywhere through its views.
    /// A page logged but not written only costs QEMU one more send of that page; a page written
    /// but not logged reaches the destination stale. Devices that know they wrote exactly the
    /// first `len` bytes and nothing else use [`complete_prefix`](Self::complete_prefix).
    pub fn complete(&mut self, batch: &ChainBatch, chain: &Chain, len: u32) -> Result<(), VirtqueueError> {
        let len = len.min(chain.writable_len);
        self.complete_with(chain.head, batch.writable(chain).iter().map(|s| (s.gpa, s.len)), len)
    }

    /// Completes a chain of `batch` whose device wrote **exactly** its first `len` writable bytes
    /// and no other byte (net RX: header and frame, nothing after): only those are logged.
    pub fn complete_prefix(&mut self, batch: &ChainBatch, chain: &Chain, len: u32) -> Result<(), VirtqueueError> {
        let len = len.min(chain.writable_len);
        self.complete_with(chain.head, prefix(batch.writable(chain).iter().map(|s| (s.gpa, s.len)), len), len)
    }

    /// Completes chain `head` with used length `len`; when LOG_ALL is on, first logs each
    /// (guest address, length) range of `written` — what the device wrote into the chain's
    /// buffers (its whole writable buffers, or [`prefix`] of them). The log is marked after the
    /// device's writes and before the used entry: a front-end that reads and clears the log in
    /// between sends the page again at its next pass.
    pub fn complete_with(
        &mut self,
        head: u16,
        written: impl IntoIterator<Item = (u64, u32)>,
        len: u32,
    ) -> Result<(), VirtqueueError> {
        if let Some(log) = &self.data_log {
            for (gpa, n) in written {
                log.mark(gpa, u64::from(n))?;
            }
        }
        self.add_used(head, len)
    }

    fn log_used(&self, offset: u64, len: u64) -> Result<(), VirtqueueError> {
        if let Some((log, base)) = &self.used_log {
            let gpa = base.checked_add(offset).ok_or(MemoryError::Overflow {
                space: crate::memory::AddressSpace::Guest,
                addr: *base,
                len: offset,
            })?;
            log.mark(gpa, len)?;
        }
        Ok(())
    }

    /// Makes the used entries written since the last call visible (one release store of
    /// `used.idx`) and says whether the driver must be notified (call eventfd), following
    /// EVENT_IDX or VRING_AVAIL_F_NO_INTERRUPT.
    pub fn publish_used(&mut self) -> Result<bool, VirtqueueError> {
        if self.next_used == self.published_used {
            return Ok(false);
        }
        // SAFETY: used translated with ≥ 4 bytes; avail with ≥ 4 + 2N (+2 with EVENT_IDX).
        unsafe { store_u16(self.used.add(2), self.next_used, Ordering::Release) };
        if let Some(f) = &mut self.inflight {
            f.region.published(&f.unpublished, self.next_used);
            f.unpublished.clear();
        }
        self.log_used(2, 2)?;
        let old = self.published_used;
        self.published_used = self.next_used;
        // The store above must be visible before reading the driver's suppression state.
        fence(Ordering::SeqCst);
        let notify = if self.event_idx {
            // SAFETY: used_event is the last u16 of the avail ring, translated with EVENT_IDX.
            let used_event = unsafe { load_u16(self.avail.add(4 + 2 * usize::from(self.size)), Ordering::Relaxed) };
            let notify = match self.signalled_used {
                // After (re)start always signal once.
                None => true,
                Some(_) => need_event(used_event, self.next_used, old),
            };
            self.signalled_used = Some(self.next_used);
            notify
        } else {
            // SAFETY: avail.flags is the first u16 of the avail ring.
            let flags = unsafe { load_u16(self.avail, Ordering::Relaxed) };
            flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
        };
        Ok(notify)
    }

    /// Asks the driver not to kick (VRING_USED_F_NO_NOTIFY) while the device polls anyway.
    /// With EVENT_IDX the driver only kicks when avail.idx passes avail_event, which the device
    /// leaves behind while it drains, so there is nothing to write.
    pub fn disable_notifications(&mut self) -> Result<(), VirtqueueError> {
        if !self.event_idx && !self.broken {
            // SAFETY: used.flags is the first u16 of the used ring.
            unsafe {
                let flags = load_u16(self.used, Ordering::Relaxed);
                store_u16(self.used, flags | VIRTQ_USED_F_NO_NOTIFY, Ordering::Relaxed);
            }
            self.log_used(0, 2)?;
        }
        Ok(())
    }

    /// Re-arms kicks (clears NO_NOTIFY, or publishes avail_event = next avail index), then
    /// re-reads avail.idx after a full barrier: `true` means more chains arrived meanwhile and
    /// the caller must drain again instead of sleeping — this closes the lost-kick window.
    pub fn enable_notifications(&mut self) -> Result<bool, VirtqueueError> {
        if self.broken {
            return Err(VirtqueueError::Broken);
        }
        if self.event_idx {
            let off = 4 + 8 * usize::from(self.size);
            // SAFETY: avail_event is the last u16 of the used ring, translated with EVENT_IDX.
            unsafe { store_u16(self.used.add(off), self.next_avail, Ordering::Relaxed) };
            self.log_used(off as u64, 2)?;
        } else {
            // SAFETY: used.flags is the first u16 of the used ring.
            unsafe {
                let flags = load_u16(self.used, Ordering::Relaxed);
                store_u16(self.used, flags & !VIRTQ_USED_F_NO_NOTIFY, Ordering::Relaxed);
            }
            self.log_used(0, 2)?;
        }
        fence(Ordering::SeqCst);
        // SAFETY: avail.idx is inside the translated avail ring.
        let avail_idx = unsafe { load_u16(self.avail.add(2), Ordering::Acquire) };
        Ok(avail_idx != self.next_avail)
    }

    /// The disable → drain → enable → re-check loop: calls `handle` with every batch until the
    /// ring is empty with notifications re-armed, completing chains through the queue passed to
    /// it. Returns whether the driver must be notified. No kick can be lost.
    pub fn drain<F>(&mut self, batch: &mut ChainBatch, max_batch: usize, mut handle: F) -> Result<bool, VirtqueueError>
    where
        F: FnMut(&mut DeviceQueue, &ChainBatch) -> Result<(), VirtqueueError>,
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
