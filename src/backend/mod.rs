//! The back-end role: serve one front-end at a time on a socket, handle every front-end request
//! with its validation, keep the ring state machine, and run each started ring on a worker
//! thread that drains it through a [`Device`].
//!
//! Ring states (protocol.md §6.2): a ring is *started* by SET_VRING_KICK (or, with
//! INBAND_NOTIFICATIONS, a VRING_KICK message) once its size, addresses and the memory are known
//! (libvhost-user's convention) and *stopped* by GET_VRING_BASE; independently it is *enabled*
//! by SET_VRING_ENABLE, or at SET_FEATURES when PROTOCOL_FEATURES was not negotiated. Only
//! started and enabled rings are processed — and, once the front-end has written a device
//! status (STATUS), only while DRIVER_OK is set and FAILED is not; status 0 stops every ring
//! (keeping its base) and resets the device.
//!
//! A ring that breaks (malformed chain, a translation the front-end refuses) signals its error
//! fd (SET_VRING_ERR), or VRING_ERR in-band, never its call fd, and sets DEVICE_NEEDS_RESET.
//!
//! Every front-end request gets the spec's answer: [`coverage`] lists, per request, whether the
//! session handles it, a [`Device`] hook does, or it is refused, and what the refusal is.

mod coverage;
mod requests;
mod rings;
mod serving;
mod session;
mod shared;
mod shmem;
mod state;
mod worker;

pub use coverage::{coverage, offer, refusal, Coverage, Handling, Offer, Refusal};
pub use requests::BackendRequests;
pub use rings::{RingHandle, Rings};
pub use serving::ServedSession;
pub use session::{
    serve_connection, serve_session, Session, DEVICE_PROTOCOL_FEATURES, NEVER_OFFERED, SESSION_PROTOCOL_FEATURES,
};
pub use shared::{shared_object_add, shared_object_lookup, shared_object_remove};
pub use shmem::{check_mapping, check_regions, shmem_map, shmem_unmap};
pub use state::{StateReader, StateWriter, MAX_STATE};
pub use worker::{Polling, WorkerPolicy, WorkerPool};

use std::os::fd::{OwnedFd, RawFd};

use crate::protocol::{CryptoSession, ProtocolFeatures};
use crate::virtqueue::{AnyDeviceQueue, ChainBatch, KeptChains, VirtqueueError};

