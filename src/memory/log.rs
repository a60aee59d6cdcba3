//! The dirty-page log of live migration (SET_LOG_BASE, LOG_ALL): one bit per 4 KiB page of guest
//! physical memory, set atomically by the back-end, read and cleared by the front-end.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use super::error::MemoryError;
use super::mapping::{memfd, Mapping};

/// Bytes of guest memory per log bit (`VHOST_LOG_PAGE`).
pub const LOG_PAGE_SIZE: u64 = 0x1000;

/// Environment variable of the test-only switch [`data_logging_disabled_for_tests`].
pub const TEST_BREAK_ENV: &str = "VHOSTUSER_RS_TEST_BREAK_DIRTY_LOG";

/// **Test-only**: whether the back-end must skip logging the guest buffers it writes, because
/// `VHOSTUSER_RS_TEST_BREAK_DIRTY_LOG=1` was set when the process first asked (read once). The
/// used-ring writes (VHOST_VRING_F_LOG) are still logged. This exists so that a live-migration
/// test can show that it fails when the back-end's log is ineffective
/// (tests/python/test_migration_guest.py); a process serving real guests must never set it: a
/// migrated guest would find stale data in the pages the back-end filled during migration.
pub fn data_logging_disabled_for_tests() -> bool {
    static BROKEN: OnceLock<bool> = OnceLock::new();
    *BROKEN.get_or_init(|| {
        let broken = std::env::var_os(TEST_BREAK_ENV).is_some_and(|v| v == "1");
        if broken {
            log::warn!("{TEST_BREAK_ENV}=1: guest buffers written by this back-end are NOT logged (a test aid)");
        }
        broken
    })
}

/// A mapped dirty log.
#[derive(Clone, Debug)]
pub struct DirtyLog {
    mapping: Arc<Mapping>,
}

impl DirtyLog {
    /// Maps the log of SET_LOG_BASE: `mmap_size` bytes at `mmap_offset` in `fd`.
    pub fn from_fd(fd: OwnedFd, mmap_size: u64, mmap_offset: u64) -> Result<DirtyLog, MemoryError> {
        Ok(DirtyLog { mapping: Arc::new(Mapping::from_fd(fd, mmap_offset, mmap_size)?) })
    }

    /// A zeroed memfd-backed log covering guest addresses `[0, guest_end)` (front-end role).
    pub fn allocate(guest_end: u64) -> Result<DirtyLog, MemoryError> {
        let pages = guest_end.div_ceil(LOG_PAGE_SIZE);
        let bytes = pages.div_ceil(8).next_multiple_of(8).max(8);
        DirtyLog::from_fd(memfd("vhostuser_rs-dirty-log", bytes)?, bytes, 0)
    }

    /// Size of the bitmap in bytes (SET_LOG_BASE's `mmap_size`).
    pub fn size(&self) -> u64 {
        self.mapping.len() as u64
    }

    /// Number of pages the log covers.
    pub fn pages(&self) -> u64 {
        self.size() * 8
    }

    /// The fd to send with SET_LOG_BASE.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.mapping.fd()
    }

    /// Marks every page touched by a write of `len` bytes at `gpa`. Pages beyond the log are an
    /// error (libvhost-user asserts there; a crash is not an answer).
    pub fn mark(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        if len == 0 {
            return Ok(());
        }
        let last = gpa.checked_add(len - 1).ok_or(MemoryError::Overflow {
            space: super::error::AddressSpace::Guest,
            addr: gpa,
            len,
        })?;
        let (first, last) = (gpa / LOG_PAGE_SIZE, last / LOG_PAGE_SIZE);
        if last >= self.pages() {
            return Err(MemoryError::LogRange { page: last, pages: self.pages() });
        }
        let base = self.mapping.as_ptr();
        for page in first..=last {
            // SAFETY: page / 8 < size (checked above); AtomicU8 has alignment 1; the bitmap is
            // shared with the front-end, which clears bits concurrently, hence atomics.
            let byte = unsafe { AtomicU8::from_ptr(base.add((page / 8) as usize)) };
            byte.fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads and clears the bitmap; returns the dirty page numbers in order.
    pub fn take_dirty(&self) -> Vec<u64> {
        let base = self.mapping.as_ptr();
        let len = self.mapping.len();
        let mut pages = Vec::new();
        let mut i = 0usize;
        while i < len {
            // SAFETY: i < len; word accesses only when aligned and fully inside the bitmap.
            let (bits, width) = unsafe {
                let p = base.add(i);
                if (p as usize) % 8 == 0 && i + 8 <= len {
                    (AtomicU64::from_ptr(p.cast()).swap(0, Ordering::AcqRel), 64)
                } else {
                    (u64::from(AtomicU8::from_ptr(p).swap(0, Ordering::AcqRel)), 8)
                }
            };
            let mut rest = bits;
            while rest != 0 {
                let bit = rest.trailing_zeros() as u64;
                pages.push(i as u64 * 8 + bit);
                rest &= rest - 1;
            }
            i += width / 8;
        }
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_pages_and_clears_on_read() {
        let log = DirtyLog::allocate(64 * LOG_PAGE_SIZE).unwrap();
        assert_eq!(log.size(), 8);
        log.mark(0x1000, 1).unwrap();
        log.mark(0x3fff, 2).unwrap(); // pages 3 and 4
        log.mark(63 * LOG_PAGE_SIZE, LOG_PAGE_SIZE).unwrap();
        assert_eq!(log.take_dirty(), [1, 3, 4, 63]);
        assert!(log.take_dirty().is_empty());
        assert!(matches!(log.mark(64 * LOG_PAGE_SIZE, 1), Err(MemoryError::LogRange { page: 64, pages: 64 })));
        assert!(matches!(log.mark(u64::MAX, 2), Err(MemoryError::Overflow { .. })));
        log.mark(0, 0).unwrap();
        assert!(log.take_dirty().is_empty());
    }

    #[test]
    fn a_log_at_an_odd_offset_is_read_bytewise() {
        let fd = memfd("log", 64).unwrap();
        let log = DirtyLog::from_fd(fd, 17, 3).unwrap();
        log.mark(8 * 16 * LOG_PAGE_SIZE, 1).unwrap(); // page 128: byte 16, the last one
        assert_eq!(log.take_dirty(), [128]);
    }
}
