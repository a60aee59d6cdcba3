//! Payload structures (protocol.md §2) and their exact little-endian-on-x86 (native) layouts.
//!
//! Decoding here only checks what a layout alone can tell (sizes, reserved bits, overflowing
//! (offset, size) pairs); request-level rules live in `message.rs`.

use super::error::ProtocolError;
use super::request::Request;

/// Maximum number of regions in one SET_MEM_TABLE (`VHOST_MEMORY_BASELINE_NREGIONS`).
pub const MAX_MEM_TABLE_REGIONS: usize = 8;
/// Bit 8 of the ring-fd u64 and of the host-notifier u64: no fd attached.
pub const VRING_NOFD: u64 = 1 << 8;
/// Mask of the ring index in the ring-fd u64.
pub const VRING_INDEX_MASK: u64 = 0xff;
/// Number of entries in the GET_SHMEM_CONFIG reply.
pub const MAX_SHMEM_REGIONS: usize = 256;

/// Bounds-checked little reader: a missing size check shows up as an error, never a panic.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    request: Request,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(request: Request, bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, pos: 0, request }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let end = self.pos.checked_add(N).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(ProtocolError::PayloadSize {
                request: self.request,
                got: self.bytes.len(),
                expected: format!("at least {}", self.pos.saturating_add(N)),
            });
        };
        let mut out = [0u8; N];
        out.copy_from_slice(&self.bytes[self.pos..end]);
        self.pos = end;
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_ne_bytes(self.take()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_ne_bytes(self.take()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_ne_bytes(self.take()?))
    }
    pub(crate) fn skip(&mut self, n: usize) -> Result<(), ProtocolError> {
        for _ in 0..n {
            self.u8()?;
        }
        Ok(())
    }
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let rest = self.bytes.get(self.pos..).unwrap_or(&[]);
        self.pos = self.bytes.len();
        rest
    }
}

fn check_end(request: Request, field: &'static str, start: u64, size: u64) -> Result<(), ProtocolError> {
    start.checked_add(size).map(|_| ()).ok_or(ProtocolError::Overflow { request, field })
}

fn invalid(request: Request, field: &'static str, value: u64, reason: &'static str) -> ProtocolError {
    ProtocolError::InvalidField { request, field, value, reason }
}

/// `struct vhost_vring_state` (8 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VringState {
    /// Ring index (full 32 bits; never truncate before checking, CVE-2020-10723).
    pub index: u32,
    /// Meaning depends on the request: size, base, enable flag, endianness.
    pub num: u32,
}

impl VringState {
    /// Wire size.
    pub const SIZE: usize = 8;
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, ProtocolError> {
        Ok(VringState { index: r.u32()?, num: r.u32()? })
    }
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.index.to_ne_bytes());
        out.extend_from_slice(&self.num.to_ne_bytes());
    }
}

/// `struct vhost_vring_addr` (40 bytes). Note the order: desc, used, avail, log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VringAddr {
    /// Ring index.
    pub index: u32,
    /// Bit 0: `VHOST_VRING_F_LOG`; other bits must be zero.
    pub flags: u32,
    /// Descriptor table (front-end address, IOVA or GPA depending on negotiation).
    pub desc_user_addr: u64,
    /// Used ring.
    pub used_user_addr: u64,
    /// Available ring.
    pub avail_user_addr: u64,
    /// Guest physical address of the used ring, for dirty logging.
    pub log_guest_addr: u64,
}

impl VringAddr {
    /// Wire size.
    pub const SIZE: usize = 40;
    pub(crate) fn decode(request: Request, r: &mut Reader<'_>) -> Result<Self, ProtocolError> {
        let a = VringAddr {
            index: r.u32()?,
            flags: r.u32()?,
            desc_user_addr: r.u64()?,
            used_user_addr: r.u64()?,
            avail_user_addr: r.u64()?,
            log_guest_addr: r.u64()?,
        };
        if a.flags & !super::features::VRING_F_LOG != 0 {
            return Err(invalid(request, "flags", a.flags.into(), "only VHOST_VRING_F_LOG (bit 0) is defined"));
        }
        // Alignments that hold for split and packed rings alike.
        if a.desc_user_addr % 16 != 0 {
            return Err(invalid(request, "desc_user_addr", a.desc_user_addr, "must be 16-byte aligned"));
        }
        if a.used_user_addr % 4 != 0 {
            return Err(invalid(request, "used_user_addr", a.used_user_addr, "must be 4-byte aligned"));
        }
        if a.avail_user_addr % 2 != 0 {
            return Err(invalid(request, "avail_user_addr", a.avail_user_addr, "must be 2-byte aligned"));
        }
        Ok(a)
    }
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.index.to_ne_bytes());
        out.extend_from_slice(&self.flags.to_ne_bytes());
        for v in [self.desc_user_addr, self.used_user_addr, self.avail_user_addr, self.log_guest_addr] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
    }
}

