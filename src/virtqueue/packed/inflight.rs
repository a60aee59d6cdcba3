//! Inflight I/O tracking for packed rings (INFLIGHT_SHMFD, protocol.md §6.9; the vhost-user
//! spec's "Inflight I/O tracking", packed layout).
//!
//! A packed ring cannot be replayed from the ring alone: used descriptors are written in order
//! of completion at the device's used position, over the slots of lists that may still be in
//! flight. So each popped list's descriptors are copied into the region (one 32-byte entry per
//! descriptor, linked by `next`), and the region records where the device's used position was
//! when it last published.
//!
//! Per queue, `packed_queue_region_size(N)` bytes:
//!
//! | offset | field |
//! |---|---|
//! | 0 | features (u64, 0) |
//! | 8 | version (u16, 1; 0 = never used) |
//! | 10 | desc_num (u16, = N) |
//! | 12 | free_head (u16) — informative only, rebuilt on recovery |
//! | 14 | old_free_head (u16) — informative only |
//! | 16 | used_idx (u16) — next used slot once the burst being published is |
//! | 18 | old_used_idx (u16) — next used slot as of the last completed publish |
//! | 20 | used_wrap_counter (u8) |
//! | 21 | old_used_wrap_counter (u8) |
//! | 32 + 32·i | desc[i]: inflight u8 @0, next u16 @2, last u16 @4, num u16 @6, counter u64 @8, id u16 @16, flags u16 @18, len u32 @20, addr u64 @24 |
//!
//! `inflight` of a list's first entry: 1 in flight, 2 completed in the burst being published, 0
//! otherwise (free entries and the other entries of a list). `num` is the list's ring slots,
//! which is also its entry count (a direct list takes a slot per descriptor, an indirect one a
//! single slot); `counter` orders fetches.
//!
//! A burst is published in three steps: `used_idx`/`used_wrap_counter` get the new position,
//! the release store of the burst's first used descriptor's flags makes it visible, then its
//! lists' entries go from 2 to 0 and `old_used_*` catches up. After a crash between the first
//! and the last step, the ring tells whether the release happened: the slot at `old_used_idx`
//! has its USED bit equal to `old_used_wrap_counter` once the device wrote it (and still does
//! after the driver reuses the slot, as an available descriptor of the next lap), and the
//! opposite while it holds the available descriptor the device consumed.
//!
//! The buffer outlives the back-end and comes back from the front-end: all of it is untrusted
//! and validated on recovery (indices, counts, list walks bounded and never sharing entries).

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use super::device::PackedDesc;
use super::{RingPos, VIRTQ_DESC_F_USED};
use crate::memory::Mapping;
use crate::virtqueue::error::VirtqueueError;
use crate::virtqueue::inflight::INFLIGHT_VERSION;

const HEADER: usize = 32;
const ENTRY: usize = 32;

const VERSION: usize = 8;
const DESC_NUM: usize = 10;
const FREE_HEAD: usize = 12;
const OLD_FREE_HEAD: usize = 14;
const USED_IDX: usize = 16;
const OLD_USED_IDX: usize = 18;
const USED_WRAP: usize = 20;
const OLD_USED_WRAP: usize = 21;

const E_INFLIGHT: usize = 0;
const E_NEXT: usize = 2;
const E_LAST: usize = 4;
const E_NUM: usize = 6;
const E_COUNTER: usize = 8;
const E_ID: usize = 16;
const E_FLAGS: usize = 18;
const E_LEN: usize = 20;
const E_ADDR: usize = 24;

const IN_FLIGHT: u8 = 1;
const PUBLISHING: u8 = 2;

/// Bytes of one packed queue's region: the 32-byte header and a 32-byte entry per descriptor,
/// rounded up to a cache line (DPDK's stride, so the sizes agree between implementations).
pub fn packed_queue_region_size(queue_size: u16) -> u64 {
    (HEADER as u64 + ENTRY as u64 * u64::from(queue_size)).next_multiple_of(64)
}

