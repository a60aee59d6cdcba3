//! Whole messages: header + payload, decoded against the rules of their request.

use super::error::ProtocolError;
use super::header::{Header, HEADER_SIZE, NEED_REPLY, REPLY, VERSION};
use super::payload::*;
use super::request::{BackendRequest, Channel, FdRule, FrontendRequest, Layout, ReplyRule, Request};

/// A decoded (or to-be-encoded) message. File descriptors travel beside it, never inside: the
/// wire layer only counts them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The request (a reply carries the request it answers).
    pub request: Request,
    /// Header flags as sent or received.
    pub flags: u32,
    /// The decoded payload.
    pub payload: Payload,
}

impl Message {
    /// A request with version 1 and no other flag.
    pub fn request(request: impl Into<Request>, payload: Payload) -> Message {
        Message { request: request.into(), flags: VERSION, payload }
    }

    /// A reply: version 1 + REPLY, exactly the 0x5 QEMU insists on.
    pub fn reply(request: impl Into<Request>, payload: Payload) -> Message {
        Message { request: request.into(), flags: VERSION | REPLY, payload }
    }

    /// The same message with NEED_REPLY set.
    pub fn with_need_reply(mut self) -> Message {
        self.flags |= NEED_REPLY;
        self
    }

    /// Whether this is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & REPLY != 0
    }

    /// Whether the sender asks for an ack.
    pub fn need_reply(&self) -> bool {
        self.flags & NEED_REPLY != 0
    }

    /// The header this message is sent with.
    pub fn header(&self) -> Header {
        Header { code: self.request.code(), flags: self.flags, size: self.payload.encoded_len() as u32 }
    }

    /// Header and payload bytes, ready for one `sendmsg`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_SIZE + self.payload.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Appends header and payload bytes to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header().to_bytes());
        self.payload.encode_into(out);
    }

    /// The ring index this message addresses, if it addresses one (full width, untruncated).
    pub fn ring_index(&self) -> Option<u32> {
        match &self.payload {
            Payload::VringState(s) => Some(s.index),
            Payload::VringAddr(a) => Some(a.index),
            Payload::VringFd(f) => Some(f.index.into()),
            Payload::VringArea(a) => Some(a.index.into()),
            _ => None,
        }
    }

    /// Rejects a ring index at or above `num_rings` — the check every ring message needs once the
    /// receiver knows how many rings its device has (CVE-2020-10723).
    pub fn check_ring_index(&self, num_rings: u32) -> Result<(), ProtocolError> {
        match self.ring_index() {
            Some(index) if index >= num_rings => {
                Err(ProtocolError::RingIndex { request: self.request, index: index.into(), num_rings })
            }
            _ => Ok(()),
        }
    }

    /// Number of fds this message must travel with, or an error if `num_fds` does not fit.
    fn check_fds(&self, rule: FdRule, num_fds: usize) -> Result<(), ProtocolError> {
        let nofd = match &self.payload {
            Payload::VringFd(f) => f.nofd,
            Payload::VringArea(a) => a.nofd,
            _ => false,
        };
        // Decide first, describe only on failure: the happy path allocates nothing.
        let ok = match rule {
            FdRule::Exactly(n) => num_fds == n,
            FdRule::AtMost(n) => num_fds <= n,
            FdRule::PerRegion => num_fds == self.regions(),
            FdRule::UnlessNoFd => num_fds == usize::from(!nofd),
            FdRule::AtMostOneUnlessNoFd => num_fds <= usize::from(!nofd),
            FdRule::InflightReply => num_fds == self.inflight_fds(),
            FdRule::DeviceStateReply => num_fds == self.device_state_fds(),
        };
        if ok {
            return Ok(());
        }
        let expected = match rule {
            FdRule::Exactly(n) => n.to_string(),
            FdRule::AtMost(n) => format!("at most {n}"),
            FdRule::PerRegion => format!("{} (one per region)", self.regions()),
            FdRule::UnlessNoFd if nofd => "0 (NOFD is set)".into(),
            FdRule::UnlessNoFd => "1 (NOFD is clear)".into(),
            FdRule::AtMostOneUnlessNoFd if nofd => "0 (NOFD is set)".into(),
            FdRule::AtMostOneUnlessNoFd => "at most 1".into(),
            FdRule::InflightReply => format!("{} (one unless mmap_size is 0)", self.inflight_fds()),
            FdRule::DeviceStateReply => format!("{} (per the reply's status and no-fd bit)", self.device_state_fds()),
        };
        Err(ProtocolError::FdCount { request: self.request, got: num_fds, expected })
    }

    fn regions(&self) -> usize {
        match &self.payload {
            Payload::MemoryTable(r) => r.len(),
            _ => 0,
        }
    }

    fn inflight_fds(&self) -> usize {
        match &self.payload {
            Payload::Inflight(d) => usize::from(d.mmap_size != 0),
            _ => 0,
        }
    }

    fn device_state_fds(&self) -> usize {
        match &self.payload {
            // An fd only on success (bits 0-7 zero) with "no fd" (bit 8) clear.
            Payload::U64(v) => usize::from(v & 0xff == 0 && v & (1 << 8) == 0),
            _ => 0,
        }
    }
}