/// A front-end request that belongs to the device rather than to the session. The session
/// checks the protocol feature that gates it before the device sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// SEND_RARP (RARP): broadcast a RARP frame for this MAC (after a migration, for drivers
    /// without GUEST_ANNOUNCE).
    SendRarp([u8; 6]),
    /// NET_SET_MTU (MTU + VIRTIO_NET_F_MTU): the host MTU. The device must refuse values it
    /// cannot use (with REPLY_ACK the refusal reaches the front-end).
    NetSetMtu(u64),
}

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
    /// Protocol features offered on top of what the session implements itself: those of the
    /// device requests it implements (RARP, MTU, CRYPTO_SESSION), and INBAND_NOTIFICATIONS to
    /// have the session use in-band notifications ([`DEVICE_PROTOCOL_FEATURES`]). Features
    /// nobody here implements ([`NEVER_OFFERED`]) are dropped.
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
    fn process(&self, queue_index: u16, queue: &mut AnyDeviceQueue, batch: &ChainBatch) -> Result<(), VirtqueueError>;
    /// The front-end reset the device (RESET_DEVICE, or a new session).
    fn reset(&self) {}
    /// Ring `queue_index` started (its worker runs; it is processed once enabled).
    fn queue_started(&self, _queue_index: u16) {}
    /// Ring `queue_index` stopped (GET_VRING_BASE, a memory-table change that restarts it, the
    /// end of the session). Nothing of it is processed until it starts again.
    fn queue_stopped(&self, _queue_index: u16) {}
    /// GET_QUEUE_NUM's answer: the ring count for most devices, queue *pairs* for virtio-net
    /// (protocol.md §9).
    fn queue_num(&self) -> u64 {
        u64::from(self.num_queues())
    }
    /// Rings with the same group run on the same worker thread (with one thread per group, or
    /// group `g` on thread `g % n` of a shared pool), so a device can move data between them
    /// without a lock: virtio-net puts a queue pair in one group. Default: every ring alone.
    fn ring_group(&self, queue_index: u16) -> u16 {
        queue_index
    }
    /// The driver acknowledged `features` (SET_FEATURES).
    fn features_acked(&self, _features: u64) {}
    /// A device request (SEND_RARP, NET_SET_MTU). `Err` refuses it with a reason (a failure
    /// ack under REPLY_ACK). Offer the gating protocol feature only if this is implemented.
    fn device_request(&self, _request: DeviceRequest) -> Result<(), String> {
        Err("not implemented by this device".into())
    }
    /// CREATE_CRYPTO_SESSION (CRYPTO_SESSION, virtio-crypto devices): create a session and
    /// return its id (≥ 0). `Err` answers with a negative session id, the spec's failure. Offer
    /// CRYPTO_SESSION in [`protocol_features`](Device::protocol_features) only if implemented
    /// (and [`close_crypto_session`](Device::close_crypto_session)).
    fn create_crypto_session(&self, _session: &CryptoSession) -> Result<i64, String> {
        Err("not a virtio-crypto device".into())
    }
    /// CLOSE_CRYPTO_SESSION (CRYPTO_SESSION): close a session `create_crypto_session` made.
    fn close_crypto_session(&self, _session_id: u64) -> Result<(), String> {
        Err("not a virtio-crypto device".into())
    }
    /// GPU_SET_SOCKET (vhost-user-gpu devices): the socket of the separate vhost-user-gpu
    /// protocol. `Err` refuses it (a failure ack under REPLY_ACK; the socket is closed).
    fn gpu_set_socket(&self, _socket: OwnedFd) -> Result<(), String> {
        Err("not a vhost-user-gpu device".into())
    }
    /// Fds the worker of ring `queue_index` watches for this device while the ring runs (a
    /// TAP, a socket, a timerfd), next to the kicks; [`event`](Device::event) runs when one is
    /// readable. Asked each time the ring starts; the device keeps them open meanwhile.
    fn event_fds(&self, _queue_index: u16) -> Vec<RawFd> {
        Vec::new()
    }
    /// `fd` (one of [`event_fds`](Device::event_fds) of `ring`) is readable. Poll is
    /// level-triggered: return `false` to stop watching the ring's fds until the ring is kicked
    /// again (e.g. a TAP with frames while the RX ring has no buffers).
    fn event(&self, _fd: RawFd, _ring: RingHandle<'_>, _others: &mut Rings<'_>) -> Result<bool, VirtqueueError> {
        Ok(true)
    }
    /// Handles a batch with the ring's kept chains and the other rings of this worker at hand
    /// (deferred completion; net: TX fills the RX ring of its pair). Default: [`process`](Device::process).
    fn process_batch(
        &self,
        queue_index: u16,
        queue: &mut AnyDeviceQueue,
        batch: &ChainBatch,
        _kept: &mut KeptChains,
        _others: &mut Rings<'_>,
    ) -> Result<(), VirtqueueError> {
        self.process(queue_index, queue, batch)
    }
    /// Chains a worker pops per batch of a drain; each batch's completions are published, and
    /// the driver notified if it asked, before the next batch is popped. Small where a chain
    /// takes microseconds (a block read: a driver that sleeps until notified then refills the
    /// ring while the device works on the rest, instead of the two taking turns), large where
    /// it takes nanoseconds (a packet burst: fewer publishes). Default 64.
    fn drain_batch(&self) -> usize {
        64
    }
    /// Ring `ring` is about to stop (GET_VRING_BASE, a restart, the end of the session), on its
    /// worker thread: complete the chains the device holds outside the ring's kept list (I/O
    /// still in flight), so none is lost and nothing writes guest memory after the ring stopped.
    fn ring_stopping(&self, _ring: RingHandle<'_>) {}
    /// Runs one wake-up of a worker (every batch it drains). The Python adapter takes the GIL
    /// here once, so a wake-up costs one GIL acquisition however many batches it holds.
    fn wake_scope(&self, run: &mut dyn FnMut()) {
        run()
    }
    /// DEVICE_STATE (SET_DEVICE_STATE_FD, direction SAVE): the device's internal state, in a
    /// format of its own, for a back-end of the same kind to [`load_state`](Device::load_state)
    /// on the migration destination. Called with every ring stopped (the STOPPED phase). `Err`
    /// is reported to the front-end (the reply's error bits, and CHECK_DEVICE_STATE). Offer
    /// DEVICE_STATE in [`protocol_features`](Device::protocol_features) only if this works.
    fn save_state(&self) -> Result<Vec<u8>, String> {
        Err("this device cannot save its state".into())
    }
    /// DEVICE_STATE, direction LOAD: restores what [`save_state`](Device::save_state) produced
    /// on the source, so that the driver goes on without re-initialising the device. Called on
    /// the transfer thread with every ring stopped. `Err` fails CHECK_DEVICE_STATE.
    fn load_state(&self, _state: &[u8]) -> Result<(), String> {
        Err("this device cannot load a state".into())
    }
    /// SHARED_OBJECT: GET_SHARED_OBJECT asks for the dma-buf this device exported under `uuid`
    /// (with SHARED_OBJECT_ADD); return a new fd for it (sent to the front-end and closed
    /// here), or `None` if it is not exported.
    fn shared_object(&self, _uuid: &[u8; 16]) -> Option<OwnedFd> {
        None
    }
    /// SHMEM: the size of each VIRTIO Shared Memory Region by shmid (index; 0 = unused id, at
    /// most 256 entries, sizes multiples of the page size), answered to GET_SHMEM_CONFIG. Fixed
    /// for the life of the connection (protocol.md §6.15).
    fn shmem_regions(&self) -> Vec<u64> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests;
