//! Session tests: every row of the coverage table against what a session answers.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::coverage::{coverage, refusal, Handling, Offer, Refusal};
use super::{Device, DeviceRequest, Session};
use crate::connection::Connection;
use crate::protocol::{
    CryptoSession, DeviceConfig, DeviceStateParams, FrontendRequest, InflightDesc, IotlbMsg, MemoryRegion, Message,
    Payload, ProtocolFeatures, VirtioFeatures, VringAddr, VringFd, VringState,
};
use crate::virtqueue::{AnyDeviceQueue, ChainBatch, VirtqueueError};

const FAILED_CHECK: fn(&Payload) -> bool = |p| matches!(p, Payload::U64(v) if *v != 0);

/// A device with every hook implemented (`hooks`) or none.
struct TestDevice {
    hooks: bool,
    calls: AtomicUsize,
}

impl Device for TestDevice {
    fn num_queues(&self) -> u16 {
        2
    }
    fn features(&self) -> u64 {
        VirtioFeatures::VERSION_1.bits() | if self.hooks { VirtioFeatures::NET_MTU.bits() } else { 0 }
    }
    fn protocol_features(&self) -> ProtocolFeatures {
        if self.hooks {
            super::DEVICE_PROTOCOL_FEATURES
        } else {
            ProtocolFeatures::empty()
        }
    }
    fn config(&self) -> Vec<u8> {
        vec![7; 16]
    }
    fn set_config(&self, _offset: u32, _data: &[u8]) -> bool {
        self.hooks
    }
    fn process(&self, _: u16, _: &mut AnyDeviceQueue, _: &ChainBatch) -> Result<(), VirtqueueError> {
        Ok(())
    }
    fn device_request(&self, _request: DeviceRequest) -> Result<(), String> {
        self.hook()
    }
    fn create_crypto_session(&self, _session: &CryptoSession) -> Result<i64, String> {
        self.hook().map(|()| 5)
    }
    fn close_crypto_session(&self, _session_id: u64) -> Result<(), String> {
        self.hook()
    }
    fn gpu_set_socket(&self, _socket: OwnedFd) -> Result<(), String> {
        self.hook()
    }
    fn save_state(&self) -> Result<Vec<u8>, String> {
        self.hook().map(|()| vec![1, 2, 3])
    }
    fn load_state(&self, _state: &[u8]) -> Result<(), String> {
        self.hook()
    }
    fn shared_object(&self, _uuid: &[u8; 16]) -> Option<OwnedFd> {
        self.hook().ok().map(|()| memfd(4096))
    }
    fn shmem_regions(&self) -> Vec<u64> {
        if self.hook().is_ok() {
            vec![0, 2 << 20]
        } else {
            Vec::new()
        }
    }
}

impl TestDevice {
    fn hook(&self) -> Result<(), String> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.hooks {
            Ok(())
        } else {
            Err("no".into())
        }
    }
}

/// Fills every writable byte of each chain of `batch` with `byte` and completes the chain with
/// its whole writable length (the process() of the test devices that answer).
fn fill_and_complete(queue: &mut AnyDeviceQueue, batch: &ChainBatch, byte: u8) -> Result<(), VirtqueueError> {
    for chain in batch.chains() {
        for s in batch.writable(chain) {
            // SAFETY: the segment lies in a mapping the queue keeps alive.
            unsafe { std::ptr::write_bytes(s.host, byte, s.len as usize) };
        }
        queue.complete(batch, chain, chain.writable_len)?;
    }
    Ok(())
}

fn memfd(size: u64) -> OwnedFd {
    // SAFETY: plain syscalls on a new descriptor we own.
    unsafe {
        let fd = libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, size as i64), 0);
        OwnedFd::from_raw_fd(fd)
    }
}

fn eventfd() -> OwnedFd {
    // SAFETY: a new descriptor we own.
    unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) }
}

const MEM: u64 = 1 << 20;
const REGION: MemoryRegion =
    MemoryRegion { guest_addr: 0, size: MEM, user_addr: 0x7000_0000, mmap_offset: 0, xen: None };

/// A session with everything offered acknowledged, REPLY_ACK included, and one memory region.
fn negotiated(device: &Arc<TestDevice>) -> Session {
    let mut s = Session::new(device.clone());
    let Payload::U64(features) = ask(&mut s, FrontendRequest::GET_FEATURES, Payload::Empty, vec![]).unwrap() else {
        panic!()
    };
    let Payload::U64(proto) = ask(&mut s, FrontendRequest::GET_PROTOCOL_FEATURES, Payload::Empty, vec![]).unwrap()
    else {
        panic!()
    };
    assert!(acked(&mut s, FrontendRequest::SET_PROTOCOL_FEATURES, Payload::U64(proto), vec![]));
    let features = features & !VirtioFeatures::LOG_ALL.bits();
    assert!(acked(&mut s, FrontendRequest::SET_FEATURES, Payload::U64(features), vec![]));
    let table = Payload::MemoryTable(vec![REGION]);
    assert!(acked(&mut s, FrontendRequest::SET_MEM_TABLE, table, vec![memfd(MEM)]));
    s
}

/// Sends `req` with NEED_REPLY; the reply's payload, or None if the session ended.
fn ask(s: &mut Session, req: FrontendRequest, payload: Payload, fds: Vec<OwnedFd>) -> Option<Payload> {
    let message = Message::request(req, payload).with_need_reply();
    match s.handle(&message, fds) {
        Ok(Some((reply, _fds))) => {
            assert!(reply.is_reply() && !reply.need_reply());
            assert_eq!(reply.request, req.into());
            Some(reply.payload)
        }
        Ok(None) => panic!("{req}: no answer although NEED_REPLY was set under REPLY_ACK"),
        Err(_) => None,
    }
}

fn acked(s: &mut Session, req: FrontendRequest, payload: Payload, fds: Vec<OwnedFd>) -> bool {
    matches!(ask(s, req, payload, fds), Some(Payload::U64(0)))
}

