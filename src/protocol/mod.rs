//! The vhost-user wire format: bytes and a count of file descriptors in, typed messages out, and
//! back. Nothing here does I/O, so every rule is testable with byte literals and fuzzable.

mod error;
mod features;
mod header;
mod message;
mod negotiated;
mod payload;
mod request;

#[cfg(test)]
mod tests;

pub use error::ProtocolError;
pub use features::{ProtocolFeatures, VirtioFeatures, VRING_F_LOG};
pub use header::{Header, HEADER_SIZE, NEED_REPLY, REPLY, RESERVED_FLAGS, VERSION, VERSION_MASK};
pub use message::{decode, decode_body, Message};
pub use negotiated::Negotiated;
pub use payload::{
    CryptoSession, DeviceConfig, DeviceStateParams, InflightDesc, IotlbMsg, MemoryRegion, MmapRequest, Payload,
    ShmemConfig, VringAddr, VringArea, VringFd, VringState, XenMmap, MAX_MEM_TABLE_REGIONS, MAX_SHMEM_REGIONS,
    VRING_NOFD,
};
pub use request::{BackendRequest, Channel, FdRule, FrontendRequest, Gate, Layout, ReplyRule, Request, Rules};

/// Largest payload accepted from a peer (rust-vmm's `MAX_MSG_SIZE`; every defined payload fits).
pub const MAX_PAYLOAD_SIZE: usize = 4096;

/// Most file descriptors one message may carry (QEMU sends at most 8; the spec caps the back-end
/// request channel at 8).
pub const MAX_FDS: usize = 8;
