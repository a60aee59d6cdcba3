//! Inflight I/O tracking (INFLIGHT_SHMFD, protocol.md §6.9): the buffer of a session, and the
//! split-ring region (the packed one is [`super::packed::PackedInflightQueue`]): the back-end
//! records in a buffer shared with the front-end which heads it has taken from the avail ring and
//! not completed, so that a back-end started after a crash can hand them to the device again.
//!
//! The buffer outlives the back-end process (the front-end keeps its fd and passes it back with
//! SET_INFLIGHT_FD), so everything read from it is untrusted: a corrupt or hostile buffer is an
//! error, never an out-of-range access.
//!
//! Per queue, back to back, `queue_region_size(N)` bytes each:
//!
//! | offset | field |
//! |---|---|
//! | 0 | features (u64, 0) |
//! | 8 | version (u16, 1; 0 = never used) |
//! | 10 | desc_num (u16, = N) |
//! | 12 | last_batch_head (u16) |
//! | 14 | used_idx (u16) |
//! | 16 + 16·i | desc[i]: inflight u8 @0, next u16 @6, counter u64 @8 |

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use super::error::VirtqueueError;
use super::layout::MAX_QUEUE_SIZE;
use super::packed::{packed_queue_region_size, PackedInflightQueue, MAX_PACKED_QUEUE_SIZE};
use crate::memory::{sealed_memfd, Mapping, MemoryError};

/// The only split-ring layout version.
pub const INFLIGHT_VERSION: u16 = 1;

const HEADER: usize = 16;
const DESC_STATE: usize = 16;

/// Bytes of one queue's region: the header and one state per descriptor, rounded up to a cache
/// line (the stride QEMU's peers use, so a buffer can move between implementations).
pub fn queue_region_size(queue_size: u16) -> u64 {
    (HEADER as u64 + DESC_STATE as u64 * u64::from(queue_size)).next_multiple_of(64)
}

fn check_queue_size(queue_size: u16, packed: bool) -> Result<(), VirtqueueError> {
    // Split rings are powers of two; packed rings any size up to 32768 (virtio 1.2 §2.8).
    let max = if packed { MAX_PACKED_QUEUE_SIZE } else { MAX_QUEUE_SIZE };
    if queue_size == 0 || queue_size > max || (!packed && !queue_size.is_power_of_two()) {
        return Err(VirtqueueError::InvalidSize(queue_size.into()));
    }
    Ok(())
}

fn region_size(queue_size: u16, packed: bool) -> u64 {
    if packed {
        packed_queue_region_size(queue_size)
    } else {
        queue_region_size(queue_size)
    }
}

/// The mapped inflight buffer of a session (all its queues), in the layout of one ring format:
/// the format is the one negotiated when the buffer was made (QEMU sends SET_FEATURES before
/// GET_INFLIGHT_FD for this reason) or handed back.
#[derive(Debug, Clone)]
pub struct InflightBuffer {
    map: Arc<Mapping>,
    num_queues: u16,
    queue_size: u16,
    packed: bool,
}

impl InflightBuffer {
    /// GET_INFLIGHT_FD: a fresh, zeroed, size-sealed buffer for `num_queues` split rings of
    /// `queue_size` descriptors.
    pub fn allocate(num_queues: u16, queue_size: u16) -> Result<InflightBuffer, VirtqueueError> {
        InflightBuffer::allocate_for(num_queues, queue_size, false)
    }

    /// GET_INFLIGHT_FD for rings of either format (`packed`: VIRTIO_F_RING_PACKED negotiated).
    pub fn allocate_for(num_queues: u16, queue_size: u16, packed: bool) -> Result<InflightBuffer, VirtqueueError> {
        check_queue_size(queue_size, packed)?;
        if num_queues == 0 {
            return Err(VirtqueueError::InflightCorrupt("zero queues"));
        }
        let size = u64::from(num_queues) * region_size(queue_size, packed);
        let fd = sealed_memfd("vhostuser_rs-inflight", size)?;
        let map = Mapping::from_fd(fd, 0, size)?;
        Ok(InflightBuffer { map: Arc::new(map), num_queues, queue_size, packed })
    }

