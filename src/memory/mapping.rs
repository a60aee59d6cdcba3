//! One mmap of a file descriptor, kept alive by `Arc` for as long as anything (a ring, a Python
//! view) still points into it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

use super::error::MemoryError;

/// A shared, read-write mapping of `[0, mmap_offset + size)` of a file; the usable bytes are
/// `[mmap_offset, mmap_offset + size)`. Mapping from offset 0 (as libvhost-user and DPDK do)
/// works for any `mmap_offset`, including ones that are not hugepage-aligned.
#[derive(Debug)]
pub struct Mapping {
    region: MmapRegion<()>,
    offset: usize,
    size: usize,
}

// SAFETY: MmapRegion is Send + Sync; `offset`/`size` are plain integers.
unsafe impl Send for Mapping {}
// SAFETY: as above; all access to the mapped bytes goes through raw pointers and atomics.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `size` bytes found at `mmap_offset` in `fd`. Refuses a regular file shorter than
    /// `mmap_offset + size`, since touching pages past its end would raise SIGBUS.
    pub fn from_fd(fd: OwnedFd, mmap_offset: u64, size: u64) -> Result<Mapping, MemoryError> {
        let total = mmap_offset.checked_add(size).ok_or(MemoryError::InvalidSize(size))?;
        if size == 0 || usize::try_from(total).is_err() || total > isize::MAX as u64 {
            return Err(MemoryError::InvalidSize(size));
        }
        check_file_size(fd.as_fd(), total)?;
        let file = File::from(fd);
        let region = MmapRegion::<()>::from_file(FileOffset::new(file, 0), total as usize)
            .map_err(|e| MemoryError::Os { op: "mmap", source: io::Error::other(e.to_string()) })?;
        Ok(Mapping { region, offset: mmap_offset as usize, size: size as usize })
    }

    /// Host address of the first usable byte.
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: offset < mapping length by construction.
        unsafe { self.region.as_ptr().add(self.offset) }
    }

    /// Usable bytes.
    pub fn len(&self) -> usize {
        self.size
    }

    /// Whether the mapping is empty (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Offset of the usable bytes in the file.
    pub fn mmap_offset(&self) -> u64 {
        self.offset as u64
    }

    /// The mapped file, e.g. to send it with SET_MEM_TABLE.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.region.file_offset().map(|f| f.file().as_fd())
    }
}

fn check_file_size(fd: BorrowedFd<'_>, needed: u64) -> Result<(), MemoryError> {
    // SAFETY: stat is plain old data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and a valid stat buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(MemoryError::Os { op: "fstat", source: io::Error::last_os_error() });
    }
    if st.st_mode & libc::S_IFMT == libc::S_IFREG && (st.st_size as u64) < needed {
        return Err(MemoryError::FileTooSmall { needed, actual: st.st_size as u64 });
    }
    Ok(())
}

/// Creates a close-on-exec memfd of `size` bytes (the shareable memory a front-end hands out).
pub fn memfd(name: &str, size: u64) -> Result<OwnedFd, MemoryError> {
    create_memfd(name, size, false)
}

/// A memfd of `size` bytes whose size is sealed: a peer it is shared with cannot shrink it under
/// our mapping (which would turn our next access into SIGBUS) nor grow it.
pub fn sealed_memfd(name: &str, size: u64) -> Result<OwnedFd, MemoryError> {
    let fd = create_memfd(name, size, true)?;
    // SAFETY: plain fcntl on our memfd.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_GROW | libc::F_SEAL_SHRINK) } != 0 {
        return Err(MemoryError::Os { op: "F_ADD_SEALS", source: io::Error::last_os_error() });
    }
    Ok(fd)
}

fn create_memfd(name: &str, size: u64, sealing: bool) -> Result<OwnedFd, MemoryError> {
    let cname = CString::new(name).unwrap_or_else(|_| CString::from(c"vhostuser_rs"));
    let flags = libc::MFD_CLOEXEC | if sealing { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: valid C string; the result is a new descriptor we own.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Os { op: "memfd_create", source: io::Error::last_os_error() });
    }
    // SAFETY: memfd_create returned a new descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(size).map_err(|_| MemoryError::InvalidSize(size))?;
    // SAFETY: plain syscall on our fd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
        return Err(MemoryError::Os { op: "ftruncate", source: io::Error::last_os_error() });
    }
    Ok(fd)
}
