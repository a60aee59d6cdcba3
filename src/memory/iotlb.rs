//! The back-end's IOTLB (ACCESS_PLATFORM, protocol.md §6.6): I/O virtual addresses → front-end
//! virtual addresses with permissions, filled by the front-end's IOTLB_MSG UPDATEs (usually in
//! answer to our MISS) and emptied by INVALIDATEs. Pure bookkeeping: no mapping happens here;
//! the translated front-end address then goes through the memory table like any other.

use std::collections::BTreeMap;

use super::error::{AddressSpace, MemoryError};

/// Read permission (the spec's `perm` values are a 2-bit mask).
pub const IOTLB_READ: u8 = 1;
/// Write permission.
pub const IOTLB_WRITE: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    size: u64,
    uaddr: u64,
    perm: u8,
}

/// Why a lookup failed: the caller sends a MISS for `iova` (or fails the access when the entry
/// exists but forbids it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbFault {
    /// No entry covers `iova`.
    Miss {
        /// The first address without an entry.
        iova: u64,
    },
    /// An entry covers `iova` but lacks the permission.
    Denied {
        /// The address.
        iova: u64,
    },
}

/// IOVA ranges → front-end virtual addresses. Entries never overlap: an UPDATE replaces what
/// it covers.
#[derive(Debug, Default, Clone)]
pub struct Iotlb {
    entries: BTreeMap<u64, Entry>,
}

