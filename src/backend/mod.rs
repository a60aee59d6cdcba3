//! The back-end role: serve one front-end at a time on a socket, handle every front-end request
//! with its validation, keep the ring state machine, and run each started ring on a worker
//! thread that drains it through a [`Device`].
//!
//! Ring states (protocol.md §6.2): a ring is *started* by SET_VRING_KICK once its size,
//! addresses and the memory are known (libvhost-user's convention) and *stopped* by
//! GET_VRING_BASE; independently it is *enabled* by SET_VRING_ENABLE, or at SET_FEATURES when
//! PROTOCOL_FEATURES was not negotiated. Only started and enabled rings are processed.

mod requests;
mod session;
mod worker;

pub use requests::BackendRequests;
pub use session::{serve_connection, serve_session, Session};
pub use worker::WorkerPolicy;

use crate::protocol::ProtocolFeatures;
use crate::virtqueue::{ChainBatch, DeviceQueue, VirtqueueError};

/// A virtio device served by the back-end. Implementations must be thread-safe: each started
/// ring calls [`process`](Device::process) from its own worker thread.
pub trait Device: Send + Sync + 'static {
    /// Number of queues (GET_QUEUE_NUM).
    fn num_queues(&self) -> u16;
    /// Largest ring size accepted by SET_VRING_NUM.
    fn max_queue_size(&self) -> u16 {
        1024
    }
    /// Virtio feature bits offered (device-specific bits plus VERSION_1, EVENT_IDX...; the
    /// session adds PROTOCOL_FEATURES).
    fn features(&self) -> u64;
    /// Protocol features offered (the session adds what it implements itself).
    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::empty()
    }
    /// The device config space (GET_CONFIG reads a window of it).
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    /// A driver write to the config space (SET_CONFIG); refused by default.
    fn set_config(&self, _offset: u32, _data: &[u8]) -> bool {
        false
    }
    /// Handles every chain of `batch`, completing each on `queue` (the worker publishes the used
    /// index and notifies the driver afterwards).
    fn process(&self, queue_index: u16, queue: &mut DeviceQueue, batch: &ChainBatch) -> Result<(), VirtqueueError>;
    /// The front-end reset the device (RESET_DEVICE, or a new session).
    fn reset(&self) {}
    /// Ring `queue_index` started (its worker runs; it is processed once enabled).
    fn queue_started(&self, _queue_index: u16) {}
    /// Ring `queue_index` stopped (GET_VRING_BASE, a memory-table change that restarts it, the
    /// end of the session). Nothing of it is processed until it starts again.
    fn queue_stopped(&self, _queue_index: u16) {}
    /// Runs one wake-up of a worker (every batch it drains). The Python adapter takes the GIL
    /// here once, so a wake-up costs one GIL acquisition however many batches it holds.
    fn wake_scope(&self, run: &mut dyn FnMut()) {
        run()
    }
}
