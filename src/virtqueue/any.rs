//! One type per role for either ring format (VIRTIO_F_RING_PACKED negotiated or not), so code
//! above the rings — a back-end worker, a front-end driver — is written once. An enum rather
//! than a trait object: the format is fixed per ring at SET_FEATURES, the match is one
//! predictable branch, and the hot loops stay monomorphic and inlinable.

use std::sync::{Arc, RwLock};

use super::device::{Chain, ChainBatch, DeviceQueue};
use super::driver::{Buffer, DriverQueue};
use super::error::VirtqueueError;
use super::packed::{PackedDeviceQueue, PackedDriverQueue};
use crate::memory::{DirtyLog, GuestMemory, Iotlb, MemoryTable};

/// The device side of a ring of either format.
#[derive(Debug)]
pub enum AnyDeviceQueue {
    /// Split ring.
    Split(DeviceQueue),
    /// Packed ring.
    Packed(PackedDeviceQueue),
}

macro_rules! both {
    ($self:expr, $q:ident => $e:expr) => {
        match $self {
            AnyDeviceQueue::Split($q) => $e,
            AnyDeviceQueue::Packed($q) => $e,
        }
    };
}

impl AnyDeviceQueue {
    /// Pops up to `max` chains into `batch`; `Chain::head` is what the completion returns
    /// (split: head index; packed: buffer id).
    #[inline]
    pub fn pop_batch(&mut self, batch: &mut ChainBatch, max: usize) -> Result<usize, VirtqueueError> {
        both!(self, q => q.pop_batch(batch, max))
    }

    /// Completes a chain, logging its writable buffers whole (LOG_ALL).
    #[inline]
    pub fn complete(&mut self, batch: &ChainBatch, chain: &Chain, len: u32) -> Result<(), VirtqueueError> {
        both!(self, q => q.complete(batch, chain, len))
    }

    /// Completes a chain whose device wrote exactly its first `len` writable bytes.
    #[inline]
    pub fn complete_prefix(&mut self, batch: &ChainBatch, chain: &Chain, len: u32) -> Result<(), VirtqueueError> {
        both!(self, q => q.complete_prefix(batch, chain, len))
    }

    /// Completes `head` with used length `len`, logging `written` first.
    #[inline]
    pub fn complete_with(
        &mut self,
        head: u16,
        written: impl IntoIterator<Item = (u64, u32)>,
        len: u32,
    ) -> Result<(), VirtqueueError> {
        both!(self, q => q.complete_with(head, written, len))
    }

    /// Makes the completions visible (one release store) and says whether to notify.
    #[inline]
    pub fn publish_used(&mut self) -> Result<bool, VirtqueueError> {
        both!(self, q => q.publish_used())
    }

    /// Asks the driver not to notify while the device polls.
    pub fn disable_notifications(&mut self) -> Result<(), VirtqueueError> {
        both!(self, q => q.disable_notifications())
    }

    /// Re-arms notifications; `true`: more arrived meanwhile, drain again.
    pub fn enable_notifications(&mut self) -> Result<bool, VirtqueueError> {
        both!(self, q => q.enable_notifications())
    }

    /// Whether chains are waiting to be popped.
    #[inline]
    pub fn avail_pending(&self) -> bool {
        both!(self, q => q.avail_pending())
    }

    /// Chains popped and not completed.
    pub fn in_flight(&self) -> u16 {
        both!(self, q => q.in_flight())
    }

    /// Ring size.
    pub fn size(&self) -> u16 {
        both!(self, q => q.size())
    }

    /// Whether an earlier error stopped the ring.
    pub fn is_broken(&self) -> bool {
        both!(self, q => q.is_broken())
    }

    /// Stops processing the ring.
    pub fn mark_broken(&mut self) {
        both!(self, q => q.mark_broken())
    }

    /// The memory table the ring was translated against.
    pub fn memory(&self) -> &Arc<MemoryTable> {
        both!(self, q => q.memory())
    }

    /// ACCESS_PLATFORM translation of buffer addresses.
    pub fn set_iotlb(&mut self, iotlb: Option<Arc<RwLock<Iotlb>>>) {
        both!(self, q => q.set_iotlb(iotlb))
    }

    /// The IOTLB buffer addresses are translated through, if any.
    pub fn iotlb(&self) -> Option<&Arc<RwLock<Iotlb>>> {
        both!(self, q => q.iotlb())
    }

