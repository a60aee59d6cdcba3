//! One front-end session: every front-end request, validated and answered per the spec.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use super::coverage::{refusal, Refusal};
use super::requests::BackendRequests;
use super::worker::{
    Notifier, RingShared, Worker, WorkerPolicy, Workers, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
};
use super::{Device, DeviceRequest};
use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::memory::{
    DirtyLog, Iotlb, IotlbFault, MemoryTable, Region, RegionDesc, DEFAULT_MAX_SLOTS, IOTLB_READ, IOTLB_WRITE,
};
use crate::protocol::{
    BackendRequest, CryptoSession, DeviceConfig, FrontendRequest, Gate, InflightDesc, IotlbMsg, MemoryRegion, Message,
    Payload, ProtocolFeatures, Request, ShmemConfig, VirtioFeatures, VringAddr, VringArea, VRING_F_LOG,
};
use crate::virtqueue::packed::{EVENT_SUPPRESS_SIZE, MAX_PACKED_QUEUE_SIZE};
use crate::virtqueue::{
    avail_ring_size, used_ring_size, AnyDeviceQueue, DeviceQueue, InflightBuffer, PackedBase, PackedDeviceQueue,
    PackedQueueConfig, QueueConfig, RingAddressSpace, DESC_SIZE,
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
        | ProtocolFeatures::INFLIGHT_SHMFD.0
        // With it the front-end puts guest-physical addresses in every "user address" field
        // (regions, rings, IOTLB). The session only ever uses user addresses to find a region
        // and an offset in it, never as pointers, so it works unchanged (spec: GPA_ADDRESSES).
        | ProtocolFeatures::GPA_ADDRESSES.0,
);

/// Protocol features the session leaves to a device that declares them in
/// [`Device::protocol_features`]: the device requests (RARP, MTU, CRYPTO_SESSION), the
/// device-facing DEVICE_STATE, SHARED_OBJECT and SHMEM (answered from `Device` hooks),
/// HOST_NOTIFIER (doorbell pages, which make the worker poll the ring: a cost in CPU only a
/// device that wants it should pay), and
/// INBAND_NOTIFICATIONS, which the session implements but the spec advises against outside
/// simulation, and which QEMU acks whenever it is offered (protocol.md §5.4.4).
pub const DEVICE_PROTOCOL_FEATURES: ProtocolFeatures = ProtocolFeatures(
    ProtocolFeatures::RARP.0
        | ProtocolFeatures::MTU.0
        | ProtocolFeatures::CRYPTO_SESSION.0
        | ProtocolFeatures::INBAND_NOTIFICATIONS.0
        | ProtocolFeatures::DEVICE_STATE.0
        | ProtocolFeatures::SHARED_OBJECT.0
        | ProtocolFeatures::SHMEM.0
        | ProtocolFeatures::HOST_NOTIFIER.0,
);

/// What a device may add to the offer: [`DEVICE_PROTOCOL_FEATURES`] and BACKEND_SEND_FD, which
/// the features that send fds on the back-end channel (SHMEM, HOST_NOTIFIER) need. Anything
/// else a device declares is not implemented here and never offered.
const DEVICE_MAY_DECLARE: ProtocolFeatures =
    ProtocolFeatures(DEVICE_PROTOCOL_FEATURES.0 | ProtocolFeatures::BACKEND_SEND_FD.0);

/// Protocol features not implemented here, never offered even if a device declares them:
/// CROSS_ENDIAN (rings are little-endian, VERSION_1 only), PAGEFAULT (postcopy: no
/// userfaultfd registration of guest memory), XEN_MMAP, GET_VRING_BASE_INFLIGHT and
/// GET_VRING_BASE_SKIP_DRAIN (stopping a ring never leaves requests recorded in flight on
/// purpose).
pub const NEVER_OFFERED: ProtocolFeatures = ProtocolFeatures(
    ProtocolFeatures::CROSS_ENDIAN.0
        | ProtocolFeatures::PAGEFAULT.0
        | ProtocolFeatures::XEN_MMAP.0
        | ProtocolFeatures::GET_VRING_BASE_INFLIGHT.0
        | ProtocolFeatures::GET_VRING_BASE_SKIP_DRAIN.0,
);

/// Status of an ack for a refused request (-EINVAL, as rust-vmm answers).
const FAILED: u64 = (-(libc::EINVAL as i64)) as u64;

