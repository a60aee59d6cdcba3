//! Packed virtqueues (VIRTIO_F_RING_PACKED, virtio 1.2 §2.8; protocol.md §7.10): one ring of
//! 16-byte descriptors `{addr u64, len u32, id u16, flags u16}` that the driver fills with
//! available descriptors and the device overwrites with used ones, plus two 4-byte event
//! suppression structures. Ownership of a slot is told by two flag bits against a wrap counter
//! each side keeps (starting at 1, toggled every time its position passes the ring's end).
//!
//! What lives here: the layout, ring positions (index + wrap counter), the packed
//! SET/GET_VRING_BASE encoding, and the event suppression decision both sides share. The device
//! side is [`PackedDeviceQueue`], the driver side [`PackedDriverQueue`]. Chains come out in the
//! split ring's shapes ([`super::ChainBatch`] / [`super::Chain`] / [`super::Segment`], `(id, len)`
//! reaping) with `Chain::head` holding the buffer id.

mod device;
mod driver;
mod inflight;

#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering;

use super::error::VirtqueueError;
use super::layout::{load_u16, need_event};

pub use device::{PackedDesc, PackedDeviceQueue, PackedQueueConfig};
pub use driver::{PackedDriverQueue, PackedDriverRing};
pub use inflight::{packed_queue_region_size, PackedInflightQueue, PackedRecovery, SavedList};

/// Descriptor flag (bit 7): equals the driver's wrap counter in an available descriptor.
pub const VIRTQ_DESC_F_AVAIL: u16 = 1 << 7;
/// Descriptor flag (bit 15): the inverse of AVAIL in an available descriptor; equal to AVAIL
/// (both the device's wrap counter) in a used one.
pub const VIRTQ_DESC_F_USED: u16 = 1 << 15;
/// Event suppression flags: notify on every new descriptor.
pub const RING_EVENT_FLAGS_ENABLE: u16 = 0;
/// Event suppression flags: do not notify.
pub const RING_EVENT_FLAGS_DISABLE: u16 = 1;
/// Event suppression flags: notify when the descriptor at `off`/`wrap` is made available / used
/// (only with VIRTIO_F_RING_EVENT_IDX).
pub const RING_EVENT_FLAGS_DESC: u16 = 2;
/// Largest packed ring (the 15 bits of a position; any size up to it, not only powers of two).
pub const MAX_PACKED_QUEUE_SIZE: u16 = 32768;
/// Bytes of an event suppression structure: `{desc: off 15 bits | wrap bit 15, flags}`.
pub const EVENT_SUPPRESS_SIZE: u64 = 4;

/// Byte offset of `flags` inside a descriptor.
pub(crate) const FLAGS_OFFSET: usize = 14;

/// A position in a packed ring: the slot and the wrap counter that goes with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RingPos {
    /// Slot, `< size`.
    pub index: u16,
    /// Wrap counter (starts at 1, toggles when the position passes the ring's end).
    pub wrap: bool,
}

impl RingPos {
    /// Where both sides start: slot 0, wrap counter 1.
    pub const START: RingPos = RingPos { index: 0, wrap: true };

    /// The 16-bit encoding of the vring base halves and of event suppression `desc`: bits 0–14
    /// the slot, bit 15 the wrap counter.
    pub fn encode(self) -> u16 {
        self.index | (u16::from(self.wrap) << 15)
    }

    /// Inverse of [`encode`](Self::encode).
    pub fn decode(v: u16) -> RingPos {
        RingPos { index: v & 0x7fff, wrap: v & 0x8000 != 0 }
    }

    /// This position moved on by `n ≤ size` slots.
    #[inline]
    pub fn advance(self, n: u16, size: u16) -> RingPos {
        let i = u32::from(self.index) + u32::from(n);
        if i >= u32::from(size) {
            RingPos { index: (i - u32::from(size)) as u16, wrap: !self.wrap }
        } else {
            RingPos { index: i as u16, wrap: self.wrap }
        }
    }

    /// This position moved back by `n ≤ size` slots.
    #[inline]
    pub fn retreat(self, n: u16, size: u16) -> RingPos {
        if self.index >= n {
            RingPos { index: self.index - n, wrap: self.wrap }
        } else {
            RingPos { index: (u32::from(self.index) + u32::from(size) - u32::from(n)) as u16, wrap: !self.wrap }
        }
    }

    /// Slots from `from` to `self` going forward, assuming at most one lap (`≤ size`).
    #[inline]
    pub fn distance_from(self, from: RingPos, size: u16) -> u16 {
        let to = if self.wrap != from.wrap { u32::from(self.index) + u32::from(size) } else { u32::from(self.index) };
        to.wrapping_sub(u32::from(from.index)) as u16
    }
}