/// The u64 of SET_VRING_KICK / CALL / ERR: ring index (bits 0–7) and NOFD (bit 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VringFd {
    /// Ring index (8 bits on the wire, so rings 0..=255 are addressable).
    pub index: u8,
    /// No fd attached: poll the ring (kick) or no interrupts (call).
    pub nofd: bool,
}

impl VringFd {
    /// Wire size.
    pub const SIZE: usize = 8;
    pub(crate) fn decode(request: Request, r: &mut Reader<'_>) -> Result<Self, ProtocolError> {
        let v = r.u64()?;
        if v & !(VRING_INDEX_MASK | VRING_NOFD) != 0 {
            return Err(invalid(request, "u64", v, "only bits 0-7 (index) and 8 (NOFD) are defined"));
        }
        Ok(VringFd { index: (v & VRING_INDEX_MASK) as u8, nofd: v & VRING_NOFD != 0 })
    }
    /// The u64 as sent.
    pub fn to_u64(&self) -> u64 {
        u64::from(self.index) | if self.nofd { VRING_NOFD } else { 0 }
    }
}

/// Extra fields of a memory region when XEN_MMAP is negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct XenMmap {
    /// Bit 0 foreign mapping, bit 1 grant mapping, bit 8 map on demand only.
    pub flags: u32,
    /// Xen domain id.
    pub domid: u32,
}

/// One memory region (32 bytes, 40 with XEN_MMAP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MemoryRegion {
    /// Guest physical address of the region start.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Front-end virtual address of the region start (the GPA with GPA_ADDRESSES).
    pub user_addr: u64,
    /// Offset in the fd where the region's bytes begin.
    pub mmap_offset: u64,
    /// Present only on XEN_MMAP layouts.
    pub xen: Option<XenMmap>,
}

impl MemoryRegion {
    /// Wire size without Xen fields.
    pub const SIZE: usize = 32;
    /// Wire size with Xen fields.
    pub const XEN_SIZE: usize = 40;

    fn wire_size(&self) -> usize {
        if self.xen.is_some() {
            Self::XEN_SIZE
        } else {
            Self::SIZE
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>, xen: bool) -> Result<Self, ProtocolError> {
        let mut region = MemoryRegion {
            guest_addr: r.u64()?,
            size: r.u64()?,
            user_addr: r.u64()?,
            mmap_offset: r.u64()?,
            xen: None,
        };
        if xen {
            region.xen = Some(XenMmap { flags: r.u32()?, domid: r.u32()? });
        }
        Ok(region)
    }

    /// Region rules: non-empty, and no end that overflows 64 bits. `check_offset` is false for
    /// REM_MEM_REG, whose mmap_offset the spec says to ignore.
    pub fn validate(&self, request: Request, check_offset: bool) -> Result<(), ProtocolError> {
        if self.size == 0 {
            return Err(invalid(request, "memory_size", 0, "a region must not be empty"));
        }
        check_end(request, "guest_phys_addr", self.guest_addr, self.size)?;
        check_end(request, "userspace_addr", self.user_addr, self.size)?;
        if check_offset {
            check_end(request, "mmap_offset", self.mmap_offset, self.size)?;
        }
        Ok(())
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.guest_addr, self.size, self.user_addr, self.mmap_offset] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        if let Some(x) = self.xen {
            out.extend_from_slice(&x.flags.to_ne_bytes());
            out.extend_from_slice(&x.domid.to_ne_bytes());
        }
    }
}

