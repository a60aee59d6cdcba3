//! virtio-net (VIRTIO 1.2 §5.1): feature bits, the per-packet header, the config layout, the
//! control-queue commands and the queue layout. Used by the built-in net devices, the Python
//! net device and the net client alike.

/// Feature bits (VIRTIO 1.2 §5.1.3), spec names without the `VIRTIO_NET_F_` prefix.
pub mod feature {
    /// Device handles packets with partial checksum (driver TX offload).
    pub const CSUM: u64 = 1 << 0;
    /// Driver handles packets with partial checksum (device RX offload).
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// Control-queue GUEST_OFFLOADS_SET.
    pub const CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
    /// `mtu` in the config space is valid.
    pub const MTU: u64 = 1 << 3;
    /// `mac` in the config space is valid.
    pub const MAC: u64 = 1 << 5;
    /// Driver can receive TSOv4.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// Driver can receive TSOv6.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// Driver can receive TSO with ECN.
    pub const GUEST_ECN: u64 = 1 << 9;
    /// Driver can receive UFO.
    pub const GUEST_UFO: u64 = 1 << 10;
    /// Device can receive TSOv4.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// Device can receive TSOv6.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// Device can receive TSO with ECN.
    pub const HOST_ECN: u64 = 1 << 13;
    /// Device can receive UFO.
    pub const HOST_UFO: u64 = 1 << 14;
    /// Driver can merge receive buffers (`num_buffers` in the header).
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// `status` in the config space is valid.
    pub const STATUS: u64 = 1 << 16;
    /// Control virtqueue.
    pub const CTRL_VQ: u64 = 1 << 17;
    /// Control-queue RX mode commands.
    pub const CTRL_RX: u64 = 1 << 18;
    /// Control-queue VLAN filtering.
    pub const CTRL_VLAN: u64 = 1 << 19;
    /// Driver can send gratuitous packets (ANNOUNCE).
    pub const GUEST_ANNOUNCE: u64 = 1 << 21;
    /// Several queue pairs (VQ_PAIRS_SET).
    pub const MQ: u64 = 1 << 22;
    /// Control-queue MAC_ADDR_SET.
    pub const CTRL_MAC_ADDR: u64 = 1 << 23;

    /// The offload bits a device that only moves frames may offer when its peer (a TAP with a
    /// virtio-net header) does the checksum and segmentation work.
    pub const OFFLOADS: u64 =
        CSUM | GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN | HOST_TSO4 | HOST_TSO6 | HOST_ECN;

    /// (bit, spec name) for every bit above, for tracing and Python.
    pub const NAMES: &[(u64, &str)] = &[
        (CSUM, "CSUM"),
        (GUEST_CSUM, "GUEST_CSUM"),
        (CTRL_GUEST_OFFLOADS, "CTRL_GUEST_OFFLOADS"),
        (MTU, "MTU"),
        (MAC, "MAC"),
        (GUEST_TSO4, "GUEST_TSO4"),
        (GUEST_TSO6, "GUEST_TSO6"),
        (GUEST_ECN, "GUEST_ECN"),
        (GUEST_UFO, "GUEST_UFO"),
        (HOST_TSO4, "HOST_TSO4"),
        (HOST_TSO6, "HOST_TSO6"),
        (HOST_ECN, "HOST_ECN"),
        (HOST_UFO, "HOST_UFO"),
        (MRG_RXBUF, "MRG_RXBUF"),
        (STATUS, "STATUS"),
        (CTRL_VQ, "CTRL_VQ"),
        (CTRL_RX, "CTRL_RX"),
        (CTRL_VLAN, "CTRL_VLAN"),
        (GUEST_ANNOUNCE, "GUEST_ANNOUNCE"),
        (MQ, "MQ"),
        (CTRL_MAC_ADDR, "CTRL_MAC_ADDR"),
    ];
}

/// `virtio_net_hdr.flags`.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.flags`: checksum already validated.
pub const HDR_F_DATA_VALID: u8 = 2;
/// `gso_type`: not a GSO frame.
pub const HDR_GSO_NONE: u8 = 0;
/// `gso_type`: TCPv4 segmentation.
pub const HDR_GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP fragmentation.
pub const HDR_GSO_UDP: u8 = 3;
/// `gso_type`: TCPv6 segmentation.
pub const HDR_GSO_TCPV6: u8 = 4;
/// `gso_type` flag: ECN.
pub const HDR_GSO_ECN: u8 = 0x80;

