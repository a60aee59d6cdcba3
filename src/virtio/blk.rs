//! virtio-blk (VIRTIO 1.2 §5.2): feature bits, request header, request types, status codes,
//! config layout.
//!
//! Constants keep the spec's (and `<linux/virtio_blk.h>`'s) names and values, so
//! `grep VIRTIO_BLK_T_FLUSH` finds the spec, Linux, QEMU and this crate alike. Feature constants
//! are therefore bit *numbers*, as in the spec: the mask is `1 << VIRTIO_BLK_F_FLUSH`. Each group
//! also has a table of (name, value) pairs that `src/python/virtio.rs` exports to Python, where
//! `vhostuser_rs.blk` builds its enums from it.

/// Defines `pub const`s and a table of (name, value) holding each of them, in order.
macro_rules! named_consts {
    ($table:ident: $ty:ty { $($(#[$doc:meta])* $name:ident = $value:expr,)+ }) => {
        $($(#[$doc])* pub const $name: $ty = $value;)+

        /// Every constant above with its name, in definition order (exported to Python).
        pub const $table: &[(&str, $ty)] = &[$((stringify!($name), $name),)+];
    };
}

/// Feature bits (§5.2.3), as bit numbers: the mask is `1 << VIRTIO_BLK_F_*`.
pub mod feature {
    named_consts!(FEATURES: u32 {
        /// `size_max` is valid: the largest size of any single segment.
        VIRTIO_BLK_F_SIZE_MAX = 1,
        /// `seg_max` is valid: the most segments in a request.
        VIRTIO_BLK_F_SEG_MAX = 2,
        /// `geometry` is valid.
        VIRTIO_BLK_F_GEOMETRY = 4,
        /// The device is read-only.
        VIRTIO_BLK_F_RO = 5,
        /// `blk_size` is valid.
        VIRTIO_BLK_F_BLK_SIZE = 6,
        /// FLUSH is supported.
        VIRTIO_BLK_F_FLUSH = 9,
        /// `topology` is valid.
        VIRTIO_BLK_F_TOPOLOGY = 10,
        /// The driver may set `writeback`.
        VIRTIO_BLK_F_CONFIG_WCE = 11,
        /// `num_queues` is valid.
        VIRTIO_BLK_F_MQ = 12,
        /// DISCARD is supported (`max_discard_*` are valid).
        VIRTIO_BLK_F_DISCARD = 13,
        /// WRITE_ZEROES is supported (`max_write_zeroes_*` are valid).
        VIRTIO_BLK_F_WRITE_ZEROES = 14,
        /// GET_LIFETIME is supported.
        VIRTIO_BLK_F_LIFETIME = 15,
        /// SECURE_ERASE is supported (`max_secure_erase_*` are valid).
        VIRTIO_BLK_F_SECURE_ERASE = 16,
    });
}

/// Request types, the `type` field of the request header (§5.2.6).
pub mod request_type {
    named_consts!(REQUEST_TYPES: u32 {
        /// Read sectors into the device-writable data.
        VIRTIO_BLK_T_IN = 0,
        /// Write the device-readable data to sectors.
        VIRTIO_BLK_T_OUT = 1,
        /// Make completed writes durable.
        VIRTIO_BLK_T_FLUSH = 4,
        /// Read the device ID string (up to [`VIRTIO_BLK_ID_BYTES`](super::VIRTIO_BLK_ID_BYTES)).
        VIRTIO_BLK_T_GET_ID = 8,
        /// Discard ranges (one [`DiscardWriteZeroes`](super::DiscardWriteZeroes) per range).
        VIRTIO_BLK_T_DISCARD = 11,
        /// Zero ranges (one [`DiscardWriteZeroes`](super::DiscardWriteZeroes) per range).
        VIRTIO_BLK_T_WRITE_ZEROES = 13,
    });
}

/// Status codes, the last (device-writable) byte of every request (§5.2.6).
pub mod status {
    named_consts!(STATUSES: u8 {
        /// Success.
        VIRTIO_BLK_S_OK = 0,
        /// Device or driver error.
        VIRTIO_BLK_S_IOERR = 1,
        /// Request unsupported by the device.
        VIRTIO_BLK_S_UNSUPP = 2,
    });
}

pub use feature::*;
pub use request_type::*;
pub use status::*;

/// Size of a sector: the unit of every `sector` field and of `capacity`, whatever `blk_size`
/// says (§5.2.6).
pub const SECTOR_SIZE: u64 = 512;

/// Length of the device ID string GET_ID returns (NUL-padded, not NUL-terminated when full).
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// `flags` of [`DiscardWriteZeroes`]: WRITE_ZEROES may unmap (deallocate) the range.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// `struct virtio_blk_outhdr`: the 16 device-readable bytes that start every request (§5.2.6,
/// `struct virtio_blk_req` up to `sector`), little-endian.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestHeader {
    /// `type`: a `VIRTIO_BLK_T_*` request type.
    pub type_: u32,
    /// `reserved` (`ioprio` in legacy devices and Linux).
    pub reserved: u32,
    /// First sector of the request (512-byte units).
    pub sector: u64,
}

impl RequestHeader {
    /// Size on the wire.
    pub const SIZE: usize = 16;

    /// The header as it lies in guest memory.
    pub fn to_le_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.type_.to_le_bytes());
        b[4..8].copy_from_slice(&self.reserved.to_le_bytes());
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b
    }

    /// Decodes a header copied out of guest memory.
    pub fn from_le_bytes(b: [u8; Self::SIZE]) -> RequestHeader {
        let [t0, t1, t2, t3, r0, r1, r2, r3, s @ ..] = b;
        RequestHeader {
            type_: u32::from_le_bytes([t0, t1, t2, t3]),
            reserved: u32::from_le_bytes([r0, r1, r2, r3]),
            sector: u64::from_le_bytes(s),
        }
    }
}

/// `struct virtio_blk_discard_write_zeroes`: one range of a DISCARD or WRITE_ZEROES request
/// (§5.2.6), device-readable after the header, little-endian.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscardWriteZeroes {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// [`VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`]; the other bits are reserved (zero).
    pub flags: u32,
}

impl DiscardWriteZeroes {
    /// Size on the wire.
    pub const SIZE: usize = 16;

    /// The range as it lies in guest memory.
    pub fn to_le_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    /// Decodes a range copied out of guest memory.
    pub fn from_le_bytes(b: [u8; Self::SIZE]) -> DiscardWriteZeroes {
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = b;
        DiscardWriteZeroes {
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            num_sectors: u32::from_le_bytes([n0, n1, n2, n3]),
            flags: u32::from_le_bytes([f0, f1, f2, f3]),
        }
    }
}

/// Size of the config space this crate reads and writes: `struct virtio_blk_config` up to and
/// including `unused1` (what qemu-storage-daemon answers; the secure-erase and zoned fields that
/// follow are not used).
pub const CONFIG_SIZE: usize = 60;

/// Byte offsets of the fields of `struct virtio_blk_config` (§5.2.4), little-endian. [`config::FIELDS`]
/// holds (field, offset); [`config::WIDTHS`] gives each field's size in the same order.
pub mod config {
    named_consts!(FIELDS: usize {
        /// `capacity` (le64): size in 512-byte sectors.
        CAPACITY = 0,
        /// `size_max` (le32).
        SIZE_MAX = 8,
        /// `seg_max` (le32).
        SEG_MAX = 12,
        /// `geometry.cylinders` (le16).
        CYLINDERS = 16,
        /// `geometry.heads` (u8).
        HEADS = 18,
        /// `geometry.sectors` (u8).
        SECTORS = 19,
        /// `blk_size` (le32).
        BLK_SIZE = 20,
        /// `topology.physical_block_exp` (u8).
        PHYSICAL_BLOCK_EXP = 24,
        /// `topology.alignment_offset` (u8).
        ALIGNMENT_OFFSET = 25,
        /// `topology.min_io_size` (le16).
        MIN_IO_SIZE = 26,
        /// `topology.opt_io_size` (le32).
        OPT_IO_SIZE = 28,
        /// `writeback` (u8).
        WRITEBACK = 32,
        /// `num_queues` (le16), after one unused byte.
        NUM_QUEUES = 34,
        /// `max_discard_sectors` (le32).
        MAX_DISCARD_SECTORS = 36,
        /// `max_discard_seg` (le32).
        MAX_DISCARD_SEG = 40,
        /// `discard_sector_alignment` (le32).
        DISCARD_SECTOR_ALIGNMENT = 44,
        /// `max_write_zeroes_sectors` (le32).
        MAX_WRITE_ZEROES_SECTORS = 48,
        /// `max_write_zeroes_seg` (le32).
        MAX_WRITE_ZEROES_SEG = 52,
        /// `write_zeroes_may_unmap` (u8), followed by three unused bytes.
        WRITE_ZEROES_MAY_UNMAP = 56,
    });

    /// Size in bytes of each field of [`FIELDS`], in the same order.
    pub const WIDTHS: [usize; FIELDS.len()] = [8, 4, 4, 2, 1, 1, 4, 1, 1, 2, 4, 1, 2, 4, 4, 4, 4, 4, 1];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trip() {
        let hdr = RequestHeader { type_: VIRTIO_BLK_T_OUT, reserved: 0x0403_0201, sector: 0x0f0e_0d0c_0b0a_0908 };
        let bytes = hdr.to_le_bytes();
        assert_eq!(bytes, [1, 0, 0, 0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(RequestHeader::from_le_bytes(bytes), hdr);
        let raw: [u8; 16] = std::array::from_fn(|i| 0xf0 | i as u8);
        assert_eq!(RequestHeader::from_le_bytes(raw).to_le_bytes(), raw);
    }

    #[test]
    fn discard_write_zeroes_round_trip() {
        let seg = DiscardWriteZeroes { sector: 7, num_sectors: 8, flags: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP };
        let bytes = seg.to_le_bytes();
        assert_eq!(bytes, [7, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(DiscardWriteZeroes::from_le_bytes(bytes), seg);
    }

    #[test]
    fn config_fields_ascend_without_overlap_inside_config_size() {
        let mut end = 0;
        for (&(name, offset), width) in config::FIELDS.iter().zip(config::WIDTHS) {
            assert!(offset >= end, "{name} overlaps the field before it");
            assert_eq!(offset % width, 0, "{name} is not naturally aligned");
            end = offset + width;
        }
        assert!(end <= CONFIG_SIZE);
        assert_eq!(config::WRITE_ZEROES_MAY_UNMAP + 4, CONFIG_SIZE, "CONFIG_SIZE ends with unused1[3]");
    }

    #[test]
    fn named_tables_hold_every_constant() {
        assert_eq!(FEATURES.len(), 13);
        assert!(FEATURES.contains(&("VIRTIO_BLK_F_FLUSH", 9)));
        assert_eq!(REQUEST_TYPES.last(), Some(&("VIRTIO_BLK_T_WRITE_ZEROES", 13)));
        assert_eq!(STATUSES, &[("VIRTIO_BLK_S_OK", 0), ("VIRTIO_BLK_S_IOERR", 1), ("VIRTIO_BLK_S_UNSUPP", 2)]);
    }
}