/// A well-formed instance of `req` (ring 0, the memory of `negotiated`).
fn sample(s: &mut Session, req: FrontendRequest) -> (Payload, Vec<OwnedFd>) {
    use FrontendRequest::*;
    let state = Payload::VringState(VringState { index: 0, num: 0 });
    let ring_fd = Payload::VringFd(VringFd { index: 0, nofd: false });
    let socket = || Connection::pair().unwrap().0.into_fd();
    let none = Vec::new();
    match req {
        GET_FEATURES
        | SET_OWNER
        | RESET_OWNER
        | GET_PROTOCOL_FEATURES
        | GET_QUEUE_NUM
        | POSTCOPY_ADVISE
        | POSTCOPY_LISTEN
        | POSTCOPY_END
        | RESET_DEVICE
        | GET_MAX_MEM_SLOTS
        | GET_STATUS
        | GET_SHMEM_CONFIG => (Payload::Empty, none),
        CHECK_DEVICE_STATE => {
            // Something to check: a SAVE into a pipe whose read end is dropped at once (the
            // device's state is produced either way; the hook decides the outcome).
            let mut fds = [0; 2];
            // SAFETY: plain syscall filling a local array; the fds are owned right after.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: fresh descriptors nobody else owns.
            let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            let params = Payload::DeviceStateParams(DeviceStateParams { direction: 0, phase: 0 });
            ask(s, SET_DEVICE_STATE_FD, params, vec![w]);
            // Keep the read end open until the state is written (a full pipe would not be).
            std::mem::forget(r);
            (Payload::Empty, none)
        }
        SET_FEATURES => {
            (Payload::U64(VirtioFeatures::VERSION_1.bits() | VirtioFeatures::PROTOCOL_FEATURES.bits()), none)
        }
        SET_PROTOCOL_FEATURES => (Payload::U64(ProtocolFeatures::REPLY_ACK.bits()), none),
        SET_MEM_TABLE => (Payload::MemoryTable(vec![REGION]), vec![memfd(MEM)]),
        SET_LOG_BASE => (Payload::LogBase { mmap_size: 4096, mmap_offset: 0 }, vec![memfd(4096)]),
        SET_LOG_FD => (Payload::Empty, vec![eventfd()]),
        SET_VRING_NUM => (Payload::VringState(VringState { index: 0, num: 64 }), none),
        SET_VRING_ADDR => (
            Payload::VringAddr(VringAddr {
                index: 0,
                flags: 0,
                desc_user_addr: REGION.user_addr,
                used_user_addr: REGION.user_addr + 0x2000,
                avail_user_addr: REGION.user_addr + 0x1000,
                log_guest_addr: 0x2000,
            }),
            none,
        ),
        SET_VRING_BASE | GET_VRING_BASE | GET_VRING_BASE_SKIP_DRAIN | VRING_KICK | SET_VRING_ENDIAN => (state, none),
        SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => (ring_fd, vec![eventfd()]),
        SET_VRING_ENABLE => (Payload::VringState(VringState { index: 0, num: 1 }), none),
        SEND_RARP => (Payload::U64(0x0000_5452_0012_3456), none),
        NET_SET_MTU => (Payload::U64(1500), none),
        SET_BACKEND_REQ_FD | GPU_SET_SOCKET => (Payload::Empty, vec![socket()]),
        IOTLB_MSG => (
            Payload::Iotlb(IotlbMsg { iova: 0, size: 4096, uaddr: REGION.user_addr, perm: 3, kind: IotlbMsg::UPDATE }),
            none,
        ),
        GET_CONFIG => (Payload::Config(DeviceConfig { offset: 0, flags: 0, data: vec![0; 8] }), none),
        SET_CONFIG => (Payload::Config(DeviceConfig { offset: 4, flags: 0, data: vec![1; 4] }), none),
        CREATE_CRYPTO_SESSION => {
            (Payload::CryptoSession(CryptoSession { op_code: 2, params: vec![0; 16], session_id: 0 }), none)
        }
        CLOSE_CRYPTO_SESSION => (Payload::U64(5), none),
        GET_INFLIGHT_FD => {
            (Payload::Inflight(InflightDesc { mmap_size: 0, mmap_offset: 0, num_queues: 1, queue_size: 64 }), none)
        }
        SET_INFLIGHT_FD => {
            // A buffer the back-end itself allocated, handed back.
            let message = Message::request(GET_INFLIGHT_FD, sample(s, GET_INFLIGHT_FD).0);
            match s.handle(&message, Vec::new()) {
                Ok(Some((reply, mut fds))) if fds.len() == 1 => (reply.payload, vec![fds.remove(0)]),
                // Not negotiated: any well-formed buffer description.
                _ => (
                    Payload::Inflight(InflightDesc { mmap_size: 4096, mmap_offset: 0, num_queues: 1, queue_size: 64 }),
                    vec![memfd(4096)],
                ),
            }
        }
        ADD_MEM_REG => (
            Payload::SingleRegion(MemoryRegion { guest_addr: MEM, user_addr: 0x8000_0000, ..REGION }),
            vec![memfd(MEM)],
        ),
        REM_MEM_REG => (Payload::SingleRegion(REGION), none),
        SET_STATUS => (Payload::U64(0x0f), none),
        GET_SHARED_OBJECT => (Payload::Shared([1; 16]), none),
        SET_DEVICE_STATE_FD => {
            (Payload::DeviceStateParams(DeviceStateParams { direction: 0, phase: 0 }), vec![eventfd()])
        }
    }
}

/// Whether `answer` is `refusal`'s shape (None: the session ended).
fn is_refusal(answer: &Option<Payload>, refusal: Refusal) -> bool {
    match (refusal, answer) {
        (Refusal::Close, None) => true,
        (_, None) => false,
        (Refusal::Ack | Refusal::Status | Refusal::NoSharedObject, Some(p)) => FAILED_CHECK(p),
        (Refusal::EmptyConfig | Refusal::NoUserfaultfd, Some(p)) => *p == Payload::Empty,
        (Refusal::NoInflightBuffer, Some(Payload::Inflight(d))) => d.mmap_size == 0,
        (Refusal::NegativeSessionId, Some(Payload::CryptoSession(c))) => c.session_id < 0,
        (Refusal::DeviceStateError, Some(Payload::U64(v))) => v & 0xff != 0 && v & 0x100 != 0,
        (Refusal::NoShmemRegions, Some(Payload::ShmemConfig(c))) => c.memory_sizes.iter().all(|&s| s == 0),
        _ => false,
    }
}

#[test]
fn the_coverage_table_is_what_the_session_does() {
    let table = coverage();
    assert_eq!(table.len(), FrontendRequest::ALL.len());
    for row in &table {
        let req = row.request;
        for hooks in [true, false] {
            let device = Arc::new(TestDevice { hooks, calls: AtomicUsize::new(0) });
            let mut s = negotiated(&device);
            let (payload, fds) = sample(&mut s, req);
            let answer = ask(&mut s, req, payload, fds);
            let refused = is_refusal(&answer, row.refusal);
            let expect_refused = match (row.offer, row.handling) {
                // Answered although its feature is never offered (GET_VRING_BASE_SKIP_DRAIN).
                (Offer::Never, Handling::Session) => false,
                (Offer::Never, _) | (_, Handling::Refused) => true,
                (Offer::DeviceDeclares, _) => !hooks,
                (Offer::Default, Handling::Device) => !hooks,
                (Offer::Default, Handling::Session) => false,
            };
            // A request the table calls refused is never offered.
            assert!(row.handling != Handling::Refused || row.offer == Offer::Never, "{req}");
            assert_eq!(
                refused, expect_refused,
                "{req} ({:?}, device hooks: {hooks}): answered {answer:?}",
                row.handling
            );
            if row.handling == Handling::Device && hooks && req != FrontendRequest::SET_CONFIG {
                assert!(device.calls.load(Ordering::Relaxed) > 0, "{req}: device hook not reached");
            }
            if answer.is_some() {
                // The session goes on after a refusal.
                assert!(ask(&mut s, FrontendRequest::GET_FEATURES, Payload::Empty, vec![]).is_some(), "{req}");
            }
        }
    }
}

#[test]
fn a_refusal_never_ends_the_session_where_the_spec_has_a_failure_answer() {
    // Every request sent to a session that negotiated nothing but REPLY_ACK: only requests
    // whose mandatory reply has no failure form end it.
    for &req in FrontendRequest::ALL {
        let device = Arc::new(TestDevice { hooks: false, calls: AtomicUsize::new(0) });
        let mut s = Session::new(device);
        assert!(acked(
            &mut s,
            FrontendRequest::SET_PROTOCOL_FEATURES,
            Payload::U64(ProtocolFeatures::REPLY_ACK.bits()),
            vec![]
        ));
        let (payload, fds) = sample(&mut s, req);
        let answer = ask(&mut s, req, payload, fds);
        if answer.is_none() {
            assert_eq!(refusal(req, false), Refusal::Close, "{req} ended the session");
        }
    }
}

