//! What both ring formats do with a descriptor's buffer once the ring told them where it is:
//! translate it (guest-physical, or an IOVA through the IOTLB under ACCESS_PLATFORM) into
//! segments that never leave a mapping, copy an indirect table privately, and apply the chain
//! rules that do not depend on the ring layout (protocol.md §7.9 #5, #10, #11, #12, #15).

use std::sync::RwLock;

use super::device::{Chain, Segment, MAX_SEGMENTS};
use super::error::VirtqueueError;
use crate::memory::{Iotlb, IotlbFault, MemoryError, MemoryTable, IOTLB_READ, IOTLB_WRITE};

/// Translates descriptor buffers for one queue.
#[derive(Clone, Copy)]
pub(super) struct Buffers<'a> {
    pub memory: &'a MemoryTable,
    pub iotlb: Option<&'a RwLock<Iotlb>>,
}

impl Buffers<'_> {
    /// Copies the indirect table at `addr` (`out.len()` bytes) into `out`: its entries are then
    /// read from the private copy only (§7.9 #16), and it may straddle regions.
    pub fn read_table(&self, head: u16, addr: u64, len: u32, out: &mut [u8]) -> Result<(), VirtqueueError> {
        let Some(iotlb) = self.iotlb else {
            return self.memory.read(addr, out).map_err(|_| VirtqueueError::BufferUnmapped { head, addr, len });
        };
        let mut at = 0usize;
        self.walk_iova(iotlb, head, addr, len, IOTLB_READ, |host, _gpa, n| {
            // SAFETY: `host` is valid for n bytes of a live mapping; `out` holds `len` bytes and
            // the IOTLB pieces add up to `len`.
            unsafe { std::ptr::copy_nonoverlapping(host, out[at..].as_mut_ptr(), n as usize) };
            at += n as usize;
        })
    }

    /// Appends the segments of buffer `[addr, addr + len)` to `out`, split where it crosses
    /// regions (or IOTLB entries). The common case — no IOTLB, the buffer inside one region —
    /// is inlined into the walkers; the others are out of line (they cost a call each, which
    /// in the common case measured as several per cent of a whole chain).
    #[inline(always)]
    pub fn push_segments(
        &self,
        head: u16,
        addr: u64,
        len: u32,
        writable: bool,
        out: &mut Vec<Segment>,
    ) -> Result<(), VirtqueueError> {
        if self.iotlb.is_none() {
            if let Ok(host) = self.memory.translate(addr, u64::from(len)) {
                out.push(Segment { host, len, gpa: addr, writable });
                return Ok(());
            }
        }
        self.push_segments_slow(head, addr, len, writable, out)
    }

    /// [`push_segments`](Self::push_segments) through the IOTLB, or across regions.
    #[cold]
    #[inline(never)]
    fn push_segments_slow(
        &self,
        head: u16,
        addr: u64,
        len: u32,
        writable: bool,
        out: &mut Vec<Segment>,
    ) -> Result<(), VirtqueueError> {
        if let Some(iotlb) = self.iotlb {
            let perm = if writable { IOTLB_WRITE } else { IOTLB_READ };
            return self.walk_iova(iotlb, head, addr, len, perm, |host, gpa, n| {
                out.push(Segment { host, len: n as u32, gpa, writable });
            });
        }
        match self.memory.translate(addr, u64::from(len)) {
            Ok(host) => {
                out.push(Segment { host, len, gpa: addr, writable });
                Ok(())
            }
            Err(MemoryError::Unmapped { .. }) => {
                // The buffer may continue in an adjacent region: split it.
                let mut gpa = addr;
                self.memory
                    .for_each_segment(addr, u64::from(len), |host, n| {
                        out.push(Segment { host, len: n as u32, gpa, writable });
                        gpa += n as u64;
                    })
                    .map_err(|_| VirtqueueError::BufferUnmapped { head, addr, len })
            }
            Err(_) => Err(VirtqueueError::BufferUnmapped { head, addr, len }),
        }
    }

    /// Calls `f(host, gpa, len)` for each piece of the IOVA range (one per IOTLB entry crossed),
    /// each mapped with `perm`. A missing entry is [`VirtqueueError::IotlbMiss`]; a forbidden
    /// access or a front-end address outside the memory table is `BufferUnmapped`.
    fn walk_iova(
        &self,
        iotlb: &RwLock<Iotlb>,
        head: u16,
        addr: u64,
        len: u32,
        perm: u8,
        mut f: impl FnMut(*mut u8, u64, u64),
    ) -> Result<(), VirtqueueError> {
        let tlb = iotlb.read().unwrap_or_else(|e| e.into_inner());
        let mut failed = false;
        tlb.translate(addr, u64::from(len), perm, |uaddr, n| {
            // After a failure the rest is skipped; callers discard what a failed walk produced.
            match (failed, self.memory.translate_user(uaddr, n), self.memory.user_to_guest(uaddr)) {
                (false, Ok(host), Some(gpa)) => f(host, gpa, n),
                _ => failed = true,
            }
        })
        .map_err(|fault| match fault {
            IotlbFault::Miss { iova } => VirtqueueError::IotlbMiss { iova, perm },
            // An entry that forbids the access: the driver handed the device a buffer it may
            // not use that way.
            IotlbFault::Denied { .. } => VirtqueueError::BufferUnmapped { head, addr, len },
        })?;
        if failed {
            return Err(VirtqueueError::BufferUnmapped { head, addr, len });
        }
        Ok(())
    }
}