impl Iotlb {
    /// An empty IOTLB.
    pub fn new() -> Iotlb {
        Iotlb::default()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// UPDATE: maps `[iova, iova + size)` to `uaddr` with `perm` (1 RO, 2 WO, 3 RW).
    pub fn update(&mut self, iova: u64, size: u64, uaddr: u64, perm: u8) -> Result<(), MemoryError> {
        let overflow = |addr, space| MemoryError::Overflow { space, addr, len: size };
        if size == 0 || perm & !(IOTLB_READ | IOTLB_WRITE) != 0 || perm == 0 {
            return Err(MemoryError::InvalidSize(size));
        }
        iova.checked_add(size).ok_or_else(|| overflow(iova, AddressSpace::Iova))?;
        uaddr.checked_add(size).ok_or_else(|| overflow(uaddr, AddressSpace::User))?;
        self.invalidate(iova, size);
        self.entries.insert(iova, Entry { size, uaddr, perm });
        Ok(())
    }

    /// INVALIDATE: forgets every mapping of `[iova, iova + size)`; entries only partly inside
    /// keep their parts outside it. Returns whether anything was removed.
    pub fn invalidate(&mut self, iova: u64, size: u64) -> bool {
        let end = iova.saturating_add(size);
        let hit: Vec<(u64, Entry)> = self
            .entries
            .range(..end)
            .rev()
            .take_while(|(start, e)| start.saturating_add(e.size) > iova)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (start, e) in &hit {
            self.entries.remove(start);
            let e_end = start + e.size;
            if *start < iova {
                self.entries.insert(*start, Entry { size: iova - start, ..*e });
            }
            if e_end > end {
                let skip = end - start;
                self.entries.insert(end, Entry { size: e_end - end, uaddr: e.uaddr + skip, perm: e.perm });
            }
        }
        !hit.is_empty()
    }

    /// The front-end address of `iova` and how many bytes from there the same entry covers,
    /// if an entry covers it with all of `perm`.
    pub fn lookup(&self, iova: u64, perm: u8) -> Result<(u64, u64), IotlbFault> {
        let Some((start, e)) = self.entries.range(..=iova).next_back() else { return Err(IotlbFault::Miss { iova }) };
        let off = iova - start;
        if off >= e.size {
            return Err(IotlbFault::Miss { iova });
        }
        if e.perm & perm != perm {
            return Err(IotlbFault::Denied { iova });
        }
        Ok((e.uaddr + off, e.size - off))
    }

    /// Translates `[iova, iova + len)` into front-end address pieces (one per entry crossed).
    pub fn translate(&self, iova: u64, len: u64, perm: u8, mut f: impl FnMut(u64, u64)) -> Result<(), IotlbFault> {
        let mut at = iova;
        let mut left = len;
        while left > 0 {
            let (uaddr, avail) = self.lookup(at, perm)?;
            let n = avail.min(left);
            f(uaddr, n);
            left -= n;
            at = at.checked_add(n).ok_or(IotlbFault::Miss { iova: at })?;
        }
        Ok(())
    }

    /// The front-end address of a range that one entry covers whole (ring parts).
    pub fn translate_contiguous(&self, iova: u64, len: u64, perm: u8) -> Result<u64, IotlbFault> {
        let (uaddr, avail) = self.lookup(iova, perm)?;
        if avail >= len {
            return Ok(uaddr);
        }
        // Adjacent entries may still map a contiguous front-end range.
        let mut next_u = uaddr + avail;
        let mut at = iova + avail;
        let mut left = len - avail;
        while left > 0 {
            let (u, a) = self.lookup(at, perm)?;
            if u != next_u {
                return Err(IotlbFault::Denied { iova: at });
            }
            let n = a.min(left);
            left -= n;
            at += n;
            next_u += n;
        }
        Ok(uaddr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_lookup_and_permissions() {
        let mut t = Iotlb::new();
        t.update(0x1000, 0x2000, 0x7f00_0000, IOTLB_READ).unwrap();
        assert_eq!(t.lookup(0x1800, IOTLB_READ), Ok((0x7f00_0800, 0x1800)));
        assert_eq!(t.lookup(0x1800, IOTLB_WRITE), Err(IotlbFault::Denied { iova: 0x1800 }));
        assert_eq!(t.lookup(0x3000, IOTLB_READ), Err(IotlbFault::Miss { iova: 0x3000 }));
        assert_eq!(t.lookup(0xfff, IOTLB_READ), Err(IotlbFault::Miss { iova: 0xfff }));
        assert!(t.update(u64::MAX - 1, 4, 0, 3).is_err());
        assert!(t.update(0, 0, 0, 3).is_err());
        assert!(t.update(0, 1, 0, 4).is_err());
    }

    #[test]
    fn ranges_across_entries() {
        let mut t = Iotlb::new();
        t.update(0x0, 0x1000, 0x10_0000, 3).unwrap();
        t.update(0x1000, 0x1000, 0x50_0000, 3).unwrap();
        let mut pieces = Vec::new();
        t.translate(0x800, 0x1000, IOTLB_READ, |u, n| pieces.push((u, n))).unwrap();
        assert_eq!(pieces, vec![(0x10_0800, 0x800), (0x50_0000, 0x800)]);
        assert!(t.translate_contiguous(0x800, 0x1000, IOTLB_READ).is_err());
        t.update(0x1000, 0x1000, 0x10_1000, 3).unwrap();
        assert_eq!(t.translate_contiguous(0x800, 0x1000, IOTLB_READ), Ok(0x10_0800));
        assert_eq!(t.translate(0x1800, 0x1000, 1, |_, _| {}), Err(IotlbFault::Miss { iova: 0x2000 }));
    }

    #[test]
    fn invalidate_splits_and_replaces() {
        let mut t = Iotlb::new();
        t.update(0x0, 0x4000, 0x10_0000, 3).unwrap();
        assert!(t.invalidate(0x1000, 0x1000));
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(0x800, 1), Ok((0x10_0800, 0x800)));
        assert_eq!(t.lookup(0x1800, 1), Err(IotlbFault::Miss { iova: 0x1800 }));
        assert_eq!(t.lookup(0x2000, 1), Ok((0x10_2000, 0x2000)));
        // An update over both pieces replaces them.
        t.update(0x0, 0x4000, 0x90_0000, 1).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup(0x3fff, 1), Ok((0x90_3fff, 1)));
        assert!(!t.invalidate(0x4000, 0x1000));
        assert!(t.invalidate(0, u64::MAX));
        assert!(t.is_empty());
    }
}