#[test]
fn gates_follow_what_was_negotiated() {
    use FrontendRequest::*;
    let device = Arc::new(TestDevice { hooks: false, calls: AtomicUsize::new(0) });
    let mut s = Session::new(device.clone());
    // GET_QUEUE_NUM without MQ: no failure form, the connection is closed.
    assert!(ask(&mut s, GET_QUEUE_NUM, Payload::Empty, vec![]).is_none());
    let mut s = Session::new(device.clone());
    let mq = ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK;
    assert!(acked(&mut s, SET_PROTOCOL_FEATURES, Payload::U64(mq.bits()), vec![]));
    assert_eq!(ask(&mut s, GET_QUEUE_NUM, Payload::Empty, vec![]), Some(Payload::U64(2)));
    // GET_CONFIG without CONFIG: the spec's empty reply, and the session goes on.
    let cfg = Payload::Config(DeviceConfig { offset: 0, flags: 0, data: vec![0; 8] });
    assert_eq!(ask(&mut s, GET_CONFIG, cfg, vec![]), Some(Payload::Empty));
    // INBAND_NOTIFICATIONS is offered only by a device that declares it...
    assert!(!acked(&mut s, SET_PROTOCOL_FEATURES, Payload::U64(ProtocolFeatures::INBAND_NOTIFICATIONS.bits()), vec![]));
    // ...and acked without BACKEND_REQ and REPLY_ACK, the back-end closes the connection.
    let device = Arc::new(TestDevice { hooks: true, calls: AtomicUsize::new(0) });
    let mut s = Session::new(device.clone());
    let bad = ProtocolFeatures::INBAND_NOTIFICATIONS | ProtocolFeatures::REPLY_ACK;
    assert!(ask(&mut s, SET_PROTOCOL_FEATURES, Payload::U64(bad.bits()), vec![]).is_none());
    // §5.4 dependencies: ACCESS_PLATFORM needs BACKEND_REQ and REPLY_ACK.
    let mut s = Session::new(device.clone());
    assert!(acked(&mut s, SET_PROTOCOL_FEATURES, Payload::U64(ProtocolFeatures::REPLY_ACK.bits()), vec![]));
    let iommu = VirtioFeatures::VERSION_1.bits() | VirtioFeatures::ACCESS_PLATFORM.bits();
    assert!(!acked(&mut s, SET_FEATURES, Payload::U64(iommu), vec![]));
    // A feature nobody implements is never offered, even when a device declares it.
    struct Greedy;
    impl Device for Greedy {
        fn num_queues(&self) -> u16 {
            1
        }
        fn features(&self) -> u64 {
            0
        }
        fn protocol_features(&self) -> ProtocolFeatures {
            ProtocolFeatures(u64::MAX >> 40)
        }
        fn process(&self, _: u16, _: &mut AnyDeviceQueue, _: &ChainBatch) -> Result<(), VirtqueueError> {
            Ok(())
        }
    }
    let mut s = Session::new(Arc::new(Greedy));
    let Some(Payload::U64(offered)) = ask(&mut s, GET_PROTOCOL_FEATURES, Payload::Empty, vec![]) else { panic!() };
    assert_eq!(offered & super::NEVER_OFFERED.bits(), 0);
}

#[test]
fn protocol_feature_dependencies_of_section_5_4() {
    use super::session::protocol_dependency_violation as violation;
    use ProtocolFeatures as P;
    assert!(violation(P::REPLY_ACK | P::MQ).is_none());
    for dependant in [P::BACKEND_SEND_FD, P::HOST_NOTIFIER, P::SHARED_OBJECT, P::SHMEM] {
        assert!(violation(dependant).is_some(), "{dependant:?} without BACKEND_REQ");
        assert!(violation(dependant | P::BACKEND_REQ).is_none());
    }
    assert!(violation(P::GET_VRING_BASE_INFLIGHT).is_some());
    assert!(violation(P::GET_VRING_BASE_INFLIGHT | P::INFLIGHT_SHMFD).is_none());
    assert!(violation(P::GET_VRING_BASE_SKIP_DRAIN | P::INFLIGHT_SHMFD).is_some());
    assert!(violation(P::GET_VRING_BASE_SKIP_DRAIN | P::GET_VRING_BASE_INFLIGHT | P::INFLIGHT_SHMFD).is_none());
}

#[test]
fn set_log_base_is_replied_to_only_with_log_shmfd() {
    use FrontendRequest::*;
    let log = || (Payload::LogBase { mmap_size: 4096, mmap_offset: 0 }, vec![memfd(4096)]);
    for (protocol, replied) in [(ProtocolFeatures::empty(), false), (ProtocolFeatures::LOG_SHMFD, true)] {
        let device = Arc::new(TestDevice { hooks: false, calls: AtomicUsize::new(0) });
        let mut s = Session::new(device);
        let set = Message::request(SET_PROTOCOL_FEATURES, Payload::U64(protocol.bits()));
        assert!(s.handle(&set, vec![]).unwrap().is_none());
        let (payload, fds) = log();
        // Without NEED_REPLY: the reply of LOG_SHMFD, nothing otherwise (a front-end without it
        // reads no reply, and an extra one would desynchronise the stream).
        let answer = s.handle(&Message::request(SET_LOG_BASE, payload), fds).unwrap();
        assert_eq!(answer.map(|(m, _)| m.payload), replied.then_some(Payload::U64(0)), "{protocol:?}");
    }
}

#[test]
fn features_ok_is_cleared_after_a_refused_feature_set() {
    use FrontendRequest::*;
    let device = Arc::new(TestDevice { hooks: false, calls: AtomicUsize::new(0) });
    let mut s = Session::new(device);
    let proto = ProtocolFeatures::REPLY_ACK | ProtocolFeatures::STATUS;
    assert!(acked(&mut s, SET_PROTOCOL_FEATURES, Payload::U64(proto.bits()), vec![]));
    // Bit 63 was not offered: refused, and FEATURES_OK does not stick.
    assert!(!acked(&mut s, SET_FEATURES, Payload::U64(1 << 63), vec![]));
    assert!(acked(&mut s, SET_STATUS, Payload::U64(0x0b), vec![]));
    assert_eq!(ask(&mut s, GET_STATUS, Payload::Empty, vec![]), Some(Payload::U64(0x03)));
    // An accepted feature set keeps it.
    assert!(acked(&mut s, SET_FEATURES, Payload::U64(VirtioFeatures::VERSION_1.bits()), vec![]));
    assert!(acked(&mut s, SET_STATUS, Payload::U64(0x0b), vec![]));
    assert_eq!(ask(&mut s, GET_STATUS, Payload::Empty, vec![]), Some(Payload::U64(0x0b)));
}

// ---- Packed rings (VIRTIO_F_RING_PACKED) in a session ----

mod packed {
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::backend::{BackendRequests, Polling, WorkerPolicy};
    use crate::memory::GuestMemory;
    use crate::virtqueue::packed::{packed_queue_region_size, PackedDesc, RingPos, VIRTQ_DESC_F_AVAIL};
    use crate::virtqueue::{PackedBase, PackedDriverQueue};

    /// One queue; fills every writable byte with 0xab and completes, unless told to hold the
    /// chains (a back-end that dies with requests in flight).
    struct Echo {
        hold: AtomicBool,
        /// Chains per batch of a drain.
        batch: usize,
        /// When set: whether this fd was readable as each batch began.
        watch: std::sync::Mutex<Option<OwnedFd>>,
        seen: std::sync::Mutex<Vec<bool>>,
    }