    /// LOG_ALL data logging and VHOST_VRING_F_LOG ring logging at `log_guest_addr`.
    pub fn set_dirty_log(&mut self, data: Option<DirtyLog>, ring: Option<(DirtyLog, u64)>) {
        both!(self, q => q.set_dirty_log(data, ring))
    }

    /// Hands the last popped chains back unused (see [`DeviceQueue::return_chains`]).
    pub fn return_chains(&mut self, heads: &[u16]) -> bool {
        both!(self, q => q.return_chains(heads))
    }

    /// Whether this is a packed ring.
    pub fn is_packed(&self) -> bool {
        matches!(self, AnyDeviceQueue::Packed(_))
    }

    /// A value that changes whenever the device pops a chain (split: the next avail index;
    /// packed: the next avail position with its wrap counter, encoded as in
    /// [`super::RingPos::encode`]). For progress checks, not for arithmetic.
    #[inline]
    pub fn avail_mark(&self) -> u16 {
        match self {
            AnyDeviceQueue::Split(q) => q.next_avail(),
            AnyDeviceQueue::Packed(q) => q.base().avail.encode(),
        }
    }

    /// A value that changes whenever the device writes a used entry (as
    /// [`avail_mark`](Self::avail_mark), for the used side).
    #[inline]
    pub fn used_mark(&self) -> u16 {
        match self {
            AnyDeviceQueue::Split(q) => q.next_used(),
            AnyDeviceQueue::Packed(q) => q.base().used.encode(),
        }
    }

    /// GET_VRING_BASE's `num`: split, the next avail index; packed, both positions and wrap
    /// counters ([`super::PackedBase::encode`]).
    pub fn vring_base(&self) -> u32 {
        match self {
            AnyDeviceQueue::Split(q) => q.next_avail().into(),
            AnyDeviceQueue::Packed(q) => q.base().encode(),
        }
    }

    /// The disable → drain → enable → re-check loop over either format; returns whether the
    /// driver must be notified.
    pub fn drain<F>(&mut self, batch: &mut ChainBatch, max_batch: usize, handle: F) -> Result<bool, VirtqueueError>
    where
        F: FnMut(&mut AnyDeviceQueue, &ChainBatch) -> Result<(), VirtqueueError>,
    {
        let mut notify = false;
        self.drain_then(batch, max_batch, true, handle, || notify = true)?;
        Ok(notify)
    }

    /// [`drain`](Self::drain), calling `notify` as soon as a batch's completions are published
    /// and the driver asked to hear of them, not once the ring is empty (virtio 1.2 §2.7.10:
    /// the device may notify once used_event is passed). With `rearm` false the ring is left
    /// with notifications disabled once empty, for a caller that polls the avail ring next: the
    /// driver then does not kick (a system call on its side per request) while nobody would
    /// sleep on the kick. Such a caller must
    /// [`enable_notifications`](Self::enable_notifications) and look at the ring again before
    /// it sleeps.
    pub fn drain_then<F, N>(
        &mut self,
        batch: &mut ChainBatch,
        max_batch: usize,
        rearm: bool,
        mut handle: F,
        mut notify: N,
    ) -> Result<(), VirtqueueError>
    where
        F: FnMut(&mut AnyDeviceQueue, &ChainBatch) -> Result<(), VirtqueueError>,
        N: FnMut(),
    {
        loop {
            self.disable_notifications()?;
            loop {
                batch.clear();
                if self.pop_batch(batch, max_batch)? == 0 {
                    break;
                }
                handle(self, batch)?;
                if self.publish_used()? {
                    notify();
                }
            }
            if !rearm || !self.enable_notifications()? {
                return Ok(());
            }
        }
    }
}

impl From<DeviceQueue> for AnyDeviceQueue {
    fn from(q: DeviceQueue) -> AnyDeviceQueue {
        AnyDeviceQueue::Split(q)
    }
}

impl From<PackedDeviceQueue> for AnyDeviceQueue {
    fn from(q: PackedDeviceQueue) -> AnyDeviceQueue {
        AnyDeviceQueue::Packed(q)
    }
}

/// The driver side of a ring of either format.
#[derive(Debug)]
pub enum AnyDriverQueue {
    /// Split ring.
    Split(DriverQueue),
    /// Packed ring.
    Packed(PackedDriverQueue),
}

