//! Errors of the virtqueue layer; the numbers refer to the malformed-input list of
//! protocol.md §7.9.

use crate::memory::MemoryError;

/// A ring or chain that breaks the virtio rules. Device-side data-path errors mark the queue
/// broken: the process keeps running, the ring is no longer processed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VirtqueueError {
    /// §7.9 #20: size 0, above 32768, or not a power of two.
    #[error("invalid queue size {0}: must be a power of two in 1..=32768")]
    InvalidSize(u32),
    /// §7.9 #21: ring part misaligned.
    #[error("{part} at {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// desc, avail or used.
        part: &'static str,
        /// Its address.
        addr: u64,
        /// Required alignment.
        align: u64,
    },
    /// §7.9 #21: ring part not inside one mapping.
    #[error("{part} ring is not inside mapped memory: {source}")]
    RingUnmapped {
        /// desc, avail or used.
        part: &'static str,
        /// The translation failure.
        #[source]
        source: MemoryError,
    },
    /// §7.9 #1: the driver moved avail.idx by more than the ring size.
    #[error("avail index moved from {last} to {avail}, more than the ring size {size}")]
    AvailIndexJump {
        /// Device's next index.
        last: u16,
        /// Driver's index.
        avail: u16,
        /// Ring size.
        size: u16,
    },
    /// §7.9 #2: head ≥ ring size.
    #[error("head {head} out of range (ring size {size})")]
    HeadOutOfRange {
        /// The head index.
        head: u16,
        /// Ring size.
        size: u16,
    },
    /// §7.9 #3: `next` beyond the table.
    #[error("chain {head}: next {next} out of range ({limit} descriptors)")]
    NextOutOfRange {
        /// Chain head.
        head: u16,
        /// The bad next.
        next: u16,
        /// Table size.
        limit: u32,
    },
    /// §7.9 #4: more descriptors than the table holds (a loop).
    #[error("chain {head} is longer than {limit} descriptors (loop?)")]
    ChainTooLong {
        /// Chain head.
        head: u16,
        /// The limit.
        limit: u32,
    },
    /// §7.9 #5: total length above u32.
    #[error("chain {head}: total length overflows 32 bits")]
    LengthOverflow {
        /// Chain head.
        head: u16,
    },
    /// §7.9 #6: INDIRECT inside an indirect table.
    #[error("chain {head}: indirect descriptor inside an indirect table")]
    NestedIndirect {
        /// Chain head.
        head: u16,
    },
    /// §7.9 #7: INDIRECT together with NEXT.
    #[error("chain {head}: indirect descriptor with NEXT set")]
    IndirectWithNext {
        /// Chain head.
        head: u16,
    },
    /// §7.9 #8: INDIRECT without VIRTIO_RING_F_INDIRECT_DESC.
    #[error("chain {head}: indirect descriptor but INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated {
        /// Chain head.
        head: u16,
    },
    /// §7.9 #9: indirect table length zero, not a multiple of 16 or above the cap.
    #[error("chain {head}: indirect table of {len} bytes (must be a non-zero multiple of 16, at most {max})")]
    IndirectTableSize {
        /// Chain head.
        head: u16,
        /// Table length in bytes.
        len: u32,
        /// Cap in bytes.
        max: u32,
    },
    /// §7.9 #10: zero-length buffer.
    #[error("chain {head}: zero-length descriptor")]
    ZeroLength {
        /// Chain head.
        head: u16,
    },
    /// §7.9 #11: device-readable after device-writable.
    #[error("chain {head}: readable descriptor after a writable one")]
    ReadableAfterWritable {
        /// Chain head.
        head: u16,
    },
    /// §7.9 #12: buffer not fully inside mapped memory.
    #[error("chain {head}: buffer {addr:#x}+{len:#x} is not in mapped memory")]
    BufferUnmapped {
        /// Chain head.
        head: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// §7.9 #14: more chains in flight than the ring size.
    #[error("more than {size} chains in flight")]
    TooManyInFlight {
        /// Ring size.
        size: u16,
    },
    /// §7.9 #14 / CVE-2016-5403: the driver made a head available again while it is in flight,
    /// or the device tried to complete a head that is not in flight.
    #[error("head {head} is {state}")]
    HeadInFlight {
        /// The head.
        head: u16,
        /// "already in flight" or "not in flight".
        state: &'static str,
    },
    /// §7.9 #15: more segments than the device handles.
    #[error("chain {head} has more than {limit} segments")]
    TooManySegments {
        /// Chain head.
        head: u16,
        /// The limit.
        limit: usize,
    },
    /// The queue hit a fatal error earlier and is not processed any more.
    #[error("queue is broken by an earlier error")]
    Broken,
    /// Driver side: the device returned an id that is not in flight.
    #[error("device returned id {id}, which is not in flight")]
    UsedIdNotInFlight {
        /// The id.
        id: u32,
    },
    /// Driver side: the device claims to have written more than the writable buffers hold.
    #[error("device wrote {len} bytes into chain {id}, whose writable buffers hold {max}")]
    UsedLenTooLarge {
        /// Chain id.
        id: u32,
        /// Claimed length.
        len: u32,
        /// Writable capacity.
        max: u64,
    },
    /// Driver side: the device moved used.idx by more than the chains in flight.
    #[error("used index moved from {last} to {used}, more than the {in_flight} chains in flight")]
    UsedIndexJump {
        /// Driver's last seen index.
        last: u16,
        /// Device's index.
        used: u16,
        /// Chains in flight.
        in_flight: u16,
    },
    /// Driver side: not enough free descriptors for the chain.
    #[error("no room in the ring: chain needs {needed} descriptors, {free} free")]
    RingFull {
        /// Descriptors needed.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// Driver side: a chain with no buffer at all, or more than the ring can express.
    #[error("invalid chain: {0}")]
    InvalidChain(&'static str),
    /// ACCESS_PLATFORM: no IOTLB entry for `iova` yet (not an error of the ring: ask the
    /// front-end with an IOTLB MISS and try again).
    #[error("IOTLB miss at I/O virtual address {iova:#x} (permission {perm})")]
    IotlbMiss {
        /// The address without an entry.
        iova: u64,
        /// The access needed: 1 read, 2 write.
        perm: u8,
    },
    /// An inflight buffer (INFLIGHT_SHMFD) that cannot be right: refused rather than trusted.
    #[error("inflight buffer refused: {0}")]
    InflightCorrupt(&'static str),
    /// Packed ring (virtio 1.2 §2.8.6: "all flags ... must be set/cleared correctly in all
    /// descriptors in the list"): a descriptor of a list is not available in the wrap the device
    /// expects there — the driver's wrap counter and the device's disagree, or the driver changed
    /// the AVAIL/USED bits of a descriptor it had made available.
    #[error("packed list at slot {head}: descriptor at slot {slot} is not available (flags {flags:#06x}, wrap counter {wrap})")]
    NotAvailable {
        /// Ring slot of the list's first descriptor.
        head: u16,
        /// Ring slot of the offending descriptor.
        slot: u16,
        /// Its flags.
        flags: u16,
        /// The wrap counter the device expected it to carry.
        wrap: bool,
    },
    /// Packed ring (virtio 1.2 §2.8.7): an INDIRECT descriptor inside a NEXT-linked list
    /// ("A driver MUST NOT write direct descriptors with DESC_F_INDIRECT set in a scatter-gather
    /// list linked by VIRTQ_DESC_F_NEXT").
    #[error("packed list at slot {head}: indirect descriptor inside a NEXT-linked list")]
    IndirectInList {
        /// Ring slot of the list's first descriptor.
        head: u16,
    },
    /// Packed ring: an event suppression structure names a descriptor offset beyond the ring.
    #[error("{part} event suppression names descriptor offset {offset}, beyond the ring size {size}")]
    EventOffsetOutOfRange {
        /// "driver" or "device".
        part: &'static str,
        /// The offset.
        offset: u16,
        /// Ring size.
        size: u16,
    },
    /// Packed ring: event suppression flags 3 (reserved) or DESC without VIRTIO_F_RING_EVENT_IDX.
    #[error("{part} event suppression flags {flags} invalid (3 is reserved; 2 needs EVENT_IDX)")]
    EventFlagsInvalid {
        /// "driver" or "device".
        part: &'static str,
        /// The flags field's low two bits.
        flags: u16,
    },
    /// Packed ring: a ring position (SET_VRING_BASE, or a used-descriptor walk) at or beyond the
    /// ring size.
    #[error("{part} position {index} is beyond the ring size {size}")]
    PositionOutOfRange {
        /// "avail" or "used".
        part: &'static str,
        /// The position.
        index: u16,
        /// Ring size.
        size: u16,
    },
    /// A guest-memory access on behalf of the queue failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

impl VirtqueueError {
    /// The chain head the error is about, if any.
    pub fn head(&self) -> Option<u16> {
        use VirtqueueError::*;
        match self {
            HeadOutOfRange { head, .. }
            | NextOutOfRange { head, .. }
            | ChainTooLong { head, .. }
            | LengthOverflow { head }
            | NestedIndirect { head }
            | IndirectWithNext { head }
            | IndirectNotNegotiated { head }
            | IndirectTableSize { head, .. }
            | ZeroLength { head }
            | ReadableAfterWritable { head }
            | BufferUnmapped { head, .. }
            | TooManySegments { head, .. }
            | HeadInFlight { head, .. }
            | NotAvailable { head, .. }
            | IndirectInList { head } => Some(*head),
            UsedIdNotInFlight { id } | UsedLenTooLarge { id, .. } => u16::try_from(*id).ok(),
            _ => None,
        }
    }
}