/// A list saved in the region: what the device needs to hand it out again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedList {
    /// Buffer id.
    pub id: u16,
    /// Ring slots (= descriptors) it took.
    pub slots: u16,
    /// Its descriptors as the driver wrote them (flags with NEXT / WRITE / INDIRECT).
    pub descs: Vec<PackedDesc>,
}

/// What [`PackedInflightQueue::recover`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct PackedRecovery {
    /// The device's used position as of the last publish.
    pub used: RingPos,
    /// Lists to hand to the device again, oldest first.
    pub resubmit: Vec<SavedList>,
    /// The next value of the fetch counter.
    pub counter: u64,
}

/// One packed queue's region, and the in-process bookkeeping of its entries (which are free,
/// which list an id uses). Only the ring's worker touches it while the ring runs.
#[derive(Debug)]
pub struct PackedInflightQueue {
    _map: Arc<Mapping>,
    base: *mut u8,
    size: u16,
    /// Free entries (a stack).
    free: Vec<u16>,
    /// Per buffer id in flight: its first entry.
    first: Vec<u16>,
    /// Per entry: the next entry of its list (a private copy: the shared one is not re-read).
    next: Vec<u16>,
    /// Per buffer id: its list's entry count.
    count: Vec<u16>,
}

// SAFETY: `base` points into the mapping kept alive by `map`; the region is used by one thread
// at a time (the session before the ring starts, then the ring's worker).
unsafe impl Send for PackedInflightQueue {}

impl PackedInflightQueue {
    pub(crate) fn new(map: Arc<Mapping>, base: *mut u8, size: u16) -> PackedInflightQueue {
        let n = usize::from(size);
        PackedInflightQueue {
            _map: map,
            base,
            size,
            free: Vec::with_capacity(n),
            first: vec![0; n],
            next: vec![0; n],
            count: vec![0; n],
        }
    }

    fn entry(&self, i: u16) -> usize {
        HEADER + ENTRY * usize::from(i)
    }

    fn u8_at(&self, off: usize) -> u8 {
        // SAFETY: every offset used is inside this queue's region (header, or entry i < N).
        unsafe { std::ptr::read_volatile(self.base.add(off)) }
    }

    fn set_u8(&self, off: usize, v: u8) {
        // SAFETY: as in u8_at.
        unsafe { std::ptr::write_volatile(self.base.add(off), v) }
    }

    fn u16_at(&self, off: usize) -> u16 {
        // SAFETY: as in u8_at; 2-byte aligned (the region starts 64-byte aligned, fields are
        // at even offsets).
        unsafe { u16::from_le(std::ptr::read_volatile(self.base.add(off).cast::<u16>())) }
    }

    fn set_u16(&self, off: usize, v: u16) {
        // SAFETY: as in u16_at.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u16>(), v.to_le()) }
    }

    fn u32_at(&self, off: usize) -> u32 {
        // SAFETY: as in u16_at; 4-byte aligned.
        unsafe { u32::from_le(std::ptr::read_volatile(self.base.add(off).cast::<u32>())) }
    }

    fn set_u32(&self, off: usize, v: u32) {
        // SAFETY: as in u32_at.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u32>(), v.to_le()) }
    }

    fn u64_at(&self, off: usize) -> u64 {
        // SAFETY: as in u16_at; 8-byte aligned.
        unsafe { u64::from_le(std::ptr::read_volatile(self.base.add(off).cast::<u64>())) }
    }

    fn set_u64(&self, off: usize, v: u64) {
        // SAFETY: as in u64_at.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u64>(), v.to_le()) }
    }

    fn pos(&self, idx: usize, wrap: usize) -> Result<RingPos, VirtqueueError> {
        let index = self.u16_at(idx);
        let wrap = match self.u8_at(wrap) {
            0 => false,
            1 => true,
            _ => return Err(VirtqueueError::InflightCorrupt("wrap counter is neither 0 nor 1")),
        };
        if index >= self.size {
            return Err(VirtqueueError::InflightCorrupt("used index beyond the ring"));
        }
        Ok(RingPos { index, wrap })
    }

    fn set_pos(&self, idx: usize, wrap: usize, p: RingPos) {
        self.set_u16(idx, p.index);
        self.set_u8(wrap, u8::from(p.wrap));
    }