    impl Echo {
        fn new(hold: bool) -> Echo {
            Echo { hold: AtomicBool::new(hold), batch: 64, watch: Default::default(), seen: Default::default() }
        }
    }

    impl Device for Echo {
        fn num_queues(&self) -> u16 {
            1
        }
        fn features(&self) -> u64 {
            VirtioFeatures::VERSION_1.bits()
                | VirtioFeatures::RING_PACKED.bits()
                | VirtioFeatures::EVENT_IDX.bits()
                | VirtioFeatures::INDIRECT_DESC.bits()
        }
        fn drain_batch(&self) -> usize {
            self.batch
        }
        fn process(&self, _: u16, queue: &mut AnyDeviceQueue, batch: &ChainBatch) -> Result<(), VirtqueueError> {
            if let Some(fd) = self.watch.lock().unwrap().as_ref() {
                self.seen.lock().unwrap().push(readable(fd.as_fd(), Duration::ZERO));
            }
            if self.hold.load(Ordering::Relaxed) {
                return Ok(());
            }
            fill_and_complete(queue, batch, 0xab)
        }
    }

    struct Rig {
        mem: Arc<GuestMemory>,
        driver: PackedDriverQueue,
        kick: OwnedFd,
        call: OwnedFd,
        err: OwnedFd,
    }

    const SIZE: u16 = 13; // packed rings need not be powers of two

    fn features(packed: bool) -> u64 {
        let f = VirtioFeatures::VERSION_1.bits()
            | VirtioFeatures::PROTOCOL_FEATURES.bits()
            | VirtioFeatures::EVENT_IDX.bits()
            | VirtioFeatures::INDIRECT_DESC.bits();
        if packed {
            f | VirtioFeatures::RING_PACKED.bits()
        } else {
            f
        }
    }

    fn session(device: &Arc<Echo>, mem: &GuestMemory, packed: bool) -> Session {
        session_with(device, mem, packed, Default::default())
    }

    fn session_with(device: &Arc<Echo>, mem: &GuestMemory, packed: bool, policy: WorkerPolicy) -> Session {
        use FrontendRequest::*;
        let mut s = Session::with_options(device.clone(), Arc::new(BackendRequests::new()), policy);
        let proto = ProtocolFeatures::REPLY_ACK | ProtocolFeatures::INFLIGHT_SHMFD | ProtocolFeatures::STATUS;
        assert!(acked(&mut s, SET_PROTOCOL_FEATURES, Payload::U64(proto.bits()), vec![]));
        assert!(acked(&mut s, SET_FEATURES, Payload::U64(features(packed)), vec![]));
        let (regions, fds): (Vec<_>, Vec<_>) = mem
            .region_fds()
            .into_iter()
            .map(|(d, fd)| {
                let r = MemoryRegion {
                    guest_addr: d.guest_addr,
                    size: d.size,
                    user_addr: d.user_addr,
                    mmap_offset: d.mmap_offset,
                    xen: None,
                };
                (r, fd.try_clone_to_owned().unwrap())
            })
            .unzip();
        assert!(acked(&mut s, SET_MEM_TABLE, Payload::MemoryTable(regions), fds));
        s
    }

    fn rig() -> Rig {
        let mem = Arc::new(GuestMemory::allocate(&[(0, MEM)]).unwrap());
        let driver = PackedDriverQueue::allocate(mem.clone(), SIZE, true, 8).unwrap();
        let fd = || crate::eventfd::new().unwrap(); // non-blocking
        Rig { mem, driver, kick: fd(), call: fd(), err: fd() }
    }

    fn state(num: u32) -> Payload {
        Payload::VringState(VringState { index: 0, num })
    }

    fn addr(desc: u64, driver_event: u64, device_event: u64) -> Payload {
        Payload::VringAddr(VringAddr {
            index: 0,
            flags: 0,
            desc_user_addr: desc,
            used_user_addr: device_event,
            avail_user_addr: driver_event,
            log_guest_addr: 0,
        })
    }

    fn dup(fd: &OwnedFd) -> Vec<OwnedFd> {
        vec![fd.try_clone().unwrap()]
    }

    /// SET_VRING_NUM / BASE / ADDR / CALL / ERR / KICK / ENABLE; whether the kick was acked
    /// (the ring started).
    fn start(s: &mut Session, r: &Rig, base: u32) -> bool {
        start_ring(s, r, SIZE, r.driver.user_addrs(), base)
    }

    /// [`start`] for a ring of `size` at `addrs` (desc, driver area, device area).
    fn start_ring(s: &mut Session, r: &Rig, size: u16, addrs: (u64, u64, u64), base: u32) -> bool {
        use FrontendRequest::*;
        let (desc, driver_event, device_event) = addrs;
        let fd = Payload::VringFd(VringFd { index: 0, nofd: false });
        assert!(acked(s, SET_VRING_NUM, state(u32::from(size)), vec![]));
        assert!(acked(s, SET_VRING_BASE, state(base), vec![]));
        assert!(acked(s, SET_VRING_ADDR, addr(desc, driver_event, device_event), vec![]));
        assert!(acked(s, SET_VRING_CALL, fd.clone(), dup(&r.call)));
        assert!(acked(s, SET_VRING_ERR, fd.clone(), dup(&r.err)));
        let started = acked(s, SET_VRING_KICK, fd, dup(&r.kick));
        assert!(acked(s, SET_VRING_ENABLE, state(1), vec![]));
        started
    }

