//! Request codes of both channels and the rules the spec attaches to each: payload layout, file
//! descriptors, whether and how it is answered, and the feature that gates it.

use std::fmt;

use super::features::{ProtocolFeatures, VirtioFeatures};

/// Which socket a message travels on; it decides which family of request codes applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// The vhost-user socket: the front-end sends requests, the back-end replies.
    Main,
    /// The back-end request channel of SET_BACKEND_REQ_FD (formerly "slave channel"): the
    /// back-end sends requests, the front-end replies.
    Backend,
}

impl Channel {
    /// The spec's name of the party that sends requests on this channel.
    pub fn requester(self) -> &'static str {
        match self {
            Channel::Main => "front-end",
            Channel::Backend => "back-end",
        }
    }
}

macro_rules! request_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $code:literal,)+ }) => {
        $(#[$meta])*
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u32)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $code,)+
        }

        impl $name {
            /// Every request of this family, in code order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The request with this code, if the spec defines one.
            pub fn from_code(code: u32) -> Option<$name> {
                match code {
                    $($code => Some($name::$variant),)+
                    _ => None,
                }
            }

            /// The wire code.
            pub fn code(self) -> u32 {
                self as u32
            }

            /// The spec name without its `VHOST_USER_` / `VHOST_USER_BACKEND_` prefix.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => stringify!($variant),)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

request_enum! {
    /// Requests the front-end sends on the main channel (spec: "Front-end message types").
    FrontendRequest {
        /// Read the back-end's virtio and vhost feature bits.
        GET_FEATURES = 1,
        /// Acknowledge a subset of the offered feature bits.
        SET_FEATURES = 2,
        /// Start a session.
        SET_OWNER = 3,
        /// Deprecated; treated as "disable all rings".
        RESET_OWNER = 4,
        /// Replace the whole memory table (one fd per region).
        SET_MEM_TABLE = 5,
        /// Hand over the dirty-log bitmap.
        SET_LOG_BASE = 6,
        /// Eventfd signalled after log updates.
        SET_LOG_FD = 7,
        /// Ring size.
        SET_VRING_NUM = 8,
        /// Ring addresses.
        SET_VRING_ADDR = 9,
        /// Next available index.
        SET_VRING_BASE = 10,
        /// Stop a ring and read its base.
        GET_VRING_BASE = 11,
        /// Kick eventfd (or NOFD: poll).
        SET_VRING_KICK = 12,
        /// Call eventfd (or NOFD).
        SET_VRING_CALL = 13,
        /// Error eventfd (or NOFD).
        SET_VRING_ERR = 14,
        /// Read the protocol feature bits.
        GET_PROTOCOL_FEATURES = 15,
        /// Acknowledge protocol feature bits.
        SET_PROTOCOL_FEATURES = 16,
        /// Maximum number of queues.
        GET_QUEUE_NUM = 17,
        /// Enable or disable a ring.
        SET_VRING_ENABLE = 18,
        /// Broadcast a RARP for a migrated guest's MAC.
        SEND_RARP = 19,
        /// Host MTU for a net device.
        NET_SET_MTU = 20,
        /// Hand over the back-end request channel (formerly SET_SLAVE_REQ_FD).
        SET_BACKEND_REQ_FD = 21,
        /// IOTLB update or invalidation.
        IOTLB_MSG = 22,
        /// Ring endianness for legacy cross-endian devices.
        SET_VRING_ENDIAN = 23,
        /// Read device config space.
        GET_CONFIG = 24,
        /// Write device config space.
        SET_CONFIG = 25,
        /// virtio-crypto session setup.
        CREATE_CRYPTO_SESSION = 26,
        /// virtio-crypto session teardown.
        CLOSE_CRYPTO_SESSION = 27,
        /// Postcopy: ask for a userfaultfd.
        POSTCOPY_ADVISE = 28,
        /// Postcopy: enter listen mode.
        POSTCOPY_LISTEN = 29,
        /// Postcopy: done.
        POSTCOPY_END = 30,
        /// Ask the back-end for an inflight-tracking buffer.
        GET_INFLIGHT_FD = 31,
        /// Hand an inflight-tracking buffer back.
        SET_INFLIGHT_FD = 32,
        /// vhost-user-gpu side socket.
        GPU_SET_SOCKET = 33,
        /// Reset the device, keeping the session.
        RESET_DEVICE = 34,
        /// In-band kick.
        VRING_KICK = 35,
        /// Maximum number of memory slots for ADD_MEM_REG.
        GET_MAX_MEM_SLOTS = 36,
        /// Add one memory region.
        ADD_MEM_REG = 37,
        /// Remove one memory region.
        REM_MEM_REG = 38,
        /// Write the virtio device status byte.
        SET_STATUS = 39,
        /// Read the virtio device status byte.
        GET_STATUS = 40,
        /// Ask an exporting back-end for a shared object's dma-buf.
        GET_SHARED_OBJECT = 41,
        /// Start a device-state transfer.
        SET_DEVICE_STATE_FD = 42,
        /// Check that a device-state transfer succeeded.
        CHECK_DEVICE_STATE = 43,
        /// Read the shared-memory regions the back-end needs.
        GET_SHMEM_CONFIG = 44,
        /// Stop a ring without draining in-flight requests.
        GET_VRING_BASE_SKIP_DRAIN = 45,
    }
}

request_enum! {
    /// Requests the back-end sends on the back-end request channel
    /// (spec: "Back-end message types", prefix `VHOST_USER_BACKEND_`).
    BackendRequest {
        /// IOTLB miss or access failure.
        IOTLB_MSG = 1,
        /// Device config space changed.
        CONFIG_CHANGE_MSG = 2,
        /// Map (or unmap) a host notifier page for a ring.
        VRING_HOST_NOTIFIER_MSG = 3,
        /// In-band used-buffer notification.
        VRING_CALL = 4,
        /// In-band ring error notification.
        VRING_ERR = 5,
        /// Export a shared object.
        SHARED_OBJECT_ADD = 6,
        /// Stop exporting a shared object.
        SHARED_OBJECT_REMOVE = 7,
        /// Look up a shared object exported by another back-end.
        SHARED_OBJECT_LOOKUP = 8,
        /// Map an fd into a VIRTIO shared memory region.
        SHMEM_MAP = 9,
        /// Unmap part of a VIRTIO shared memory region.
        SHMEM_UNMAP = 10,
    }
}

/// A request code of either family, including codes the spec does not define.
///
/// Unknown codes decode successfully so that a back-end can answer them as the spec asks
/// (failure ack when NEED_REPLY is set, close any fds) instead of dropping the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Request {
    /// A main-channel request.
    Frontend(FrontendRequest),
    /// A back-end request channel request.
    Backend(BackendRequest),
    /// A code the spec does not define, with the channel it arrived on.
    Unknown(Channel, u32),
}

