//! The memory table: regions sorted by guest address, each with its mapping, and translation of
//! guest physical and front-end user addresses. A table is immutable; SET_MEM_TABLE and
//! ADD/REM_MEM_REG build a new one, and whoever still holds the old one (a running ring, a
//! Python view) keeps its mappings alive until it lets go.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::error::{AddressSpace, MemoryError};
use super::mapping::Mapping;

/// The slot limit this library advertises with GET_MAX_MEM_SLOTS (libvhost-user's value).
pub const DEFAULT_MAX_SLOTS: usize = 509;

/// A region as the protocol describes it (SET_MEM_TABLE / ADD_MEM_REG).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionDesc {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Front-end virtual address of the first byte.
    pub user_addr: u64,
    /// Offset of the first byte in the fd.
    pub mmap_offset: u64,
}

/// A mapped region.
#[derive(Clone, Debug)]
pub struct Region {
    /// What the front-end said about it.
    pub desc: RegionDesc,
    mapping: Arc<Mapping>,
    host: usize,
}

impl Region {
    /// Maps `fd` for `desc`.
    pub fn map(desc: RegionDesc, fd: OwnedFd) -> Result<Region, MemoryError> {
        check_range(AddressSpace::Guest, desc.guest_addr, desc.size)?;
        check_range(AddressSpace::User, desc.user_addr, desc.size)?;
        let mapping = Arc::new(Mapping::from_fd(fd, desc.mmap_offset, desc.size)?);
        Ok(Region::from_mapping(desc, mapping))
    }

    /// A region over an existing mapping (the front-end's own memory).
    pub fn from_mapping(desc: RegionDesc, mapping: Arc<Mapping>) -> Region {
        let host = mapping.as_ptr() as usize;
        Region { desc, mapping, host }
    }

    /// The mapping, shared with everyone who uses it.
    pub fn mapping(&self) -> &Arc<Mapping> {
        &self.mapping
    }

    fn end(&self) -> u64 {
        self.desc.guest_addr + self.desc.size
    }
}

fn check_range(space: AddressSpace, addr: u64, len: u64) -> Result<u64, MemoryError> {
    addr.checked_add(len).ok_or(MemoryError::Overflow { space, addr, len })
}

/// An immutable set of non-overlapping regions.
#[derive(Clone, Debug, Default)]
pub struct MemoryTable {
    /// Sorted by guest address.
    regions: Vec<Region>,
    /// Indices into `regions`, sorted by user address.
    by_user: Vec<usize>,
}

impl MemoryTable {
    /// An empty table.
    pub fn new() -> MemoryTable {
        MemoryTable::default()
    }

    /// A table of already-mapped regions; refuses overlaps in either address space.
    pub fn from_regions(mut regions: Vec<Region>) -> Result<MemoryTable, MemoryError> {
        regions.sort_by_key(|r| r.desc.guest_addr);
        for pair in regions.windows(2) {
            if pair[0].end() > pair[1].desc.guest_addr {
                return Err(MemoryError::Overlap { guest_addr: pair[1].desc.guest_addr, size: pair[1].desc.size });
            }
        }
        let mut by_user: Vec<usize> = (0..regions.len()).collect();
        by_user.sort_by_key(|&i| regions[i].desc.user_addr);
        for pair in by_user.windows(2) {
            let (a, b) = (&regions[pair[0]].desc, &regions[pair[1]].desc);
            if a.user_addr + a.size > b.user_addr {
                return Err(MemoryError::Overlap { guest_addr: b.guest_addr, size: b.size });
            }
        }
        Ok(MemoryTable { regions, by_user })
    }

    /// SET_MEM_TABLE: map every (region, fd) pair. Nothing is kept if one fails.
    pub fn map_all(pairs: Vec<(RegionDesc, OwnedFd)>) -> Result<MemoryTable, MemoryError> {
        let regions = pairs.into_iter().map(|(d, fd)| Region::map(d, fd)).collect::<Result<Vec<_>, _>>()?;
        MemoryTable::from_regions(regions)
    }