macro_rules! both_driver {
    ($self:expr, $q:ident => $e:expr) => {
        match $self {
            AnyDriverQueue::Split($q) => $e,
            AnyDriverQueue::Packed($q) => $e,
        }
    };
}

impl AnyDriverQueue {
    /// Adds a chain (readable then writable buffers); returns its head (split) or id (packed).
    pub fn add(&mut self, readable: &[Buffer], writable: &[Buffer]) -> Result<u16, VirtqueueError> {
        both_driver!(self, q => q.add(readable, writable))
    }

    /// Adds a chain through an indirect table.
    pub fn add_indirect(&mut self, readable: &[Buffer], writable: &[Buffer]) -> Result<u16, VirtqueueError> {
        both_driver!(self, q => q.add_indirect(readable, writable))
    }

    /// Makes what was added visible (one release store).
    pub fn publish(&mut self) {
        both_driver!(self, q => q.publish())
    }

    /// Whether the device wants a kick; a packed device event structure filled wrongly is an
    /// error (the split ring has no such field to get wrong).
    pub fn kick_needed(&mut self) -> Result<bool, VirtqueueError> {
        match self {
            AnyDriverQueue::Split(q) => Ok(q.kick_needed()),
            AnyDriverQueue::Packed(q) => q.kick_needed(),
        }
    }

    /// Reaps up to `max` completions as `(head or id, written_len)`.
    pub fn reap(&mut self, out: &mut Vec<(u16, u32)>, max: usize) -> Result<usize, VirtqueueError> {
        both_driver!(self, q => q.reap(out, max))
    }

    /// Asks the device for used-buffer notifications (or not).
    pub fn set_interrupts(&mut self, enabled: bool) {
        both_driver!(self, q => q.set_interrupts(enabled))
    }

    /// Free descriptor slots.
    pub fn num_free(&self) -> u16 {
        both_driver!(self, q => q.num_free())
    }

    /// Chains added and not reaped.
    pub fn in_flight(&self) -> u16 {
        both_driver!(self, q => q.in_flight())
    }

    /// Host addresses for SET_VRING_ADDR's desc, avail and used fields (packed: descriptor
    /// ring, driver event area, device event area).
    pub fn user_addrs(&self) -> (u64, u64, u64) {
        both_driver!(self, q => q.user_addrs())
    }