/// Decodes one whole message (header + payload) that arrived on `channel` with `num_fds` file
/// descriptors. Pure: this is what the fuzzer eats.
pub fn decode(channel: Channel, bytes: &[u8], num_fds: usize) -> Result<Message, ProtocolError> {
    let header = Header::parse(bytes)?;
    header.validate(channel)?;
    let payload = &bytes[HEADER_SIZE..];
    if payload.len() != header.size as usize {
        return Err(ProtocolError::PayloadSize {
            request: header.request(channel),
            got: payload.len(),
            expected: format!("{} (the header's size field)", header.size),
        });
    }
    decode_body(channel, header, payload, num_fds)
}

/// Decodes a message whose header was already read and validated and whose payload is exactly
/// `header.size` bytes.
pub fn decode_body(channel: Channel, header: Header, payload: &[u8], num_fds: usize) -> Result<Message, ProtocolError> {
    let request = header.request(channel);
    let rules = request.rules();
    let (layout, fds) = if header.is_reply() {
        match rules.reply {
            ReplyRule::Always(layout, fds) => (layout, fds),
            ReplyRule::IfLogShmfd(layout) | ReplyRule::AckOrPostcopy(layout) => (layout, FdRule::Exactly(0)),
            ReplyRule::AckOnly if matches!(request, Request::Unknown(..)) => (Layout::Raw, FdRule::AtMost(usize::MAX)),
            ReplyRule::AckOnly => (Layout::U64, FdRule::Exactly(0)),
        }
    } else {
        (rules.layout, rules.fds)
    };
    let payload = decode_payload(request, layout, payload)?;
    let message = Message { request, flags: header.flags, payload };
    message.check_fds(fds, num_fds)?;
    if !header.is_reply() {
        validate_request(&message)?;
    }
    Ok(message)
}

fn exact(request: Request, bytes: &[u8], sizes: &[usize]) -> Result<(), ProtocolError> {
    if sizes.contains(&bytes.len()) {
        return Ok(());
    }
    let expected = match sizes {
        [one] => one.to_string(),
        [init @ .., last] => {
            let init: Vec<String> = init.iter().map(|s| s.to_string()).collect();
            format!("{} or {last}", init.join(", "))
        }
        [] => "nothing".into(),
    };
    Err(ProtocolError::PayloadSize { request, got: bytes.len(), expected })
}