    /// SET_INFLIGHT_FD: maps `mmap_size` bytes at `mmap_offset` of `fd`, after checking that they
    /// hold `num_queues` split-ring regions of `queue_size` descriptors (CVE-2021-3839: the
    /// caller also checks `num_queues` against its rings) and that the file is that large.
    pub fn from_fd(
        fd: OwnedFd,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightBuffer, VirtqueueError> {
        InflightBuffer::from_fd_for(fd, mmap_size, mmap_offset, num_queues, queue_size, false)
    }

    /// SET_INFLIGHT_FD for rings of either format (the regions' stride depends on it).
    pub fn from_fd_for(
        fd: OwnedFd,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
        packed: bool,
    ) -> Result<InflightBuffer, VirtqueueError> {
        check_queue_size(queue_size, packed)?;
        if num_queues == 0 {
            return Err(VirtqueueError::InflightCorrupt("zero queues"));
        }
        let needed = u64::from(num_queues) * region_size(queue_size, packed);
        if mmap_size < needed {
            return Err(VirtqueueError::Memory(MemoryError::FileTooSmall { needed, actual: mmap_size }));
        }
        let map = Mapping::from_fd(fd, mmap_offset, mmap_size)?;
        Ok(InflightBuffer { map: Arc::new(map), num_queues, queue_size, packed })
    }

    /// Whether the regions have the packed-ring layout.
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// Queues covered.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptors per queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Bytes mapped (the reply's mmap_size).
    pub fn mmap_size(&self) -> u64 {
        self.map.len() as u64
    }

    /// Offset of the buffer in its fd.
    pub fn mmap_offset(&self) -> u64 {
        self.map.mmap_offset()
    }

    /// The buffer's fd (to send with the GET_INFLIGHT_FD reply).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.map.fd()
    }

    /// Queue `index`'s split-ring region, if the buffer covers that queue (and is split).
    pub fn queue(&self, index: u16) -> Option<InflightQueue> {
        if index >= self.num_queues || self.packed {
            return None;
        }
        let offset = usize::from(index) * queue_region_size(self.queue_size) as usize;
        // SAFETY: from_fd/allocate checked that num_queues regions fit in the mapping.
        let base = unsafe { self.map.as_ptr().add(offset) };
        Some(InflightQueue { _map: self.map.clone(), base, size: self.queue_size })
    }

    /// Queue `index`'s packed-ring region, if the buffer covers that queue (and is packed).
    pub fn packed_queue(&self, index: u16) -> Option<PackedInflightQueue> {
        if index >= self.num_queues || !self.packed {
            return None;
        }
        let offset = usize::from(index) * packed_queue_region_size(self.queue_size) as usize;
        // SAFETY: from_fd_for/allocate_for checked that num_queues regions fit in the mapping.
        let base = unsafe { self.map.as_ptr().add(offset) };
        Some(PackedInflightQueue::new(self.map.clone(), base, self.queue_size))
    }
}

/// One queue's region. Only the worker of that queue touches it while the ring runs.
#[derive(Debug)]
pub struct InflightQueue {
    _map: Arc<Mapping>,
    base: *mut u8,
    size: u16,
}

// SAFETY: `base` points into the mapping kept alive by `_map`; the region is used by one thread
// at a time (the session before the ring starts, then the ring's worker).
unsafe impl Send for InflightQueue {}

/// What [`InflightQueue::recover`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to hand to the device again, oldest first.
    pub resubmit: Vec<u16>,
    /// The next value of the fetch counter.
    pub counter: u64,
}

impl InflightQueue {
    fn u16_at(&self, off: usize) -> u16 {
        // SAFETY: every offset used is inside this queue's region (header or desc[i], i < N).
        unsafe { u16::from_le(std::ptr::read_volatile(self.base.add(off).cast::<u16>())) }
    }