    /// The memory the ring lives in.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        both_driver!(self, q => q.memory())
    }

    /// Ring size.
    #[inline]
    pub fn size(&self) -> u16 {
        match self {
            AnyDriverQueue::Split(q) => q.ring().size,
            AnyDriverQueue::Packed(q) => q.ring().size,
        }
    }

    /// Whether this is a packed ring (VIRTIO_F_RING_PACKED).
    pub fn is_packed(&self) -> bool {
        matches!(self, AnyDriverQueue::Packed(_))
    }

    /// The head (split) or id (packed) the next add will return; `None` when there is no room
    /// for one more descriptor.
    #[inline]
    pub fn next_head(&self) -> Option<u16> {
        match self {
            AnyDriverQueue::Split(q) => q.next_head(),
            AnyDriverQueue::Packed(q) => q.next_id(),
        }
    }

    /// Guest addresses of the three ring parts, in SET_VRING_ADDR's sense: split (desc, avail,
    /// used); packed (descriptor ring, driver event area, device event area).
    pub fn guest_addrs(&self) -> (u64, u64, u64) {
        match self {
            AnyDriverQueue::Split(q) => {
                let r = q.ring();
                (r.desc, r.avail, r.used)
            }
            AnyDriverQueue::Packed(q) => {
                let r = q.ring();
                (r.desc, r.driver_event, r.device_event)
            }
        }
    }

    /// SET_VRING_ADDR's `log_guest_addr`: the guest address of what the device writes when it
    /// returns buffers, which VHOST_VRING_F_LOG logs — split, the used ring; packed, the
    /// descriptor ring (used descriptors are written there).
    pub fn log_guest_addr(&self) -> u64 {
        match self {
            AnyDriverQueue::Split(q) => q.ring().used,
            AnyDriverQueue::Packed(q) => q.ring().desc,
        }
    }

    /// SET_VRING_BASE's `num` for where the driver stands: split, the next avail index; packed,
    /// the next available position and the next used position expected, with their wrap
    /// counters ([`super::PackedBase::encode`]).
    pub fn vring_base(&self) -> u32 {
        match self {
            AnyDriverQueue::Split(q) => q.avail_idx().into(),
            AnyDriverQueue::Packed(q) => super::PackedBase { avail: q.next_avail(), used: q.last_used() }.encode(),
        }
    }

    /// Restarts from what GET_VRING_BASE returned (chains in flight are forgotten): split, the
    /// next avail index (bits 0–15); packed, the avail half (bits 0–15: slot and wrap counter;
    /// a back-end that completed everything before answering has its used position there too,
    /// and DPDK fills only that half, protocol.md §9 #19).
    pub fn reset_to(&mut self, base: u32) -> Result<(), VirtqueueError> {
        match self {
            AnyDriverQueue::Split(q) => {
                q.reset_to(base as u16);
                Ok(())
            }
            AnyDriverQueue::Packed(q) => q.reset_to(super::PackedBase::decode_avail_only(base).avail),
        }
    }

    /// Hands the ring, with its chains in flight, to a new back-end (the old one died without
    /// answering GET_VRING_BASE); returns the SET_VRING_BASE `num`. Split: `used.idx` as the
    /// device last published it (the new device reads the avail ring again from there); packed:
    /// see [`PackedDriverQueue::hand_over`].
    pub fn hand_over(&mut self) -> Result<u32, VirtqueueError> {
        match self {
            AnyDriverQueue::Split(q) => Ok(q.used_idx().into()),
            AnyDriverQueue::Packed(q) => Ok(q.hand_over()?.encode()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtqueue::{PackedBase, PackedQueueConfig, QueueConfig, RingAddressSpace};

    #[test]
    fn either_format_behind_one_type() {
        for packed in [false, true] {
            let mem = Arc::new(GuestMemory::allocate(&[(0, 1 << 20)]).unwrap());
            let table = Arc::new(mem.table().clone());
            let (mut driver, mut device) = if packed {
                let d = PackedDriverQueue::allocate(mem.clone(), 8, true, 4).unwrap();
                let (desc, drv, dev) = d.user_addrs();
                let cfg = PackedQueueConfig {
                    size: 8,
                    desc_addr: desc,
                    driver_event_addr: drv,
                    device_event_addr: dev,
                    addr_space: RingAddressSpace::User,
                    event_idx: true,
                    indirect: true,
                    base: PackedBase::START,
                };
                (AnyDriverQueue::Packed(d), AnyDeviceQueue::Packed(PackedDeviceQueue::new(table, cfg).unwrap()))
            } else {
                let d = DriverQueue::allocate(mem.clone(), 8, true, 4).unwrap();
                let (desc, avail, used) = d.user_addrs();
                let cfg = QueueConfig {
                    size: 8,
                    desc_addr: desc,
                    avail_addr: avail,
                    used_addr: used,
                    addr_space: RingAddressSpace::User,
                    event_idx: true,
                    indirect: true,
                    next_avail: 0,
                };
                (AnyDriverQueue::Split(d), AnyDeviceQueue::Split(DeviceQueue::new(table, cfg).unwrap()))
            };
            let buf = mem.alloc(64, 8).unwrap();
            let mut batch = ChainBatch::new();
            let mut used = Vec::new();
            for round in 0..20u32 {
                let a = driver.add(&[(buf, 8)], &[(buf + 8, 8)]).unwrap();
                let b = driver.add_indirect(&[(buf, 8)], &[(buf + 16, 16)]).unwrap();
                driver.publish();
                let _ = driver.kick_needed().unwrap();
                let notify = device
                    .drain(&mut batch, 8, |q, batch| {
                        // Out of order: the last chain first.
                        batch.chains().iter().rev().try_for_each(|c| q.complete(batch, c, c.writable_len))
                    })
                    .unwrap();
                assert!(notify || round > 0);
                used.clear();
                assert_eq!(driver.reap(&mut used, 8).unwrap(), 2);
                assert_eq!(used, vec![(b, 16), (a, 8)]);
            }
            assert_eq!((device.in_flight(), driver.in_flight()), (0, 0));
            // 60 slots of an 8-slot packed ring: 7 laps and 4 (wrap counter 0); split: index 40.
            let expect = if packed { 4 | (4 << 16) } else { 40 };
            assert_eq!(device.vring_base(), expect);
        }
    }
}
