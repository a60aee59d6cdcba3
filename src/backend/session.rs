//! One front-end session: every front-end request, validated and answered per the spec.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use super::requests::BackendRequests;
use super::worker::{RingShared, Worker, WorkerPolicy, Workers};
use super::{Device, DeviceRequest};
use crate::connection::{Connection, Deadline};
use crate::error::{Error, Result};
use crate::memory::{
    DirtyLog, Iotlb, IotlbFault, MemoryTable, Region, RegionDesc, DEFAULT_MAX_SLOTS, IOTLB_READ, IOTLB_WRITE,
};
use crate::protocol::{
    Channel, DeviceConfig, FrontendRequest, InflightDesc, IotlbMsg, MemoryRegion, Message, Payload, ProtocolFeatures,
    Request, VirtioFeatures, VringAddr, VRING_F_LOG,
};
use crate::virtqueue::{
    avail_ring_size, used_ring_size, DeviceQueue, InflightBuffer, QueueConfig, RingAddressSpace, DESC_SIZE,
};

/// Protocol features the session implements itself, offered on top of the device's.
pub const SESSION_PROTOCOL_FEATURES: ProtocolFeatures = ProtocolFeatures(
    ProtocolFeatures::MQ.0
        | ProtocolFeatures::LOG_SHMFD.0
        | ProtocolFeatures::REPLY_ACK.0
        | ProtocolFeatures::BACKEND_REQ.0
        | ProtocolFeatures::CONFIG.0
        | ProtocolFeatures::RESET_DEVICE.0
        | ProtocolFeatures::CONFIGURE_MEM_SLOTS.0
        | ProtocolFeatures::STATUS.0
        | ProtocolFeatures::INFLIGHT_SHMFD.0,
);

/// Status of an ack for a refused request (-EINVAL, as rust-vmm answers).
const FAILED: u64 = (-(libc::EINVAL as i64)) as u64;

#[derive(Debug, Default)]
struct Ring {
    size: u16,
    addr: Option<VringAddr>,
    base: u16,
    kick: Option<OwnedFd>,
    call: Option<OwnedFd>,
    err: Option<OwnedFd>,
    enabled: bool,
    worker: Option<Worker>,
}

/// The state of one front-end session.
pub struct Session {
    device: Arc<dyn Device>,
    acked_features: u64,
    acked_protocol: ProtocolFeatures,
    /// SET_PROTOCOL_FEATURES was received (PROTOCOL_FEATURES is then on its way).
    protocol_set: bool,
    memory: Arc<MemoryTable>,
    /// ADD_MEM_REG repeats of a mapped region (guest address, user address, size) → how many
    /// more REM_MEM_REGs it takes to remove it.
    region_refs: std::collections::HashMap<(u64, u64, u64), u32>,
    rings: Vec<Ring>,
    log: Option<DirtyLog>,
    status: u8,
    requests: Arc<BackendRequests>,
    inflight: Option<InflightBuffer>,
    /// ACCESS_PLATFORM: IOVA → front-end address entries from IOTLB_MSG UPDATEs.
    iotlb: Arc<RwLock<Iotlb>>,
    /// DEVICE_STATE: the state transfer in progress or its outcome.
    transfer: super::state::Transfer,
    /// Declared after `rings`: rings leave their threads before the threads end.
    workers: Workers,
    /// VHOSTUSER_RS_TRACE: print requests and ring events to stderr.
    trace: bool,
}

enum Outcome {
    /// Answer with this payload (and fds).
    Reply(Payload, Vec<OwnedFd>),
    /// No reply of its own: ack with 0 if asked.
    Done,
    /// Refused: failure ack if asked.
    Refused(Error),
}

impl Session {
    /// A fresh session for `device`.
    pub fn new(device: Arc<dyn Device>) -> Session {
        Session::with_options(device, Arc::new(BackendRequests::new()), WorkerPolicy::default())
    }

