//! Front-end memory: memfd-backed regions at chosen guest addresses, a bump allocator for rings
//! and buffers inside them, and the region table to send with its fds.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use super::error::MemoryError;
use super::mapping::{memfd, Mapping};
use super::table::{MemoryTable, Region, RegionDesc};

/// Guest memory owned by this process (the front-end role): what SET_MEM_TABLE / ADD_MEM_REG
/// share with a back-end.
#[derive(Debug)]
pub struct GuestMemory {
    table: MemoryTable,
    /// Next free byte offset in each region (same order as `table.regions()`).
    cursors: Mutex<Vec<u64>>,
}

impl GuestMemory {
    /// Creates one memfd per `(guest_addr, size)` and maps it. Each region's user address is
    /// where it is mapped in this process, as QEMU sends it.
    pub fn allocate(layout: &[(u64, u64)]) -> Result<GuestMemory, MemoryError> {
        let mut regions = Vec::with_capacity(layout.len());
        for (i, &(guest_addr, size)) in layout.iter().enumerate() {
            let fd = memfd(&format!("vhostuser_rs-guest-{i}"), size)?;
            let mapping = Arc::new(Mapping::from_fd(fd, 0, size)?);
            let desc = RegionDesc { guest_addr, size, user_addr: mapping.as_ptr() as u64, mmap_offset: 0 };
            regions.push(Region::from_mapping(desc, mapping));
        }
        let table = MemoryTable::from_regions(regions)?;
        let cursors = Mutex::new(vec![0; table.regions().len()]);
        Ok(GuestMemory { table, cursors })
    }

    /// Memory mapped from a peer's regions (the back-end role), with the same allocator.
    pub fn from_table(table: MemoryTable) -> GuestMemory {
        let cursors = Mutex::new(vec![0; table.regions().len()]);
        GuestMemory { table, cursors }
    }

    /// The memory table (for translation, reads and writes).
    pub fn table(&self) -> &MemoryTable {
        &self.table
    }

    /// Each region with the fd to send beside it.
    pub fn region_fds(&self) -> Vec<(RegionDesc, BorrowedFd<'_>)> {
        self.table.regions().iter().filter_map(|r| Some((r.desc, r.mapping().fd()?))).collect()
    }

    /// Reserves `size` bytes aligned to `align` (a power of two) in the first region with room;
    /// returns their guest address. Memory is never handed out twice until [`reset`](Self::reset).
    pub fn alloc(&self, size: u64, align: u64) -> Result<u64, MemoryError> {
        if !align.is_power_of_two() {
            return Err(MemoryError::OutOfMemory { size, align });
        }
        let mut cursors = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
        for (r, cursor) in self.table.regions().iter().zip(cursors.iter_mut()) {
            let base = r.desc.guest_addr;
            let start = base.checked_add(*cursor).and_then(|a| a.checked_add(align - 1)).map(|a| a & !(align - 1));
            let Some(start) = start else { continue };
            let Some(end) = start.checked_add(size) else { continue };
            if end <= base + r.desc.size {
                *cursor = end - base;
                return Ok(start);
            }
        }
        Err(MemoryError::OutOfMemory { size, align })
    }

    /// Forgets every allocation (the memory itself is unchanged).
    pub fn reset(&self) {
        let mut cursors = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
        cursors.iter_mut().for_each(|c| *c = 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_regions_and_carve_buffers() {
        let mem = GuestMemory::allocate(&[(0, 0x10000), (0x1_0000_0000, 0x10000)]).unwrap();
        let fds = mem.region_fds();
        assert_eq!(fds.len(), 2);
        assert_eq!(fds[1].0.guest_addr, 0x1_0000_0000);
        let a = mem.alloc(100, 16).unwrap();
        let b = mem.alloc(4096, 4096).unwrap();
        assert_eq!(a, 0);
        assert_eq!(b, 4096);
        let c = mem.alloc(0xf000, 8).unwrap();
        assert_eq!(c, 0x1_0000_0000, "spills into the next region");
        assert!(mem.alloc(0x20000, 8).is_err());
        mem.table().write(b, b"hello").unwrap();
        let mut back = [0u8; 5];
        mem.table().read(b, &mut back).unwrap();
        assert_eq!(&back, b"hello");
        // The user address is this process's view of the same bytes.
        let p = mem.table().translate(b, 5).unwrap();
        assert_eq!(p as u64, fds[0].0.user_addr + 4096);
        mem.reset();
        assert_eq!(mem.alloc(8, 8).unwrap(), 0);
    }
}