/// Size of `virtio_net_hdr` with `num_buffers` (VERSION_1 or MRG_RXBUF): 12 bytes.
pub const HDR_LEN: usize = 12;
/// Size of the legacy header without `num_buffers` (neither VERSION_1 nor MRG_RXBUF).
pub const HDR_LEN_LEGACY: usize = 10;

/// The header size a driver with `features` puts before every frame (§5.1.6).
pub fn header_len(features: u64) -> usize {
    if features & (feature::MRG_RXBUF | crate::protocol::VirtioFeatures::VERSION_1.bits()) != 0 {
        HDR_LEN
    } else {
        HDR_LEN_LEGACY
    }
}

/// Largest frame (without header) a device accepts from the driver: a 64 KiB GSO frame plus
/// an Ethernet and VLAN header (what Linux's TAP accepts).
pub const MAX_FRAME_LEN: usize = 65536 + 14 + 4;
/// Smallest frame: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// Smallest MTU the spec allows a device to offer (§5.1.4.1).
pub const MIN_MTU: u16 = 68;

/// `struct virtio_net_hdr` (with `num_buffers`), little-endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    /// `HDR_F_*`.
    pub flags: u8,
    /// `HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Segment size for GSO.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// Buffers this frame spans (MRG_RXBUF; 1 otherwise on RX, ignored on TX).
    pub num_buffers: u16,
}

impl NetHeader {
    /// Reads the first `min(bytes.len(), 12)` bytes; missing fields stay zero.
    pub fn from_bytes(bytes: &[u8]) -> NetHeader {
        let mut b = [0u8; HDR_LEN];
        let n = bytes.len().min(HDR_LEN);
        b[..n].copy_from_slice(&bytes[..n]);
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: le(10),
        }
    }

    /// The 12 wire bytes.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }
}

/// `status` bits of the config space.
pub const S_LINK_UP: u16 = 1;
/// `status`: the driver should announce itself (GUEST_ANNOUNCE).
pub const S_ANNOUNCE: u16 = 2;

/// Offsets in `struct virtio_net_config`.
pub mod config {
    /// `u8 mac[6]`.
    pub const MAC: usize = 0;
    /// `le16 status`.
    pub const STATUS: usize = 6;
    /// `le16 max_virtqueue_pairs`.
    pub const MAX_VIRTQUEUE_PAIRS: usize = 8;
    /// `le16 mtu`.
    pub const MTU: usize = 10;
    /// Bytes up to and including `mtu` (what QEMU reads for these features).
    pub const SIZE: usize = 12;
}

/// `struct virtio_net_config` (the part up to `mtu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The device's MAC address.
    pub mac: [u8; 6],
    /// `S_LINK_UP | S_ANNOUNCE`.
    pub status: u16,
    /// Queue pairs the device has.
    pub max_virtqueue_pairs: u16,
    /// Largest MTU the driver should use.
    pub mtu: u16,
}

impl NetConfig {
    /// The config space bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; config::SIZE];
        b[config::MAC..config::MAC + 6].copy_from_slice(&self.mac);
        b[config::STATUS..config::STATUS + 2].copy_from_slice(&self.status.to_le_bytes());
        b[config::MAX_VIRTQUEUE_PAIRS..config::MAX_VIRTQUEUE_PAIRS + 2]
            .copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b[config::MTU..config::MTU + 2].copy_from_slice(&self.mtu.to_le_bytes());
        b
    }

    /// Parses config-space bytes (at least [`config::SIZE`]).
    pub fn from_bytes(b: &[u8]) -> Option<NetConfig> {
        if b.len() < config::SIZE {
            return None;
        }
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[config::MAC..config::MAC + 6]);
        Some(NetConfig {
            mac,
            status: le(config::STATUS),
            max_virtqueue_pairs: le(config::MAX_VIRTQUEUE_PAIRS),
            mtu: le(config::MTU),
        })
    }
}

/// Control-queue classes and commands (§5.1.6.5).
pub mod ctrl {
    /// `virtio_net_ctrl_ack`: success.
    pub const OK: u8 = 0;
    /// `virtio_net_ctrl_ack`: failure.
    pub const ERR: u8 = 1;