    fn readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) == 1 }
    }

    /// Kicks and waits until `n` completions are reaped.
    fn run(r: &mut Rig, n: usize) -> Vec<(u16, u32)> {
        r.driver.publish();
        crate::eventfd::signal(r.kick.as_fd()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut used = Vec::new();
        while used.len() < n {
            assert!(Instant::now() < deadline, "only {} of {n} completions", used.len());
            r.driver.reap(&mut used, 64).unwrap();
            if used.len() < n {
                // The call eventfd is blocking: read it only when it has something.
                if readable(r.call.as_fd(), Duration::from_millis(10)) {
                    crate::eventfd::drain(r.call.as_fd());
                }
            }
        }
        used
    }

    #[test]
    fn a_packed_ring_runs_and_its_base_round_trips() {
        use FrontendRequest::*;
        let device = Arc::new(Echo::new(false));
        let mut r = rig();
        let mut s = session(&device, &r.mem, true);
        assert!(start(&mut s, &r, PackedBase::START.encode()));
        let buf = r.mem.alloc(4096, 64).unwrap();
        // 3 rounds of (direct 3-slot list + indirect list) on a 13-slot ring: past its end.
        for _ in 0..3 {
            let a = r.driver.add(&[(buf, 16)], &[(buf + 64, 100), (buf + 256, 1)]).unwrap();
            let b = r.driver.add_indirect(&[(buf, 16)], &[(buf + 512, 8)]).unwrap();
            let mut used = run(&mut r, 2);
            used.sort_unstable();
            let mut want = vec![(a, 101), (b, 8)];
            want.sort_unstable();
            assert_eq!(used, want);
        }
        let mut back = [0u8; 8];
        r.mem.table().read(buf + 512, &mut back).unwrap();
        assert_eq!(back, [0xab; 8]);
        // GET_VRING_BASE: both positions with their wrap counters (12 slots: still lap 1).
        let Some(Payload::VringState(v)) = ask(&mut s, GET_VRING_BASE, state(0), vec![]) else { panic!() };
        let base = PackedBase::decode(v.num);
        assert_eq!(base.avail, RingPos { index: 12, wrap: true });
        assert_eq!(base.used, base.avail);
        assert_eq!(base.avail, r.driver.next_avail());
        // SET_VRING_BASE with it: the ring resumes there and wraps.
        assert!(start(&mut s, &r, v.num));
        for _ in 0..4 {
            let a = r.driver.add(&[(buf, 16)], &[(buf + 64, 10)]).unwrap();
            assert_eq!(run(&mut r, 1), vec![(a, 10)]);
        }
        let Some(Payload::VringState(v)) = ask(&mut s, GET_VRING_BASE, state(0), vec![]) else { panic!() };
        // 12 + 4 × 2 slots = 20 = one lap of 13 and 7.
        let pos = RingPos { index: 7, wrap: false };
        assert_eq!(v.num, PackedBase { avail: pos, used: pos }.encode());
        assert_eq!(v.num, 7 | 7 << 16);
        assert!(!readable(r.err.as_fd(), Duration::ZERO), "no ring error");
    }

    /// A ring of 8 (split or packed, EVENT_IDX) in `r`'s memory, started on ring 0 of `s`.
    fn ring_of_8(s: &mut Session, r: &Rig, packed: bool) -> crate::virtqueue::AnyDriverQueue {
        use crate::virtqueue::{AnyDriverQueue, DriverQueue};
        let (driver, base) = if packed {
            let q = PackedDriverQueue::allocate(r.mem.clone(), 8, true, 0).unwrap();
            (AnyDriverQueue::Packed(q), PackedBase::START.encode())
        } else {
            (AnyDriverQueue::Split(DriverQueue::allocate(r.mem.clone(), 8, true, 0).unwrap()), 0)
        };
        assert!(start_ring(s, r, 8, driver.user_addrs(), base));
        driver
    }

    /// Reaps `driver` until `n` completions came (5 s at most), without waiting on the call fd.
    fn wait_used(driver: &mut crate::virtqueue::AnyDriverQueue, n: usize) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut used = Vec::new();
        while used.len() < n {
            assert!(Instant::now() < deadline, "only {} of {n} completions", used.len());
            driver.reap(&mut used, 64).unwrap();
            std::thread::yield_now();
        }
        used
    }

    /// A driver asleep on its call eventfd hears of each batch's completions before the device
    /// starts on the next batch, not once the whole ring is done (Device::drain_batch).
    #[test]
    fn each_batch_of_a_drain_is_notified_before_the_next_is_processed() {
        for packed in [false, true] {
            let device = Arc::new(Echo { batch: 2, ..Echo::new(false) });
            let r = rig();
            let mut s = session(&device, &r.mem, packed);
            let mut driver = ring_of_8(&mut s, &r, packed);
            *device.watch.lock().unwrap() = Some(r.call.try_clone().unwrap());
            let buf = r.mem.alloc(4096, 64).unwrap();
            for i in 0..4 {
                driver.add(&[(buf, 16)], &[(buf + 64 * (i + 1), 8)]).unwrap();
            }
            driver.publish();
            crate::eventfd::signal(r.kick.as_fd()).unwrap();
            assert_eq!(wait_used(&mut driver, 4).len(), 4);
            // The first batch found nothing signalled yet, the second found the first's call.
            assert_eq!(*device.seen.lock().unwrap(), [false, true], "packed: {packed}");
        }
    }

    /// While its thread polls the avail ring the driver is not asked to kick (no system call
    /// per request on its side); once the thread stops polling, kicks are re-armed before it
    /// sleeps, so the next request asks for one and is served after it.
    #[test]
    fn a_polling_thread_takes_requests_without_kicks_and_rearms_them_before_sleeping() {
        for packed in [false, true] {
            for window in [Duration::from_secs(30), Duration::from_millis(1)] {
                let device = Arc::new(Echo::new(false));
                let r = rig();
                let policy = WorkerPolicy { poll: Polling::Fixed(window), ..Default::default() };
                let mut s = session_with(&device, &r.mem, packed, policy);
                let mut driver = ring_of_8(&mut s, &r, packed);
                let buf = r.mem.alloc(4096, 64).unwrap();
                let mut kicks = Vec::new();
                for round in 0..4 {
                    if window < Duration::from_millis(10) {
                        // Well past the window: the thread is asleep on the kick.
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    let head = driver.add(&[(buf, 16)], &[(buf + 64, 8)]).unwrap();
                    driver.publish();
                    let kick = driver.kick_needed().unwrap();
                    kicks.push(kick);
                    if kick || round == 0 {
                        crate::eventfd::signal(r.kick.as_fd()).unwrap();
                    }
                    assert_eq!(wait_used(&mut driver, 1), [(head, 8)], "round {round}, packed: {packed}");
                }
                let want = if window > Duration::from_secs(1) { [false; 3] } else { [true; 3] };
                assert_eq!(kicks[1..], want, "packed: {packed}, window {window:?}");
                // A ring taken off its thread (GET_VRING_BASE) is handed back with kicks armed:
                // whoever drives it next is told of new chains.
                assert!(ask(&mut s, FrontendRequest::GET_VRING_BASE, state(0), vec![]).is_some());
                driver.add(&[(buf, 16)], &[(buf + 64, 8)]).unwrap();
                driver.publish();
                assert!(driver.kick_needed().unwrap(), "packed: {packed}, window {window:?}");
            }
        }
    }

    #[test]
    fn packed_sizes_addresses_and_bases_are_checked() {
        use FrontendRequest::*;
        let device = Arc::new(Echo::new(false));
        let r = rig();
        // A split ring must be a power of two; a packed one need not.
        let mut split = session(&device, &r.mem, false);
        assert!(!acked(&mut split, SET_VRING_NUM, state(13), vec![]));
        let mut s = session(&device, &r.mem, true);
        assert!(acked(&mut s, SET_VRING_NUM, state(13), vec![]));
        assert!(!acked(&mut s, SET_VRING_NUM, state(0), vec![]));
        assert!(!acked(&mut s, SET_VRING_NUM, state(1025), vec![]), "beyond the device's maximum");
        let (desc, drv, dev) = r.driver.user_addrs();
        let fd = Payload::VringFd(VringFd { index: 0, nofd: false });
        // virtio 1.2 §2.8.10: descriptor ring 16-byte aligned, event areas 4-byte aligned.
        for (what, a) in [
            ("desc misaligned", addr(desc + 8, drv, dev)),
            ("driver event misaligned", addr(desc, drv + 2, dev)),
            ("device event misaligned", addr(desc, drv, dev + 2)),
            ("desc outside memory", addr(0x10, drv, dev)),
        ] {
            let mut s = session(&device, &r.mem, true);
            assert!(acked(&mut s, SET_VRING_NUM, state(u32::from(SIZE)), vec![]));
            assert!(acked(&mut s, SET_VRING_ADDR, a, vec![]));
            assert!(!acked(&mut s, SET_VRING_KICK, fd.clone(), dup(&r.kick)), "{what}");
        }
        // Positions beyond the ring in either half of the base.
        for bad in [13, 13 << 16, 0x7fff | 0x8000] {
            let mut s = session(&device, &r.mem, true);
            assert!(!start(&mut s, &r, bad), "base {bad:#x}");
        }
        let mut s = session(&device, &r.mem, true);
        assert!(start(&mut s, &r, PackedBase::START.encode()));
    }

    #[test]
    fn a_base_with_only_the_avail_half_resumes_there() {
        // DPDK's virtio_user: SET_VRING_BASE 0x8000 for a fresh ring, and the avail half only
        // after a stop; the used position is the avail one (a stopped ring completed all).
        let device = Arc::new(Echo::new(false));
        let mut r = rig();
        let mut s = session(&device, &r.mem, true);
        assert!(start(&mut s, &r, 0x8000));
        let buf = r.mem.alloc(64, 64).unwrap();
        for _ in 0..9 {
            let a = r.driver.add(&[(buf, 8)], &[(buf + 8, 8)]).unwrap();
            assert_eq!(run(&mut r, 1), vec![(a, 8)]);
        }
        let Some(Payload::VringState(v)) = ask(&mut s, FrontendRequest::GET_VRING_BASE, state(0), vec![]) else {
            panic!()
        };
        // 18 slots of 13: slot 5 of lap 2 (wrap counter 0).
        assert_eq!(v.num, 5 | 5 << 16);
        assert!(start(&mut s, &r, v.num & 0xffff));
        for _ in 0..9 {
            let a = r.driver.add(&[(buf, 8)], &[(buf + 8, 8)]).unwrap();
            assert_eq!(run(&mut r, 1), vec![(a, 8)]);
        }
    }

    #[test]
    fn dirty_logging_covers_packed_used_descriptors_event_area_and_buffers() {
        use crate::memory::{DirtyLog, LOG_PAGE_SIZE};
        use FrontendRequest::*;
        let device = Arc::new(Echo::new(false));
        let mut r = rig();
        let mut s = Session::new(device.clone());
        let proto = ProtocolFeatures::REPLY_ACK | ProtocolFeatures::LOG_SHMFD;
        assert!(acked(&mut s, SET_PROTOCOL_FEATURES, Payload::U64(proto.bits()), vec![]));
        let f = features(true) | VirtioFeatures::LOG_ALL.bits();
        assert!(acked(&mut s, SET_FEATURES, Payload::U64(f), vec![]));
        let (d, fd) = r.mem.region_fds().remove(0);
        let region =
            MemoryRegion { guest_addr: d.guest_addr, size: d.size, user_addr: d.user_addr, mmap_offset: 0, xen: None };
        let table = Payload::MemoryTable(vec![region]);
        assert!(acked(&mut s, SET_MEM_TABLE, table, vec![fd.try_clone_to_owned().unwrap()]));
        let log = DirtyLog::allocate(MEM).unwrap();
        let log_fd = log.fd().unwrap().try_clone_to_owned().unwrap();
        let reply = ask(&mut s, SET_LOG_BASE, Payload::LogBase { mmap_size: log.size(), mmap_offset: 0 }, vec![log_fd]);
        assert_eq!(reply, Some(Payload::U64(0)));
        let ring = r.driver.ring();
        let (desc, drv, dev) = r.driver.user_addrs();
        let fdp = Payload::VringFd(VringFd { index: 0, nofd: false });
        assert!(acked(&mut s, SET_VRING_NUM, state(u32::from(SIZE)), vec![]));
        assert!(acked(&mut s, SET_VRING_BASE, state(PackedBase::START.encode()), vec![]));
        // VHOST_VRING_F_LOG with log_guest_addr = the device event area's guest address, as
        // QEMU sends it for a packed ring.
        let a = VringAddr {
            index: 0,
            flags: crate::protocol::VRING_F_LOG,
            desc_user_addr: desc,
            used_user_addr: dev,
            avail_user_addr: drv,
            log_guest_addr: ring.device_event,
        };
        assert!(acked(&mut s, SET_VRING_ADDR, Payload::VringAddr(a), vec![]));
        assert!(acked(&mut s, SET_VRING_CALL, fdp.clone(), dup(&r.call)));
        assert!(acked(&mut s, SET_VRING_KICK, fdp, dup(&r.kick)));
        assert!(acked(&mut s, SET_VRING_ENABLE, state(1), vec![]));
        let buf = r.mem.alloc(3 * LOG_PAGE_SIZE, LOG_PAGE_SIZE).unwrap();
        log.take_dirty();
        let id = r.driver.add(&[(buf, 16)], &[(buf + 2 * LOG_PAGE_SIZE, 64)]).unwrap();
        assert_eq!(run(&mut r, 1), vec![(id, 64)]);
        let page = |gpa: u64| gpa / LOG_PAGE_SIZE;
        let dirty = log.take_dirty();
        assert!(dirty.contains(&page(buf + 2 * LOG_PAGE_SIZE)), "the written buffer: {dirty:?}");
        assert!(!dirty.contains(&page(buf)), "the read-only buffer: {dirty:?}");
        assert!(dirty.contains(&page(ring.desc)), "the used descriptor: {dirty:?}");
        assert!(dirty.contains(&page(ring.device_event)), "the device event area: {dirty:?}");
    }

    #[test]
    fn a_hostile_packed_ring_breaks_cleanly() {
        use FrontendRequest::*;
        let device = Arc::new(Echo::new(false));
        let mut r = rig();
        let mut s = session(&device, &r.mem, true);
        assert!(acked(&mut s, SET_STATUS, Payload::U64(0x0f), vec![]));
        assert!(start(&mut s, &r, PackedBase::START.encode()));
        let buf = r.mem.alloc(64, 64).unwrap();
        let a = r.driver.add(&[(buf, 8)], &[]).unwrap();
        assert_eq!(run(&mut r, 1), vec![(a, 0)]);
        // The driver makes a descriptor available with a buffer id beyond the ring.
        let slot = r.driver.next_avail();
        let bad = PackedDesc { addr: buf, len: 8, id: SIZE + 3, flags: PackedDesc::avail_flags(0, slot.wrap) };
        assert_eq!(bad.flags & VIRTQ_DESC_F_AVAIL != 0, slot.wrap);
        let gpa = r.driver.ring().desc + u64::from(slot.index) * 16;
        r.mem.table().write(gpa, &bad.to_bytes()).unwrap();
        crate::eventfd::signal(r.kick.as_fd()).unwrap();
        assert!(readable(r.err.as_fd(), Duration::from_secs(5)), "the error fd was not signalled");
        // DEVICE_NEEDS_RESET is set right after the error fd is written.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let Some(Payload::U64(status)) = ask(&mut s, GET_STATUS, Payload::Empty, vec![]) else { panic!() };
            if status & 0x40 != 0 {
                break;
            }
            assert!(Instant::now() < deadline, "DEVICE_NEEDS_RESET was not set");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The session goes on: the ring can be set up again.
        let Some(Payload::VringState(_)) = ask(&mut s, GET_VRING_BASE, state(0), vec![]) else { panic!() };
        // The driver withdraws the bad descriptor (flags 0 read as available on neither lap)
        // before restarting: a worker polling the restarted ring before the driver's next list
        // overwrites the slot would otherwise pop the bad id again.
        r.mem.table().write(gpa, &[0u8; 16]).unwrap();
        // From where the driver is: its next list overwrites that slot.
        let pos = r.driver.next_avail();
        assert!(start(&mut s, &r, PackedBase { avail: pos, used: pos }.encode()));
        let b = r.driver.add(&[(buf, 8)], &[]).unwrap();
        assert_eq!(run(&mut r, 1), vec![(b, 0)]);
    }

    #[test]
    fn packed_inflight_buffer_resubmits_after_a_back_end_restart() {
        use FrontendRequest::*;
        let device = Arc::new(Echo::new(true));
        let mut r = rig();
        let mut s = session(&device, &r.mem, true);
        let ask_fd = Payload::Inflight(InflightDesc { mmap_size: 0, mmap_offset: 0, num_queues: 1, queue_size: SIZE });
        let message = Message::request(GET_INFLIGHT_FD, ask_fd).with_need_reply();
        let Ok(Some((reply, mut fds))) = s.handle(&message, vec![]) else { panic!() };
        let Payload::Inflight(desc) = reply.payload else { panic!() };
        // The packed layout's size (32-byte header, 32 bytes per descriptor, cache lines).
        assert_eq!(desc.mmap_size, packed_queue_region_size(SIZE));
        assert_eq!(desc.mmap_size, 448);
        let inflight = fds.pop().unwrap();
        assert!(acked(&mut s, SET_INFLIGHT_FD, Payload::Inflight(desc), dup(&inflight)));
        assert!(start(&mut s, &r, PackedBase::START.encode()));
        let buf = r.mem.alloc(4096, 64).unwrap();
        let ids: Vec<u16> = (0..3).map(|i| r.driver.add(&[(buf, 16)], &[(buf + 64 * (i + 1), 32)]).unwrap()).collect();
        r.driver.publish();
        crate::eventfd::signal(r.kick.as_fd()).unwrap();
        // Wait until the device popped them (the avail position moves in GET_VRING_BASE's
        // answer only after a stop, so look at the device event area instead: with EVENT_IDX
        // the device re-arms at its next available slot, 3 lists × 2 slots).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut ev = [0u8; 4];
            r.mem.table().read(r.driver.ring().device_event, &mut ev).unwrap();
            if u16::from_le_bytes([ev[0], ev[1]]) & 0x7fff == 6 {
                break;
            }
            assert!(Instant::now() < deadline, "the device did not pop the requests");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The back-end "crashes": its session ends with the requests in flight.
        drop(s);
        device.hold.store(false, Ordering::Relaxed);
        // A new back-end: the front-end hands the buffer back and, not knowing better, a base
        // from before (a fresh ring's).
        let mut s = session(&device, &r.mem, true);
        assert!(acked(&mut s, SET_INFLIGHT_FD, Payload::Inflight(desc), vec![inflight]));
        assert!(start(&mut s, &r, PackedBase::START.encode()));
        crate::eventfd::signal(r.kick.as_fd()).unwrap();
        let mut used = run(&mut r, 3);
        used.sort_unstable();
        assert_eq!(used, ids.iter().map(|&id| (id, 32)).collect::<Vec<_>>());
        // Nothing twice, and new requests go on from there.
        let d = r.driver.add(&[(buf, 16)], &[(buf + 512, 4)]).unwrap();
        assert_eq!(run(&mut r, 1), vec![(d, 4)]);
        // A split-layout buffer is refused for a packed ring (and the other way round).
        let mut split = session(&device, &r.mem, false);
        let message = Message::request(
            GET_INFLIGHT_FD,
            Payload::Inflight(InflightDesc { num_queues: 1, queue_size: 16, ..desc }),
        )
        .with_need_reply();
        let Ok(Some((reply, _))) = split.handle(&message, vec![]) else { panic!() };
        let Payload::Inflight(split_desc) = reply.payload else { panic!() };
        assert_eq!(split_desc.mmap_size, crate::virtqueue::queue_region_size(16));
    }
}