    /// ADD_MEM_REG: this table plus one region, within `max_slots`.
    pub fn with_added(&self, region: Region, max_slots: usize) -> Result<MemoryTable, MemoryError> {
        if self.regions.len() >= max_slots {
            return Err(MemoryError::TooManyRegions { limit: max_slots });
        }
        let mut regions = self.regions.clone();
        regions.push(region);
        MemoryTable::from_regions(regions)
    }

    /// REM_MEM_REG: this table minus the region with the same guest address, user address and
    /// size (the spec says to ignore mmap_offset).
    pub fn with_removed(&self, desc: &RegionDesc) -> Result<MemoryTable, MemoryError> {
        let pos = self
            .regions
            .iter()
            .position(|r| {
                r.desc.guest_addr == desc.guest_addr && r.desc.user_addr == desc.user_addr && r.desc.size == desc.size
            })
            .ok_or(MemoryError::NoSuchRegion {
                guest_addr: desc.guest_addr,
                size: desc.size,
                user_addr: desc.user_addr,
            })?;
        let mut regions = self.regions.clone();
        regions.remove(pos);
        MemoryTable::from_regions(regions)
    }

    /// The regions, sorted by guest address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Whether the table has no region.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// One past the highest guest address mapped (what a dirty log must cover).
    pub fn guest_end(&self) -> u64 {
        self.regions.last().map(Region::end).unwrap_or(0)
    }

    #[inline]
    fn find_guest(&self, addr: u64) -> Option<&Region> {
        // partition_point: first region starting after addr; the candidate is the one before.
        let i = self.regions.partition_point(|r| r.desc.guest_addr <= addr);
        let r = self.regions.get(i.checked_sub(1)?)?;
        (addr < r.end()).then_some(r)
    }

