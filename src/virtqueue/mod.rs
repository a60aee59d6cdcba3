//! Virtqueues (virtio 1.x, protocol.md §7): split rings here, packed rings in [`packed`]; the
//! device side a back-end runs and the driver side a front-end runs, over guest memory shared
//! with a peer that is not trusted.
//!
//! Rules that hold everywhere here: ring indices are free-running `u16`s; every descriptor is
//! read once into a local copy and validated there; every buffer is translated with
//! overflow-checked arithmetic and never outside a mapping; `avail.idx` is read with one acquire
//! load per burst and `used.idx` written with one release store per burst.

mod any;
mod buffers;
mod device;
mod driver;
mod error;
mod inflight;
mod kept;
mod layout;
pub mod packed;

#[cfg(test)]
mod tests;

pub use any::{AnyDeviceQueue, AnyDriverQueue};
pub use device::{
    for_each_span, prefix, Chain, ChainBatch, DeviceQueue, QueueConfig, RingAddressSpace, Segment, MAX_SEGMENTS,
};
pub use driver::{Buffer, DriverQueue, DriverRing};
pub use error::VirtqueueError;
pub use inflight::{queue_region_size, InflightBuffer, InflightQueue, Recovery, INFLIGHT_VERSION};
pub use kept::{KeptChain, KeptChains};
pub use layout::{
    avail_ring_size, need_event, used_ring_size, Descriptor, DESC_SIZE, MAX_QUEUE_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
};
pub use packed::{PackedBase, PackedDeviceQueue, PackedDriverQueue, PackedDriverRing, PackedQueueConfig, RingPos};
