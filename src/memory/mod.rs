//! Guest memory: the regions a front-end shares (memfds or other fds), mapped with the
//! `vm-memory` crate, and translation of guest physical addresses (descriptor buffers) and
//! front-end user addresses (ring addresses of SET_VRING_ADDR) into this process.
//!
//! Guest memory is shared with another process that may change it at any time: nothing here
//! forms a Rust reference (`&[u8]`) over it; accesses are raw-pointer copies and atomics.

mod alloc;
mod error;
mod iotlb;
mod log;
mod mapping;
mod table;

pub use alloc::GuestMemory;
pub use error::{AddressSpace, MemoryError};
pub use iotlb::{Iotlb, IotlbFault, IOTLB_READ, IOTLB_WRITE};
pub use log::{data_logging_disabled_for_tests, DirtyLog, LOG_PAGE_SIZE, TEST_BREAK_ENV};
pub use mapping::{memfd, sealed_memfd, Mapping};
pub use table::{MemoryTable, Region, RegionDesc, DEFAULT_MAX_SLOTS};