/// One chain being collected into a batch's segments: the layout-independent rules, checked
/// buffer by buffer on values already copied out of the ring.
pub(super) struct ChainAcc {
    first: usize,
    seen_writable: bool,
    readable_len: u64,
    writable_len: u64,
    readable_segs: u32,
}

impl ChainAcc {
    /// A chain whose segments start at `segments[first]`.
    #[inline]
    pub fn new(first: usize) -> ChainAcc {
        ChainAcc { first, seen_writable: false, readable_len: 0, writable_len: 0, readable_segs: 0 }
    }

    /// Adds one buffer: non-empty (#10), readable ones before writable ones (#11), total length
    /// within 32 bits summed in u64 (#5), translated inside memory (#12), and at most
    /// [`MAX_SEGMENTS`] segments (#15). Always inlined into the walkers: as a call it cost
    /// the split device side 5-9 % per chain (callgrind, `benches/ring_counts.rs`).
    #[inline(always)]
    pub fn add(
        &mut self,
        buffers: &Buffers<'_>,
        head: u16,
        addr: u64,
        len: u32,
        writable: bool,
        segments: &mut Vec<Segment>,
    ) -> Result<(), VirtqueueError> {
        if len == 0 {
            return Err(VirtqueueError::ZeroLength { head });
        }
        if !writable && self.seen_writable {
            return Err(VirtqueueError::ReadableAfterWritable { head });
        }
        self.seen_writable |= writable;
        if writable {
            self.writable_len += u64::from(len);
        } else {
            self.readable_len += u64::from(len);
        }
        if self.readable_len + self.writable_len > u64::from(u32::MAX) {
            return Err(VirtqueueError::LengthOverflow { head });
        }
        let before = segments.len();
        buffers.push_segments(head, addr, len, writable, segments)?;
        if !writable {
            self.readable_segs += (segments.len() - before) as u32;
        }
        if segments.len() - self.first > MAX_SEGMENTS {
            return Err(VirtqueueError::TooManySegments { head, limit: MAX_SEGMENTS });
        }
        Ok(())
    }

    /// The chain, returned to the driver as `head` (split: head index; packed: buffer id).
    #[inline]
    pub fn finish(self, head: u16, segments: &[Segment]) -> Chain {
        Chain {
            head,
            first: self.first as u32,
            readable: self.readable_segs,
            total: (segments.len() - self.first) as u32,
            readable_len: self.readable_len as u32,
            writable_len: self.writable_len as u32,
        }
    }
}
