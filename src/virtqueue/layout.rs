//! Split-ring layout (protocol.md §7.1–7.4) and raw accessors for shared ring memory.

use std::sync::atomic::{AtomicU16, Ordering};

/// Descriptor continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Buffer is device-writable.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Buffer is an indirect descriptor table.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// avail.flags: the driver does not want interrupts (ignored with EVENT_IDX).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// used.flags: the device does not want kicks (ignored with EVENT_IDX).
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
/// Largest split-ring size.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Bytes per descriptor.
pub const DESC_SIZE: u64 = 16;

/// A descriptor as read (once) from guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// NEXT / WRITE / INDIRECT.
    pub flags: u16,
    /// Next descriptor when NEXT is set.
    pub next: u16,
}

impl Descriptor {
    /// Reads the 16 bytes at `p` once.
    ///
    /// # Safety
    /// `p..p+16` must be inside a live mapping.
    #[inline(always)]
    pub unsafe fn read(p: *const u8) -> Descriptor {
        // One copy of the whole descriptor: the validated values are the used values.
        let raw: [u8; 16] = std::ptr::read_volatile(p.cast::<[u8; 16]>());
        Descriptor::from_bytes(&raw)
    }

    /// Decodes 16 little-endian bytes.
    #[inline(always)]
    pub fn from_bytes(raw: &[u8; 16]) -> Descriptor {
        Descriptor {
            addr: u64::from_le_bytes([raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7]]),
            len: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            flags: u16::from_le_bytes([raw[12], raw[13]]),
            next: u16::from_le_bytes([raw[14], raw[15]]),
        }
    }

    /// Writes the descriptor at `p`.
    ///
    /// # Safety
    /// `p..p+16` must be inside a live mapping.
    #[inline(always)]
    pub unsafe fn write(&self, p: *mut u8) {
        std::ptr::write_volatile(p.cast::<[u8; 16]>(), self.to_bytes());
    }

    /// The 16 little-endian bytes of the descriptor.
    #[inline(always)]
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&self.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&self.len.to_le_bytes());
        raw[12..14].copy_from_slice(&self.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&self.next.to_le_bytes());
        raw
    }
}

/// Bytes of the available ring for `size` entries, including used_event (EVENT_IDX).
pub fn avail_ring_size(size: u16) -> u64 {
    6 + 2 * u64::from(size)
}

/// Bytes of the used ring for `size` entries, including avail_event (EVENT_IDX).
pub fn used_ring_size(size: u16) -> u64 {
    6 + 8 * u64::from(size)
}

/// The virtio need-event test: whether `event` lies in `[old, new)` modulo 2^16.
#[inline(always)]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// An atomic view of a 16-bit ring field.
///
/// # Safety
/// `p` must be 2-byte aligned and inside a live mapping for as long as the reference is used.
#[inline(always)]
pub(crate) unsafe fn atomic_u16<'a>(p: *mut u8) -> &'a AtomicU16 {
    AtomicU16::from_ptr(p.cast())
}

/// Little-endian 16-bit load with the given ordering.
///
/// # Safety
/// As for [`atomic_u16`].
#[inline(always)]
pub(crate) unsafe fn load_u16(p: *mut u8, order: Ordering) -> u16 {
    u16::from_le(atomic_u16(p).load(order))
}

/// Little-endian 16-bit store with the given ordering.
///
/// # Safety
/// As for [`atomic_u16`].
#[inline(always)]
pub(crate) unsafe fn store_u16(p: *mut u8, value: u16, order: Ordering) {
    atomic_u16(p).store(value.to_le(), order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_formula() {
        // The driver asked to hear about entry 5; the device moved used.idx from 3 to 6.
        assert!(need_event(5, 6, 3));
        assert!(!need_event(6, 6, 3));
        assert!(!need_event(2, 6, 3));
        // Across the wrap.
        assert!(need_event(0xffff, 2, 0xfffe));
        assert!(!need_event(3, 2, 0xfffe));
        assert_eq!(avail_ring_size(256), 518);
        assert_eq!(used_ring_size(256), 2054);
    }

    #[test]
    fn descriptor_bytes() {
        let d = Descriptor { addr: 0x1122_3344_5566_7788, len: 0x99aa_bbcc, flags: 3, next: 7 };
        let mut buf = [0u8; 16];
        // SAFETY: buf is 16 bytes.
        unsafe { d.write(buf.as_mut_ptr()) };
        assert_eq!(buf[0], 0x88);
        assert_eq!(Descriptor::from_bytes(&buf), d);
    }
}