/// `struct vhost_iotlb_msg` (32 bytes with tail padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IotlbMsg {
    /// I/O virtual address.
    pub iova: u64,
    /// Size of the range.
    pub size: u64,
    /// Front-end virtual address the range maps to.
    pub uaddr: u64,
    /// 0 none, 1 read-only, 2 write-only, 3 read-write.
    pub perm: u8,
    /// The spec's `type`: 1 MISS, 2 UPDATE, 3 INVALIDATE, 4 ACCESS_FAIL.
    pub kind: u8,
}

impl IotlbMsg {
    /// Wire size.
    pub const SIZE: usize = 32;
    /// IOTLB miss (back-end → front-end).
    pub const MISS: u8 = 1;
    /// IOTLB update (front-end → back-end).
    pub const UPDATE: u8 = 2;
    /// IOTLB invalidation (front-end → back-end).
    pub const INVALIDATE: u8 = 3;
    /// Access failure (back-end → front-end).
    pub const ACCESS_FAIL: u8 = 4;

    pub(crate) fn decode(request: Request, r: &mut Reader<'_>) -> Result<Self, ProtocolError> {
        let m = IotlbMsg { iova: r.u64()?, size: r.u64()?, uaddr: r.u64()?, perm: r.u8()?, kind: r.u8()? };
        r.skip(6)?;
        if m.perm > 3 {
            return Err(invalid(request, "perm", m.perm.into(), "must be 0..=3"));
        }
        if !(Self::MISS..=Self::ACCESS_FAIL).contains(&m.kind) {
            return Err(invalid(request, "type", m.kind.into(), "must be MISS, UPDATE, INVALIDATE or ACCESS_FAIL"));
        }
        check_end(request, "iova", m.iova, m.size)?;
        if m.kind == Self::UPDATE {
            check_end(request, "uaddr", m.uaddr, m.size)?;
        }
        Ok(m)
    }
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.iova, self.size, self.uaddr] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        out.extend_from_slice(&[self.perm, self.kind, 0, 0, 0, 0, 0, 0]);
    }
}

/// GET_CONFIG / SET_CONFIG payload: a window into the device config space.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DeviceConfig {
    /// Byte offset into the device-specific config space.
    pub offset: u32,
    /// SET_CONFIG: 0 = driver write, 1 = migration restore.
    pub flags: u32,
    /// The config bytes (the size field on the wire is their length).
    pub data: Vec<u8>,
}

impl DeviceConfig {
    /// Size of the offset/size/flags header inside the payload.
    pub const HEADER_SIZE: usize = 12;
    /// Largest offset + size accepted (rust-vmm's bound; QEMU itself sends at most 256 bytes).
    pub const MAX_SPACE: u64 = 4096;
    /// SET_CONFIG flag value: write by the driver.
    pub const WRITABLE: u32 = 0;
    /// SET_CONFIG flag value: restore during live migration.
    pub const MIGRATION: u32 = 1;

    pub(crate) fn decode(request: Request, r: &mut Reader<'_>, total: usize) -> Result<Self, ProtocolError> {
        let offset = r.u32()?;
        let size = r.u32()?;
        let flags = r.u32()?;
        let data = r.rest();
        if Self::HEADER_SIZE.checked_add(size as usize) != Some(total) {
            return Err(ProtocolError::PayloadSize {
                request,
                got: total,
                expected: format!("12 + size field ({size})"),
            });
        }
        if u64::from(offset) + u64::from(size) > Self::MAX_SPACE {
            return Err(invalid(request, "offset", offset.into(), "offset + size exceeds the 4096-byte config space"));
        }
        Ok(DeviceConfig { offset, flags, data: data.to_vec() })
    }
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_ne_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_ne_bytes());
        out.extend_from_slice(&self.flags.to_ne_bytes());
        out.extend_from_slice(&self.data);
    }
}

/// VRING_HOST_NOTIFIER_MSG payload (24 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VringArea {
    /// Ring index (bits 0–7 of the first u64).
    pub index: u8,
    /// Bit 8: unregister the notifier.
    pub nofd: bool,
    /// mmap length (QEMU requires the host page size).
    pub size: u64,
    /// mmap offset into the fd.
    pub offset: u64,
}