    fn set_u16(&self, off: usize, v: u16) {
        // SAFETY: as in u16_at; 2-byte aligned (the region starts 64-byte aligned).
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u16>(), v.to_le()) }
    }

    fn desc(&self, head: u16) -> usize {
        HEADER + DESC_STATE * usize::from(head)
    }

    fn is_inflight(&self, head: u16) -> bool {
        // SAFETY: head < N, inside the region.
        unsafe { std::ptr::read_volatile(self.base.add(self.desc(head))) != 0 }
    }

    fn set_inflight(&self, head: u16, v: bool) {
        // SAFETY: head < N, inside the region.
        unsafe { std::ptr::write_volatile(self.base.add(self.desc(head)), u8::from(v)) }
    }

    fn counter(&self, head: u16) -> u64 {
        // SAFETY: head < N; the counter is 8-byte aligned (desc states are 16 bytes from 16).
        unsafe { u64::from_le(std::ptr::read_volatile(self.base.add(self.desc(head) + 8).cast::<u64>())) }
    }

    /// Prepares the region for a ring whose used index in guest memory is `ring_used_idx`: a
    /// never-used region is initialised; a used one is validated and repaired (a batch published
    /// to the used ring but not recorded here is cleared), and the heads still in flight are
    /// returned oldest first.
    pub fn recover(&mut self, ring_used_idx: u16) -> Result<Recovery, VirtqueueError> {
        let version = self.u16_at(8);
        if version == 0 {
            // SAFETY: the whole region is ours to write; a fresh buffer may hold anything.
            unsafe { std::ptr::write_bytes(self.base, 0, queue_region_size(self.size) as usize) };
            self.set_u16(10, self.size);
            self.set_u16(14, ring_used_idx);
            fence(Ordering::Release);
            self.set_u16(8, INFLIGHT_VERSION);
            return Ok(Recovery { resubmit: Vec::new(), counter: 1 });
        }
        if version != INFLIGHT_VERSION {
            return Err(VirtqueueError::InflightCorrupt("unknown version"));
        }
        if self.u16_at(10) != self.size {
            return Err(VirtqueueError::InflightCorrupt("desc_num is not the ring size"));
        }
        let recorded = self.u16_at(14);
        let unrecorded = ring_used_idx.wrapping_sub(recorded);
        if unrecorded > self.size {
            return Err(VirtqueueError::InflightCorrupt("used index is more than a ring ahead of the record"));
        }
        // The last batch reached the used ring but its heads were not cleared: walk the list of
        // completed heads, newest first, for as many entries as the used ring is ahead.
        let mut head = self.u16_at(12);
        for _ in 0..unrecorded {
            if head >= self.size {
                return Err(VirtqueueError::InflightCorrupt("completed list leaves the ring"));
            }
            self.set_inflight(head, false);
            head = self.u16_at(self.desc(head) + 6);
        }
        self.set_u16(14, ring_used_idx);
        let mut pending: Vec<(u64, u16)> =
            (0..self.size).filter(|&h| self.is_inflight(h)).map(|h| (self.counter(h), h)).collect();
        pending.sort_unstable();
        let counter = pending.last().map_or(1, |&(c, _)| c.saturating_add(1));
        Ok(Recovery { resubmit: pending.into_iter().map(|(_, h)| h).collect(), counter })
    }

    /// The device took `head` from the avail ring as the `counter`-th fetch.
    pub fn fetched(&self, head: u16, counter: u64) {
        debug_assert!(head < self.size);
        // SAFETY: head < N (the ring validated it); 8-byte aligned.
        unsafe { std::ptr::write_volatile(self.base.add(self.desc(head) + 8).cast::<u64>(), counter.to_le()) };
        self.set_inflight(head, true);
    }

    /// `head`'s used entry was written (not yet published): link it to the completed list.
    pub fn completed(&self, head: u16) {
        debug_assert!(head < self.size);
        self.set_u16(self.desc(head) + 6, self.u16_at(12));
        self.set_u16(12, head);
    }

    /// `head` was fetched but handed back to the avail ring unused (the device rewound its
    /// avail index over it): it is no longer in flight.
    pub fn returned(&self, head: u16) {
        debug_assert!(head < self.size);
        self.set_inflight(head, false);
    }

    /// `used.idx` was published as `used_idx` with `heads` in it: they are no longer in flight.
    pub fn published(&self, heads: &[u16], used_idx: u16) {
        for &h in heads {
            self.set_inflight(h, false);
        }
        fence(Ordering::Release);
        self.set_u16(14, used_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(n: u16) -> (InflightBuffer, InflightQueue) {
        let b = InflightBuffer::allocate(1, n).unwrap();
        let q = b.queue(0).unwrap();
        (b, q)
    }

    #[test]
    fn stride_matches_other_implementations() {
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(1), 64);
    }

    #[test]
    fn fresh_region_is_initialised() {
        let (_b, mut q) = region(8);
        assert_eq!(q.recover(5).unwrap(), Recovery { resubmit: vec![], counter: 1 });
        assert_eq!(q.u16_at(8), INFLIGHT_VERSION);
        assert_eq!(q.u16_at(10), 8);
        assert_eq!(q.u16_at(14), 5);
    }

    #[test]
    fn unfinished_heads_come_back_oldest_first() {
        let (_b, mut q) = region(8);
        q.recover(0).unwrap();
        q.fetched(3, 1);
        q.fetched(1, 2);
        q.fetched(6, 3);
        q.completed(1);
        q.published(&[1], 1);
        // A "restart": the next back-end maps the same buffer.
        let mut again = _b.queue(0).unwrap();
        let r = again.recover(1).unwrap();
        assert_eq!(r.resubmit, vec![3, 6]);
        assert_eq!(r.counter, 4);
    }

    #[test]
    fn batch_published_but_not_recorded_is_not_resubmitted() {
        let (b, mut q) = region(8);
        q.recover(0).unwrap();
        q.fetched(2, 1);
        q.fetched(4, 2);
        q.fetched(5, 3);
        q.completed(4);
        q.completed(2);
        // Crash after used.idx became 2 in guest memory, before `published`.
        let r = b.queue(0).unwrap().recover(2).unwrap();
        assert_eq!(r.resubmit, vec![5]);
        assert_eq!(q.u16_at(14), 2);
    }

    #[test]
    fn corrupt_regions_are_refused() {
        let (b, mut q) = region(8);
        q.recover(0).unwrap();
        q.set_u16(10, 16);
        assert!(matches!(b.queue(0).unwrap().recover(0), Err(VirtqueueError::InflightCorrupt(_))));
        q.set_u16(10, 8);
        q.set_u16(8, 7);
        assert!(matches!(b.queue(0).unwrap().recover(0), Err(VirtqueueError::InflightCorrupt(_))));
        q.set_u16(8, 1);
        // used ring claims 3 unrecorded completions; the list points outside the ring.
        q.set_u16(12, 9);
        assert!(matches!(b.queue(0).unwrap().recover(3), Err(VirtqueueError::InflightCorrupt(_))));
        // More than a ring ahead.
        q.set_u16(12, 0);
        assert!(matches!(b.queue(0).unwrap().recover(9), Err(VirtqueueError::InflightCorrupt(_))));
        // A list that loops is bounded by the count, not followed forever.
        q.set_u16(q.desc(0) + 6, 0);
        assert!(b.queue(0).unwrap().recover(8).is_ok());
    }

    #[test]
    fn short_buffers_are_refused() {
        let fd = crate::memory::memfd("t", 100).unwrap();
        let e = InflightBuffer::from_fd(fd, 100, 0, 1, 8).unwrap_err();
        assert!(matches!(e, VirtqueueError::Memory(MemoryError::FileTooSmall { .. })));
        // mmap_size claims more than the file holds.
        let fd = crate::memory::memfd("t", 64).unwrap();
        let e = InflightBuffer::from_fd(fd, 4096, 0, 1, 8).unwrap_err();
        assert!(matches!(e, VirtqueueError::Memory(MemoryError::FileTooSmall { .. })));
        let fd = crate::memory::memfd("t", 4096).unwrap();
        assert!(InflightBuffer::from_fd(fd, 4096, 0, 1, 12).is_err());
    }
}