#[derive(Debug, Default)]
struct Ring {
    size: u16,
    addr: Option<VringAddr>,
    /// SET_VRING_BASE's `num` / GET_VRING_BASE's answer, in the negotiated format's encoding
    /// (split: the next avail index; packed: [`PackedBase`]).
    base: u32,
    kick: Option<OwnedFd>,
    call: Option<OwnedFd>,
    err: Option<OwnedFd>,
    enabled: bool,
    worker: Option<Worker>,
    /// The front-end was sent a doorbell page for this ring (HOST_NOTIFIER) while it runs.
    doorbell: bool,
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
    /// SET_LOG_FD's eventfd. The spec makes writing it optional ("may be used to inform the
    /// front-end that the log has been modified"); the log itself is shared memory the
    /// front-end reads, so it is kept (and replaced, closing the old one) but never written.
    log_fd: Option<OwnedFd>,
    /// The virtio device status byte (SET/GET_STATUS), shared with the rings, which set
    /// DEVICE_NEEDS_RESET when they break.
    status: Arc<AtomicU8>,
    /// The front-end has written a status: from then on rings run only with DRIVER_OK set
    /// and FAILED clear (virtio 1.x §2.1.2: no buffers consumed before DRIVER_OK). Front-ends
    /// that never use STATUS are not held to it.
    status_written: bool,
    /// The last SET_FEATURES was refused: FEATURES_OK written by the front-end is cleared, which
    /// is how a device refuses a feature set (virtio 1.x §3.1.1: the driver re-reads the status
    /// "to ensure the FEATURES_OK bit is still set").
    features_refused: bool,
    requests: Arc<BackendRequests>,
    inflight: Option<InflightBuffer>,
    /// ACCESS_PLATFORM: IOVA → front-end address entries from IOTLB_MSG UPDATEs.
    iotlb: Arc<RwLock<Iotlb>>,
    /// DEVICE_STATE: the state transfer in progress or its outcome.
    transfer: super::state::Transfer,
    /// Declared after `rings`: rings leave their threads before the threads end.
    workers: Workers,
}