fn decode_payload(request: Request, layout: Layout, bytes: &[u8]) -> Result<Payload, ProtocolError> {
    let mut r = Reader::new(request, bytes);
    let payload = match layout {
        Layout::Empty => {
            exact(request, bytes, &[0])?;
            Payload::Empty
        }
        Layout::U64 => {
            exact(request, bytes, &[8])?;
            Payload::U64(r.u64()?)
        }
        Layout::VringState => {
            exact(request, bytes, &[VringState::SIZE])?;
            Payload::VringState(VringState::decode(&mut r)?)
        }
        Layout::VringAddr => {
            exact(request, bytes, &[VringAddr::SIZE])?;
            Payload::VringAddr(VringAddr::decode(request, &mut r)?)
        }
        Layout::VringFd => {
            exact(request, bytes, &[VringFd::SIZE])?;
            Payload::VringFd(VringFd::decode(request, &mut r)?)
        }
        Layout::MemoryTable => Payload::MemoryTable(decode_memory_table(request, bytes)?),
        Layout::SingleRegion => {
            exact(request, bytes, &[8 + MemoryRegion::SIZE, 8 + MemoryRegion::XEN_SIZE])?;
            r.skip(8)?;
            let region = MemoryRegion::decode(&mut r, bytes.len() == 8 + MemoryRegion::XEN_SIZE)?;
            let check_offset = request != Request::Frontend(FrontendRequest::REM_MEM_REG);
            region.validate(request, check_offset)?;
            Payload::SingleRegion(region)
        }
        Layout::LogBase => {
            exact(request, bytes, &[16])?;
            let (mmap_size, mmap_offset) = (r.u64()?, r.u64()?);
            if mmap_offset.checked_add(mmap_size).is_none() {
                return Err(ProtocolError::Overflow { request, field: "mmap_offset" });
            }
            Payload::LogBase { mmap_size, mmap_offset }
        }
        Layout::Iotlb => {
            exact(request, bytes, &[IotlbMsg::SIZE])?;
            Payload::Iotlb(IotlbMsg::decode(request, &mut r)?)
        }
        Layout::Config => {
            if bytes.len() < DeviceConfig::HEADER_SIZE {
                exact(request, bytes, &[DeviceConfig::HEADER_SIZE])?;
            }
            Payload::Config(DeviceConfig::decode(request, &mut r, bytes.len())?)
        }
        Layout::VringArea => {
            exact(request, bytes, &[VringArea::SIZE])?;
            Payload::VringArea(VringArea::decode(request, &mut r)?)
        }
        Layout::Inflight => {
            exact(request, bytes, &[InflightDesc::SIZE])?;
            Payload::Inflight(InflightDesc::decode(request, &mut r)?)
        }
        Layout::Shared => {
            exact(request, bytes, &[16])?;
            Payload::Shared(bytes.try_into().unwrap_or([0; 16]))
        }
        Layout::DeviceStateParams => {
            exact(request, bytes, &[DeviceStateParams::SIZE])?;
            Payload::DeviceStateParams(DeviceStateParams::decode(request, &mut r)?)
        }
        Layout::Mmap => {
            exact(request, bytes, &[MmapRequest::SIZE])?;
            Payload::Mmap(MmapRequest::decode(request, &mut r)?)
        }
        Layout::ShmemConfig => {
            exact(request, bytes, &[ShmemConfig::SIZE])?;
            Payload::ShmemConfig(ShmemConfig::decode(request, &mut r)?)
        }
        Layout::CryptoSession => Payload::CryptoSession(CryptoSession::decode(request, &mut r, bytes.len())?),
        Layout::LogBaseReply => {
            exact(request, bytes, &[0, 8, 16])?;
            match bytes.len() {
                0 => Payload::Empty,
                8 => Payload::U64(r.u64()?),
                _ => Payload::LogBase { mmap_size: r.u64()?, mmap_offset: r.u64()? },
            }
        }
        Layout::MemoryTableReply => {
            if bytes.len() == 8 {
                Payload::U64(r.u64()?)
            } else {
                Payload::MemoryTable(decode_memory_table(request, bytes)?)
            }
        }
        Layout::SingleRegionReply => {
            if bytes.len() == 8 {
                Payload::U64(r.u64()?)
            } else {
                decode_payload(request, Layout::SingleRegion, bytes)?
            }
        }
        Layout::ConfigReply => {
            if bytes.is_empty() {
                Payload::Empty
            } else {
                decode_payload(request, Layout::Config, bytes)?
            }
        }
        Layout::SharedLenient => {
            exact(request, bytes, &[0, 8, 16])?;
            match bytes.len() {
                0 => Payload::Empty,
                8 => Payload::U64(r.u64()?),
                _ => Payload::Shared(bytes.try_into().unwrap_or([0; 16])),
            }
        }
        Layout::Raw => Payload::Raw(bytes.to_vec()),
    };
    Ok(payload)
}