    /// Class RX: packet filtering modes (one byte: on/off).
    pub const CLASS_RX: u8 = 0;
    /// RX: promiscuous.
    pub const RX_PROMISC: u8 = 0;
    /// RX: all multicast.
    pub const RX_ALLMULTI: u8 = 1;
    /// RX: all unicast.
    pub const RX_ALLUNI: u8 = 2;
    /// RX: no multicast.
    pub const RX_NOMULTI: u8 = 3;
    /// RX: no unicast.
    pub const RX_NOUNI: u8 = 4;
    /// RX: no broadcast.
    pub const RX_NOBCAST: u8 = 5;

    /// Class MAC.
    pub const CLASS_MAC: u8 = 1;
    /// MAC: set the unicast and multicast filter tables.
    pub const MAC_TABLE_SET: u8 = 0;
    /// MAC: set the device's address.
    pub const MAC_ADDR_SET: u8 = 1;

    /// Class VLAN.
    pub const CLASS_VLAN: u8 = 2;

    /// Class ANNOUNCE.
    pub const CLASS_ANNOUNCE: u8 = 3;
    /// ANNOUNCE: the driver has announced itself.
    pub const ANNOUNCE_ACK: u8 = 0;

    /// Class MQ.
    pub const CLASS_MQ: u8 = 4;
    /// MQ: number of queue pairs to use.
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
    /// Smallest VQ_PAIRS_SET value.
    pub const MQ_VQ_PAIRS_MIN: u16 = 1;
    /// Largest VQ_PAIRS_SET value.
    pub const MQ_VQ_PAIRS_MAX: u16 = 0x8000;

    /// Class GUEST_OFFLOADS.
    pub const CLASS_GUEST_OFFLOADS: u8 = 5;
    /// GUEST_OFFLOADS: set the RX offloads.
    pub const GUEST_OFFLOADS_SET: u8 = 0;
}

/// Ring index of queue pair `pair`'s receive queue (`receiveq1` is 0).
pub const fn rx_queue(pair: u16) -> u16 {
    pair * 2
}

/// Ring index of queue pair `pair`'s transmit queue.
pub const fn tx_queue(pair: u16) -> u16 {
    pair * 2 + 1
}

/// Ring index of the control queue of a device with `pairs` queue pairs: the last one.
pub const fn ctrl_queue(pairs: u16) -> u16 {
    pairs * 2
}

/// What a ring index is in a device with `pairs` queue pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRole {
    /// receiveq of this pair.
    Rx(u16),
    /// transmitq of this pair.
    Tx(u16),
    /// The control queue.
    Ctrl,
}

/// Role of ring `index` (`None` beyond the control queue).
pub fn queue_role(index: u16, pairs: u16) -> Option<QueueRole> {
    if index < pairs * 2 {
        Some(if index % 2 == 0 { QueueRole::Rx(index / 2) } else { QueueRole::Tx(index / 2) })
    } else if index == ctrl_queue(pairs) {
        Some(QueueRole::Ctrl)
    } else {
        None
    }
}

/// A RARP frame announcing `mac` (what a back-end sends on SEND_RARP, RFC 903 layout as the
/// Linux bridge and QEMU's announce use): broadcast destination, ethertype 0x8035, reverse
/// request with sender and target hardware address `mac`; padded to the 60-byte minimum.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(&mac);
    f[32..38].copy_from_slice(&mac);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = NetHeader {
            flags: HDR_F_NEEDS_CSUM,
            gso_type: HDR_GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        assert_eq!(NetHeader::from_bytes(&h.to_bytes()), h);
        assert_eq!(h.to_bytes()[10..], [3, 0]);
        // A short (legacy) header leaves num_buffers zero.
        assert_eq!(NetHeader::from_bytes(&h.to_bytes()[..10]).num_buffers, 0);
    }

    #[test]
    fn layout_and_roles() {
        assert_eq!(queue_role(0, 2), Some(QueueRole::Rx(0)));
        assert_eq!(queue_role(3, 2), Some(QueueRole::Tx(1)));
        assert_eq!(queue_role(4, 2), Some(QueueRole::Ctrl));
        assert_eq!(queue_role(5, 2), None);
        assert_eq!(header_len(0), HDR_LEN_LEGACY);
        assert_eq!(header_len(feature::MRG_RXBUF), HDR_LEN);
        let c = NetConfig { mac: [2, 0, 0, 0, 0, 1], status: S_LINK_UP, max_virtqueue_pairs: 2, mtu: 1500 };
        assert_eq!(NetConfig::from_bytes(&c.to_bytes()), Some(c));
        let r = rarp_frame([2, 0, 0, 0, 0, 1]);
        assert_eq!(&r[12..14], &[0x80, 0x35]);
    }
}