impl VringArea {
    /// Wire size.
    pub const SIZE: usize = 24;
    pub(crate) fn decode(request: Request, r: &mut Reader<'_>) -> Result<Self, ProtocolError> {
        let v = r.u64()?;
        if v & !(VRING_INDEX_MASK | VRING_NOFD) != 0 {
            return Err(invalid(request, "u64", v, "only bits 0-7 (index) and 8 (NOFD) are defined"));
        }
        let area = VringArea {
            index: (v & VRING_INDEX_MASK) as u8,
            nofd: v & VRING_NOFD != 0,
            size: r.u64()?,
            offset: r.u64()?,
        };
        check_end(request, "offset", area.offset, area.size)?;
        Ok(area)
    }
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let v = u64::from(self.index) | if self.nofd { VRING_NOFD } else { 0 };
        for v in [v, self.size, self.offset] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
    }
}

/// GET_INFLIGHT_FD / SET_INFLIGHT_FD payload (24 bytes with tail padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InflightDesc {
    /// Size of the shared inflight buffer.
    pub mmap_size: u64,
    /// Offset of the buffer in the fd.
    pub mmap_offset: u64,
    /// Number of queues tracked.
    pub num_queues: u16,
    /// Size of each queue.
    pub queue_size: u16,
}

impl InflightDesc {
    /// Wire size.
    pub const SIZE: usize = 24;
    pub(crate) fn decode(request: Request, r: &mut Reader<'_>) -> Result<Self, ProtocolError> {
        let d = InflightDesc { mmap_size: r.u64()?, mmap_offset: r.u64()?, num_queues: r.u16()?, queue_size: r.u16()? };
        r.skip(4)?;
        check_end(request, "mmap_offset", d.mmap_offset, d.mmap_size)?;
        Ok(d)
    }
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.mmap_size.to_ne_bytes());
        out.extend_from_slice(&self.mmap_offset.to_ne_bytes());
        out.extend_from_slice(&self.num_queues.to_ne_bytes());
        out.extend_from_slice(&self.queue_size.to_ne_bytes());
        out.extend_from_slice(&[0; 4]);
    }
}

/// SET_DEVICE_STATE_FD parameters (8 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DeviceStateParams {
    /// 0 SAVE (back-end writes its state), 1 LOAD (back-end reads it).
    pub direction: u32,
    /// 0 STOPPED: the only phase defined.
    pub phase: u32,
}

impl DeviceStateParams {
    /// Wire size.
    pub const SIZE: usize = 8;
    /// Direction: the back-end saves its state into the fd.
    pub const SAVE: u32 = 0;
    /// Direction: the back-end loads its state from the fd.
    pub const LOAD: u32 = 1;
    pub(crate) fn decode(request: Request, r: &mut Reader<'_>) -> Result<Self, ProtocolError> {
        let p = DeviceStateParams { direction: r.u32()?, phase: r.u32()? };
        if p.direction > Self::LOAD {
            return Err(invalid(request, "direction", p.direction.into(), "must be SAVE (0) or LOAD (1)"));
        }
        if p.phase != 0 {
            return Err(invalid(request, "phase", p.phase.into(), "only STOPPED (0) is defined"));
        }
        Ok(p)
    }
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.direction.to_ne_bytes());
        out.extend_from_slice(&self.phase.to_ne_bytes());
    }
}

/// SHMEM_MAP / SHMEM_UNMAP payload (40 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MmapRequest {
    /// VIRTIO shared memory region id.
    pub shmid: u8,
    /// Offset into the passed fd (MAP only).
    pub fd_offset: u64,
    /// Offset inside the shared memory region.
    pub shm_offset: u64,
    /// Length in bytes; non-zero.
    pub len: u64,
    /// Bit 0: map read-write (else read-only).
    pub flags: u64,
}

