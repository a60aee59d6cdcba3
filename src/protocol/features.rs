//! Feature bits: protocol features (GET/SET_PROTOCOL_FEATURES) and the virtio/vhost bits the
//! protocol itself depends on (GET/SET_FEATURES).

use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign, Not};

macro_rules! feature_set {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $flag:ident = $bit:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub u64);

        #[allow(missing_docs)]
        impl $name {
            $($(#[$fmeta])* pub const $flag: $name = $name(1 << $bit);)+

            /// Every named bit with its name, in bit order.
            pub const NAMED: &'static [(&'static str, u32)] = &[$((stringify!($flag), $bit),)+];

            /// The empty set.
            pub const fn empty() -> $name {
                $name(0)
            }

            /// Raw bits.
            pub const fn bits(self) -> u64 {
                self.0
            }

            /// Whether every bit of `other` is set in `self`.
            pub const fn contains(self, other: $name) -> bool {
                self.0 & other.0 == other.0
            }

            /// Names of the set bits; unnamed bits appear as `bit<N>`.
            pub fn names(self) -> Vec<String> {
                (0..64)
                    .filter(|bit| self.0 & (1u64 << bit) != 0)
                    .map(|bit| match Self::NAMED.iter().find(|(_, b)| *b == bit) {
                        Some((name, _)) => (*name).to_string(),
                        None => format!("bit{bit}"),
                    })
                    .collect()
            }
        }

        impl BitOr for $name {
            type Output = $name;
            fn bitor(self, rhs: $name) -> $name {
                $name(self.0 | rhs.0)
            }
        }

        impl BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: $name) {
                self.0 |= rhs.0;
            }
        }

        impl BitAnd for $name {
            type Output = $name;
            fn bitand(self, rhs: $name) -> $name {
                $name(self.0 & rhs.0)
            }
        }

        impl Not for $name {
            type Output = $name;
            fn not(self) -> $name {
                $name(!self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:#x}: {})", stringify!($name), self.0, self.names().join("|"))
            }
        }
    };
}

feature_set! {
    /// `VHOST_USER_PROTOCOL_F_*` bits (protocol.md §5.1).
    ProtocolFeatures {
        MQ = 0,
        LOG_SHMFD = 1,
        RARP = 2,
        REPLY_ACK = 3,
        /// QEMU and DPDK call it NET_MTU.
        MTU = 4,
        /// Formerly SLAVE_REQ.
        BACKEND_REQ = 5,
        CROSS_ENDIAN = 6,
        CRYPTO_SESSION = 7,
        PAGEFAULT = 8,
        CONFIG = 9,
        /// Formerly SLAVE_SEND_FD.
        BACKEND_SEND_FD = 10,
        HOST_NOTIFIER = 11,
        INFLIGHT_SHMFD = 12,
        RESET_DEVICE = 13,
        INBAND_NOTIFICATIONS = 14,
        CONFIGURE_MEM_SLOTS = 15,
        STATUS = 16,
        XEN_MMAP = 17,
        SHARED_OBJECT = 18,
        DEVICE_STATE = 19,
        GET_VRING_BASE_INFLIGHT = 20,
        GPA_ADDRESSES = 21,
        SHMEM = 22,
        GET_VRING_BASE_SKIP_DRAIN = 23,
    }
}

feature_set! {
    /// Virtio and vhost feature bits that the vhost-user protocol itself uses (protocol.md §5.2).
    /// Device-specific bits (0–23) other than NET_MTU are left to the device modules.
    VirtioFeatures {
        /// virtio-net's MTU bit; NET_SET_MTU needs it.
        NET_MTU = 3,
        NOTIFY_ON_EMPTY = 24,
        /// vhost-only: dirty logging of device writes.
        LOG_ALL = 26,
        ANY_LAYOUT = 27,
        INDIRECT_DESC = 28,
        EVENT_IDX = 29,
        /// vhost-user-only: gates protocol features and disabled-at-start rings.
        PROTOCOL_FEATURES = 30,
        VERSION_1 = 32,
        ACCESS_PLATFORM = 33,
        RING_PACKED = 34,
        IN_ORDER = 35,
        ORDER_PLATFORM = 36,
        SR_IOV = 37,
        NOTIFICATION_DATA = 38,
        NOTIF_CONFIG_DATA = 39,
        RING_RESET = 40,
        ADMIN_VQ = 41,
        SUSPEND = 43,
    }
}

/// Bit 0 of `vhost_vring_addr.flags`: log writes to the used ring.
pub const VRING_F_LOG: u32 = 1;

impl ProtocolFeatures {
    /// Checks the dependencies between protocol bits that the spec states (protocol.md §5.4),
    /// returning the first dependant bit whose prerequisite is missing.
    pub fn missing_dependency(self) -> Option<(ProtocolFeatures, ProtocolFeatures)> {
        use ProtocolFeatures as P;
        let rules = [
            (P::INBAND_NOTIFICATIONS, P::BACKEND_REQ | P::REPLY_ACK),
            (P::BACKEND_SEND_FD, P::BACKEND_REQ),
            (P::HOST_NOTIFIER, P::BACKEND_REQ),
            (P::SHARED_OBJECT, P::BACKEND_REQ),
            (P::SHMEM, P::BACKEND_REQ),
            (P::GET_VRING_BASE_INFLIGHT, P::INFLIGHT_SHMFD),
            (P::GET_VRING_BASE_SKIP_DRAIN, P::GET_VRING_BASE_INFLIGHT),
        ];
        rules.into_iter().find(|(bit, needs)| self.contains(*bit) && !self.contains(*needs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_match_the_spec() {
        assert_eq!(ProtocolFeatures::REPLY_ACK.bits(), 1 << 3);
        assert_eq!(ProtocolFeatures::GET_VRING_BASE_SKIP_DRAIN.bits(), 1 << 23);
        assert_eq!(ProtocolFeatures::NAMED.len(), 24);
        assert_eq!(VirtioFeatures::PROTOCOL_FEATURES.bits(), 1 << 30);
        assert_eq!(VirtioFeatures::VERSION_1.bits(), 1 << 32);
    }

    #[test]
    fn names_cover_unknown_bits() {
        // qemu-storage-daemon's protocol features.
        let qsd = ProtocolFeatures(0x8f2b);
        assert_eq!(
            qsd.names(),
            [
                "MQ",
                "LOG_SHMFD",
                "REPLY_ACK",
                "BACKEND_REQ",
                "PAGEFAULT",
                "CONFIG",
                "BACKEND_SEND_FD",
                "HOST_NOTIFIER",
                "CONFIGURE_MEM_SLOTS"
            ]
        );
        assert_eq!(ProtocolFeatures(1 << 40).names(), ["bit40"]);
    }

    #[test]
    fn dependencies() {
        use ProtocolFeatures as P;
        assert_eq!(P::empty().missing_dependency(), None);
        assert_eq!(
            P::INBAND_NOTIFICATIONS.missing_dependency(),
            Some((P::INBAND_NOTIFICATIONS, P::BACKEND_REQ | P::REPLY_ACK))
        );
        assert_eq!((P::INBAND_NOTIFICATIONS | P::BACKEND_REQ | P::REPLY_ACK).missing_dependency(), None);
        assert!(P::GET_VRING_BASE_SKIP_DRAIN.missing_dependency().is_some());
    }
}
