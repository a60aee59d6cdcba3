//! VIRTIO Shared Memory Regions on the front-end side (protocol feature SHMEM; spec:
//! GET_SHMEM_CONFIG, back-end requests SHMEM_MAP / SHMEM_UNMAP).
//!
//! Each region the back-end declares in GET_SHMEM_CONFIG is an address range of its fixed size,
//! reserved up front with no access. SHMEM_MAP places the back-end's fd at an offset inside the
//! range (`MAP_FIXED` over the reservation); SHMEM_UNMAP puts the reservation back. The spec's
//! rules are checked before anything is mapped: the range lies inside the region, does not
//! overlap an existing mapping, and UNMAP names exactly one existing mapping (same offset and
//! length). Reads and writes from the front-end go through [`SharedRegion::read`] /
//! [`SharedRegion::write`], which only touch mapped bytes (a reserved page would fault).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::protocol::{BackendRequest, Request};

/// One live SHMEM_MAP mapping inside a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Offset inside the region (`shm_offset`).
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset into the back-end's fd (`fd_offset`).
    pub fd_offset: u64,
    /// Mapped read-write (flags bit 0) rather than read-only.
    pub writable: bool,
}

/// A reserved address range backing one VIRTIO Shared Memory Region.
#[derive(Debug)]
pub struct SharedRegion {
    shmid: u8,
    base: usize,
    size: u64,
    /// Live mappings by offset; the lock also covers every access to the mapped bytes, so a
    /// mapping cannot go away under a read or write.
    maps: Mutex<BTreeMap<u64, Mapping>>,
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

fn refused(request: BackendRequest, state: &'static str) -> Error {
    Error::InvalidState { request: Request::Backend(request), state }
}

impl SharedRegion {
    /// Reserves `size` bytes (a non-zero multiple of the page size, as GET_SHMEM_CONFIG
    /// requires) with no access.
    pub fn reserve(shmid: u8, size: u64) -> Result<SharedRegion> {
        let page = page_size();
        if size == 0 || size % page != 0 {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("shared memory region {shmid}: size {size:#x} is not a non-zero multiple of the page size"),
            )));
        }
        let len = usize::try_from(size).map_err(|_| Error::Io(io::Error::from_raw_os_error(libc::ENOMEM)))?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks; nothing aliases it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::Io(io::Error::last_os_error()));
        }
        Ok(SharedRegion { shmid, base: base as usize, size, maps: Mutex::new(BTreeMap::new()) })
    }

    /// The region id (`shmid`).
    pub fn shmid(&self) -> u8 {
        self.shmid
    }

    /// The region size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The live mappings, by offset.
    pub fn mappings(&self) -> Vec<Mapping> {
        self.lock().values().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Mapping>> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_range(&self, request: BackendRequest, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Err(refused(request, "the length is zero"));
        }
        let end = offset.checked_add(len).ok_or_else(|| refused(request, "shm_offset + len overflows"))?;
        if end > self.size {
            return Err(refused(request, "the range lies beyond the end of the region"));
        }
        let page = page_size();
        if offset % page != 0 || len % page != 0 {
            return Err(refused(request, "shm_offset and len must be multiples of the page size"));
        }
        Ok(())
    }

    /// SHMEM_MAP: maps `len` bytes of `fd` from `fd_offset` at `offset` in the region.
    pub fn map(&self, fd: BorrowedFd<'_>, fd_offset: u64, offset: u64, len: u64, writable: bool) -> Result<()> {
        const R: BackendRequest = BackendRequest::SHMEM_MAP;
        self.check_range(R, offset, len)?;
        if fd_offset % page_size() != 0 {
            return Err(refused(R, "fd_offset must be a multiple of the page size"));
        }
        let end = offset + len;
        let mut maps = self.lock();
        // The mapping starting before `end` with the largest offset is the only one that can
        // overlap [offset, end) from the left; any starting inside overlaps too.
        if let Some((_, m)) = maps.range(..end).next_back() {
            if m.offset + m.len > offset {
                return Err(refused(R, "the range overlaps an existing mapping"));
            }
        }
        let file_offset = libc::off_t::try_from(fd_offset).map_err(|_| refused(R, "fd_offset is too large"))?;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        let addr = self.base + offset as usize;
        // SAFETY: [addr, addr+len) lies inside our reservation (checked above) and no live
        // mapping is there; MAP_FIXED replaces only our PROT_NONE reservation pages.
        let got = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                file_offset,
            )
        };
        if got == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            // The failed MAP_FIXED may have unmapped the reservation there: put it back.
            self.reserve_again(addr, len as usize);
            return Err(Error::Io(err));
        }
        maps.insert(offset, Mapping { offset, len, fd_offset, writable });
        Ok(())
    }

    /// SHMEM_UNMAP: removes the mapping at exactly `offset` with exactly `len` bytes.
    pub fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        const R: BackendRequest = BackendRequest::SHMEM_UNMAP;
        self.check_range(R, offset, len)?;
        let mut maps = self.lock();
        match maps.get(&offset) {
            Some(m) if m.len == len => {}
            _ => return Err(refused(R, "no mapping has that offset and length")),
        }
        maps.remove(&offset);
        self.reserve_again(self.base + offset as usize, len as usize);
        Ok(())
    }

    /// Removes every mapping (device reset, end of session).
    pub fn unmap_all(&self) {
        let mut maps = self.lock();
        for m in maps.values() {
            self.reserve_again(self.base + m.offset as usize, m.len as usize);
        }
        maps.clear();
    }

    fn reserve_again(&self, addr: usize, len: usize) {
        // SAFETY: [addr, addr+len) is inside our reservation; the anonymous PROT_NONE mapping
        // replaces whatever was there (the back-end's pages), which nobody else references.
        unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            );
        }
    }

    /// Checks that [offset, offset+len) is covered by mappings (adjacent ones may be spanned),
    /// writable ones if `write`.
    fn covered(maps: &BTreeMap<u64, Mapping>, offset: u64, len: u64, write: bool) -> bool {
        let Some(end) = offset.checked_add(len) else { return false };
        let mut at = offset;
        while at < end {
            match maps.range(..=at).next_back() {
                Some((_, m)) if m.offset + m.len > at && (m.writable || !write) => at = m.offset + m.len,
                _ => return false,
            }
        }
        true
    }

    /// Copies `len` bytes at `offset` out of the region; they must be mapped.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let maps = self.lock();
        if !Self::covered(&maps, offset, len as u64, false) {
            return Err(refused(BackendRequest::SHMEM_MAP, "the range is not mapped"));
        }
        let mut out = vec![0u8; len];
        // SAFETY: the range is mapped readable (checked under the lock that map/unmap take);
        // the back-end may change the bytes at any time, so copy, never reference.
        unsafe { std::ptr::copy_nonoverlapping((self.base + offset as usize) as *const u8, out.as_mut_ptr(), len) };
        Ok(out)
    }

    /// Copies `data` into the region at `offset`; the range must be mapped read-write.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let maps = self.lock();
        if !Self::covered(&maps, offset, data.len() as u64, true) {
            return Err(refused(BackendRequest::SHMEM_MAP, "the range is not mapped read-write"));
        }
        // SAFETY: the range is mapped writable (checked under the lock).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), (self.base + offset as usize) as *mut u8, data.len()) };
        Ok(())
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: the whole reservation is ours; nothing refers to it once we are dropped
        // (read/write copy out under the lock, no pointer escapes).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    fn memfd(bytes: &[u8]) -> std::fs::File {
        // SAFETY: memfd_create with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"shm-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by nobody else.
        let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn map_read_write_unmap() {
        let page = page_size();
        let r = SharedRegion::reserve(1, 4 * page).unwrap();
        let mut content = vec![0u8; 2 * page as usize];
        content[page as usize..page as usize + 5].copy_from_slice(b"hello");
        let f = memfd(&content);
        assert!(r.read(0, 1).is_err(), "nothing mapped yet");
        r.map(f.as_fd(), page, 2 * page, page, true).unwrap();
        assert_eq!(r.read(2 * page, 5).unwrap(), b"hello");
        r.write(2 * page, b"HE").unwrap();
        assert_eq!(r.read(2 * page, 5).unwrap(), b"HEllo");
        // Overlap, outside, unaligned, wrong unmap shapes.
        assert!(r.map(f.as_fd(), 0, 2 * page, page, false).is_err());
        assert!(r.map(f.as_fd(), 0, page, 2 * page, false).is_err());
        assert!(r.map(f.as_fd(), 0, 4 * page, page, false).is_err());
        assert!(r.map(f.as_fd(), 0, u64::MAX - page + 1, page, false).is_err());
        assert!(r.map(f.as_fd(), 0, 1, page, false).is_err());
        assert!(r.map(f.as_fd(), 0, 0, 0, false).is_err());
        assert!(r.unmap(2 * page, 2 * page).is_err());
        assert!(r.unmap(page, page).is_err());
        // A read-only neighbour: readable, not writable; reads may span both.
        r.map(f.as_fd(), 0, page, page, false).unwrap();
        assert!(r.write(page, b"x").is_err());
        assert_eq!(r.read(2 * page - 1, 3).unwrap(), b"\0HE");
        r.unmap(2 * page, page).unwrap();
        assert!(r.read(2 * page, 1).is_err());
        assert_eq!(r.mappings().len(), 1);
        r.unmap_all();
        assert!(r.mappings().is_empty());
    }

    #[test]
    fn sizes_must_be_pages() {
        assert!(SharedRegion::reserve(0, 0).is_err());
        assert!(SharedRegion::reserve(0, 100).is_err());
    }
}
