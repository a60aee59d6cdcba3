//! What a device sees of the rings of its worker thread: a handle on one ring (its queue, the
//! chains the device keeps on it, a way to complete them later) and the other rings of the same
//! thread. Rings of one group (`Device::ring_group`) share a thread, so a device moves data
//! between them (net: TX into the RX ring of the pair) without a lock. The worker publishes
//! every ring that was written to once per wake-up and notifies the driver once per burst.

use super::worker::Slot;
use crate::virtqueue::{prefix, AnyDeviceQueue, ChainBatch, KeptChain, KeptChains, VirtqueueError};

/// One ring of the worker, lent to the device for the current wake-up.
pub struct RingHandle<'a> {
    slot: &'a mut Slot,
}

impl<'a> RingHandle<'a> {
    pub(crate) fn new(slot: &'a mut Slot) -> RingHandle<'a> {
        RingHandle { slot }
    }

    /// The ring index.
    pub fn index(&self) -> u16 {
        self.slot.index
    }

    /// The ring's queue (complete chains of a batch on it; the worker publishes afterwards).
    pub fn queue(&mut self) -> &mut AnyDeviceQueue {
        self.slot.dirty = true;
        &mut self.slot.queue
    }

    /// The chains the device keeps on this ring.
    pub fn kept(&mut self) -> &mut KeptChains {
        &mut self.slot.kept
    }

    /// Pops up to `max` available chains into the kept store; returns how many. A malformed
    /// chain breaks the ring (the chains popped before it are kept); a missing IOTLB entry
    /// leaves the chain on the ring for the kick path, which asks the front-end for it.
    pub fn refill(&mut self, max: usize) -> usize {
        let slot = &mut *self.slot;
        slot.refill_batch.clear();
        let n = match slot.queue.pop_batch(&mut slot.refill_batch, max) {
            Ok(n) => n,
            Err(VirtqueueError::IotlbMiss { .. }) => {
                slot.pending = true;
                slot.refill_batch.len()
            }
            Err(_) => slot.refill_batch.len(),
        };
        slot.kept.keep_all(&slot.refill_batch);
        slot.refill_batch.clear();
        n
    }

    /// The oldest kept chain, refilling from the ring (up to `refill` chains) when none is
    /// kept. Complete it with [`complete`](Self::complete) or hand it back with
    /// [`KeptChains::put_back`].
    pub fn take(&mut self, refill: usize) -> Option<KeptChain> {
        if self.slot.kept.is_empty() && refill > 0 {
            self.refill(refill);
        }
        self.slot.kept.take()
    }

    /// Completes a kept chain with used length `written` (capped at its writable length); when
    /// LOG_ALL is on its writable buffers are logged whole, as [`AnyDeviceQueue::complete`] does.
    /// The used entry becomes visible when the worker publishes.
    pub fn complete(&mut self, chain: KeptChain, written: u32) -> Result<(), VirtqueueError> {
        self.complete_logging(chain, written, false)
    }

    /// Completes a kept chain whose device wrote exactly its first `written` bytes and nothing
    /// else: only those are logged (as [`AnyDeviceQueue::complete_prefix`]).
    pub fn complete_prefix(&mut self, chain: KeptChain, written: u32) -> Result<(), VirtqueueError> {
        self.complete_logging(chain, written, true)
    }

    fn complete_logging(&mut self, chain: KeptChain, written: u32, exact: bool) -> Result<(), VirtqueueError> {
        let written = written.min(chain.writable_len);
        let slot = &mut *self.slot;
        slot.dirty = true;
        let whole = chain.writable().iter().map(|s| (s.gpa, s.len));
        let result = if exact {
            slot.queue.complete_with(chain.head, prefix(whole, written), written)
        } else {
            slot.queue.complete_with(chain.head, whole, written)
        };
        slot.kept.recycle(chain);
        result
    }

    /// Re-arms the driver's notifications for this ring (when the device waits for buffers)
    /// and says whether chains arrived meanwhile (then refill instead of waiting).
    pub fn arm(&mut self) -> Result<bool, VirtqueueError> {
        self.slot.queue.enable_notifications()
    }

    /// A scratch batch of this ring (empty), e.g. to pop into.
    pub fn scratch(&mut self) -> (&mut AnyDeviceQueue, &mut ChainBatch) {
        let slot = &mut *self.slot;
        slot.refill_batch.clear();
        (&mut slot.queue, &mut slot.refill_batch)
    }
}

/// The other rings of the worker during one device call.
pub struct Rings<'a> {
    before: &'a mut [Box<Slot>],
    after: &'a mut [Box<Slot>],
    /// The session whose rings these are: a worker shared by several devices holds rings of
    /// other sessions too, which a device never sees.
    owner: u64,
}

impl<'a> Rings<'a> {
    pub(crate) fn new(before: &'a mut [Box<Slot>], after: &'a mut [Box<Slot>], owner: u64) -> Rings<'a> {
        Rings { before, after, owner }
    }

    /// No other ring (a device call outside a worker's wake-up).
    pub fn none() -> Rings<'static> {
        Rings { before: &mut [], after: &mut [], owner: u64::MAX }
    }

    /// Publishes the rings written to during the last device call (once per batch, so a driver
    /// sees its RX entries while the device is still draining its TX ring).
    pub(crate) fn flush(&mut self) {
        let owner = self.owner;
        for slot in self.before.iter_mut().chain(self.after.iter_mut()).filter(|s| s.owner == owner) {
            slot.flush();
        }
    }

    /// Ring `index` of this device, if it runs on this worker and is enabled and usable.
    pub fn get(&mut self, index: u16) -> Option<RingHandle<'_>> {
        let owner = self.owner;
        self.before
            .iter_mut()
            .chain(self.after.iter_mut())
            .find(|s| s.owner == owner && s.index == index)
            .filter(|s| s.usable())
            .map(|s| RingHandle::new(s))
    }
}