impl Request {
    /// Resolves a wire code on a channel.
    pub fn from_code(channel: Channel, code: u32) -> Request {
        let known = match channel {
            Channel::Main => FrontendRequest::from_code(code).map(Request::Frontend),
            Channel::Backend => BackendRequest::from_code(code).map(Request::Backend),
        };
        known.unwrap_or(Request::Unknown(channel, code))
    }

    /// The wire code.
    pub fn code(self) -> u32 {
        match self {
            Request::Frontend(r) => r.code(),
            Request::Backend(r) => r.code(),
            Request::Unknown(_, code) => code,
        }
    }

    /// The channel this request travels on.
    pub fn channel(self) -> Channel {
        match self {
            Request::Frontend(_) => Channel::Main,
            Request::Backend(_) => Channel::Backend,
            Request::Unknown(channel, _) => channel,
        }
    }

    /// The wire rules for this request.
    pub fn rules(self) -> Rules {
        match self {
            Request::Frontend(r) => r.rules(),
            Request::Backend(r) => r.rules(),
            Request::Unknown(..) => Rules::UNKNOWN,
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Frontend(r) => write!(f, "{r}"),
            Request::Backend(r) => write!(f, "BACKEND_{r}"),
            Request::Unknown(channel, code) => {
                write!(f, "unknown {} request {code}", channel.requester())
            }
        }
    }
}

