//! What the back-end role does with each front-end request: handled by the session, routed to a
//! [`Device`](super::Device) hook, or refused with the spec's answer — and what that answer is.
//!
//! The session's dispatcher uses [`refusal`] for its failure answers, and the tests in
//! `session.rs` check every row of [`coverage`] against what a session actually answers, so
//! this table (printed by `vhostuser-rs requests`) cannot drift from the code.

use super::session::{DEVICE_PROTOCOL_FEATURES, NEVER_OFFERED, SESSION_PROTOCOL_FEATURES};
use crate::protocol::{FrontendRequest, Gate, ProtocolFeatures};

/// Whether the feature that gates a request is offered to front-ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Offer {
    /// Always (no gate, PROTOCOL_FEATURES, virtio bits the session offers, or a protocol
    /// feature of [`SESSION_PROTOCOL_FEATURES`]).
    Default,
    /// When the device declares it ([`DEVICE_PROTOCOL_FEATURES`]).
    DeviceDeclares,
    /// Never ([`NEVER_OFFERED`], or implemented by nobody here).
    Never,
}

impl Offer {
    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Offer::Default => "offered",
            Offer::DeviceDeclares => "if the device declares it",
            Offer::Never => "never offered",
        }
    }
}

/// Whether what gates `request` is offered (from its gate, protocol.md §3.1).
pub fn offer(request: FrontendRequest) -> Offer {
    let protocol = |p: ProtocolFeatures| {
        if (p & NEVER_OFFERED) != ProtocolFeatures::empty() {
            Offer::Never
        } else if SESSION_PROTOCOL_FEATURES.contains(p) {
            Offer::Default
        } else if (SESSION_PROTOCOL_FEATURES | DEVICE_PROTOCOL_FEATURES).contains(p) {
            Offer::DeviceDeclares
        } else {
            Offer::Never
        }
    };
    match request.rules().gate {
        Gate::None | Gate::ProtocolFeaturesOffered | Gate::ProtocolFeaturesAcked | Gate::Virtio(_) => Offer::Default,
        Gate::Protocol(p) | Gate::Both(p, _) => protocol(p),
    }
}

/// Who answers a request in the back-end role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Handling {
    /// The session implements it (once the feature that gates it is negotiated).
    Session,
    /// The session checks its gate and hands it to a [`Device`](super::Device) hook; a device
    /// that does not implement it gets the spec's refusal.
    Device,
    /// Its feature is never offered: the spec's refusal, and the session goes on where the
    /// spec allows.
    Refused,
}

impl Handling {
    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Handling::Session => "handled",
            Handling::Device => "device hook",
            Handling::Refused => "spec refusal",
        }
    }
}

/// The answer to a refused request (not negotiated, invalid, or refused by the device).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// A request without a reply of its own: a non-zero ack when NEED_REPLY asked for one
    /// (REPLY_ACK), otherwise nothing; the session goes on.
    Ack,
    /// A u64 status reply, non-zero (IOTLB_MSG, POSTCOPY_LISTEN/END, CHECK_DEVICE_STATE, and
    /// SET_LOG_BASE once LOG_SHMFD makes it replied to).
    Status,
    /// GET_CONFIG: "zero length of payload to indicate an error".
    EmptyConfig,
    /// GET_INFLIGHT_FD: mmap_size 0 and no fd, "no inflight buffer".
    NoInflightBuffer,
    /// POSTCOPY_ADVISE: an empty reply without the userfaultfd.
    NoUserfaultfd,
    /// CREATE_CRYPTO_SESSION: the session echoed with a negative session id ("negative for
    /// failure").
    NegativeSessionId,
    /// SET_DEVICE_STATE_FD: error in bits 0-7, bit 8 "no fd".
    DeviceStateError,
    /// GET_SHARED_OBJECT: a non-zero u64 and no dma-buf fd.
    NoSharedObject,
    /// GET_SHMEM_CONFIG: no shared memory region (every size 0).
    NoShmemRegions,
    /// A mandatory reply the spec gives no failure form (GET_QUEUE_NUM without MQ,
    /// GET_STATUS without STATUS...), or SET_PROTOCOL_FEATURES acking INBAND_NOTIFICATIONS
    /// without BACKEND_REQ and REPLY_ACK: the back-end closes the connection (spec: "If
    /// back-end detects some error such as incompatible features, it may also close the
    /// connection").
    Close,
}