/// The packed ring's SET_VRING_BASE request / GET_VRING_BASE reply (`vhost_vring_state.num`,
/// protocol.md §2): bits 0–14 the next available slot, bit 15 the driver (avail) wrap counter,
/// bits 16–30 the next used slot, bit 31 the device (used) wrap counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedBase {
    /// Where the device reads the next available descriptor.
    pub avail: RingPos,
    /// Where the device writes the next used descriptor.
    pub used: RingPos,
}

impl PackedBase {
    /// A fresh ring: both at slot 0, wrap counters 1.
    pub const START: PackedBase = PackedBase { avail: RingPos::START, used: RingPos::START };

    /// The 32-bit `num`.
    pub fn encode(self) -> u32 {
        u32::from(self.avail.encode()) | (u32::from(self.used.encode()) << 16)
    }

    /// Both halves of `num`, as sent.
    pub fn decode(num: u32) -> PackedBase {
        PackedBase { avail: RingPos::decode(num as u16), used: RingPos::decode((num >> 16) as u16) }
    }

    /// A GET_VRING_BASE reply from a back-end that fills only the avail half (DPDK, protocol.md
    /// §9 #19): after a stop that completed every request, the used position equals the avail
    /// one, which is what this assumes.
    pub fn decode_avail_only(num: u32) -> PackedBase {
        let avail = RingPos::decode(num as u16);
        PackedBase { avail, used: avail }
    }

    /// Both positions inside a ring of `size` slots.
    pub fn check(self, size: u16) -> Result<(), VirtqueueError> {
        for (part, p) in [("avail", self.avail), ("used", self.used)] {
            if p.index >= size {
                return Err(VirtqueueError::PositionOutOfRange { part, index: p.index, size });
            }
        }
        Ok(())
    }
}

/// Whether the descriptor flags say "available" to a reader whose wrap counter is `wrap`.
#[inline(always)]
pub(crate) fn is_avail(flags: u16, wrap: bool) -> bool {
    // AVAIL == wrap and USED != wrap: exactly the bits an available descriptor of that lap
    // carries (one mask and compare).
    flags & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) == avail_bits(wrap)
}

/// Whether the descriptor flags say "used" to a reader whose used wrap counter is `wrap`.
#[inline(always)]
pub(crate) fn is_used(flags: u16, wrap: bool) -> bool {
    // AVAIL == USED == wrap (one mask and compare).
    flags & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) == used_bits(wrap)
}

/// The AVAIL/USED bits of an available descriptor written with driver wrap counter `wrap`.
#[inline(always)]
pub(crate) fn avail_bits(wrap: bool) -> u16 {
    if wrap {
        VIRTQ_DESC_F_AVAIL
    } else {
        VIRTQ_DESC_F_USED
    }
}

/// The AVAIL/USED bits of a used descriptor written with device wrap counter `wrap`.
#[inline(always)]
pub(crate) fn used_bits(wrap: bool) -> u16 {
    if wrap {
        VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
    } else {
        0
    }
}