// ---- ACCESS_PLATFORM: IOTLB MISS / UPDATE / INVALIDATE interleavings on a running ring ----

/// The front-end played message by message: the test answers the back-end's MISSes itself, in
/// the orders a front-end may choose (protocol.md §4.3, §6.6).
mod iotlb {
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::connection::Deadline;
    use crate::memory::GuestMemory;
    use crate::protocol::{BackendRequest, Channel, Request};
    use crate::virtqueue::DriverQueue;

    /// IOVA = guest address + this: an IOVA taken for a guest or user address finds nothing.
    const IOVA: u64 = 0x7_0000_0000;
    const PAGE: u64 = 4096;
    const SIZE: u16 = 16;

    /// One queue; fills every writable byte with 0x5a and completes.
    struct Fill;

    impl Device for Fill {
        fn num_queues(&self) -> u16 {
            1
        }
        fn features(&self) -> u64 {
            VirtioFeatures::VERSION_1.bits()
        }
        fn process(&self, _: u16, queue: &mut AnyDeviceQueue, batch: &ChainBatch) -> Result<(), VirtqueueError> {
            fill_and_complete(queue, batch, 0x5a)
        }
    }

    struct Rig {
        s: Session,
        mem: Arc<GuestMemory>,
        user_base: u64,
        driver: DriverQueue,
        /// The front-end's end of the back-end request channel.
        channel: Connection,
        kick: OwnedFd,
        call: OwnedFd,
        /// The IOVA pages of the ring parts.
        ring_pages: (u64, u64),
        /// MISSes received with NEED_REPLY and not acked yet.
        ack_due: usize,
    }