impl Refusal {
    /// A short description for tables.
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::Ack => "failure ack (REPLY_ACK), session goes on",
            Refusal::Status => "u64 non-zero status",
            Refusal::EmptyConfig => "empty GET_CONFIG reply",
            Refusal::NoInflightBuffer => "mmap_size 0, no fd",
            Refusal::NoUserfaultfd => "empty reply without fd",
            Refusal::NegativeSessionId => "negative session id",
            Refusal::DeviceStateError => "error | no-fd bit",
            Refusal::NoSharedObject => "non-zero u64, no fd",
            Refusal::NoShmemRegions => "no regions",
            Refusal::Close => "connection closed",
        }
    }
}

/// How a refused `request` is answered (with `log_shmfd`: LOG_SHMFD was negotiated).
pub fn refusal(request: FrontendRequest, log_shmfd: bool) -> Refusal {
    use FrontendRequest::*;
    match request {
        GET_CONFIG => Refusal::EmptyConfig,
        GET_INFLIGHT_FD => Refusal::NoInflightBuffer,
        IOTLB_MSG | POSTCOPY_LISTEN | POSTCOPY_END | CHECK_DEVICE_STATE => Refusal::Status,
        SET_LOG_BASE if log_shmfd => Refusal::Status,
        POSTCOPY_ADVISE => Refusal::NoUserfaultfd,
        CREATE_CRYPTO_SESSION => Refusal::NegativeSessionId,
        SET_DEVICE_STATE_FD => Refusal::DeviceStateError,
        GET_SHARED_OBJECT => Refusal::NoSharedObject,
        GET_SHMEM_CONFIG => Refusal::NoShmemRegions,
        r if r.rules().has_reply() => Refusal::Close,
        _ => Refusal::Ack,
    }
}

/// One row of the coverage table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coverage {
    /// The request.
    pub request: FrontendRequest,
    /// Who answers it.
    pub handling: Handling,
    /// Whether the feature that gates it is offered.
    pub offer: Offer,
    /// The answer when it is refused (not negotiated, invalid, or refused by the device).
    pub refusal: Refusal,
    /// What the back-end does, in a few words.
    pub note: &'static str,
}

/// The back-end's coverage of every front-end request, in code order.
pub fn coverage() -> Vec<Coverage> {
    FrontendRequest::ALL
        .iter()
        .map(|&request| {
            let (handling, note) = row(request);
            Coverage { request, handling, offer: offer(request), refusal: refusal(request, true), note }
        })
        .collect()
}