    /// Prepares the region for a ring whose used position per SET_VRING_BASE is `base_used`:
    /// a never-used region is initialised with it; a used one is validated, the burst a crash
    /// interrupted is settled (published or not, from `ring_flags(slot)`, the flags of a ring
    /// slot), and the lists still in flight are returned oldest first with the used position
    /// they follow (which overrides SET_VRING_BASE: the front-end cannot know how far a
    /// crashed back-end got).
    pub fn recover(
        &mut self,
        base_used: RingPos,
        ring_flags: impl Fn(u16) -> u16,
    ) -> Result<PackedRecovery, VirtqueueError> {
        let size = self.size;
        let version = self.u16_at(VERSION);
        if version == 0 {
            // SAFETY: the whole region is ours to write; a fresh buffer may hold anything.
            unsafe { std::ptr::write_bytes(self.base, 0, packed_queue_region_size(size) as usize) };
            self.set_u16(DESC_NUM, size);
            self.set_pos(USED_IDX, USED_WRAP, base_used);
            self.set_pos(OLD_USED_IDX, OLD_USED_WRAP, base_used);
            self.free = (0..size).rev().collect();
            fence(Ordering::Release);
            self.set_u16(VERSION, INFLIGHT_VERSION);
            return Ok(PackedRecovery { used: base_used, resubmit: Vec::new(), counter: 1 });
        }
        if version != INFLIGHT_VERSION {
            return Err(VirtqueueError::InflightCorrupt("unknown version"));
        }
        if self.u16_at(DESC_NUM) != size {
            return Err(VirtqueueError::InflightCorrupt("desc_num is not the ring size"));
        }
        let old = self.pos(OLD_USED_IDX, OLD_USED_WRAP)?;
        let new = self.pos(USED_IDX, USED_WRAP)?;
        // A publish was under way: did its release store happen?
        let published = new != old && (ring_flags(old.index) & VIRTQ_DESC_F_USED != 0) == old.wrap;
        let used = if published { new } else { old };
        let mut heads: Vec<(u64, u16)> = Vec::new();
        for i in 0..size {
            let at = self.entry(i);
            match self.u8_at(at + E_INFLIGHT) {
                0 => {}
                IN_FLIGHT => heads.push((self.u64_at(at + E_COUNTER), i)),
                PUBLISHING if published => self.set_u8(at + E_INFLIGHT, 0),
                PUBLISHING => {
                    self.set_u8(at + E_INFLIGHT, IN_FLIGHT);
                    heads.push((self.u64_at(at + E_COUNTER), i));
                }
                _ => return Err(VirtqueueError::InflightCorrupt("inflight flag is not 0, 1 or 2")),
            }
        }
        heads.sort_unstable();
        let mut taken = vec![false; usize::from(size)];
        let mut id_seen = vec![false; usize::from(size)];
        let mut total = 0u32;
        let mut resubmit = Vec::with_capacity(heads.len());
        for &(_, head) in &heads {
            let at = self.entry(head);
            let (id, num) = (self.u16_at(at + E_ID), self.u16_at(at + E_NUM));
            if id >= size || std::mem::replace(&mut id_seen[usize::from(id)], true) {
                return Err(VirtqueueError::InflightCorrupt("buffer id out of range or in flight twice"));
            }
            total += u32::from(num);
            if num == 0 || total > u32::from(size) {
                return Err(VirtqueueError::InflightCorrupt("lists in flight take more slots than the ring has"));
            }
            let mut descs = Vec::with_capacity(usize::from(num));
            let mut e = head;
            for k in 0..num {
                if e >= size || std::mem::replace(&mut taken[usize::from(e)], true) {
                    return Err(VirtqueueError::InflightCorrupt("list leaves the region or shares an entry"));
                }
                let a = self.entry(e);
                descs.push(PackedDesc {
                    addr: self.u64_at(a + E_ADDR),
                    len: self.u32_at(a + E_LEN),
                    id,
                    flags: self.u16_at(a + E_FLAGS),
                });
                let next = self.u16_at(a + E_NEXT);
                if k + 1 < num {
                    self.next[usize::from(e)] = next;
                    e = next;
                }
            }
            self.first[usize::from(id)] = head;
            self.count[usize::from(id)] = num;
            resubmit.push(SavedList { id, slots: num, descs });
        }
        self.set_pos(USED_IDX, USED_WRAP, used);
        self.set_pos(OLD_USED_IDX, OLD_USED_WRAP, used);
        self.free = (0..size).rev().filter(|&e| !taken[usize::from(e)]).collect();
        let counter = heads.last().map_or(1, |&(c, _)| c.saturating_add(1));
        Ok(PackedRecovery { used, resubmit, counter })
    }