impl MmapRequest {
    /// Wire size.
    pub const SIZE: usize = 40;
    /// Flag bit 0: writable mapping.
    pub const FLAG_RW: u64 = 1;
    pub(crate) fn decode(request: Request, r: &mut Reader<'_>) -> Result<Self, ProtocolError> {
        let shmid = r.u8()?;
        r.skip(7)?;
        let m = MmapRequest { shmid, fd_offset: r.u64()?, shm_offset: r.u64()?, len: r.u64()?, flags: r.u64()? };
        if m.len == 0 {
            return Err(invalid(request, "len", 0, "must not be zero"));
        }
        if m.flags & !Self::FLAG_RW != 0 {
            return Err(invalid(request, "flags", m.flags, "only bit 0 (read-write) is defined"));
        }
        check_end(request, "shm_offset", m.shm_offset, m.len)?;
        check_end(request, "fd_offset", m.fd_offset, m.len)?;
        Ok(m)
    }
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.shmid, 0, 0, 0, 0, 0, 0, 0]);
        for v in [self.fd_offset, self.shm_offset, self.len, self.flags] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
    }
}

/// GET_SHMEM_CONFIG reply (2056 bytes): sizes of VIRTIO shared memory regions by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShmemConfig {
    /// `memory_sizes[shmid]`; 0 = unused id. Always 256 entries.
    pub memory_sizes: Vec<u64>,
}

impl Default for ShmemConfig {
    fn default() -> Self {
        ShmemConfig { memory_sizes: vec![0; MAX_SHMEM_REGIONS] }
    }
}

impl ShmemConfig {
    /// Wire size.
    pub const SIZE: usize = 8 + 8 * MAX_SHMEM_REGIONS;
    pub(crate) fn decode(request: Request, r: &mut Reader<'_>) -> Result<Self, ProtocolError> {
        let nregions = r.u32()?;
        r.skip(4)?;
        let mut memory_sizes = Vec::with_capacity(MAX_SHMEM_REGIONS);
        for _ in 0..MAX_SHMEM_REGIONS {
            memory_sizes.push(r.u64()?);
        }
        let used = memory_sizes.iter().filter(|&&s| s != 0).count();
        if nregions as usize != used {
            return Err(invalid(request, "nregions", nregions.into(), "must equal the number of non-zero sizes"));
        }
        Ok(ShmemConfig { memory_sizes })
    }
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let used = self.memory_sizes.iter().filter(|&&s| s != 0).count() as u32;
        out.extend_from_slice(&used.to_ne_bytes());
        out.extend_from_slice(&[0; 4]);
        for i in 0..MAX_SHMEM_REGIONS {
            out.extend_from_slice(&self.memory_sizes.get(i).copied().unwrap_or(0).to_ne_bytes());
        }
    }
}

/// CREATE_CRYPTO_SESSION payload. The spec leaves the layout to QEMU's
/// `VhostUserCryptoSession`: op_code, a session-parameter union, session_id. The union is kept
/// as opaque bytes (QEMU 7.2+: 1056 bytes, total 1072).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CryptoSession {
    /// virtio-crypto opcode.
    pub op_code: u64,
    /// The session-parameter union, opaque.
    pub params: Vec<u8>,
    /// ≥ 0 success (the session id), < 0 failure.
    pub session_id: i64,
}

impl CryptoSession {
    /// Smallest legal payload: op_code + session_id.
    pub const MIN_SIZE: usize = 16;
    pub(crate) fn decode(request: Request, r: &mut Reader<'_>, total: usize) -> Result<Self, ProtocolError> {
        if total < Self::MIN_SIZE || total % 8 != 0 {
            return Err(ProtocolError::PayloadSize {
                request,
                got: total,
                expected: "a multiple of 8, at least 16".into(),
            });
        }
        let op_code = r.u64()?;
        let body = r.rest();
        let (params, id) = body.split_at(body.len() - 8);
        let session_id = i64::from_ne_bytes(id.try_into().unwrap_or([0; 8]));
        Ok(CryptoSession { op_code, params: params.to_vec(), session_id })
    }
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.op_code.to_ne_bytes());
        out.extend_from_slice(&self.params);
        out.extend_from_slice(&self.session_id.to_ne_bytes());
    }
}