/// Reads the event suppression structure at `p` written by the other side and decides whether
/// moving our position from `old` to `new` (at most one lap) must be notified (virtio 1.2
/// §2.8.10, §2.8.14). `part` names the structure for errors.
///
/// With DESC, the event names a slot and a wrap counter; it fires iff that slot is among
/// `[old, new)`. The slot is put on the same line as `new`: one lap back when its wrap counter
/// differs from `new`'s. Flags 3, DESC without EVENT_IDX, or an offset beyond the ring are
/// errors of the peer.
///
/// # Safety
/// `p..p+4` must be inside a live mapping, 2-byte aligned.
pub(crate) unsafe fn event_wants(
    p: *mut u8,
    part: &'static str,
    event_idx: bool,
    size: u16,
    old: RingPos,
    new: RingPos,
) -> Result<bool, VirtqueueError> {
    let flags = load_u16(p.add(2), Ordering::Relaxed) & 3;
    match flags {
        RING_EVENT_FLAGS_ENABLE => Ok(true),
        RING_EVENT_FLAGS_DISABLE => Ok(false),
        RING_EVENT_FLAGS_DESC if event_idx => {
            let event = RingPos::decode(load_u16(p, Ordering::Relaxed));
            if event.index >= size {
                return Err(VirtqueueError::EventOffsetOutOfRange { part, offset: event.index, size });
            }
            let moved = new.distance_from(old, size);
            let mut e = event.index;
            if event.wrap != new.wrap {
                e = e.wrapping_sub(size);
            }
            Ok(need_event(e, new.index, new.index.wrapping_sub(moved)))
        }
        _ => Err(VirtqueueError::EventFlagsInvalid { part, flags }),
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn vring_base_packed_encoding() {
        let b = PackedBase { avail: RingPos { index: 5, wrap: true }, used: RingPos { index: 0x7ffe, wrap: false } };
        assert_eq!(b.encode(), 5 | 0x8000 | (0x7ffe << 16));
        assert_eq!(PackedBase::decode(b.encode()), b);
        assert_eq!(PackedBase::START.encode(), 0x8000_8000);
        let b = PackedBase { avail: RingPos { index: 3, wrap: false }, used: RingPos { index: 1, wrap: true } };
        assert_eq!(PackedBase::decode(b.encode()), b);
        // DPDK's reply carries the avail half only.
        let dpdk = PackedBase::decode_avail_only(0x8007);
        assert_eq!(dpdk.used, RingPos { index: 7, wrap: true });
        assert_eq!(dpdk.avail, dpdk.used);
        assert!(b.check(4).is_ok());
        assert!(matches!(b.check(3), Err(VirtqueueError::PositionOutOfRange { part: "avail", index: 3, size: 3 })));
        let used_bad = PackedBase { avail: RingPos::START, used: RingPos { index: 9, wrap: true } };
        assert!(matches!(used_bad.check(8), Err(VirtqueueError::PositionOutOfRange { part: "used", .. })));
    }

    #[test]
    fn positions_wrap_and_measure() {
        let size = 5; // any size, not only powers of two
        let p = RingPos { index: 3, wrap: true };
        assert_eq!(p.advance(1, size), RingPos { index: 4, wrap: true });
        assert_eq!(p.advance(2, size), RingPos { index: 0, wrap: false });
        assert_eq!(p.advance(5, size), RingPos { index: 3, wrap: false });
        assert_eq!(p.advance(2, size).distance_from(p, size), 2);
        assert_eq!(p.advance(5, size).distance_from(p, size), 5);
        assert_eq!(p.distance_from(p, size), 0);
        for n in 0..=size {
            assert_eq!(p.advance(n, size).retreat(n, size), p);
        }
        assert_eq!(RingPos { index: 0, wrap: false }.retreat(1, size), RingPos { index: 4, wrap: true });
        let big = RingPos { index: 32767, wrap: false };
        assert_eq!(big.advance(1, 32768), RingPos { index: 0, wrap: true });
        assert_eq!(big.advance(32768, 32768).distance_from(big, 32768), 32768);
    }

    #[test]
    fn flag_bits() {
        assert!(is_avail(avail_bits(true), true) && !is_avail(avail_bits(true), false));
        assert!(is_avail(avail_bits(false), false) && !is_avail(avail_bits(false), true));
        assert!(is_used(used_bits(true), true) && !is_used(used_bits(false), true));
        assert!(!is_avail(used_bits(true), true) && !is_used(avail_bits(true), true));
        // A zeroed ring is neither available nor used to sides starting at wrap 1.
        assert!(!is_avail(0, true) && !is_used(0, true));
    }

    #[test]
    fn event_suppression_decision() {
        let size = 8u16;
        let old = RingPos { index: 6, wrap: true };
        let new = RingPos { index: 2, wrap: false }; // slots 6, 7, 0, 1 just moved past
        let check = |off_wrap: u16, flags: u16| {
            // Little-endian fields in a 2-byte aligned buffer, as in guest memory.
            let mut ev = [off_wrap.to_le(), flags.to_le()];
            // SAFETY: a local, 2-byte aligned 4-byte buffer.
            unsafe { event_wants(ev.as_mut_ptr().cast(), "driver", true, size, old, new) }
        };
        assert!(check(0, RING_EVENT_FLAGS_ENABLE).unwrap());
        assert!(!check(0, RING_EVENT_FLAGS_DISABLE).unwrap());
        // Slot 7 of the old lap, slot 1 of the new lap: among those used.
        assert!(check(7 | 0x8000, RING_EVENT_FLAGS_DESC).unwrap());
        assert!(check(1, RING_EVENT_FLAGS_DESC).unwrap());
        // Slot 2 of the new lap (next to be used) and slot 5 of the old lap: not.
        assert!(!check(2, RING_EVENT_FLAGS_DESC).unwrap());
        assert!(!check(5 | 0x8000, RING_EVENT_FLAGS_DESC).unwrap());
        assert!(matches!(
            check(8, RING_EVENT_FLAGS_DESC),
            Err(VirtqueueError::EventOffsetOutOfRange { offset: 8, .. })
        ));
        assert!(matches!(check(0, 3), Err(VirtqueueError::EventFlagsInvalid { flags: 3, .. })));
        // DESC without EVENT_IDX negotiated.
        let mut ev = [1u16.to_le(), RING_EVENT_FLAGS_DESC.to_le()];
        // SAFETY: as above.
        let r = unsafe { event_wants(ev.as_mut_ptr().cast(), "driver", false, size, old, new) };
        assert!(matches!(r, Err(VirtqueueError::EventFlagsInvalid { flags: 2, .. })));
    }
}