    fn iotlb(s: &mut Session, msg: IotlbMsg) -> bool {
        acked(s, FrontendRequest::IOTLB_MSG, Payload::Iotlb(msg), vec![])
    }

    impl Rig {
        /// ACCESS_PLATFORM negotiated, the ring's pages mapped, the ring started.
        fn new() -> Rig {
            use FrontendRequest::*;
            let mut s = Session::new(Arc::new(Fill));
            let proto = ProtocolFeatures::REPLY_ACK | ProtocolFeatures::BACKEND_REQ;
            assert!(acked(&mut s, SET_PROTOCOL_FEATURES, Payload::U64(proto.bits()), vec![]));
            let features = VirtioFeatures::VERSION_1.bits()
                | VirtioFeatures::PROTOCOL_FEATURES.bits()
                | VirtioFeatures::ACCESS_PLATFORM.bits();
            assert!(acked(&mut s, SET_FEATURES, Payload::U64(features), vec![]));
            let mem = Arc::new(GuestMemory::allocate(&[(0, MEM)]).unwrap());
            let (desc, fd) = mem.region_fds().remove(0);
            let region = MemoryRegion {
                guest_addr: desc.guest_addr,
                size: desc.size,
                user_addr: desc.user_addr,
                mmap_offset: desc.mmap_offset,
                xen: None,
            };
            let fd = fd.try_clone_to_owned().unwrap();
            assert!(acked(&mut s, SET_MEM_TABLE, Payload::MemoryTable(vec![region]), vec![fd]));
            let (ours, theirs) = Connection::pair().unwrap();
            assert!(acked(&mut s, SET_BACKEND_REQ_FD, Payload::Empty, vec![theirs.into_fd()]));
            let driver = DriverQueue::allocate(mem.clone(), SIZE, false, 0).unwrap();
            let ring = driver.ring();
            let ring_pages = (ring.desc & !(PAGE - 1), (ring.used + 8 + 8 * u64::from(SIZE) + PAGE) & !(PAGE - 1));
            let fd = || crate::eventfd::new().unwrap();
            let mut r = Rig {
                s,
                mem,
                user_base: desc.user_addr,
                driver,
                channel: ours,
                kick: fd(),
                call: fd(),
                ring_pages,
                ack_due: 0,
            };
            let mut page = ring_pages.0;
            while page < ring_pages.1 {
                r.update(page);
                page += PAGE;
            }
            let state = |num| Payload::VringState(VringState { index: 0, num });
            let addr = VringAddr {
                index: 0,
                flags: 0,
                desc_user_addr: ring.desc + IOVA,
                used_user_addr: ring.used + IOVA,
                avail_user_addr: ring.avail + IOVA,
                log_guest_addr: 0,
            };
            let vfd = Payload::VringFd(VringFd { index: 0, nofd: false });
            let s = &mut r.s;
            assert!(acked(s, SET_VRING_NUM, state(u32::from(SIZE)), vec![]));
            assert!(acked(s, SET_VRING_BASE, state(0), vec![]));
            assert!(acked(s, SET_VRING_ADDR, Payload::VringAddr(addr), vec![]));
            assert!(acked(s, SET_VRING_CALL, vfd.clone(), vec![r.call.try_clone().unwrap()]));
            assert!(acked(s, SET_VRING_KICK, vfd, vec![r.kick.try_clone().unwrap()]));
            assert!(acked(s, SET_VRING_ENABLE, state(1), vec![]));
            r
        }