fn row(request: FrontendRequest) -> (Handling, &'static str) {
    use FrontendRequest::*;
    use Handling::*;
    match request {
        GET_FEATURES => (Session, "device features + PROTOCOL_FEATURES, LOG_ALL, ACCESS_PLATFORM"),
        SET_FEATURES => (Session, "refuses bits not offered; ACCESS_PLATFORM needs BACKEND_REQ+REPLY_ACK"),
        SET_OWNER => (Session, "session start (nothing to do)"),
        RESET_OWNER => (Session, "deprecated: disables and stops all rings"),
        SET_MEM_TABLE => (Session, "maps the regions, re-translates running rings"),
        SET_LOG_BASE => (Session, "dirty log (LOG_SHMFD fd), replied to with LOG_SHMFD"),
        SET_LOG_FD => (Session, "eventfd kept; never written (optional in the spec)"),
        SET_VRING_NUM => (Session, "power of two up to the device's maximum"),
        SET_VRING_ADDR => (Session, "translated at ring start; log flag restarts a running ring"),
        SET_VRING_BASE => (Session, "next avail index of a stopped ring"),
        GET_VRING_BASE => (Session, "stops the ring, forgets kick and call fds"),
        SET_VRING_KICK => (Session, "starts the ring; NOFD only with INBAND_NOTIFICATIONS"),
        SET_VRING_CALL => (Session, "swapped atomically on a running ring; none: in-band VRING_CALL"),
        SET_VRING_ERR => (Session, "signalled when the ring breaks; none: in-band VRING_ERR"),
        GET_PROTOCOL_FEATURES => (Session, "session features + what the device declares"),
        SET_PROTOCOL_FEATURES => (Session, "dependencies of protocol.md §5.4 enforced"),
        GET_QUEUE_NUM => (Session, "the device's queue count (pairs for net)"),
        SET_VRING_ENABLE => (Session, "accepted once SET_PROTOCOL_FEATURES was received"),
        SEND_RARP => (Device, "net devices (RARP)"),
        NET_SET_MTU => (Device, "net devices (MTU + VIRTIO_NET_F_MTU offered)"),
        SET_BACKEND_REQ_FD => (Session, "back-end request channel, replaces an earlier one"),
        IOTLB_MSG => (Session, "UPDATE inside the memory table / INVALIDATE, restarts affected rings"),
        SET_VRING_ENDIAN => (Refused, "CROSS_ENDIAN not offered: rings are little-endian (VERSION_1)"),
        GET_CONFIG => (Session, "a window of the device's config space"),
        SET_CONFIG => (Device, "the device accepts or refuses the write"),
        CREATE_CRYPTO_SESSION => (Device, "virtio-crypto devices (CRYPTO_SESSION)"),
        CLOSE_CRYPTO_SESSION => (Device, "virtio-crypto devices (CRYPTO_SESSION)"),
        POSTCOPY_ADVISE | POSTCOPY_LISTEN | POSTCOPY_END => {
            (Refused, "PAGEFAULT not offered: no userfaultfd registration of guest memory")
        }
        GET_INFLIGHT_FD => (Session, "allocates the inflight buffer (split rings)"),
        SET_INFLIGHT_FD => (Session, "validated; rings resubmit what it records"),
        GPU_SET_SOCKET => (Device, "vhost-user-gpu devices"),
        RESET_DEVICE => (Session, "stops rings, clears features, status and inflight; resets the device"),
        VRING_KICK => (Session, "INBAND_NOTIFICATIONS (offered when the device declares it)"),
        GET_MAX_MEM_SLOTS => (Session, "the memory table's slot limit"),
        ADD_MEM_REG => (Session, "maps one region (repeats counted)"),
        REM_MEM_REG => (Session, "unmaps one region (after its last repeat)"),
        SET_STATUS => (
            Session,
            "0 stops the rings (bases kept) and resets; rings run with DRIVER_OK, not FAILED; FEATURES_OK dropped after a refused SET_FEATURES",
        ),
        GET_STATUS => (Session, "the status byte, DEVICE_NEEDS_RESET once a ring broke"),
        GET_SHARED_OBJECT => (Device, "the dma-buf the device exported under the UUID (SHARED_OBJECT)"),
        SET_DEVICE_STATE_FD => (Device, "save or load over the front-end's pipe on a thread of its own (DEVICE_STATE)"),
        CHECK_DEVICE_STATE => (Device, "the outcome of the last transfer, waited for up to 5 s (DEVICE_STATE)"),
        GET_SHMEM_CONFIG => (Device, "the device's declared shared memory regions (SHMEM)"),
        GET_VRING_BASE_SKIP_DRAIN => {
            (Session, "answered as GET_VRING_BASE even without bit 23: draining is always allowed")
        }
    }
}