    /// Index (in [`regions`](Self::regions)) of the region holding guest address `gpa`.
    pub fn region_index(&self, gpa: u64) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.desc.guest_addr <= gpa).checked_sub(1)?;
        (gpa < self.regions[i].end()).then_some(i)
    }

    /// Host pointer to `[gpa, gpa + len)`, which must lie inside one region. A zero `len` still
    /// requires `gpa` to be mapped (CVE-2020-10725: an unchecked translation of an empty buffer).
    #[inline]
    pub fn translate(&self, gpa: u64, len: u64) -> Result<*mut u8, MemoryError> {
        self.translate_with(gpa, len).map(|(p, _)| p)
    }

    /// Like [`translate`](Self::translate), also returning the region's mapping.
    #[inline]
    pub fn translate_with(&self, gpa: u64, len: u64) -> Result<(*mut u8, &Arc<Mapping>), MemoryError> {
        let end = check_range(AddressSpace::Guest, gpa, len)?;
        match self.find_guest(gpa) {
            Some(r) if end <= r.end() => Ok(((r.host + (gpa - r.desc.guest_addr) as usize) as *mut u8, &r.mapping)),
            _ => Err(MemoryError::Unmapped { space: AddressSpace::Guest, addr: gpa, len }),
        }
    }

    /// Host pointer to the front-end user range `[uva, uva + len)` (ring addresses of
    /// SET_VRING_ADDR), which must lie inside one region.
    pub fn translate_user(&self, uva: u64, len: u64) -> Result<*mut u8, MemoryError> {
        let end = check_range(AddressSpace::User, uva, len)?;
        let i = self.by_user.partition_point(|&i| self.regions[i].desc.user_addr <= uva);
        let found = i.checked_sub(1).and_then(|j| self.by_user.get(j)).map(|&k| &self.regions[k]);
        match found {
            Some(r) if end <= r.desc.user_addr + r.desc.size => {
                Ok((r.host + (uva - r.desc.user_addr) as usize) as *mut u8)
            }
            _ => Err(MemoryError::Unmapped { space: AddressSpace::User, addr: uva, len }),
        }
    }

    /// The guest physical address of a front-end user address (for dirty logging of rings).
    pub fn user_to_guest(&self, uva: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| uva >= r.desc.user_addr && uva - r.desc.user_addr < r.desc.size)
            .map(|r| r.desc.guest_addr + (uva - r.desc.user_addr))
    }

    /// Calls `f(host_ptr, len)` for each piece of `[gpa, gpa + len)`, split where it crosses from
    /// one region into an adjacent one; fails (before calling `f`) if any byte is unmapped.
    pub fn for_each_segment(&self, gpa: u64, len: u64, mut f: impl FnMut(*mut u8, usize)) -> Result<(), MemoryError> {
        let end = check_range(AddressSpace::Guest, gpa, len)?;
        // First pass validates, so a partial copy never happens.
        let mut at = gpa;
        while at < end {
            let r = self.find_guest(at).ok_or(MemoryError::Unmapped { space: AddressSpace::Guest, addr: gpa, len })?;
            at = r.end().min(end);
        }
        if len == 0 {
            self.find_guest(gpa).ok_or(MemoryError::Unmapped { space: AddressSpace::Guest, addr: gpa, len })?;
            return Ok(());
        }
        let mut at = gpa;
        while at < end {
            let Some(r) = self.find_guest(at) else { break };
            let piece = r.end().min(end) - at;
            f((r.host + (at - r.desc.guest_addr) as usize) as *mut u8, piece as usize);
            at += piece;
        }
        Ok(())
    }

    /// Copies guest memory at `gpa` into `buf` (split across regions as needed).
    #[inline]
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        // Nearly every access lies inside one region: one lookup instead of two passes.
        if let Ok(p) = self.translate(gpa, buf.len() as u64) {
            // SAFETY: p..p+len is inside a live mapping; buf has len bytes. Raw copy, no
            // reference to guest memory is formed.
            unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
            return Ok(());
        }
        self.read_segments(gpa, buf)
    }

    #[cold]
    fn read_segments(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mut done = 0usize;
        self.for_each_segment(gpa, buf.len() as u64, |p, n| {
            // SAFETY: p..p+n is inside a live mapping (validated); buf has n bytes left. Raw
            // copy, no reference to guest memory is formed.
            unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr().add(done), n) };
            done += n;
        })
    }

    /// Copies `data` into guest memory at `gpa` (split across regions as needed).
    #[inline]
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        if let Ok(p) = self.translate(gpa, data.len() as u64) {
            // SAFETY: as in `read`, in the other direction.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
            return Ok(());
        }
        self.write_segments(gpa, data)
    }

    #[cold]
    fn write_segments(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let mut done = 0usize;
        self.for_each_segment(gpa, data.len() as u64, |p, n| {
            // SAFETY: as in `read`, in the other direction.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().add(done), p, n) };
            done += n;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::memfd;

    fn region(gpa: u64, size: u64, uva: u64) -> Region {
        Region::map(RegionDesc { guest_addr: gpa, size, user_addr: uva, mmap_offset: 0 }, memfd("t", size).unwrap())
            .unwrap()
    }

    #[test]
    fn translation_and_bounds() {
        let t = MemoryTable::from_regions(vec![region(0x10000, 0x4000, 0x7000_0000), region(0, 0x4000, 0x9000_0000)])
            .unwrap();
        assert_eq!(t.regions()[0].desc.guest_addr, 0, "sorted by guest address");
        assert!(t.translate(0, 0x4000).is_ok());
        assert!(matches!(t.translate(0x3fff, 2), Err(MemoryError::Unmapped { .. })), "straddles the end");
        assert!(matches!(t.translate(0x4000, 0), Err(MemoryError::Unmapped { .. })), "unmapped, even empty");
        assert!(matches!(t.translate(u64::MAX, 2), Err(MemoryError::Overflow { .. })));
        assert!(t.translate(0x13fff, 1).is_ok());
        assert!(t.translate_user(0x7000_0000 + 0x100, 0x100).is_ok());
        assert!(t.translate_user(0x7000_3fff, 2).is_err());
        assert!(t.translate_user(0x6fff_ffff, 1).is_err());
        assert_eq!(t.user_to_guest(0x9000_0010), Some(0x10));
        assert_eq!(t.guest_end(), 0x14000);
        // Same mapping through both address spaces.
        assert_eq!(t.translate_user(0x7000_0010, 1).unwrap(), t.translate(0x10010, 1).unwrap());
    }

    #[test]
    fn reads_and_writes_split_across_adjacent_regions() {
        let t =
            MemoryTable::from_regions(vec![region(0, 0x1000, 0x1_0000_0000), region(0x1000, 0x1000, 0x2_0000_0000)])
                .unwrap();
        let data: Vec<u8> = (0..64).collect();
        t.write(0xfe0, &data).unwrap();
        let mut back = vec![0u8; 64];
        t.read(0xfe0, &mut back).unwrap();
        assert_eq!(back, data);
        let mut pieces = vec![];
        t.for_each_segment(0xfe0, 64, |_, n| pieces.push(n)).unwrap();
        assert_eq!(pieces, [32, 32]);
        // A hole: nothing is copied when any byte is unmapped.
        assert!(t.write(0x1ff0, &data).is_err());
        let mut probe = [0u8; 16];
        t.read(0x1ff0, &mut probe).unwrap();
        assert_eq!(probe, [0; 16]);
    }

    #[test]
    fn overlap_slots_and_removal() {
        let a = region(0, 0x1000, 0x1000_0000);
        let t = MemoryTable::from_regions(vec![a.clone()]).unwrap();
        assert!(matches!(t.with_added(region(0x800, 0x1000, 0x2000_0000), 8), Err(MemoryError::Overlap { .. })));
        assert!(matches!(t.with_added(region(0x1000, 0x1000, 0x1000_0800), 8), Err(MemoryError::Overlap { .. })));
        assert!(matches!(
            t.with_added(region(0x1000, 0x1000, 0x3000_0000), 1),
            Err(MemoryError::TooManyRegions { .. })
        ));
        let t2 = t.with_added(region(0x1000, 0x1000, 0x3000_0000), 8).unwrap();
        assert_eq!(t2.regions().len(), 2);
        let mut gone = a.desc;
        gone.mmap_offset = 12345; // ignored
        let t3 = t2.with_removed(&gone).unwrap();
        assert_eq!(t3.regions().len(), 1);
        assert!(matches!(t3.with_removed(&gone), Err(MemoryError::NoSuchRegion { .. })));
        // The old table still reads its (now removed) region: its mapping lives on.
        t.write(0, b"still here").unwrap();
    }

    #[test]
    fn short_files_and_absurd_sizes_are_refused() {
        let fd = memfd("short", 0x1000).unwrap();
        let err =
            Region::map(RegionDesc { guest_addr: 0, size: 0x2000, user_addr: 0, mmap_offset: 0 }, fd).unwrap_err();
        assert!(matches!(err, MemoryError::FileTooSmall { needed: 0x2000, actual: 0x1000 }), "{err}");
        let fd = memfd("off", 0x2000).unwrap();
        let err =
            Region::map(RegionDesc { guest_addr: 0, size: 0x1000, user_addr: 0, mmap_offset: 0x1001 }, fd).unwrap_err();
        assert!(matches!(err, MemoryError::FileTooSmall { .. }));
        let fd = memfd("big", 0x1000).unwrap();
        let err =
            Region::map(RegionDesc { guest_addr: 0, size: u64::MAX, user_addr: 0, mmap_offset: 0 }, fd).unwrap_err();
        assert!(matches!(err, MemoryError::Overflow { .. } | MemoryError::InvalidSize(_)), "{err}");
        // A non-zero mmap_offset that is not page-aligned still maps (libvhost-user convention).
        let fd = memfd("odd", 0x3000).unwrap();
        let r = Region::map(RegionDesc { guest_addr: 0, size: 0x1000, user_addr: 0, mmap_offset: 0x1234 }, fd).unwrap();
        assert_eq!(r.mapping().mmap_offset(), 0x1234);
    }
}
