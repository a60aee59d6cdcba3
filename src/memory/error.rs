//! Errors of the guest-memory layer. Every variant says which address range was at fault.

use std::fmt;
use std::io;

/// Which address space an address belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressSpace {
    /// Guest physical address (descriptor buffers, log addresses).
    Guest,
    /// Front-end virtual address (`userspace_addr`, SET_VRING_ADDR ring addresses).
    User,
    /// I/O virtual address (ACCESS_PLATFORM: rings and buffers behind the IOTLB).
    Iova,
}

impl fmt::Display for AddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressSpace::Guest => "guest physical",
            AddressSpace::User => "front-end user",
            AddressSpace::Iova => "I/O virtual",
        })
    }
}

/// A guest-memory failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// Part of the range is not in any mapped region (or would need to cross regions where a
    /// single mapping is required).
    #[error("{space} range {addr:#x}+{len:#x} is not mapped")]
    Unmapped {
        /// Address space of `addr`.
        space: AddressSpace,
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// `addr + len` overflows 64 bits.
    #[error("{space} range {addr:#x}+{len:#x} overflows 64 bits")]
    Overflow {
        /// Address space of `addr`.
        space: AddressSpace,
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// A new region overlaps an existing one.
    #[error("region at guest address {guest_addr:#x} (+{size:#x}) overlaps an existing region")]
    Overlap {
        /// Guest address of the new region.
        guest_addr: u64,
        /// Its size.
        size: u64,
    },
    /// More regions than the slot limit.
    #[error("memory table would exceed {limit} regions")]
    TooManyRegions {
        /// The limit.
        limit: usize,
    },
    /// REM_MEM_REG named a region that is not in the table.
    #[error("no region at guest address {guest_addr:#x} (+{size:#x}, user address {user_addr:#x})")]
    NoSuchRegion {
        /// Guest address named.
        guest_addr: u64,
        /// Size named.
        size: u64,
        /// User address named.
        user_addr: u64,
    },
    /// The fd is shorter than `mmap_offset + size`: touching the tail would raise SIGBUS.
    #[error("file of {actual} bytes is too small for a mapping of {needed} bytes")]
    FileTooSmall {
        /// Bytes the region needs.
        needed: u64,
        /// Bytes the file has.
        actual: u64,
    },
    /// A region or log too large for this process's address space, or empty.
    #[error("invalid mapping size {0:#x}")]
    InvalidSize(u64),
    /// The dirty log does not cover a page that was written.
    #[error("dirty log of {pages} pages does not cover page {page:#x}")]
    LogRange {
        /// Page number written.
        page: u64,
        /// Pages the log covers.
        pages: u64,
    },
    /// The allocator has no room left.
    #[error("no room for {size:#x} bytes (alignment {align:#x}) in guest memory")]
    OutOfMemory {
        /// Bytes requested.
        size: u64,
        /// Alignment requested.
        align: u64,
    },
    /// mmap, memfd_create, ftruncate or fstat failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl MemoryError {
    /// The (address, length) at fault, when the error is about one.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            MemoryError::Unmapped { addr, len, .. } | MemoryError::Overflow { addr, len, .. } => Some((*addr, *len)),
            MemoryError::Overlap { guest_addr, size } => Some((*guest_addr, *size)),
            MemoryError::NoSuchRegion { guest_addr, size, .. } => Some((*guest_addr, *size)),
            _ => None,
        }
    }
}