impl From<FrontendRequest> for Request {
    fn from(r: FrontendRequest) -> Request {
        Request::Frontend(r)
    }
}

impl From<BackendRequest> for Request {
    fn from(r: BackendRequest) -> Request {
        Request::Backend(r)
    }
}

/// Payload layouts (spec section "Message types" / protocol.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// No payload.
    Empty,
    /// One u64.
    U64,
    /// `vhost_vring_state`: index, num.
    VringState,
    /// `vhost_vring_addr`.
    VringAddr,
    /// u64 with ring index in bits 0–7 and NOFD in bit 8 (SET_VRING_KICK/CALL/ERR).
    VringFd,
    /// Memory table: count, padding, regions.
    MemoryTable,
    /// Padding + one region (ADD/REM_MEM_REG).
    SingleRegion,
    /// Dirty log description.
    LogBase,
    /// `vhost_iotlb_msg`.
    Iotlb,
    /// Config space access: offset, size, flags, data.
    Config,
    /// Host notifier area.
    VringArea,
    /// Inflight buffer description.
    Inflight,
    /// A shared-object UUID.
    Shared,
    /// Device-state transfer parameters.
    DeviceStateParams,
    /// SHMEM_MAP / SHMEM_UNMAP request.
    Mmap,
    /// GET_SHMEM_CONFIG reply.
    ShmemConfig,
    /// virtio-crypto session (QEMU's layout).
    CryptoSession,
    /// Reply to SET_LOG_BASE: empty, a u64 or an echoed log description (peers differ).
    LogBaseReply,
    /// Reply of SET_MEM_TABLE: an ack, or in postcopy-listen mode the table with back-end addresses.
    MemoryTableReply,
    /// Reply of ADD_MEM_REG: an ack, or in postcopy-listen mode the region with its back-end address.
    SingleRegionReply,
    /// Reply of GET_CONFIG: the config, or an empty payload on failure.
    ConfigReply,
    /// GET_SHARED_OBJECT: QEMU sends the request with size 0; peers answer with 0, 8 or 16 bytes.
    SharedLenient,
    /// Bytes with no known structure (unknown requests).
    Raw,
}

/// How many file descriptors a message may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdRule {
    /// Exactly this many.
    Exactly(usize),
    /// Between 0 and this many.
    AtMost(usize),
    /// One per memory-table region.
    PerRegion,
    /// None if the payload's NOFD bit is set, otherwise exactly one.
    UnlessNoFd,
    /// None if the payload's NOFD bit is set, otherwise at most one.
    AtMostOneUnlessNoFd,
    /// GET_INFLIGHT_FD reply: one fd unless mmap_size is 0.
    InflightReply,
    /// SET_DEVICE_STATE_FD reply: one fd only on success with bit 8 clear.
    DeviceStateReply,
}

/// Whether a request is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyRule {
    /// Only with NEED_REPLY (REPLY_ACK), as a u64 status.
    AckOnly,
    /// Always answered, with this layout and these fds.
    Always(Layout, FdRule),
    /// Answered only when LOG_SHMFD was negotiated (SET_LOG_BASE).
    IfLogShmfd(Layout),
    /// Only with NEED_REPLY, except in postcopy-listen mode where this layout answers
    /// (SET_MEM_TABLE, ADD_MEM_REG).
    AckOrPostcopy(Layout),
}

/// What must have been negotiated before a request may be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Nothing beyond the session itself.
    None,
    /// VHOST_USER_F_PROTOCOL_FEATURES offered by GET_FEATURES.
    ProtocolFeaturesOffered,
    /// VHOST_USER_F_PROTOCOL_FEATURES negotiated with SET_FEATURES.
    ProtocolFeaturesAcked,
    /// These protocol features, all of them.
    Protocol(ProtocolFeatures),
    /// These virtio feature bits, all of them.
    Virtio(VirtioFeatures),
    /// Both the protocol features and the virtio bits.
    Both(ProtocolFeatures, VirtioFeatures),
}

/// Wire rules of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Layout of the request payload.
    pub layout: Layout,
    /// File descriptors allowed on the request.
    pub fds: FdRule,
    /// How the request is answered.
    pub reply: ReplyRule,
    /// What must be negotiated first.
    pub gate: Gate,
}