        /// UPDATE: the guest page at `gpa` read-write at its IOVA.
        fn update(&mut self, gpa: u64) {
            let msg =
                IotlbMsg { iova: gpa + IOVA, size: PAGE, uaddr: self.user_base + gpa, perm: 3, kind: IotlbMsg::UPDATE };
            assert!(iotlb(&mut self.s, msg));
        }

        /// The next MISS on the back-end request channel: (iova, perm), or None within `timeout`.
        /// A MISS with NEED_REPLY is remembered: [`answer`](Self::answer) acks it.
        fn miss(&mut self, timeout: Duration) -> Option<(u64, u8)> {
            if !self.channel.readable(Some(timeout)).unwrap() {
                return None;
            }
            let got = self.channel.recv(Channel::Backend, Deadline::after(Some(Duration::from_secs(1)))).unwrap();
            assert_eq!(got.message.request, Request::Backend(BackendRequest::IOTLB_MSG));
            let Payload::Iotlb(m) = got.message.payload else { panic!("{:?}", got.message) };
            assert_eq!(m.kind, IotlbMsg::MISS);
            self.ack_due += usize::from(got.message.need_reply());
            Some((m.iova, m.perm))
        }

        /// Answers a MISS as QEMU does: the UPDATE of its page on the main channel, then the
        /// ack on the back-end request channel if it asked for one.
        fn answer(&mut self, iova: u64) {
            self.update((iova - IOVA) & !(PAGE - 1));
            if self.ack_due > 0 {
                self.ack_due -= 1;
                let ack = Message::reply(BackendRequest::IOTLB_MSG, Payload::U64(0));
                self.channel.send(&ack, &[], Deadline::after(Some(Duration::from_secs(1)))).unwrap();
            }
        }

        /// A request with one writable buffer of `len` bytes at guest address `buf` (kicked).
        fn submit(&mut self, buf: u64, len: u32) -> u16 {
            let head = self.driver.add(&[], &[(buf + IOVA, len)]).unwrap();
            self.driver.publish();
            crate::eventfd::signal(self.kick.as_fd()).unwrap();
            head
        }

        /// Answers every MISS with the UPDATE of its page until a request completes; the used
        /// entries seen within 5 s.
        fn serve_until_used(&mut self) -> Vec<(u16, u32)> {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut used = Vec::new();
            while used.is_empty() && Instant::now() < deadline {
                if let Some((iova, _)) = self.miss(Duration::from_millis(10)) {
                    self.answer(iova);
                }
                self.driver.reap(&mut used, 64).unwrap();
            }
            // Nothing more comes: a request is completed once.
            std::thread::sleep(Duration::from_millis(50));
            self.driver.reap(&mut used, 64).unwrap();
            used
        }
    }

    /// QEMU's order behind a vIOMMU (iommu.strict=1): the guest's unmap reaches the front-end
    /// while the ring's MISS for a buffer is unanswered, and the front-end sends the INVALIDATE,
    /// and waits for its answer, before it reads the back-end request channel. The INVALIDATE
    /// covers the ring's own pages, so the session must take the ring off its worker: that must
    /// not wait for the MISS's answer (it waited 5 s for a REPLY_ACK that could not come, then
    /// closed the back-end request channel and broke the ring).
    #[test]
    fn an_invalidate_of_the_ring_while_a_buffer_miss_is_unanswered_is_answered_at_once() {
        let mut r = Rig::new();
        let buf = r.mem.alloc(PAGE, PAGE).unwrap();
        let head = r.submit(buf, 64);
        assert_eq!(r.miss(Duration::from_secs(5)), Some((buf + IOVA, 2)));
        let (lo, hi) = r.ring_pages;
        let started = Instant::now();
        let invalidate = IotlbMsg { iova: lo + IOVA, size: hi - lo, uaddr: 0, perm: 0, kind: IotlbMsg::INVALIDATE };
        assert!(iotlb(&mut r.s, invalidate));
        let took = started.elapsed();
        assert!(took < Duration::from_millis(500), "the INVALIDATE waited {took:?} for the worker");
        // The front-end now answers what was asked (the buffer, then the ring's pages again):
        // the request completes once, with what the device wrote.
        assert_eq!(r.serve_until_used(), vec![(head, 64)]);
        let mut back = [0u8; 64];
        r.mem.table().read(buf, &mut back).unwrap();
        assert_eq!(back, [0x5a; 64]);
        // The back-end request channel still works: the next request asks and completes.
        let buf2 = r.mem.alloc(PAGE, PAGE).unwrap();
        let head2 = r.submit(buf2, 8);
        assert_eq!(r.serve_until_used(), vec![(head2, 8)]);
    }

    /// A guest in strict mode unmaps each buffer after its request and reuses the IOVA for the
    /// next one: every request misses on the same address, each MISS answered. Only unanswered
    /// MISSes may count towards giving the ring up (they all counted: the 4th request broke it).
    #[test]
    fn an_iova_mapped_used_and_invalidated_over_and_over_keeps_the_ring_running() {
        let mut r = Rig::new();
        let buf = r.mem.alloc(PAGE, PAGE).unwrap();
        for round in 0..6 {
            let head = r.submit(buf, 16);
            assert_eq!(r.serve_until_used(), vec![(head, 16)], "round {round}");
            let invalidate = IotlbMsg { iova: buf + IOVA, size: PAGE, uaddr: 0, perm: 0, kind: IotlbMsg::INVALIDATE };
            assert!(iotlb(&mut r.s, invalidate));
        }
    }

    /// A MISS left unanswered is sent again; the chain stays on the ring (not used, not lost)
    /// and completes once the UPDATE comes.
    #[test]
    fn an_unanswered_miss_is_asked_again_and_the_request_completes_once() {
        let mut r = Rig::new();
        let buf = r.mem.alloc(PAGE, PAGE).unwrap();
        let head = r.submit(buf, 32);
        assert_eq!(r.miss(Duration::from_secs(5)), Some((buf + IOVA, 2)));
        let asked = Instant::now();
        assert_eq!(r.miss(Duration::from_secs(5)), Some((buf + IOVA, 2)), "asked again");
        assert!(asked.elapsed() >= Duration::from_millis(900), "asked again after {:?}", asked.elapsed());
        let mut used = Vec::new();
        r.driver.reap(&mut used, 64).unwrap();
        assert!(used.is_empty());
        r.answer(buf + IOVA);
        assert_eq!(r.serve_until_used(), vec![(head, 32)]);
    }
}
