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