impl Rules {
    const fn new(layout: Layout, fds: FdRule, reply: ReplyRule, gate: Gate) -> Rules {
        Rules { layout, fds, reply, gate }
    }

    /// Rules for codes the spec does not define: anything goes on decode, nothing is answered
    /// except a failure ack when NEED_REPLY is set.
    pub const UNKNOWN: Rules = Rules::new(Layout::Raw, FdRule::AtMost(usize::MAX), ReplyRule::AckOnly, Gate::None);

    /// Whether the request is always answered (independently of REPLY_ACK).
    pub fn has_reply(&self) -> bool {
        matches!(self.reply, ReplyRule::Always(..))
    }
}

impl FrontendRequest {
    /// The wire rules of this request (protocol.md §3.1).
    pub fn rules(self) -> Rules {
        use FdRule::*;
        use FrontendRequest::*;
        use Layout as L;
        use ReplyRule::*;
        let p = |f: ProtocolFeatures| Gate::Protocol(f);
        let none = FdRule::Exactly(0);
        match self {
            GET_FEATURES => Rules::new(L::Empty, none, Always(L::U64, none), Gate::None),
            SET_FEATURES => Rules::new(L::U64, none, AckOnly, Gate::None),
            SET_OWNER => Rules::new(L::Empty, none, AckOnly, Gate::None),
            RESET_OWNER => Rules::new(L::Empty, none, AckOnly, Gate::None),
            SET_MEM_TABLE => Rules::new(L::MemoryTable, PerRegion, AckOrPostcopy(L::MemoryTableReply), Gate::None),
            SET_LOG_BASE => Rules::new(L::LogBase, AtMost(1), IfLogShmfd(L::LogBaseReply), Gate::None),
            SET_LOG_FD => Rules::new(L::Empty, Exactly(1), AckOnly, Gate::None),
            SET_VRING_NUM => Rules::new(L::VringState, none, AckOnly, Gate::None),
            SET_VRING_ADDR => Rules::new(L::VringAddr, none, AckOnly, Gate::None),
            SET_VRING_BASE => Rules::new(L::VringState, none, AckOnly, Gate::None),
            GET_VRING_BASE => Rules::new(L::VringState, none, Always(L::VringState, none), Gate::None),
            SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => Rules::new(L::VringFd, UnlessNoFd, AckOnly, Gate::None),
            GET_PROTOCOL_FEATURES => Rules::new(L::Empty, none, Always(L::U64, none), Gate::ProtocolFeaturesOffered),
            SET_PROTOCOL_FEATURES => Rules::new(L::U64, none, AckOnly, Gate::ProtocolFeaturesOffered),
            GET_QUEUE_NUM => Rules::new(L::Empty, none, Always(L::U64, none), p(ProtocolFeatures::MQ)),
            SET_VRING_ENABLE => Rules::new(L::VringState, none, AckOnly, Gate::ProtocolFeaturesAcked),
            SEND_RARP => Rules::new(L::U64, none, AckOnly, p(ProtocolFeatures::RARP)),
            NET_SET_MTU => {
                Rules::new(L::U64, none, AckOnly, Gate::Both(ProtocolFeatures::MTU, VirtioFeatures::NET_MTU))
            }
            SET_BACKEND_REQ_FD => Rules::new(L::Empty, Exactly(1), AckOnly, p(ProtocolFeatures::BACKEND_REQ)),
            IOTLB_MSG => {
                Rules::new(L::Iotlb, none, Always(L::U64, none), Gate::Virtio(VirtioFeatures::ACCESS_PLATFORM))
            }
            SET_VRING_ENDIAN => Rules::new(L::VringState, none, AckOnly, p(ProtocolFeatures::CROSS_ENDIAN)),
            GET_CONFIG => Rules::new(L::Config, none, Always(L::ConfigReply, none), p(ProtocolFeatures::CONFIG)),
            SET_CONFIG => Rules::new(L::Config, none, AckOnly, p(ProtocolFeatures::CONFIG)),
            CREATE_CRYPTO_SESSION => {
                Rules::new(L::CryptoSession, none, Always(L::CryptoSession, none), p(ProtocolFeatures::CRYPTO_SESSION))
            }
            CLOSE_CRYPTO_SESSION => Rules::new(L::U64, none, AckOnly, p(ProtocolFeatures::CRYPTO_SESSION)),
            POSTCOPY_ADVISE => Rules::new(L::Empty, none, Always(L::Empty, AtMost(1)), p(ProtocolFeatures::PAGEFAULT)),
            POSTCOPY_LISTEN | POSTCOPY_END => {
                Rules::new(L::Empty, none, Always(L::U64, none), p(ProtocolFeatures::PAGEFAULT))
            }
            GET_INFLIGHT_FD => {
                Rules::new(L::Inflight, none, Always(L::Inflight, InflightReply), p(ProtocolFeatures::INFLIGHT_SHMFD))
            }
            SET_INFLIGHT_FD => Rules::new(L::Inflight, Exactly(1), AckOnly, p(ProtocolFeatures::INFLIGHT_SHMFD)),
            GPU_SET_SOCKET => Rules::new(L::Empty, Exactly(1), AckOnly, Gate::None),
            RESET_DEVICE => Rules::new(L::Empty, none, AckOnly, p(ProtocolFeatures::RESET_DEVICE)),
            VRING_KICK => Rules::new(L::VringState, none, AckOnly, p(ProtocolFeatures::INBAND_NOTIFICATIONS)),
            GET_MAX_MEM_SLOTS => {
                Rules::new(L::Empty, none, Always(L::U64, none), p(ProtocolFeatures::CONFIGURE_MEM_SLOTS))
            }
            ADD_MEM_REG => Rules::new(
                L::SingleRegion,
                Exactly(1),
                AckOrPostcopy(L::SingleRegionReply),
                p(ProtocolFeatures::CONFIGURE_MEM_SLOTS),
            ),
            // The spec says no fd; tolerate (and close) one, as DPDK and libvhost-user do.
            REM_MEM_REG => Rules::new(L::SingleRegion, AtMost(1), AckOnly, p(ProtocolFeatures::CONFIGURE_MEM_SLOTS)),
            SET_STATUS => Rules::new(L::U64, none, AckOnly, p(ProtocolFeatures::STATUS)),
            GET_STATUS => Rules::new(L::Empty, none, Always(L::U64, none), p(ProtocolFeatures::STATUS)),
            GET_SHARED_OBJECT => Rules::new(
                L::SharedLenient,
                none,
                Always(L::SharedLenient, AtMost(1)),
                p(ProtocolFeatures::SHARED_OBJECT),
            ),
            SET_DEVICE_STATE_FD => Rules::new(
                L::DeviceStateParams,
                Exactly(1),
                Always(L::U64, DeviceStateReply),
                p(ProtocolFeatures::DEVICE_STATE),
            ),
            CHECK_DEVICE_STATE => Rules::new(L::Empty, none, Always(L::U64, none), p(ProtocolFeatures::DEVICE_STATE)),
            GET_SHMEM_CONFIG => Rules::new(L::Empty, none, Always(L::ShmemConfig, none), p(ProtocolFeatures::SHMEM)),
            GET_VRING_BASE_SKIP_DRAIN => Rules::new(
                L::VringState,
                none,
                Always(L::VringState, none),
                p(ProtocolFeatures::GET_VRING_BASE_SKIP_DRAIN),
            ),
        }
    }
}