fn decode_memory_table(request: Request, bytes: &[u8]) -> Result<Vec<MemoryRegion>, ProtocolError> {
    let mut r = Reader::new(request, bytes);
    if bytes.len() < 8 {
        exact(request, bytes, &[8 + MemoryRegion::SIZE])?;
    }
    let nregions = r.u32()?;
    r.skip(4)?;
    if nregions == 0 || nregions as usize > MAX_MEM_TABLE_REGIONS {
        return Err(ProtocolError::InvalidField {
            request,
            field: "nregions",
            value: nregions.into(),
            reason: "must be 1..=8",
        });
    }
    let n = nregions as usize;
    let xen = if bytes.len() == 8 + n * MemoryRegion::SIZE {
        false
    } else if bytes.len() == 8 + n * MemoryRegion::XEN_SIZE {
        true
    } else {
        return Err(ProtocolError::PayloadSize {
            request,
            got: bytes.len(),
            expected: format!("8 + 32*{n} (or 8 + 40*{n} with XEN_MMAP)"),
        });
    };
    let mut regions = Vec::with_capacity(n);
    for _ in 0..n {
        let region = MemoryRegion::decode(&mut r, xen)?;
        region.validate(request, true)?;
        regions.push(region);
    }
    Ok(regions)
}

/// Request-level value rules that need no negotiated state.
fn validate_request(message: &Message) -> Result<(), ProtocolError> {
    use FrontendRequest as F;
    let request = message.request;
    let invalid = |field, value: u64, reason| ProtocolError::InvalidField { request, field, value, reason };
    match (request, &message.payload) {
        (Request::Frontend(F::SET_VRING_NUM), Payload::VringState(s)) if s.num == 0 || s.num > 32768 => {
            Err(invalid("num", s.num.into(), "queue size must be 1..=32768"))
        }
        (Request::Frontend(F::SET_VRING_ENABLE), Payload::VringState(s)) if s.num > 1 => {
            Err(invalid("num", s.num.into(), "must be 0 (disable) or 1 (enable)"))
        }
        (Request::Frontend(F::SET_VRING_ENDIAN), Payload::VringState(s)) if s.num > 1 => {
            Err(invalid("num", s.num.into(), "must be 0 (little) or 1 (big)"))
        }
        // GET_VRING_BASE's num is not checked: DPDK's virtio_user sends the ring size there
        // (protocol.md §9: lenient where real peers differ).
        (Request::Frontend(F::VRING_KICK), Payload::VringState(s)) if s.num != 0 => {
            Err(invalid("num", s.num.into(), "reserved, must be 0"))
        }
        (Request::Backend(BackendRequest::VRING_CALL | BackendRequest::VRING_ERR), Payload::VringState(s))
            if s.num != 0 =>
        {
            Err(invalid("num", s.num.into(), "reserved, must be 0"))
        }
        (Request::Frontend(F::SET_STATUS), Payload::U64(v)) if *v > 0xff => {
            Err(invalid("status", *v, "the device status is one byte"))
        }
        (Request::Frontend(F::SET_CONFIG), Payload::Config(c)) if c.flags > 1 => {
            Err(invalid("flags", c.flags.into(), "must be 0 (driver write) or 1 (migration)"))
        }
        (Request::Frontend(F::IOTLB_MSG), Payload::Iotlb(m))
            if m.kind != IotlbMsg::UPDATE && m.kind != IotlbMsg::INVALIDATE =>
        {
            Err(invalid("type", m.kind.into(), "the front-end sends only UPDATE or INVALIDATE"))
        }
        (Request::Backend(BackendRequest::IOTLB_MSG), Payload::Iotlb(m))
            if m.kind != IotlbMsg::MISS && m.kind != IotlbMsg::ACCESS_FAIL =>
        {
            Err(invalid("type", m.kind.into(), "the back-end sends only MISS or ACCESS_FAIL"))
        }
        _ => Ok(()),
    }
}