    /// A fresh session whose back-end request channel, once the front-end sets one up, is sent
    /// on through `requests` (the handle a device keeps), and whose rings run on threads as
    /// `policy` says.
    pub fn with_options(device: Arc<dyn Device>, requests: Arc<BackendRequests>, policy: WorkerPolicy) -> Session {
        let n = usize::from(device.num_queues());
        Session {
            device,
            acked_features: 0,
            acked_protocol: ProtocolFeatures::empty(),
            protocol_set: false,
            memory: Arc::new(MemoryTable::new()),
            region_refs: std::collections::HashMap::new(),
            rings: (0..n).map(|_| Ring::default()).collect(),
            log: None,
            status: 0,
            requests,
            inflight: None,
            iotlb: Arc::new(RwLock::new(Iotlb::new())),
            transfer: super::state::Transfer::default(),
            workers: Workers::new(policy),
            // A debugging aid for users and for tests that check what a real front-end sent.
            trace: std::env::var_os("VHOSTUSER_RS_TRACE").is_some_and(|v| !v.is_empty() && v != "0"),
        }
    }

    fn offered_features(&self) -> u64 {
        self.device.features()
            | VirtioFeatures::PROTOCOL_FEATURES.bits()
            | VirtioFeatures::LOG_ALL.bits()
            | VirtioFeatures::ACCESS_PLATFORM.bits()
    }

    fn offered_protocol(&self) -> ProtocolFeatures {
        self.device.protocol_features() | SESSION_PROTOCOL_FEATURES
    }

    fn ring(&mut self, message: &Message) -> std::result::Result<usize, Error> {
        message.check_ring_index(self.rings.len() as u32)?;
        Ok(message.ring_index().unwrap_or(0) as usize)
    }

    /// Handles one request; returns the reply to send, if any.
    pub fn handle(&mut self, message: &Message, fds: Vec<OwnedFd>) -> Result<Option<(Message, Vec<OwnedFd>)>> {
        let request = message.request;
        let Request::Frontend(req) = request else {
            // Unknown code: fds are closed; a failure ack if one was asked for.
            drop(fds);
            return Ok(message.need_reply().then(|| (Message::reply(request, Payload::U64(FAILED)), Vec::new())));
        };
        let outcome = self.dispatch(req, message, fds);
        if let (true, Outcome::Refused(e)) = (self.trace, &outcome) {
            eprintln!("vhost-user back-end: {req} refused: {e}");
        }
        let reply_ack = self.acked_protocol.contains(ProtocolFeatures::REPLY_ACK);
        Ok(match outcome {
            Outcome::Reply(payload, fds) => Some((Message::reply(request, payload), fds)),
            Outcome::Done if message.need_reply() && reply_ack => {
                Some((Message::reply(request, Payload::U64(0)), Vec::new()))
            }
            Outcome::Done => None,
            Outcome::Refused(e) if req.rules().has_reply() => return Err(e),
            Outcome::Refused(_) if message.need_reply() && reply_ack => {
                Some((Message::reply(request, Payload::U64(FAILED)), Vec::new()))
            }
            Outcome::Refused(_) => None,
        })
    }