    /// The device popped buffer `id`'s list (`descs`, one per ring slot) as fetch `counter`:
    /// copy it into free entries, then mark it in flight. Fails only if the entries ran out,
    /// which the ring's own slot accounting rules out.
    pub fn fetched(&mut self, id: u16, counter: u64, descs: &[PackedDesc]) -> Result<(), VirtqueueError> {
        let n = descs.len();
        if n == 0 || n > self.free.len() || id >= self.size {
            return Err(VirtqueueError::InflightCorrupt("no free entries for a fetched list"));
        }
        let entries: Vec<u16> = self.free.split_off(self.free.len() - n);
        // Popped from a stack: take them last first so the list runs in stack order.
        let head = entries[n - 1];
        for (k, d) in descs.iter().enumerate() {
            let e = entries[n - 1 - k];
            let at = self.entry(e);
            let next = if k + 1 < n { entries[n - 2 - k] } else { e };
            self.next[usize::from(e)] = next;
            self.set_u8(at + E_INFLIGHT, 0);
            self.set_u16(at + E_NEXT, next);
            self.set_u16(at + E_ID, d.id);
            self.set_u16(at + E_FLAGS, d.flags);
            self.set_u32(at + E_LEN, d.len);
            self.set_u64(at + E_ADDR, d.addr);
        }
        let at = self.entry(head);
        self.set_u16(at + E_ID, id);
        self.set_u16(at + E_NUM, n as u16);
        self.set_u16(at + E_LAST, entries[0]);
        self.set_u64(at + E_COUNTER, counter);
        self.set_u16(FREE_HEAD, self.free.last().copied().unwrap_or(self.size));
        // The entries are complete before the list counts as in flight.
        fence(Ordering::Release);
        self.set_u8(at + E_INFLIGHT, IN_FLIGHT);
        self.first[usize::from(id)] = head;
        self.count[usize::from(id)] = n as u16;
        Ok(())
    }

    /// Buffer `id`'s used descriptor was written (not yet published).
    pub fn completed(&self, id: u16) {
        if let Some(&head) = self.first.get(usize::from(id)) {
            self.set_u8(self.entry(head) + E_INFLIGHT, PUBLISHING);
        }
    }

    /// A publish that moves the used position to `used` is about to be released.
    pub fn publishing(&self, used: RingPos) {
        self.set_pos(USED_IDX, USED_WRAP, used);
    }

    /// The publish of `ids` (used position now `used`) was released: their entries are free.
    pub fn published(&mut self, ids: &[u16], used: RingPos) {
        for &id in ids {
            self.release(id);
        }
        fence(Ordering::Release);
        self.set_u16(OLD_FREE_HEAD, self.u16_at(FREE_HEAD));
        self.set_pos(OLD_USED_IDX, OLD_USED_WRAP, used);
    }

    /// Buffer `id` was handed back to the ring unused: no longer in flight.
    pub fn returned(&mut self, id: u16) {
        self.release(id);
    }

    fn release(&mut self, id: u16) {
        let (Some(&head), Some(&n)) = (self.first.get(usize::from(id)), self.count.get(usize::from(id))) else {
            return;
        };
        self.set_u8(self.entry(head) + E_INFLIGHT, 0);
        let mut e = head;
        for _ in 0..n {
            self.free.push(e);
            e = self.next[usize::from(e)];
        }
        self.count[usize::from(id)] = 0;
        self.set_u16(FREE_HEAD, head);
    }
}