impl BackendRequest {
    /// The wire rules of this request (protocol.md §4.1). Every back-end request needs
    /// BACKEND_REQ; the gate names what it needs on top.
    pub fn rules(self) -> Rules {
        use BackendRequest::*;
        use FdRule::*;
        use Layout as L;
        use ReplyRule::*;
        let p = |f: ProtocolFeatures| Gate::Protocol(ProtocolFeatures::BACKEND_REQ | f);
        let none = FdRule::Exactly(0);
        match self {
            IOTLB_MSG => Rules::new(
                L::Iotlb,
                none,
                AckOnly,
                Gate::Both(ProtocolFeatures::BACKEND_REQ, VirtioFeatures::ACCESS_PLATFORM),
            ),
            CONFIG_CHANGE_MSG => Rules::new(L::Empty, none, AckOnly, p(ProtocolFeatures::CONFIG)),
            VRING_HOST_NOTIFIER_MSG => {
                Rules::new(L::VringArea, AtMostOneUnlessNoFd, AckOnly, p(ProtocolFeatures::HOST_NOTIFIER))
            }
            VRING_CALL | VRING_ERR => {
                Rules::new(L::VringState, none, AckOnly, p(ProtocolFeatures::INBAND_NOTIFICATIONS))
            }
            SHARED_OBJECT_ADD | SHARED_OBJECT_REMOVE => {
                Rules::new(L::Shared, none, AckOnly, p(ProtocolFeatures::SHARED_OBJECT))
            }
            // The spec puts no fd on the request; rust-vmm's back-end attaches one. Tolerate it.
            SHARED_OBJECT_LOOKUP => {
                Rules::new(L::Shared, AtMost(1), Always(L::U64, AtMost(1)), p(ProtocolFeatures::SHARED_OBJECT))
            }
            SHMEM_MAP => {
                Rules::new(L::Mmap, Exactly(1), AckOnly, p(ProtocolFeatures::BACKEND_SEND_FD | ProtocolFeatures::SHMEM))
            }
            SHMEM_UNMAP => Rules::new(L::Mmap, none, AckOnly, p(ProtocolFeatures::SHMEM)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_dense_and_named_like_the_spec() {
        assert_eq!(FrontendRequest::ALL.len(), 45);
        assert_eq!(BackendRequest::ALL.len(), 10);
        for (i, r) in FrontendRequest::ALL.iter().enumerate() {
            assert_eq!(r.code(), i as u32 + 1);
            assert_eq!(FrontendRequest::from_code(r.code()), Some(*r));
        }
        for (i, r) in BackendRequest::ALL.iter().enumerate() {
            assert_eq!(r.code(), i as u32 + 1);
        }
        assert_eq!(FrontendRequest::SET_VRING_ADDR.name(), "SET_VRING_ADDR");
        assert_eq!(FrontendRequest::from_code(0), None);
        assert_eq!(FrontendRequest::from_code(46), None);
    }

    #[test]
    fn unknown_codes_keep_their_channel() {
        assert_eq!(Request::from_code(Channel::Main, 99), Request::Unknown(Channel::Main, 99));
        assert_eq!(Request::from_code(Channel::Backend, 11), Request::Unknown(Channel::Backend, 11));
        assert_eq!(Request::from_code(Channel::Backend, 2), Request::Backend(BackendRequest::CONFIG_CHANGE_MSG));
        assert_eq!(Request::Unknown(Channel::Main, 0).to_string(), "unknown front-end request 0");
    }

    #[test]
    fn mandatory_replies_match_the_spec_list() {
        use FrontendRequest::*;
        let always: Vec<_> = FrontendRequest::ALL.iter().filter(|r| r.rules().has_reply()).copied().collect();
        assert_eq!(
            always,
            vec![
                GET_FEATURES,
                GET_VRING_BASE,
                GET_PROTOCOL_FEATURES,
                GET_QUEUE_NUM,
                IOTLB_MSG,
                GET_CONFIG,
                CREATE_CRYPTO_SESSION,
                POSTCOPY_ADVISE,
                POSTCOPY_LISTEN,
                POSTCOPY_END,
                GET_INFLIGHT_FD,
                GET_MAX_MEM_SLOTS,
                GET_STATUS,
                GET_SHARED_OBJECT,
                SET_DEVICE_STATE_FD,
                CHECK_DEVICE_STATE,
                GET_SHMEM_CONFIG,
                GET_VRING_BASE_SKIP_DRAIN,
            ]
        );
        assert!(matches!(SET_LOG_BASE.rules().reply, ReplyRule::IfLogShmfd(_)));
        let backend: Vec<_> = BackendRequest::ALL.iter().filter(|r| r.rules().has_reply()).collect();
        assert_eq!(backend, vec![&BackendRequest::SHARED_OBJECT_LOOKUP]);
    }
}