    fn dispatch(&mut self, req: FrontendRequest, message: &Message, mut fds: Vec<OwnedFd>) -> Outcome {
        use FrontendRequest::*;
        let p = &message.payload;
        let refuse = |state: &'static str| Outcome::Refused(Error::InvalidState { request: req.into(), state });
        match (req, p) {
            (GET_FEATURES, _) => Outcome::Reply(Payload::U64(self.offered_features()), Vec::new()),
            (SET_FEATURES, Payload::U64(v)) => {
                if v & !self.offered_features() != 0 {
                    return refuse("acknowledges features that were not offered");
                }
                self.acked_features = *v;
                self.requests.negotiated(self.acked_features, self.acked_protocol);
                self.device.features_acked(*v);
                if v & VirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
                    // Without PROTOCOL_FEATURES, rings start enabled.
                    for r in &mut self.rings {
                        r.enabled = true;
                    }
                }
                self.apply_logging();
                Outcome::Done
            }
            (SET_OWNER, _) => Outcome::Done,
            (RESET_OWNER, _) => {
                self.stop_all();
                Outcome::Done
            }
            (GET_PROTOCOL_FEATURES, _) => Outcome::Reply(Payload::U64(self.offered_protocol().bits()), Vec::new()),
            (SET_PROTOCOL_FEATURES, Payload::U64(v)) => {
                if v & !self.offered_protocol().bits() != 0 {
                    return refuse("acknowledges protocol features that were not offered");
                }
                self.acked_protocol = ProtocolFeatures(*v);
                self.protocol_set = true;
                self.requests.negotiated(self.acked_features, self.acked_protocol);
                Outcome::Done
            }
            (GET_QUEUE_NUM, _) => Outcome::Reply(Payload::U64(self.device.queue_num()), Vec::new()),
            (GET_MAX_MEM_SLOTS, _) => Outcome::Reply(Payload::U64(DEFAULT_MAX_SLOTS as u64), Vec::new()),
            (SET_MEM_TABLE, Payload::MemoryTable(regions)) => {
                let pairs = regions.iter().zip(fds.drain(..)).map(|(r, fd)| (region_desc(r), fd)).collect();
                match MemoryTable::map_all(pairs) {
                    Ok(t) => {
                        self.region_refs.clear();
                        self.replace_memory(t)
                    }
                    Err(e) => Outcome::Refused(e.into()),
                }
            }
            (ADD_MEM_REG, Payload::SingleRegion(r)) => {
                let desc = region_desc(r);
                let Some(fd) = fds.pop() else { return refuse("no fd") };
                // QEMU's net front-end has one vhost device per queue pair on this socket, and
                // each adds the whole guest memory: a region already mapped is counted, not
                // mapped twice, and stays until its last REM_MEM_REG.
                let key = region_key(&desc);
                if self.memory.regions().iter().any(|m| region_key(&m.desc) == key) {
                    drop(fd);
                    *self.region_refs.entry(key).or_insert(0) += 1;
                    return Outcome::Done;
                }
                match Region::map(desc, fd).and_then(|region| self.memory.with_added(region, DEFAULT_MAX_SLOTS)) {
                    Ok(t) => self.replace_memory(t),
                    Err(e) => Outcome::Refused(e.into()),
                }
            }
            (REM_MEM_REG, Payload::SingleRegion(r)) => {
                drop(fds);
                let desc = region_desc(r);
                if let Some(extra) = self.region_refs.get_mut(&region_key(&desc)) {
                    *extra -= 1;
                    if *extra == 0 {
                        self.region_refs.remove(&region_key(&desc));
                    }
                    return Outcome::Done;
                }
                match self.memory.with_removed(&desc) {
                    Ok(t) => self.replace_memory(t),
                    Err(e) => Outcome::Refused(e.into()),
                }
            }
            (SET_VRING_NUM, Payload::VringState(s)) => {
                let i = match self.ring(message) {
                    Ok(i) => i,
                    Err(e) => return Outcome::Refused(e),
                };
                if self.rings[i].worker.is_some() {
                    return refuse("the ring is started");
                }
                let size = s.num;
                if !size.is_power_of_two() || size > u32::from(self.device.max_queue_size()) {
                    return refuse("ring size must be a power of two within the device's maximum");
                }
                self.rings[i].size = size as u16;
                Outcome::Done
            }
            (SET_VRING_ADDR, Payload::VringAddr(a)) => {
                let i = match self.ring(message) {
                    Ok(i) => i,
                    Err(e) => return Outcome::Refused(e),
                };
                self.rings[i].addr = Some(*a);
                if self.rings[i].worker.is_some() {
                    // Logging toggled on a running ring: restart it with the new flag.
                    self.restart(i);
                }
                Outcome::Done
            }
            (SET_VRING_BASE, Payload::VringState(s)) => {
                let i = match self.ring(message) {
                    Ok(i) => i,
                    Err(e) => return Outcome::Refused(e),
                };
                if self.rings[i].worker.is_some() {
                    return refuse("the ring is started");
                }
                self.rings[i].base = s.num as u16;
                Outcome::Done
            }
            (GET_VRING_BASE, _) | (GET_VRING_BASE_SKIP_DRAIN, _) => {
                let i = match self.ring(message) {
                    Ok(i) => i,
                    Err(e) => return Outcome::Refused(e),
                };
                let ring = &mut self.rings[i];
                if let Some(w) = ring.worker.take() {
                    if let Some(q) = w.stop() {
                        ring.base = q.next_avail();
                    }
                    self.device.queue_stopped(i as u16);
                }
                // After the reply the ring must not touch the fds: forget them.
                ring.kick = None;
                ring.call = None;
                Outcome::Reply(
                    Payload::VringState(crate::protocol::VringState { index: i as u32, num: u32::from(ring.base) }),
                    Vec::new(),
                )
            }
            (SET_VRING_KICK, Payload::VringFd(f))
            | (SET_VRING_CALL, Payload::VringFd(f))
            | (SET_VRING_ERR, Payload::VringFd(f)) => {
                let i = match self.ring(message) {
                    Ok(i) => i,
                    Err(e) => return Outcome::Refused(e),
                };
                let fd = if f.nofd { None } else { fds.pop() };
                match req {
                    SET_VRING_KICK => {
                        if fd.is_none() {
                            return refuse("polling rings (NOFD kick) is not supported");
                        }
                        self.rings[i].kick = fd;
                        self.start(i)
                    }
                    SET_VRING_CALL => {
                        let ring = &mut self.rings[i];
                        match &ring.worker {
                            // Swap atomically with respect to the data path.
                            Some(w) => *w.shared.call.lock().unwrap_or_else(|e| e.into_inner()) = fd,
                            None => ring.call = fd,
                        }
                        Outcome::Done
                    }
                    _ => {
                        self.rings[i].err = fd;
                        Outcome::Done
                    }
                }
            }
            (SET_VRING_ENABLE, Payload::VringState(s)) => {
                // QEMU's net front-end enables its rings before SET_FEATURES (protocol.md §9):
                // SET_PROTOCOL_FEATURES already showed that PROTOCOL_FEATURES will be acked.
                if self.acked_features & VirtioFeatures::PROTOCOL_FEATURES.bits() == 0 && !self.protocol_set {
                    return refuse("PROTOCOL_FEATURES was not negotiated");
                }
                let i = match self.ring(message) {
                    Ok(i) => i,
                    Err(e) => return Outcome::Refused(e),
                };
                let ring = &mut self.rings[i];
                ring.enabled = s.num == 1;
                if let Some(w) = &ring.worker {
                    w.shared.enabled.store(ring.enabled, Ordering::Release);
                    w.shared.wake();
                }
                Outcome::Done
            }
            (GET_CONFIG, Payload::Config(c)) => {
                let space = self.device.config();
                let (start, len) = (c.offset as usize, c.data.len());
                match space.get(start..start + len) {
                    Some(bytes) => Outcome::Reply(
                        Payload::Config(DeviceConfig { offset: c.offset, flags: 0, data: bytes.to_vec() }),
                        Vec::new(),
                    ),
                    // The spec's failure answer: an empty payload.
                    None => Outcome::Reply(Payload::Empty, Vec::new()),
                }
            }
            (SET_CONFIG, Payload::Config(c)) => {
                if self.device.set_config(c.offset, &c.data) {
                    Outcome::Done
                } else {
                    refuse("the device refuses this config write")
                }
            }
            (SET_BACKEND_REQ_FD, _) => match fds.pop().map(Connection::from_fd) {
                Some(Ok(conn)) => {
                    self.requests.attach(conn);
                    Outcome::Done
                }
                Some(Err(e)) => Outcome::Refused(e),
                None => refuse("no fd"),
            },
            (SET_LOG_BASE, Payload::LogBase { mmap_size, mmap_offset }) => {
                let Some(fd) = fds.pop() else { return refuse("SET_LOG_BASE needs the log fd (LOG_SHMFD)") };
                match DirtyLog::from_fd(fd, *mmap_size, *mmap_offset) {
                    Ok(log) => {
                        self.log = Some(log);
                        self.apply_logging();
                        Outcome::Reply(Payload::U64(0), Vec::new())
                    }
                    Err(e) => Outcome::Refused(e.into()),
                }
            }
            (IOTLB_MSG, Payload::Iotlb(m)) => {
                // Always answered with a status (QEMU sets NEED_REPLY and waits).
                let status = |ok: bool| Outcome::Reply(Payload::U64(if ok { 0 } else { FAILED }), Vec::new());
                if !self.iommu() {
                    return status(false);
                }
                match m.kind {
                    IotlbMsg::UPDATE => {
                        // The range must be guest memory we have mapped (protocol.md §3.3).
                        let inside = m.size != 0 && self.memory.translate_user(m.uaddr, m.size).is_ok();
                        let updated = inside
                            && self
                                .iotlb
                                .write()
                                .unwrap_or_else(|e| e.into_inner())
                                .update(m.iova, m.size, m.uaddr, m.perm)
                                .is_ok();
                        if !updated {
                            return status(false);
                        }
                        // Rings waiting for a translation may start now.
                        for i in 0..self.rings.len() {
                            if self.rings[i].worker.is_none() {
                                let _ = self.start(i);
                            }
                        }
                        status(true)
                    }
                    IotlbMsg::INVALIDATE => {
                        self.iotlb.write().unwrap_or_else(|e| e.into_inner()).invalidate(m.iova, m.size);
                        // Rings whose parts lie in the range were translated through the removed
                        // entries: translate them again (or wait for the next UPDATE).
                        let end = m.iova.saturating_add(m.size);
                        for i in 0..self.rings.len() {
                            let ring = &self.rings[i];
                            let hit = ring.worker.is_some()
                                && ring.addr.is_some_and(|a| {
                                    ring_parts(&a, ring.size)
                                        .iter()
                                        .any(|&(at, len, _)| at < end && at.saturating_add(len) > m.iova)
                                });
                            if hit {
                                self.restart(i);
                            }
                        }
                        status(true)
                    }
                    _ => status(false),
                }
            }
            (GET_INFLIGHT_FD, Payload::Inflight(d)) => {
                // Refusal is answered as "no buffer" (mmap_size 0, no fd): the front-end then
                // runs without inflight tracking instead of losing the connection.
                let none = || Outcome::Reply(Payload::Inflight(InflightDesc::default()), Vec::new());
                if d.num_queues == 0
                    || usize::from(d.num_queues) > self.rings.len()
                    || d.queue_size > self.device.max_queue_size()
                    || self.acked_features & VirtioFeatures::RING_PACKED.bits() != 0
                {
                    return none();
                }
                // A repeated request replaces the buffer; the old one is unmapped once no ring
                // uses it (CVE-2020-10726 was a leak here).
                let Ok(buffer) = InflightBuffer::allocate(d.num_queues, d.queue_size) else { return none() };
                let Some(Ok(fd)) = buffer.fd().map(|f| f.try_clone_to_owned()) else { return none() };
                let desc = InflightDesc {
                    mmap_size: buffer.mmap_size(),
                    mmap_offset: buffer.mmap_offset(),
                    num_queues: d.num_queues,
                    queue_size: d.queue_size,
                };
                self.inflight = Some(buffer);
                Outcome::Reply(Payload::Inflight(desc), vec![fd])
            }
            (SET_INFLIGHT_FD, Payload::Inflight(d)) => {
                let Some(fd) = fds.pop() else { return refuse("no fd") };
                // CVE-2021-3839: more queues than the device has would index past our rings.
                if usize::from(d.num_queues) > self.rings.len() {
                    return refuse("more queues than the device has");
                }
                match InflightBuffer::from_fd(fd, d.mmap_size, d.mmap_offset, d.num_queues, d.queue_size) {
                    Ok(buffer) => {
                        self.inflight = Some(buffer);
                        Outcome::Done
                    }
                    Err(e) => Outcome::Refused(Error::Queue { queue: 0, source: e }),
                }
            }
            (SEND_RARP, Payload::U64(v)) => {
                if !self.acked_protocol.contains(ProtocolFeatures::RARP) {
                    return refuse("RARP was not negotiated");
                }
                let b = v.to_le_bytes();
                self.device_request(DeviceRequest::SendRarp([b[0], b[1], b[2], b[3], b[4], b[5]]))
            }
            (NET_SET_MTU, Payload::U64(v)) => {
                // QEMU sends it before SET_FEATURES: VIRTIO_NET_F_MTU offered is what counts.
                if !self.acked_protocol.contains(ProtocolFeatures::MTU)
                    || self.offered_features() & VirtioFeatures::NET_MTU.bits() == 0
                {
                    return refuse("the MTU protocol feature was not negotiated or VIRTIO_NET_F_MTU not offered");
                }
                self.device_request(DeviceRequest::NetSetMtu(*v))
            }
            (SET_STATUS, Payload::U64(v)) => {
                self.status = *v as u8;
                Outcome::Done
            }
            (GET_STATUS, _) => Outcome::Reply(Payload::U64(u64::from(self.status)), Vec::new()),
            (RESET_DEVICE, _) => {
                self.stop_all();
                for r in &mut self.rings {
                    *r = Ring::default();
                }
                self.acked_features = 0;
                self.requests.negotiated(self.acked_features, self.acked_protocol);
                self.status = 0;
                self.inflight = None;
                self.device.reset();
                Outcome::Done
            }
            // Device-facing requests (state transfer, shared objects, shared memory): each
            // answered only once its protocol feature was negotiated.
            (SET_DEVICE_STATE_FD, Payload::DeviceStateParams(params)) if self.acked(ProtocolFeatures::DEVICE_STATE) => {
                let running = self.rings.iter().any(|r| r.worker.is_some());
                let status = self.transfer.start(&self.device, *params, fds.pop(), running);
                Outcome::Reply(Payload::U64(status), Vec::new())
            }
            (CHECK_DEVICE_STATE, _) if self.acked(ProtocolFeatures::DEVICE_STATE) => {
                Outcome::Reply(Payload::U64(self.transfer.check()), Vec::new())
            }
            (GET_SHARED_OBJECT, p) if self.acked(ProtocolFeatures::SHARED_OBJECT) => {
                let (payload, fds) = super::shared::get_shared_object(&*self.device, p);
                Outcome::Reply(payload, fds)
            }
            (GET_SHMEM_CONFIG, _) if self.acked(ProtocolFeatures::SHMEM) => {
                Outcome::Reply(Payload::ShmemConfig(super::shmem::shmem_config(&*self.device)), Vec::new())
            }
            _ => {
                drop(fds);
                refuse("not supported by this back-end")
            }
        }
    }

    fn device_request(&self, request: DeviceRequest) -> Outcome {
        match self.device.device_request(request) {
            Ok(()) => Outcome::Done,
            Err(why) => {
                if self.trace {
                    eprintln!("vhost-user back-end: {request:?} refused: {why}");
                }
                Outcome::Refused(Error::InvalidState {
                    request: match request {
                        DeviceRequest::SendRarp(_) => FrontendRequest::SEND_RARP.into(),
                        DeviceRequest::NetSetMtu(_) => FrontendRequest::NET_SET_MTU.into(),
                    },
                    state: "the device refused it",
                })
            }
        }
    }

    fn acked(&self, feature: ProtocolFeatures) -> bool {
        self.acked_protocol.contains(feature)
    }

    fn iommu(&self) -> bool {
        self.acked_features & VirtioFeatures::ACCESS_PLATFORM.bits() != 0
    }

    fn logging(&self) -> bool {
        self.acked_features & VirtioFeatures::LOG_ALL.bits() != 0 && self.log.is_some()
    }

    /// Re-applies LOG_ALL / the ring log flags to running rings (by restarting them).
    fn apply_logging(&mut self) {
        for i in 0..self.rings.len() {
            if self.rings[i].worker.is_some() {
                self.restart(i);
            }
        }
    }

    fn replace_memory(&mut self, table: MemoryTable) -> Outcome {
        self.memory = Arc::new(table);
        // Running rings are re-translated against the new table; the old mappings are dropped
        // when the last ring that used them has stopped.
        for i in 0..self.rings.len() {
            if self.rings[i].worker.is_some() {
                self.restart(i);
            }
        }
        Outcome::Done
    }

    fn restart(&mut self, i: usize) {
        let ring = &mut self.rings[i];
        if let Some(w) = ring.worker.take() {
            let shared = w.shared.clone();
            if let Some(q) = w.stop() {
                ring.base = q.next_avail();
            }
            self.device.queue_stopped(i as u16);
            ring.call = shared.call.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        let _ = self.start(i);
    }

    /// Starts ring `i` if everything it needs is known.
    fn start(&mut self, i: usize) -> Outcome {
        let logging = self.logging();
        let iommu = self.iommu();
        let event_idx = self.acked_features & VirtioFeatures::EVENT_IDX.bits() != 0;
        let indirect = self.acked_features & VirtioFeatures::INDIRECT_DESC.bits() != 0;
        let memory = self.memory.clone();
        let log = self.log.clone();
        let device = self.device.clone();
        let ring = &mut self.rings[i];
        let (Some(addr), Some(kick)) = (ring.addr, ring.kick.as_ref()) else { return Outcome::Done };
        if ring.size == 0 || memory.is_empty() {
            return Outcome::Done;
        }
        let mut ring_addrs = [addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr];
        if iommu {
            // Ring addresses are IOVAs. Without entries yet, ask for them and start the ring
            // when the UPDATE arrives (waiting here would block the channel that brings it).
            let tlb = self.iotlb.read().unwrap_or_else(|e| e.into_inner());
            for (k, (iova, len, perm)) in ring_parts(&addr, ring.size).into_iter().enumerate() {
                match tlb.translate_contiguous(iova, len, perm) {
                    Ok(uaddr) => ring_addrs[k] = uaddr,
                    Err(IotlbFault::Miss { iova }) => {
                        drop(tlb);
                        let _ = self.requests.iotlb_miss(iova, perm, false, Some(std::time::Duration::from_secs(1)));
                        return Outcome::Done;
                    }
                    Err(IotlbFault::Denied { .. }) => {
                        return refuse_state(
                            FrontendRequest::SET_VRING_KICK,
                            "a ring part is not mapped with the access it needs",
                        )
                    }
                }
            }
        }
        let inflight = match &self.inflight {
            Some(b) if b.queue_size() == ring.size => b.queue(i as u16),
            // A buffer for another ring size cannot describe this ring.
            Some(b) if i < usize::from(b.num_queues()) => {
                return Outcome::Refused(Error::Queue {
                    queue: i as u16,
                    source: crate::virtqueue::VirtqueueError::InflightCorrupt("queue size differs from the ring's"),
                })
            }
            _ => None,
        };
        let cfg = QueueConfig {
            size: ring.size,
            desc_addr: ring_addrs[0],
            avail_addr: ring_addrs[1],
            used_addr: ring_addrs[2],
            addr_space: RingAddressSpace::User,
            event_idx,
            indirect,
            next_avail: ring.base,
        };
        let mut queue = match DeviceQueue::new(memory, cfg) {
            Ok(q) => q,
            Err(e) => return Outcome::Refused(Error::Queue { queue: i as u16, source: e }),
        };
        if logging {
            // Under ACCESS_PLATFORM log_guest_addr is the used ring's IOVA; the log is indexed by
            // guest-physical address, which the used ring's translated address gives.
            let used_gpa = if iommu { queue.memory().user_to_guest(ring_addrs[2]) } else { Some(addr.log_guest_addr) };
            let used =
                (addr.flags & VRING_F_LOG != 0).then_some(()).and(used_gpa).and_then(|a| log.clone().map(|l| (l, a)));
            queue.set_dirty_log(log.clone(), used);
        }
        if iommu {
            queue.set_iotlb(Some(self.iotlb.clone()));
        }
        if let Some(region) = inflight {
            match queue.attach_inflight(region) {
                Ok(n) if self.trace => {
                    eprintln!("vhost-user back-end: ring {i}: {n} requests resubmitted from the inflight buffer")
                }
                Ok(_) => {}
                Err(e) => return Outcome::Refused(Error::Queue { queue: i as u16, source: e }),
            }
        }
        let kick = match kick.try_clone() {
            Ok(k) => k,
            Err(e) => return Outcome::Refused(Error::Io(e)),
        };
        let group = match self.workers.group_for(i as u16, &device) {
            Ok(g) => g,
            Err(e) => return Outcome::Refused(Error::Io(e)),
        };
        let shared = RingShared::new(ring.enabled, ring.call.take(), group);
        let requests = iommu.then(|| self.requests.clone());
        let events = device.event_fds(i as u16);
        ring.worker = Some(Worker::start(i as u16, queue, kick, shared, requests, events));
        self.device.queue_started(i as u16);
        Outcome::Done
    }

    fn stop_all(&mut self) {
        for (i, r) in self.rings.iter_mut().enumerate() {
            if let Some(w) = r.worker.take() {
                if let Some(q) = w.stop() {
                    r.base = q.next_avail();
                }
                self.device.queue_stopped(i as u16);
            }
            r.enabled = false;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn refuse_state(request: FrontendRequest, state: &'static str) -> Outcome {
    Outcome::Refused(Error::InvalidState { request: request.into(), state })
}

/// The IOVA ranges of a ring's three parts with the access each needs.
fn ring_parts(addr: &VringAddr, size: u16) -> [(u64, u64, u8); 3] {
    [
        (addr.desc_user_addr, DESC_SIZE * u64::from(size), IOTLB_READ),
        (addr.avail_user_addr, avail_ring_size(size), IOTLB_READ),
        (addr.used_user_addr, used_ring_size(size), IOTLB_WRITE),
    ]
}

/// What identifies a region for ADD/REM_MEM_REG (the spec ignores mmap_offset).
fn region_key(d: &RegionDesc) -> (u64, u64, u64) {
    (d.guest_addr, d.user_addr, d.size)
}

fn region_desc(r: &MemoryRegion) -> RegionDesc {
    RegionDesc { guest_addr: r.guest_addr, size: r.size, user_addr: r.user_addr, mmap_offset: r.mmap_offset }
}

/// Serves one front-end on `conn` until it disconnects (or `stop` returns true between
/// messages). A message that breaks the spec ends the session with an error.
pub fn serve_connection(conn: &Connection, device: Arc<dyn Device>, stop: &dyn Fn() -> bool) -> Result<()> {
    serve_session(conn, device, &Arc::new(BackendRequests::new()), &WorkerPolicy::default(), stop)
}

/// [`serve_connection`] with the handle through which the device sends back-end requests
/// during this session; it is emptied when the session ends.
pub fn serve_session(
    conn: &Connection,
    device: Arc<dyn Device>,
    requests: &Arc<BackendRequests>,
    policy: &WorkerPolicy,
    stop: &dyn Fn() -> bool,
) -> Result<()> {
    let mut session = Session::with_options(device.clone(), requests.clone(), policy.clone());
    let trace = session.trace;
    let result = loop {
        if stop() {
            break Ok(());
        }
        if !conn.readable(Some(std::time::Duration::from_millis(200)))? {
            continue;
        }
        let received = match conn.recv(Channel::Main, Deadline::after(Some(std::time::Duration::from_secs(5)))) {
            Ok(r) => r,
            Err(Error::Disconnected) => break Ok(()),
            Err(e) => break Err(e),
        };
        if trace {
            let m = &received.message;
            eprintln!("vhost-user back-end: {} {:?} ({} fds)", m.request, m.payload, received.fds.len());
        }
        match session.handle(&received.message, received.fds) {
            Ok(Some((reply, fds))) => {
                let borrowed: Vec<_> = fds.iter().map(std::os::fd::AsFd::as_fd).collect();
                conn.send(&reply, &borrowed, Deadline::after(Some(std::time::Duration::from_secs(5))))?;
            }
            Ok(None) => {}
            Err(e) => break Err(e),
        }
    };
    // Close the back-end channel first: a worker waiting for an answer on it (an IOTLB miss)
    // wakes at once instead of holding up the end of the session.
    requests.detach();
    drop(session);
    device.reset();
    result
}