/// Any payload of either channel, request or reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// No payload.
    Empty,
    /// A u64: features, counts, status, acks.
    U64(u64),
    /// `vhost_vring_state`.
    VringState(VringState),
    /// `vhost_vring_addr`.
    VringAddr(VringAddr),
    /// Ring fd message u64 (index + NOFD).
    VringFd(VringFd),
    /// SET_MEM_TABLE regions (1..=8).
    MemoryTable(Vec<MemoryRegion>),
    /// ADD_MEM_REG / REM_MEM_REG region.
    SingleRegion(MemoryRegion),
    /// SET_LOG_BASE description: mmap_size, mmap_offset.
    LogBase {
        /// Bytes of bitmap.
        mmap_size: u64,
        /// Where the bitmap starts in the fd.
        mmap_offset: u64,
    },
    /// IOTLB message.
    Iotlb(IotlbMsg),
    /// Config space window.
    Config(DeviceConfig),
    /// Host notifier area.
    VringArea(VringArea),
    /// Inflight buffer description.
    Inflight(InflightDesc),
    /// Shared-object UUID (16 opaque bytes).
    Shared([u8; 16]),
    /// Device-state transfer parameters.
    DeviceStateParams(DeviceStateParams),
    /// SHMEM_MAP / SHMEM_UNMAP.
    Mmap(MmapRequest),
    /// GET_SHMEM_CONFIG reply.
    ShmemConfig(ShmemConfig),
    /// virtio-crypto session.
    CryptoSession(CryptoSession),
    /// Bytes of an unknown request, kept so the receiver can answer per the spec.
    Raw(Vec<u8>),
}

impl Payload {
    /// Appends the wire bytes of this payload.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Payload::Empty => {}
            Payload::U64(v) => out.extend_from_slice(&v.to_ne_bytes()),
            Payload::VringState(s) => s.encode(out),
            Payload::VringAddr(a) => a.encode(out),
            Payload::VringFd(f) => out.extend_from_slice(&f.to_u64().to_ne_bytes()),
            Payload::MemoryTable(regions) => {
                out.extend_from_slice(&(regions.len() as u32).to_ne_bytes());
                out.extend_from_slice(&[0; 4]);
                for r in regions {
                    r.encode(out);
                }
            }
            Payload::SingleRegion(r) => {
                out.extend_from_slice(&[0; 8]);
                r.encode(out);
            }
            Payload::LogBase { mmap_size, mmap_offset } => {
                out.extend_from_slice(&mmap_size.to_ne_bytes());
                out.extend_from_slice(&mmap_offset.to_ne_bytes());
            }
            Payload::Iotlb(m) => m.encode(out),
            Payload::Config(c) => c.encode(out),
            Payload::VringArea(a) => a.encode(out),
            Payload::Inflight(d) => d.encode(out),
            Payload::Shared(uuid) => out.extend_from_slice(uuid),
            Payload::DeviceStateParams(p) => p.encode(out),
            Payload::Mmap(m) => m.encode(out),
            Payload::ShmemConfig(c) => c.encode(out),
            Payload::CryptoSession(c) => c.encode(out),
            Payload::Raw(bytes) => out.extend_from_slice(bytes),
        }
    }

    /// Wire size of this payload.
    pub fn encoded_len(&self) -> usize {
        match self {
            Payload::Empty => 0,
            Payload::U64(_) | Payload::VringState(_) | Payload::VringFd(_) => 8,
            Payload::VringAddr(_) => VringAddr::SIZE,
            Payload::MemoryTable(regions) => 8 + regions.iter().map(MemoryRegion::wire_size).sum::<usize>(),
            Payload::SingleRegion(r) => 8 + r.wire_size(),
            Payload::LogBase { .. } => 16,
            Payload::Iotlb(_) => IotlbMsg::SIZE,
            Payload::Config(c) => DeviceConfig::HEADER_SIZE + c.data.len(),
            Payload::VringArea(_) => VringArea::SIZE,
            Payload::Inflight(_) => InflightDesc::SIZE,
            Payload::Shared(_) => 16,
            Payload::DeviceStateParams(_) => DeviceStateParams::SIZE,
            Payload::Mmap(_) => MmapRequest::SIZE,
            Payload::ShmemConfig(_) => ShmemConfig::SIZE,
            Payload::CryptoSession(c) => 16 + c.params.len(),
            Payload::Raw(b) => b.len(),
        }
    }
}