enum Outcome {
    /// Answer with this payload (and fds).
    Reply(Payload, Vec<OwnedFd>),
    /// No reply of its own: ack with 0 if asked.
    Done,
    /// Refused: the spec's failure answer (failure ack if asked, or the request's failure
    /// reply shape; a request whose reply has no failure shape ends the session).
    Refused(Error),
    /// The spec asks the back-end to close the connection.
    Close(Error),
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
            log_fd: None,
            status: Arc::new(AtomicU8::new(0)),
            status_written: false,
            features_refused: false,
            requests,
            inflight: None,
            iotlb: Arc::new(RwLock::new(Iotlb::new())),
            transfer: super::state::Transfer::default(),
            workers: Workers::new(policy),
        }
    }

    fn offered_features(&self) -> u64 {
        self.device.features()
            | VirtioFeatures::PROTOCOL_FEATURES.bits()
            | VirtioFeatures::LOG_ALL.bits()
            | VirtioFeatures::ACCESS_PLATFORM.bits()
    }

    fn offered_protocol(&self) -> ProtocolFeatures {
        // A feature nobody implements is never offered, whatever the device declares.
        (self.device.protocol_features() & DEVICE_MAY_DECLARE & !NEVER_OFFERED) | SESSION_PROTOCOL_FEATURES
    }

    fn ring(&mut self, message: &Message) -> std::result::Result<usize, Error> {
        message.check_ring_index(self.rings.len() as u32)?;
        Ok(message.ring_index().unwrap_or(0) as usize)
    }

    /// Handles one request; returns the reply to send, if any. An `Err` ends the session (a
    /// refused request whose mandatory reply has no failure shape in the spec, or one the spec
    /// answers by closing the connection).
    pub fn handle(&mut self, message: &Message, fds: Vec<OwnedFd>) -> Result<Option<(Message, Vec<OwnedFd>)>> {
        let request = message.request;
        let Request::Frontend(req) = request else {
            // Unknown code: fds are closed; a failure ack if one was asked for.
            drop(fds);
            return Ok(message.need_reply().then(|| (Message::reply(request, Payload::U64(FAILED)), Vec::new())));
        };
        let outcome = match self.gate(req) {
            Ok(()) => self.dispatch(req, message, fds),
            Err(e) => {
                drop(fds);
                Outcome::Refused(e)
            }
        };
        let reply_ack = self.acked_protocol.contains(ProtocolFeatures::REPLY_ACK);
        Ok(match outcome {
            Outcome::Reply(payload, fds) => Some((Message::reply(request, payload), fds)),
            Outcome::Done if message.need_reply() && reply_ack => {
                Some((Message::reply(request, Payload::U64(0)), Vec::new()))
            }
            Outcome::Done => None,
            Outcome::Close(e) => {
                log::warn!("{req}: closing the connection: {e}");
                return Err(e);
            }
            Outcome::Refused(e) => {
                log::debug!(target: TRACE, "{req} refused: {e}");
                match self.failure_reply(req, message) {
                    Some(payload) => Some((Message::reply(request, payload), Vec::new())),
                    None if req.rules().has_reply() => {
                        log::warn!("{req} refused and its reply has no failure form: ending the session: {e}");
                        return Err(e);
                    }
                    None if message.need_reply() && reply_ack => {
                        Some((Message::reply(request, Payload::U64(FAILED)), Vec::new()))
                    }
                    None => None,
                }
            }
        })
    }

    /// Whether what `req` needs was negotiated (protocol.md §3.1 gates, §5.4), with the
    /// leniency real front-ends need (protocol.md §9).
    fn gate(&self, req: FrontendRequest) -> std::result::Result<(), Error> {
        let missing = |feature: String| Err(Error::NotNegotiated { request: req.into(), feature });
        let acked = VirtioFeatures(self.acked_features);
        if req == FrontendRequest::GET_VRING_BASE_SKIP_DRAIN {
            // Without bit 23 it is answered as GET_VRING_BASE: draining is always allowed (it
            // is what GET_VRING_BASE does), the front-end gets its base, and the spec defines
            // no failure reply that would let the session go on.
            return Ok(());
        }
        match req.rules().gate {
            // PROTOCOL_FEATURES is always offered.
            Gate::None | Gate::ProtocolFeaturesOffered => Ok(()),
            // QEMU's net front-end enables rings before SET_FEATURES: SET_PROTOCOL_FEATURES
            // already showed that PROTOCOL_FEATURES will be acked.
            Gate::ProtocolFeaturesAcked if acked.contains(VirtioFeatures::PROTOCOL_FEATURES) || self.protocol_set => {
                Ok(())
            }
            Gate::ProtocolFeaturesAcked => missing("PROTOCOL_FEATURES".into()),
            Gate::Protocol(p) if self.acked_protocol.contains(p) => Ok(()),
            Gate::Protocol(p) => missing((p & !self.acked_protocol).names().join("|")),
            Gate::Virtio(v) if acked.contains(v) => Ok(()),
            Gate::Virtio(v) => missing((v & !acked).names().join("|")),
            // NET_SET_MTU: QEMU sends it before SET_FEATURES, so VIRTIO_NET_F_MTU *offered*
            // is what counts.
            Gate::Both(p, _) if !self.acked_protocol.contains(p) => {
                missing((p & !self.acked_protocol).names().join("|"))
            }
            Gate::Both(_, v) if VirtioFeatures(self.offered_features()).contains(v) => Ok(()),
            Gate::Both(_, v) => missing(format!("{} (not offered)", v.names().join("|"))),
        }
    }

    /// The spec's failure answer for a refused request that is answered even on failure, if
    /// it defines one ([`refusal`] says which).
    fn failure_reply(&self, req: FrontendRequest, message: &Message) -> Option<Payload> {
        Some(match refusal(req, self.acked_protocol.contains(ProtocolFeatures::LOG_SHMFD)) {
            Refusal::Ack | Refusal::Close => return None,
            Refusal::Status => Payload::U64(FAILED),
            Refusal::EmptyConfig | Refusal::NoUserfaultfd => Payload::Empty,
            Refusal::NoInflightBuffer => Payload::Inflight(InflightDesc::default()),
            Refusal::NegativeSessionId => {
                let echo = match &message.payload {
                    Payload::CryptoSession(c) => c.clone(),
                    _ => CryptoSession::default(),
                };
                Payload::CryptoSession(CryptoSession { session_id: -i64::from(libc::EINVAL), ..echo })
            }
            Refusal::DeviceStateError => Payload::U64(1 | 1 << 8),
            Refusal::NoSharedObject => Payload::U64(FAILED),
            Refusal::NoShmemRegions => Payload::ShmemConfig(ShmemConfig::default()),
        })
    }

    /// Rings run only when the status allows it (see `status_written`).
    fn status_allows_running(&self) -> bool {
        let status = self.status.load(Ordering::Acquire);
        !self.status_written || (status & STATUS_DRIVER_OK != 0 && status & STATUS_FAILED == 0)
    }

    /// Applies enable state and status to the running rings.
    fn apply_run_state(&mut self) {
        let allowed = self.status_allows_running();
        for ring in &self.rings {
            if let Some(w) = &ring.worker {
                w.shared.enabled.store(ring.enabled && allowed, Ordering::Release);
                w.shared.wake();
            }
        }
    }

    /// RESET_DEVICE: disable all rings and reset the device to its initial state; the
    /// connection, its ownership, the protocol features, the memory table and the back-end
    /// request channel stay.
    fn reset_device(&mut self) {
        // A state transfer belongs to the device state the reset discards: a LOAD finishing
        // afterwards would put the old state into the reset device.
        self.transfer.abandon_and_wait();
        self.stop_device();
        for r in &mut self.rings {
            // The error fd stays: QEMU sends SET_VRING_ERR once, when it sets the device up.
            *r = Ring { err: r.err.take(), ..Ring::default() };
        }
        self.inflight = None;
    }

    /// SET_STATUS(0), the virtio reset (virtio 1.x §2.1: writing 0 resets the device): every
    /// ring stops and is disabled, the features and the status are forgotten and the device is
    /// reset — but the rings keep their configuration and base: QEMU 7.2 writes status 0 at
    /// the start of its device stop, *before* the GET_VRING_BASE whose answer it restarts (or
    /// migrates) the rings from (later QEMUs write it after). The inflight buffer stays too.
    fn stop_device(&mut self) {
        self.stop_all();
        self.acked_features = 0;
        self.requests.negotiated(self.acked_features, self.acked_protocol);
        self.status.store(0, Ordering::Release);
        self.status_written = false;
        self.features_refused = false;
        self.device.reset();
    }

    fn dispatch(&mut self, req: FrontendRequest, message: &Message, mut fds: Vec<OwnedFd>) -> Outcome {
        use FrontendRequest::*;
        let p = &message.payload;
        let refuse = |state: &'static str| Outcome::Refused(Error::InvalidState { request: req.into(), state });
        match (req, p) {
            (GET_FEATURES, _) => Outcome::Reply(Payload::U64(self.offered_features()), Vec::new()),
            (SET_FEATURES, Payload::U64(v)) => {
                self.features_refused = true;
                if v & !self.offered_features() != 0 {
                    return refuse("acknowledges features that were not offered");
                }
                // protocol.md §5.4: IOTLB misses travel on the back-end request channel and
                // wait for REPLY_ACK acks.
                if v & VirtioFeatures::ACCESS_PLATFORM.bits() != 0
                    && !self.acked_protocol.contains(ProtocolFeatures::BACKEND_REQ | ProtocolFeatures::REPLY_ACK)
                {
                    return refuse("ACCESS_PLATFORM needs BACKEND_REQ and REPLY_ACK");
                }
                self.features_refused = false;
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
                self.apply_run_state();
                Outcome::Done
            }
            (SET_OWNER, _) => Outcome::Done,
            (RESET_OWNER, _) => {
                self.transfer.abandon_and_wait();
                self.stop_all();
                Outcome::Done
            }
            (GET_PROTOCOL_FEATURES, _) => Outcome::Reply(Payload::U64(self.offered_protocol().bits()), Vec::new()),
            (SET_PROTOCOL_FEATURES, Payload::U64(v)) => {
                if v & !self.offered_protocol().bits() != 0 {
                    return refuse("acknowledges protocol features that were not offered");
                }
                let v = ProtocolFeatures(*v);
                let inband = ProtocolFeatures::INBAND_NOTIFICATIONS;
                let needs = ProtocolFeatures::BACKEND_REQ | ProtocolFeatures::REPLY_ACK;
                if v.contains(inband) && !v.contains(needs) {
                    // Spec (In-band notifications): "the back-end should close the connection
                    // as a response to a SET_PROTOCOL_FEATURES message that sets the in-band
                    // notifications feature flag without the other two".
                    return Outcome::Close(Error::NotNegotiated {
                        request: req.into(),
                        feature: "BACKEND_REQ|REPLY_ACK (INBAND_NOTIFICATIONS needs both)".into(),
                    });
                }
                if let Some(why) = protocol_dependency_violation(v) {
                    return refuse(why);
                }
                self.acked_protocol = v;
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
                // virtio 1.2 §2.7 (split): a power of two; §2.8 (packed): any size up to 32768.
                let shape_ok = if self.packed() {
                    size != 0 && size <= u32::from(MAX_PACKED_QUEUE_SIZE)
                } else {
                    size.is_power_of_two()
                };
                if !shape_ok || size > u32::from(self.device.max_queue_size()) {
                    return refuse("ring size must be a power of two (split) within the device's maximum");
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
                // Split: bits 0-15 (the rest is zero); packed: both positions and wrap counters,
                // checked against the ring size when the ring starts.
                self.rings[i].base = if self.packed() { s.num } else { s.num & 0xffff };
                Outcome::Done
            }
            (GET_VRING_BASE, _) | (GET_VRING_BASE_SKIP_DRAIN, _) => {
                let i = match self.ring(message) {
                    Ok(i) => i,
                    Err(e) => return Outcome::Refused(e),
                };
                self.stop_ring(i);
                let ring = &mut self.rings[i];
                // After the reply the ring must not touch the fds: forget them (the error fd
                // stays: QEMU sends SET_VRING_ERR once, at device initialisation).
                ring.kick = None;
                ring.call = None;
                Outcome::Reply(
                    Payload::VringState(crate::protocol::VringState { index: i as u32, num: ring.base }),
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
                        let fd = match fd {
                            Some(fd) => fd,
                            // Spec (SET_VRING_KICK): with INBAND_NOTIFICATIONS the ring may be
                            // kicked by VRING_KICK messages instead; they write this eventfd.
                            None if self.inband() => match crate::eventfd::new() {
                                Ok(fd) => fd,
                                Err(e) => return Outcome::Refused(Error::Io(e)),
                            },
                            None => return refuse("polling rings (NOFD kick) is not supported"),
                        };
                        // A new kick fd for a running ring: restart it on the new fd.
                        self.stop_ring(i);
                        self.rings[i].kick = Some(fd);
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
                        let ring = &mut self.rings[i];
                        match &ring.worker {
                            Some(w) => *w.shared.err.lock().unwrap_or_else(|e| e.into_inner()) = fd,
                            None => ring.err = fd,
                        }
                        Outcome::Done
                    }
                }
            }
            (SET_VRING_ENABLE, Payload::VringState(s)) => {
                let i = match self.ring(message) {
                    Ok(i) => i,
                    Err(e) => return Outcome::Refused(e),
                };
                self.rings[i].enabled = s.num == 1;
                self.apply_run_state();
                Outcome::Done
            }
            (VRING_KICK, Payload::VringState(_)) => {
                // Spec: the ring starts on this message as on a kick of its kick fd; a kick fd
                // the front-end set is written (it is preferred over the message).
                let i = match self.ring(message) {
                    Ok(i) => i,
                    Err(e) => return Outcome::Refused(e),
                };
                if self.rings[i].kick.is_none() {
                    match crate::eventfd::new() {
                        Ok(fd) => self.rings[i].kick = Some(fd),
                        Err(e) => return Outcome::Refused(Error::Io(e)),
                    }
                }
                if self.rings[i].worker.is_none() {
                    if let Outcome::Refused(e) = self.start(i) {
                        return Outcome::Refused(e);
                    }
                }
                if let Some(kick) = &self.rings[i].kick {
                    signal_kick(kick);
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
                        // Replied to only with LOG_SHMFD (spec: Communication); QEMU checks the
                        // id, peers send 0/8/16 bytes (protocol.md §9): a u64 0.
                        if self.acked_protocol.contains(ProtocolFeatures::LOG_SHMFD) {
                            Outcome::Reply(Payload::U64(0), Vec::new())
                        } else {
                            Outcome::Done
                        }
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
                        // Rings waiting for a translation may start now; running rings
                        // waiting for a buffer's entry (their MISS) look again.
                        for i in 0..self.rings.len() {
                            match &self.rings[i].worker {
                                Some(w) => w.shared.iotlb_updated(),
                                None => {
                                    let _ = self.start(i);
                                }
                            }
                        }
                        status(true)
                    }
                    IotlbMsg::INVALIDATE => {
                        self.iotlb.write().unwrap_or_else(|e| e.into_inner()).invalidate(m.iova, m.size);
                        // Rings whose parts lie in the range were translated through the removed
                        // entries: translate them again (or wait for the next UPDATE).
                        let packed = self.packed();
                        let end = m.iova.saturating_add(m.size);
                        for i in 0..self.rings.len() {
                            let ring = &self.rings[i];
                            let hit = ring.worker.is_some()
                                && ring.addr.is_some_and(|a| {
                                    ring_parts(&a, ring.size, packed)
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
                {
                    return none();
                }
                // A repeated request replaces the buffer; the old one is unmapped once no ring
                // uses it (CVE-2020-10726 was a leak here). The layout is the negotiated ring
                // format's: QEMU sends SET_FEATURES before GET_INFLIGHT_FD for this reason.
                let Ok(buffer) = InflightBuffer::allocate_for(d.num_queues, d.queue_size, self.packed()) else {
                    return none();
                };
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
                let packed = self.packed();
                match InflightBuffer::from_fd_for(fd, d.mmap_size, d.mmap_offset, d.num_queues, d.queue_size, packed) {
                    Ok(buffer) => {
                        self.inflight = Some(buffer);
                        Outcome::Done
                    }
                    Err(e) => Outcome::Refused(Error::Queue { queue: 0, source: e }),
                }
            }
            (SEND_RARP, Payload::U64(v)) => {
                let b = v.to_le_bytes();
                self.device_request(DeviceRequest::SendRarp([b[0], b[1], b[2], b[3], b[4], b[5]]))
            }
            (NET_SET_MTU, Payload::U64(v)) => {
                // The gate checks VIRTIO_NET_F_MTU offered: QEMU sends this before SET_FEATURES.
                self.device_request(DeviceRequest::NetSetMtu(*v))
            }
            (SET_STATUS, Payload::U64(v)) => {
                let v = *v as u8; // the decoder refuses values above 0xff
                if v == 0 {
                    self.stop_device();
                    return Outcome::Done;
                }
                // DEVICE_NEEDS_RESET is the device's to set and stays until a reset.
                let needs_reset = self.status.load(Ordering::Acquire) & STATUS_NEEDS_RESET;
                let refused = if self.features_refused { STATUS_FEATURES_OK } else { 0 };
                self.status.store((v & !refused) | needs_reset, Ordering::Release);
                self.status_written = true;
                self.apply_run_state();
                Outcome::Done
            }
            (GET_STATUS, _) => Outcome::Reply(Payload::U64(u64::from(self.status.load(Ordering::Acquire))), Vec::new()),
            (RESET_DEVICE, _) => {
                self.reset_device();
                Outcome::Done
            }
            (SET_LOG_FD, _) => match fds.pop() {
                Some(fd) => {
                    self.log_fd = Some(fd);
                    Outcome::Done
                }
                None => refuse("no fd"),
            },
            (CREATE_CRYPTO_SESSION, Payload::CryptoSession(c)) => match self.device.create_crypto_session(c) {
                Ok(id) if id >= 0 => {
                    Outcome::Reply(Payload::CryptoSession(CryptoSession { session_id: id, ..c.clone() }), Vec::new())
                }
                Ok(_) => refuse("the device returned a negative session id"),
                Err(why) => {
                    log::debug!(target: TRACE, "{req} refused by the device: {why}");
                    refuse("the device refused it")
                }
            },
            (CLOSE_CRYPTO_SESSION, Payload::U64(id)) => match self.device.close_crypto_session(*id) {
                Ok(()) => Outcome::Done,
                Err(why) => {
                    log::debug!(target: TRACE, "{req} refused by the device: {why}");
                    refuse("the device refused it")
                }
            },
            (GPU_SET_SOCKET, _) => match fds.pop() {
                Some(fd) => match self.device.gpu_set_socket(fd) {
                    Ok(()) => Outcome::Done,
                    Err(why) => {
                        log::debug!(target: TRACE, "{req} refused by the device: {why}");
                        refuse("the device does not speak the vhost-user-gpu protocol")
                    }
                },
                None => refuse("no fd"),
            },
            // Never offered (gates refuse them first); explicit so the coverage table and the
            // dispatcher agree. CROSS_ENDIAN: rings are little-endian only (VERSION_1);
            // PAGEFAULT: postcopy is not implemented (see `coverage`).
            (SET_VRING_ENDIAN, _) | (POSTCOPY_ADVISE, _) | (POSTCOPY_LISTEN, _) | (POSTCOPY_END, _) => {
                refuse("not offered by this back-end")
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
                log::debug!(target: TRACE, "{request:?} refused by the device: {why}");
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

    /// INBAND_NOTIFICATIONS was negotiated (and with it BACKEND_REQ and REPLY_ACK).
    fn inband(&self) -> bool {
        self.acked_protocol.contains(ProtocolFeatures::INBAND_NOTIFICATIONS)
    }

    fn acked(&self, feature: ProtocolFeatures) -> bool {
        self.acked_protocol.contains(feature)
    }

    /// VIRTIO_F_RING_PACKED was negotiated: every ring of the session is packed.
    fn packed(&self) -> bool {
        self.acked_features & VirtioFeatures::RING_PACKED.bits() != 0
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
        self.stop_ring(i);
        let _ = self.start(i);
    }

    /// Takes ring `i` off its worker (if it runs), keeping its base and its fds.
    fn stop_ring(&mut self, i: usize) {
        let ring = &mut self.rings[i];
        if std::mem::take(&mut ring.doorbell) {
            // Withdraw the doorbell page (NOFD): the driver kicks the eventfd again.
            let area = VringArea { index: i as u8, nofd: true, size: 0, offset: 0 };
            if let Err(e) =
                self.requests.send(BackendRequest::VRING_HOST_NOTIFIER_MSG, Payload::VringArea(area), &[], false, None)
            {
                log::debug!(target: TRACE, "ring {i}: withdrawing its host notifier failed: {e}");
            }
        }
        if let Some(w) = ring.worker.take() {
            let shared = w.shared.clone();
            if let Some(q) = w.stop() {
                ring.base = q.vring_base();
            }
            self.device.queue_stopped(i as u16);
            ring.call = shared.call.lock().unwrap_or_else(|e| e.into_inner()).take();
            ring.err = shared.err.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    /// Starts ring `i` if everything it needs is known.
    fn start(&mut self, i: usize) -> Outcome {
        let allowed = self.status_allows_running();
        let inband = self.inband();
        let logging = self.logging();
        let iommu = self.iommu();
        let event_idx = self.acked_features & VirtioFeatures::EVENT_IDX.bits() != 0;
        let indirect = self.acked_features & VirtioFeatures::INDIRECT_DESC.bits() != 0;
        let packed = self.packed();
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
            for (k, (iova, len, perm)) in ring_parts(&addr, ring.size, packed).into_iter().enumerate() {
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
            Some(b) if b.queue_size() == ring.size && b.is_packed() == packed => Some(b.clone()),
            // A buffer for another ring size or format cannot describe this ring.
            Some(b) if i < usize::from(b.num_queues()) => {
                return Outcome::Refused(Error::Queue {
                    queue: i as u16,
                    source: crate::virtqueue::VirtqueueError::InflightCorrupt(
                        "queue size or ring format differs from the ring's",
                    ),
                })
            }
            _ => None,
        };
        let queue = if packed {
            // SET_VRING_ADDR for a packed ring (virtio 1.2 §2.8.10, protocol.md §7.10): desc is
            // the descriptor ring, avail the driver event suppression area, used the device's.
            PackedDeviceQueue::new(
                memory,
                PackedQueueConfig {
                    size: ring.size,
                    desc_addr: ring_addrs[0],
                    driver_event_addr: ring_addrs[1],
                    device_event_addr: ring_addrs[2],
                    addr_space: RingAddressSpace::User,
                    event_idx,
                    indirect,
                    base: packed_base(ring.base),
                },
            )
            .map(AnyDeviceQueue::Packed)
        } else {
            let cfg = QueueConfig {
                size: ring.size,
                desc_addr: ring_addrs[0],
                avail_addr: ring_addrs[1],
                used_addr: ring_addrs[2],
                addr_space: RingAddressSpace::User,
                event_idx,
                indirect,
                next_avail: ring.base as u16,
            };
            DeviceQueue::new(memory, cfg).map(AnyDeviceQueue::Split)
        };
        let mut queue = match queue {
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
        let attached = match (inflight, &mut queue) {
            (Some(b), AnyDeviceQueue::Split(q)) => b.queue(i as u16).map(|r| q.attach_inflight(r)),
            (Some(b), AnyDeviceQueue::Packed(q)) => b.packed_queue(i as u16).map(|r| q.attach_inflight(r)),
            (None, _) => None,
        };
        match attached {
            Some(Ok(n)) => log::debug!(target: TRACE, "ring {i}: {n} requests resubmitted from the inflight buffer"),
            Some(Err(e)) => return Outcome::Refused(Error::Queue { queue: i as u16, source: e }),
            None => {}
        }
        let kick = match kick.try_clone() {
            Ok(k) => k,
            Err(e) => return Outcome::Refused(Error::Io(e)),
        };
        let group = match self.workers.group_for(i as u16, &device) {
            Ok(g) => g,
            Err(e) => return Outcome::Refused(Error::Io(e)),
        };
        let notifier = Notifier { requests: Some(self.requests.clone()), inband, status: self.status.clone() };
        let shared = RingShared::new(ring.enabled && allowed, ring.call.take(), ring.err.take(), notifier, group);
        let requests = iommu.then(|| self.requests.clone());
        let events = device.event_fds(i as u16);
        // HOST_NOTIFIER: the driver's kicks become writes to a page instead of the eventfd (a
        // guest writes the notify region QEMU maps it to, without a VM exit). A doorbell write
        // carries only the ring index (without NOTIFICATION_DATA), the same value every time,
        // so the page cannot tell a new kick from an old one; the avail index can: a ring with
        // a doorbell is polled by its worker instead of waiting for kicks.
        let doorbell = self.acked(ProtocolFeatures::HOST_NOTIFIER)
            && self.acked(ProtocolFeatures::BACKEND_SEND_FD)
            && self.send_doorbell(i as u16);
        let owner = self.workers.owner;
        let ring = &mut self.rings[i];
        ring.doorbell = doorbell;
        ring.worker =
            Some(Worker::start(owner, device.clone(), i as u16, queue, kick, shared, requests, events, doorbell));
        self.device.queue_started(i as u16);
        Outcome::Done
    }

    /// Sends ring `index`'s doorbell page (one page of a new memfd) with VRING_HOST_NOTIFIER_MSG,
    /// without waiting for an answer (a front-end such as QEMU serves the back-end channel from
    /// the loop that waits for our replies). False if it could not be sent.
    fn send_doorbell(&self, index: u16) -> bool {
        let Ok(index8) = u8::try_from(index) else { return false };
        // SAFETY: plain syscall; no pointers.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let fd = match crate::memory::memfd("vhostuser_rs-doorbell", page) {
            Ok(fd) => fd,
            Err(e) => {
                log::warn!("ring {index}: no doorbell page: {e}");
                return false;
            }
        };
        let area = VringArea { index: index8, nofd: false, size: page, offset: 0 };
        match self.requests.send(
            BackendRequest::VRING_HOST_NOTIFIER_MSG,
            Payload::VringArea(area),
            &[fd.as_fd()],
            false,
            Some(std::time::Duration::from_secs(1)),
        ) {
            Ok(_) => true,
            Err(e) => {
                log::warn!("ring {index}: sending its host notifier failed: {e}");
                false
            }
        }
    }

    fn stop_all(&mut self) {
        for i in 0..self.rings.len() {
            self.stop_ring(i);
            self.rings[i].enabled = false;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// protocol.md §5.4: protocol features that need another one, if `v` acks one without it.
pub(crate) fn protocol_dependency_violation(v: ProtocolFeatures) -> Option<&'static str> {
    use ProtocolFeatures as P;
    let needs_channel = P::BACKEND_SEND_FD | P::HOST_NOTIFIER | P::SHARED_OBJECT | P::SHMEM;
    if (v & needs_channel) != P::empty() && !v.contains(P::BACKEND_REQ) {
        Some("BACKEND_SEND_FD, HOST_NOTIFIER, SHARED_OBJECT and SHMEM need BACKEND_REQ")
    } else if v.contains(P::GET_VRING_BASE_INFLIGHT) && !v.contains(P::INFLIGHT_SHMFD) {
        Some("GET_VRING_BASE_INFLIGHT needs INFLIGHT_SHMFD")
    } else if v.contains(P::GET_VRING_BASE_SKIP_DRAIN) && !v.contains(P::GET_VRING_BASE_INFLIGHT) {
        Some("GET_VRING_BASE_SKIP_DRAIN needs GET_VRING_BASE_INFLIGHT")
    } else {
        None
    }
}

/// Writes one kick into the ring's kick fd (an eventfd, or a pipe: 8 bytes either way).
fn signal_kick(fd: &OwnedFd) {
    let _ = crate::eventfd::signal(fd.as_fd());
}

fn refuse_state(request: FrontendRequest, state: &'static str) -> Outcome {
    Outcome::Refused(Error::InvalidState { request: request.into(), state })
}

/// SET_VRING_BASE's `num` for a packed ring. DPDK's virtio_user sends only the avail half
/// (bits 0-15; protocol.md §9 #19 is the same quirk in its GET_VRING_BASE reply), leaving the
/// used position at slot 0 with wrap counter 0 — which would make the device write used
/// descriptors the driver reads as stale. A ring stopped by GET_VRING_BASE has completed every
/// request, so its used position is its avail position: an all-zero used half is read that way.
/// (A front-end that sends both halves after a drained stop sends equal halves, so nothing
/// changes for it; a used half of exactly zero with requests still in flight is the one case
/// read wrongly, and the inflight buffer, where there is one, sets the positions then.)
fn packed_base(num: u32) -> PackedBase {
    if num >> 16 == 0 {
        PackedBase::decode_avail_only(num)
    } else {
        PackedBase::decode(num)
    }
}

/// The IOVA ranges of a ring's three parts with the access each needs. Packed: the device
/// reads available descriptors and writes used ones in the same ring, reads the driver event
/// area and writes its own.
fn ring_parts(addr: &VringAddr, size: u16, packed: bool) -> [(u64, u64, u8); 3] {
    if packed {
        return [
            (addr.desc_user_addr, DESC_SIZE * u64::from(size), IOTLB_READ | IOTLB_WRITE),
            (addr.avail_user_addr, EVENT_SUPPRESS_SIZE, IOTLB_READ),
            (addr.used_user_addr, EVENT_SUPPRESS_SIZE, IOTLB_WRITE),
        ];
    }
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

/// The `log` target of the request trace (in Python, the logger `vhostuser_rs.trace`): each
/// request a session receives, decoded, and what it refuses. The front-end's trace is its child
/// `vhostuser_rs::trace::frontend` (`frontend::TRACE`).
pub const TRACE: &str = "vhostuser_rs::trace";

/// VHOSTUSER_RS_TRACE=1: a debugging aid for users and for tests that check what a real
/// front-end sent. Prints the back-end's `log` records (one line per request received, refusals,
/// ring events) to stderr, unless the program installed a logger of its own.
pub(super) fn install_trace_logger() {
    struct Trace;
    impl log::Log for Trace {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            (metadata.target().starts_with(TRACE) || metadata.target().starts_with("vhostuser_rs::backend"))
                && metadata.level() <= log::Level::Debug
        }
        fn log(&self, record: &log::Record<'_>) {
            if self.enabled(record.metadata()) {
                let role = if record.target().starts_with(crate::frontend::TRACE) { "front-end" } else { "back-end" };
                eprintln!("vhost-user {role}: {}", record.args());
            }
        }
        fn flush(&self) {}
    }
    static TRACE_LOGGER: Trace = Trace;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("VHOSTUSER_RS_TRACE").is_some_and(|v| !v.is_empty() && v != "0")
            && log::set_logger(&TRACE_LOGGER).is_ok()
        {
            log::set_max_level(log::LevelFilter::Debug);
        }
    });
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
    let mut served = super::serving::ServedSession::new(device, requests.clone(), policy.clone());
    let result = loop {
        if stop() {
            break Ok(());
        }
        if !conn.readable(Some(std::time::Duration::from_millis(200)))? {
            continue;
        }
        match served.handle_ready(conn) {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    served.finish();
    result
}
