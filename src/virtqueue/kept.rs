//! Chains a device keeps past the batch that delivered them (deferred completion): RX buffers
//! waiting for frames, requests waiting for asynchronous I/O. A kept chain owns a copy of its
//! segment list (storage is recycled, so keeping allocates nothing once warm) and stays in
//! flight on its ring until completed or returned.

use std::collections::VecDeque;

use super::device::{Chain, ChainBatch, Segment};

/// A chain kept past its batch. Its segments point into the mappings of the queue it came
/// from; it is only valid next to that queue, which is why the worker keeps the store beside
/// the queue and drops both together.
#[derive(Debug)]
pub struct KeptChain {
    /// Head descriptor index (what the used entry returns).
    pub head: u16,
    /// Total bytes of the device-readable buffers.
    pub readable_len: u32,
    /// Total bytes of the device-writable buffers.
    pub writable_len: u32,
    readable: usize,
    segments: Vec<Segment>,
}

impl KeptChain {
    /// All segments, readable first.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The device-readable segments.
    pub fn readable(&self) -> &[Segment] {
        &self.segments[..self.readable]
    }

    /// The device-writable segments.
    pub fn writable(&self) -> &[Segment] {
        &self.segments[self.readable..]
    }
}

/// The chains one ring's device keeps, oldest first.
#[derive(Debug, Default)]
pub struct KeptChains {
    chains: VecDeque<KeptChain>,
    spare: Vec<Vec<Segment>>,
}

// SAFETY: the raw pointers in the segments point into mappings kept alive by the queue the
// chains came from; the store lives and dies beside that queue (see `KeptChain`).
unsafe impl Send for KeptChains {}

impl KeptChains {
    /// An empty store.
    pub fn new() -> KeptChains {
        KeptChains::default()
    }

    /// Keeps `chain` of `batch` (appended: the oldest stays first).
    pub fn keep(&mut self, batch: &ChainBatch, chain: &Chain) {
        let kept = self.detach(batch, chain);
        self.chains.push_back(kept);
    }

    /// A copy of `chain` held outside this list (the caller completes or recycles it): for a
    /// device that tracks chains itself, e.g. by the I/O it submitted for them. Reuses the
    /// segment storage of recycled chains.
    pub fn detach(&mut self, batch: &ChainBatch, chain: &Chain) -> KeptChain {
        let mut segments = self.spare.pop().unwrap_or_default();
        segments.extend_from_slice(batch.segments(chain));
        KeptChain {
            head: chain.head,
            readable_len: chain.readable_len,
            writable_len: chain.writable_len,
            readable: batch.readable(chain).len(),
            segments,
        }
    }

    /// Keeps every chain of `batch`.
    pub fn keep_all(&mut self, batch: &ChainBatch) {
        for chain in batch.chains() {
            self.keep(batch, chain);
        }
    }

    /// Number of chains kept.
    pub fn len(&self) -> usize {
        self.chains.len()
    }

    /// Whether no chain is kept.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// The `i`-th oldest chain.
    pub fn get(&self, i: usize) -> Option<&KeptChain> {
        self.chains.get(i)
    }

    /// Takes the oldest chain out of the store (complete it, then hand it back to
    /// [`recycle`](Self::recycle) so its storage is reused).
    pub fn take(&mut self) -> Option<KeptChain> {
        self.chains.pop_front()
    }

    /// Takes the chain with head `head` out of the store, wherever it is.
    pub fn take_head(&mut self, head: u16) -> Option<KeptChain> {
        let i = self.chains.iter().position(|c| c.head == head)?;
        self.chains.remove(i)
    }

    /// Puts a chain taken with [`take`](Self::take) back at the front, still in flight.
    pub fn put_back(&mut self, chain: KeptChain) {
        self.chains.push_front(chain);
    }

    /// Reuses the storage of a chain that was completed.
    pub fn recycle(&mut self, mut chain: KeptChain) {
        chain.segments.clear();
        self.spare.push(chain.segments);
    }

    /// The heads of the kept chains, oldest first.
    pub fn heads(&self) -> impl Iterator<Item = u16> + '_ {
        self.chains.iter().map(|c| c.head)
    }

    /// Forgets every chain (they stay in flight on their ring).
    pub fn clear(&mut self) {
        while let Some(c) = self.chains.pop_front() {
            self.recycle(c);
        }
    }
}
