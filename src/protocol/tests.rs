//! Round trips of every request and reply, every validation rule, and golden bytes from real
//! peers.

use super::*;

fn region(gpa: u64) -> MemoryRegion {
    MemoryRegion { guest_addr: gpa, size: 0x10_0000, user_addr: 0x7f00_0000_0000 + gpa, mmap_offset: 0, xen: None }
}

/// A valid request payload and fd count for every front-end request.
pub(crate) fn sample_frontend_request(r: FrontendRequest) -> (Payload, usize) {
    use FrontendRequest::*;
    let state = |index, num| Payload::VringState(VringState { index, num });
    match r {
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
        | CHECK_DEVICE_STATE
        | GET_SHMEM_CONFIG => (Payload::Empty, 0),
        SET_LOG_FD | SET_BACKEND_REQ_FD | GPU_SET_SOCKET => (Payload::Empty, 1),
        SET_FEATURES => (Payload::U64(0x1_7500_7e46), 0),
        SET_PROTOCOL_FEATURES => (Payload::U64(0x8f2b), 0),
        SEND_RARP => (Payload::U64(0x5254_0012_3456), 0),
        NET_SET_MTU => (Payload::U64(1500), 0),
        CLOSE_CRYPTO_SESSION => (Payload::U64(7), 0),
        SET_STATUS => (Payload::U64(0xf), 0),
        SET_MEM_TABLE => (Payload::MemoryTable(vec![region(0), region(0x1_0000_0000)]), 2),
        SET_LOG_BASE => (Payload::LogBase { mmap_size: 4096, mmap_offset: 0 }, 1),
        SET_VRING_NUM => (state(1, 256), 0),
        SET_VRING_BASE => (state(1, 17), 0),
        GET_VRING_BASE | GET_VRING_BASE_SKIP_DRAIN | VRING_KICK => (state(1, 0), 0),
        SET_VRING_ENABLE => (state(1, 1), 0),
        SET_VRING_ENDIAN => (state(0, 1), 0),
        SET_VRING_ADDR => (
            Payload::VringAddr(VringAddr {
                index: 1,
                flags: VRING_F_LOG,
                desc_user_addr: 0x1000,
                used_user_addr: 0x3000,
                avail_user_addr: 0x2000,
                log_guest_addr: 0x3000,
            }),
            0,
        ),
        SET_VRING_KICK => (Payload::VringFd(VringFd { index: 2, nofd: false }), 1),
        SET_VRING_CALL => (Payload::VringFd(VringFd { index: 2, nofd: true }), 0),
        SET_VRING_ERR => (Payload::VringFd(VringFd { index: 255, nofd: false }), 1),
        IOTLB_MSG => (
            Payload::Iotlb(IotlbMsg {
                iova: 0x1000,
                size: 0x2000,
                uaddr: 0x7f00_0000,
                perm: 3,
                kind: IotlbMsg::UPDATE,
            }),
            0,
        ),
        GET_CONFIG => (Payload::Config(DeviceConfig { offset: 0, flags: 0, data: vec![0; 60] }), 0),
        SET_CONFIG => (Payload::Config(DeviceConfig { offset: 20, flags: 1, data: vec![1, 2, 3] }), 0),
        CREATE_CRYPTO_SESSION => {
            (Payload::CryptoSession(CryptoSession { op_code: 2, params: vec![9; 1056], session_id: -1 }), 0)
        }
        GET_INFLIGHT_FD => {
            (Payload::Inflight(InflightDesc { num_queues: 2, queue_size: 128, ..Default::default() }), 0)
        }
        SET_INFLIGHT_FD => {
            (Payload::Inflight(InflightDesc { mmap_size: 8192, mmap_offset: 0, num_queues: 2, queue_size: 128 }), 1)
        }
        ADD_MEM_REG => (Payload::SingleRegion(region(0x4000_0000)), 1),
        REM_MEM_REG => (Payload::SingleRegion(region(0x4000_0000)), 0),
        GET_SHARED_OBJECT => (Payload::Shared(*b"0123456789abcdef"), 0),
        SET_DEVICE_STATE_FD => {
            (Payload::DeviceStateParams(DeviceStateParams { direction: DeviceStateParams::LOAD, phase: 0 }), 1)
        }
    }
}

/// A valid reply payload and fd count for every front-end request (its ack if it has no reply).
pub(crate) fn sample_frontend_reply(r: FrontendRequest) -> (Payload, usize) {
    use FrontendRequest::*;
    match r {
        GET_FEATURES => (Payload::U64(0x1_7500_7e46), 0),
        GET_PROTOCOL_FEATURES => (Payload::U64(0x8f2b), 0),
        GET_QUEUE_NUM => (Payload::U64(2), 0),
        GET_MAX_MEM_SLOTS => (Payload::U64(509), 0),
        GET_STATUS => (Payload::U64(0xf), 0),
        GET_VRING_BASE | GET_VRING_BASE_SKIP_DRAIN => (Payload::VringState(VringState { index: 1, num: 300 }), 0),
        GET_CONFIG => (Payload::Config(DeviceConfig { offset: 0, flags: 0, data: vec![7; 60] }), 0),
        CREATE_CRYPTO_SESSION => {
            (Payload::CryptoSession(CryptoSession { op_code: 2, params: vec![0; 1056], session_id: 5 }), 0)
        }
        POSTCOPY_ADVISE => (Payload::Empty, 1),
        GET_INFLIGHT_FD => {
            (Payload::Inflight(InflightDesc { mmap_size: 4096, mmap_offset: 0, num_queues: 2, queue_size: 128 }), 1)
        }
        GET_SHARED_OBJECT => (Payload::Empty, 1),
        SET_DEVICE_STATE_FD => (Payload::U64(0), 1),
        GET_SHMEM_CONFIG => {
            let mut sizes = vec![0u64; MAX_SHMEM_REGIONS];
            sizes[0] = 1 << 30;
            sizes[3] = 1 << 21;
            (Payload::ShmemConfig(ShmemConfig { memory_sizes: sizes }), 0)
        }
        SET_LOG_BASE => (Payload::U64(0), 0),
        _ => (Payload::U64(0), 0),
    }
}

pub(crate) fn sample_backend_request(r: BackendRequest) -> (Payload, usize) {
    use BackendRequest::*;
    match r {
        IOTLB_MSG => (Payload::Iotlb(IotlbMsg { iova: 0x1000, size: 0, uaddr: 0, perm: 1, kind: IotlbMsg::MISS }), 0),
        CONFIG_CHANGE_MSG => (Payload::Empty, 0),
        VRING_HOST_NOTIFIER_MSG => (Payload::VringArea(VringArea { index: 1, nofd: false, size: 4096, offset: 0 }), 1),
        VRING_CALL | VRING_ERR => (Payload::VringState(VringState { index: 0, num: 0 }), 0),
        SHARED_OBJECT_ADD | SHARED_OBJECT_REMOVE | SHARED_OBJECT_LOOKUP => (Payload::Shared([0xab; 16]), 0),
        SHMEM_MAP => (
            Payload::Mmap(MmapRequest {
                shmid: 1,
                fd_offset: 0,
                shm_offset: 4096,
                len: 8192,
                flags: MmapRequest::FLAG_RW,
            }),
            1,
        ),
        SHMEM_UNMAP => {
            (Payload::Mmap(MmapRequest { shmid: 1, fd_offset: 0, shm_offset: 4096, len: 8192, flags: 0 }), 0)
        }
    }
}

fn round_trip(channel: Channel, msg: &Message, fds: usize) {
    let bytes = msg.encode();
    assert_eq!(bytes.len(), HEADER_SIZE + msg.payload.encoded_len());
    let back = decode(channel, &bytes, fds).unwrap_or_else(|e| panic!("{}: {e}", msg.request));
    assert_eq!(&back, msg);
    assert_eq!(back.encode(), bytes, "{} re-encodes identically", msg.request);
}

#[test]
fn every_frontend_request_and_reply_round_trips() {
    for &r in FrontendRequest::ALL {
        let (payload, fds) = sample_frontend_request(r);
        round_trip(Channel::Main, &Message::request(r, payload.clone()), fds);
        round_trip(Channel::Main, &Message::request(r, payload).with_need_reply(), fds);
        let (reply, fds) = sample_frontend_reply(r);
        round_trip(Channel::Main, &Message::reply(r, reply), fds);
    }
}

#[test]
fn every_backend_request_and_reply_round_trips() {
    for &r in BackendRequest::ALL {
        let (payload, fds) = sample_backend_request(r);
        round_trip(Channel::Backend, &Message::request(r, payload.clone()).with_need_reply(), fds);
        round_trip(Channel::Backend, &Message::reply(r, Payload::U64(1)), 0);
    }
    // SHARED_OBJECT_LOOKUP's reply may carry the dma-buf fd.
    round_trip(Channel::Backend, &Message::reply(BackendRequest::SHARED_OBJECT_LOOKUP, Payload::U64(0)), 1);
}

#[test]
fn xen_layouts_round_trip() {
    let xen = MemoryRegion { xen: Some(XenMmap { flags: 1, domid: 7 }), ..region(0) };
    round_trip(Channel::Main, &Message::request(FrontendRequest::SET_MEM_TABLE, Payload::MemoryTable(vec![xen; 5])), 5);
    round_trip(Channel::Main, &Message::request(FrontendRequest::ADD_MEM_REG, Payload::SingleRegion(xen)), 1);
}

#[test]
fn reply_variants_peers_send() {
    use FrontendRequest::*;
    // SET_LOG_BASE: DPDK answers with 0 bytes, libvhost-user 8, rust-vmm 16.
    for p in [Payload::Empty, Payload::U64(0), Payload::LogBase { mmap_size: 4096, mmap_offset: 0 }] {
        round_trip(Channel::Main, &Message::reply(SET_LOG_BASE, p), 0);
    }
    // GET_CONFIG failure: empty payload (libvhost-user, DPDK) or a header with size 0 (rust-vmm).
    round_trip(Channel::Main, &Message::reply(GET_CONFIG, Payload::Empty), 0);
    round_trip(Channel::Main, &Message::reply(GET_CONFIG, Payload::Config(DeviceConfig::default())), 0);
    // Postcopy-listen replies of SET_MEM_TABLE / ADD_MEM_REG carry the back-end's addresses.
    round_trip(Channel::Main, &Message::reply(SET_MEM_TABLE, Payload::MemoryTable(vec![region(0)])), 0);
    round_trip(Channel::Main, &Message::reply(ADD_MEM_REG, Payload::SingleRegion(region(0))), 0);
    // GET_INFLIGHT_FD with no buffer has no fd; SET_DEVICE_STATE_FD with bit 8 has none.
    round_trip(Channel::Main, &Message::reply(GET_INFLIGHT_FD, Payload::Inflight(InflightDesc::default())), 0);
    round_trip(Channel::Main, &Message::reply(SET_DEVICE_STATE_FD, Payload::U64(1 << 8)), 0);
    round_trip(Channel::Main, &Message::reply(SET_DEVICE_STATE_FD, Payload::U64(1)), 0);
    // QEMU sends GET_SHARED_OBJECT with size 0; libvhost-user echoes the UUID in the reply.
    round_trip(Channel::Main, &Message::request(GET_SHARED_OBJECT, Payload::Empty), 0);
    round_trip(Channel::Main, &Message::reply(GET_SHARED_OBJECT, Payload::Shared([1; 16])), 1);
}

#[test]
fn unknown_codes_decode_as_unknown_with_their_bytes() {
    let mut bytes = Header { code: 99, flags: VERSION | NEED_REPLY, size: 3 }.to_bytes().to_vec();
    bytes.extend_from_slice(&[1, 2, 3]);
    let msg = decode(Channel::Main, &bytes, 2).unwrap();
    assert_eq!(msg.request, Request::Unknown(Channel::Main, 99));
    assert_eq!(msg.payload, Payload::Raw(vec![1, 2, 3]));
    assert!(msg.need_reply());
    let zero = Header { code: 0, flags: VERSION, size: 0 }.to_bytes();
    assert_eq!(decode(Channel::Main, &zero, 0).unwrap().request, Request::Unknown(Channel::Main, 0));
    let b11 = Header { code: 11, flags: VERSION, size: 0 }.to_bytes();
    assert_eq!(decode(Channel::Backend, &b11, 0).unwrap().request, Request::Unknown(Channel::Backend, 11));
}

fn decode_err(channel: Channel, msg: &Message, fds: usize) -> ProtocolError {
    decode(channel, &msg.encode(), fds).expect_err("must be rejected")
}

fn raw(code: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Header { code, flags, size: payload.len() as u32 }.to_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

#[test]
fn header_size_must_match_bytes() {
    let mut bytes = Message::request(FrontendRequest::SET_FEATURES, Payload::U64(1)).encode();
    bytes.pop();
    let err = decode(Channel::Main, &bytes, 0).unwrap_err();
    assert!(matches!(err, ProtocolError::PayloadSize { got: 7, .. }), "{err}");
    assert!(matches!(decode(Channel::Main, &bytes[..5], 0), Err(ProtocolError::Truncated { .. })));
}

#[test]
fn payload_sizes_are_exact() {
    use FrontendRequest::*;
    for (r, size) in [(GET_FEATURES, 8), (SET_FEATURES, 4), (SET_VRING_NUM, 16), (SET_VRING_ADDR, 32), (IOTLB_MSG, 26)]
    {
        let err = decode(Channel::Main, &raw(r.code(), 1, &vec![0; size]), 0).unwrap_err();
        assert!(matches!(&err, ProtocolError::PayloadSize { request, .. } if *request == r.into()), "{err}");
        assert!(err.to_string().starts_with(r.name()), "error names the request: {err}");
    }
    // Inflight is 24 bytes with tail padding: 20 is rejected.
    let err = decode(Channel::Main, &raw(GET_INFLIGHT_FD.code(), 1, &[0; 20]), 0).unwrap_err();
    assert!(matches!(err, ProtocolError::PayloadSize { .. }));
    // A reply to a request without one must be an 8-byte ack.
    let err = decode(Channel::Main, &raw(SET_OWNER.code(), 5, &[0; 4]), 0).unwrap_err();
    assert!(matches!(err, ProtocolError::PayloadSize { .. }));
}

#[test]
fn fd_counts_are_enforced() {
    use FrontendRequest::*;
    for &r in FrontendRequest::ALL {
        let (payload, fds) = sample_frontend_request(r);
        let msg = Message::request(r, payload);
        let err = decode_err(Channel::Main, &msg, fds + 2);
        assert!(matches!(err, ProtocolError::FdCount { .. }), "{r}: {err}");
    }
    // Missing fds.
    let kick = Message::request(SET_VRING_KICK, Payload::VringFd(VringFd { index: 0, nofd: false }));
    assert!(matches!(decode_err(Channel::Main, &kick, 0), ProtocolError::FdCount { .. }));
    let nofd = Message::request(SET_VRING_KICK, Payload::VringFd(VringFd { index: 0, nofd: true }));
    assert!(matches!(decode_err(Channel::Main, &nofd, 1), ProtocolError::FdCount { .. }));
    let table = Message::request(SET_MEM_TABLE, Payload::MemoryTable(vec![region(0), region(1 << 32)]));
    assert!(matches!(decode_err(Channel::Main, &table, 1), ProtocolError::FdCount { got: 1, .. }));
    // REM_MEM_REG tolerates one stray fd (the receiver closes it).
    let rem = Message::request(REM_MEM_REG, Payload::SingleRegion(region(0)));
    assert!(decode(Channel::Main, &rem.encode(), 1).is_ok());
    // Inflight reply: fd iff mmap_size != 0.
    let inflight =
        Message::reply(GET_INFLIGHT_FD, Payload::Inflight(InflightDesc { mmap_size: 64, ..Default::default() }));
    assert!(matches!(decode_err(Channel::Main, &inflight, 0), ProtocolError::FdCount { .. }));
    // Device state: error + fd is forbidden.
    let state = Message::reply(SET_DEVICE_STATE_FD, Payload::U64(5));
    assert!(matches!(decode_err(Channel::Main, &state, 1), ProtocolError::FdCount { .. }));
    let area = Message::request(
        BackendRequest::VRING_HOST_NOTIFIER_MSG,
        Payload::VringArea(VringArea { index: 0, nofd: true, size: 0, offset: 0 }),
    );
    assert!(matches!(decode_err(Channel::Backend, &area, 1), ProtocolError::FdCount { .. }));
}

#[test]
fn memory_table_rules() {
    use FrontendRequest::*;
    let code = SET_MEM_TABLE.code();
    let table = |n: u32, regions: &[MemoryRegion]| {
        let mut p = n.to_ne_bytes().to_vec();
        p.extend_from_slice(&[0; 4]);
        for r in regions {
            let mut b = Vec::new();
            Payload::SingleRegion(*r).encode_into(&mut b);
            p.extend_from_slice(&b[8..]);
        }
        raw(code, 1, &p)
    };
    let err = decode(Channel::Main, &table(0, &[]), 0).unwrap_err();
    assert!(matches!(err, ProtocolError::InvalidField { field: "nregions", .. }), "{err}");
    let err = decode(Channel::Main, &table(9, &[region(0); 9]), 9).unwrap_err();
    assert!(matches!(err, ProtocolError::InvalidField { field: "nregions", .. }), "{err}");
    // Count says 3, the payload holds 2.
    let err = decode(Channel::Main, &table(3, &[region(0); 2]), 3).unwrap_err();
    assert!(matches!(err, ProtocolError::PayloadSize { .. }), "{err}");
    let empty = MemoryRegion { size: 0, ..region(0) };
    let err = decode(Channel::Main, &table(1, &[empty]), 1).unwrap_err();
    assert!(matches!(err, ProtocolError::InvalidField { field: "memory_size", .. }), "{err}");
    for (field, r) in [
        ("guest_phys_addr", MemoryRegion { guest_addr: u64::MAX - 10, ..region(0) }),
        ("userspace_addr", MemoryRegion { user_addr: u64::MAX - 10, ..region(0) }),
        ("mmap_offset", MemoryRegion { mmap_offset: u64::MAX - 10, ..region(0) }),
        ("guest_phys_addr", MemoryRegion { size: u64::MAX, ..region(1) }),
    ] {
        let err = decode(Channel::Main, &table(1, &[r]), 1).unwrap_err();
        assert_eq!(err, ProtocolError::Overflow { request: SET_MEM_TABLE.into(), field }, "{err}");
        let single = Message::request(ADD_MEM_REG, Payload::SingleRegion(r));
        assert!(matches!(decode_err(Channel::Main, &single, 1), ProtocolError::Overflow { .. }));
    }
    // REM_MEM_REG ignores mmap_offset, as the spec says.
    let rem = Message::request(REM_MEM_REG, Payload::SingleRegion(MemoryRegion { mmap_offset: u64::MAX, ..region(0) }));
    assert!(decode(Channel::Main, &rem.encode(), 0).is_ok());
}

#[test]
fn field_rules() {
    use FrontendRequest::*;
    let state = |r: FrontendRequest, num| Message::request(r, Payload::VringState(VringState { index: 0, num }));
    for (r, num) in
        [(SET_VRING_NUM, 0), (SET_VRING_NUM, 32769), (SET_VRING_ENABLE, 2), (SET_VRING_ENDIAN, 2), (VRING_KICK, 5)]
    {
        assert!(
            matches!(decode_err(Channel::Main, &state(r, num), 0), ProtocolError::InvalidField { field: "num", .. }),
            "{r} {num}"
        );
    }
    assert!(decode(Channel::Main, &state(SET_VRING_NUM, 32768).encode(), 0).is_ok());
    // DPDK's virtio_user puts the ring size in GET_VRING_BASE's num: accepted (protocol.md §9).
    assert!(decode(Channel::Main, &state(GET_VRING_BASE, 256).encode(), 0).is_ok());
    let addr = |f: fn(&mut VringAddr)| {
        let mut a = VringAddr {
            index: 0,
            flags: 0,
            desc_user_addr: 0x1000,
            used_user_addr: 0x2000,
            avail_user_addr: 0x3000,
            log_guest_addr: 0,
        };
        f(&mut a);
        Message::request(SET_VRING_ADDR, Payload::VringAddr(a))
    };
    for (field, f) in [
        ("flags", (|a: &mut VringAddr| a.flags = 2) as fn(&mut VringAddr)),
        ("desc_user_addr", |a| a.desc_user_addr = 0x1008),
        ("used_user_addr", |a| a.used_user_addr = 0x2002),
        ("avail_user_addr", |a| a.avail_user_addr = 0x3001),
    ] {
        let err = decode_err(Channel::Main, &addr(f), 0);
        assert!(matches!(err, ProtocolError::InvalidField { field: got, .. } if got == field), "{err}");
    }
    // Ring fd u64: bits above 8 are reserved.
    let err = decode(Channel::Main, &raw(SET_VRING_CALL.code(), 1, &(0x200u64 | 1).to_ne_bytes()), 1).unwrap_err();
    assert!(matches!(err, ProtocolError::InvalidField { field: "u64", .. }), "{err}");
    let status = Message::request(SET_STATUS, Payload::U64(0x100));
    assert!(matches!(decode_err(Channel::Main, &status, 0), ProtocolError::InvalidField { field: "status", .. }));
    let log = Message::request(SET_LOG_BASE, Payload::LogBase { mmap_size: u64::MAX, mmap_offset: 4096 });
    assert!(matches!(decode_err(Channel::Main, &log, 1), ProtocolError::Overflow { field: "mmap_offset", .. }));
    let inflight = Message::request(
        SET_INFLIGHT_FD,
        Payload::Inflight(InflightDesc { mmap_size: u64::MAX, mmap_offset: 1, num_queues: 1, queue_size: 1 }),
    );
    assert!(matches!(decode_err(Channel::Main, &inflight, 1), ProtocolError::Overflow { .. }));
    let iotlb = |kind, perm, iova, size| {
        Message::request(IOTLB_MSG, Payload::Iotlb(IotlbMsg { iova, size, uaddr: 0, perm, kind }))
    };
    assert!(matches!(
        decode_err(Channel::Main, &iotlb(IotlbMsg::MISS, 1, 0, 1), 0),
        ProtocolError::InvalidField { field: "type", .. }
    ));
    assert!(matches!(
        decode_err(Channel::Main, &iotlb(9, 1, 0, 1), 0),
        ProtocolError::InvalidField { field: "type", .. }
    ));
    assert!(matches!(
        decode_err(Channel::Main, &iotlb(IotlbMsg::UPDATE, 4, 0, 1), 0),
        ProtocolError::InvalidField { field: "perm", .. }
    ));
    assert!(matches!(
        decode_err(Channel::Main, &iotlb(IotlbMsg::UPDATE, 3, u64::MAX, 2), 0),
        ProtocolError::Overflow { field: "iova", .. }
    ));
    let miss = Message::request(
        BackendRequest::IOTLB_MSG,
        Payload::Iotlb(IotlbMsg { kind: IotlbMsg::UPDATE, ..Default::default() }),
    );
    assert!(matches!(decode_err(Channel::Backend, &miss, 0), ProtocolError::InvalidField { field: "type", .. }));
    // Config: the size field must match the bytes, and stay inside 4 KiB.
    let mut cfg = raw(GET_CONFIG.code(), 1, &[0; 12 + 4]);
    cfg[16..20].copy_from_slice(&8u32.to_ne_bytes());
    assert!(matches!(decode(Channel::Main, &cfg, 0), Err(ProtocolError::PayloadSize { .. })));
    let far = Message::request(GET_CONFIG, Payload::Config(DeviceConfig { offset: 4090, flags: 0, data: vec![0; 8] }));
    assert!(matches!(decode_err(Channel::Main, &far, 0), ProtocolError::InvalidField { field: "offset", .. }));
    let set = Message::request(SET_CONFIG, Payload::Config(DeviceConfig { offset: 0, flags: 2, data: vec![0] }));
    assert!(matches!(decode_err(Channel::Main, &set, 0), ProtocolError::InvalidField { field: "flags", .. }));
    let params =
        Message::request(SET_DEVICE_STATE_FD, Payload::DeviceStateParams(DeviceStateParams { direction: 2, phase: 0 }));
    assert!(matches!(decode_err(Channel::Main, &params, 1), ProtocolError::InvalidField { field: "direction", .. }));
    let params =
        Message::request(SET_DEVICE_STATE_FD, Payload::DeviceStateParams(DeviceStateParams { direction: 0, phase: 1 }));
    assert!(matches!(decode_err(Channel::Main, &params, 1), ProtocolError::InvalidField { field: "phase", .. }));
    let mmap = |m: MmapRequest| Message::request(BackendRequest::SHMEM_UNMAP, Payload::Mmap(m));
    assert!(matches!(
        decode_err(Channel::Backend, &mmap(MmapRequest { len: 0, ..Default::default() }), 0),
        ProtocolError::InvalidField { field: "len", .. }
    ));
    assert!(matches!(
        decode_err(Channel::Backend, &mmap(MmapRequest { len: 1, flags: 2, ..Default::default() }), 0),
        ProtocolError::InvalidField { field: "flags", .. }
    ));
    assert!(matches!(
        decode_err(Channel::Backend, &mmap(MmapRequest { len: 2, shm_offset: u64::MAX, ..Default::default() }), 0),
        ProtocolError::Overflow { .. }
    ));
    let crypto = raw(CREATE_CRYPTO_SESSION.code(), 1, &[0; 12]);
    assert!(matches!(decode(Channel::Main, &crypto, 0), Err(ProtocolError::PayloadSize { .. })));
    let mut shmem = Vec::new();
    Payload::ShmemConfig(ShmemConfig::default()).encode_into(&mut shmem);
    shmem[0] = 3;
    assert!(matches!(
        decode(Channel::Main, &raw(GET_SHMEM_CONFIG.code(), 5, &shmem), 0),
        Err(ProtocolError::InvalidField { field: "nregions", .. })
    ));
}

#[test]
fn ring_index_is_checked_at_full_width() {
    // CVE-2020-10723: 0x10000 + 1 must not pass as ring 1.
    let msg =
        Message::request(FrontendRequest::SET_VRING_NUM, Payload::VringState(VringState { index: 0x1_0001, num: 8 }));
    let msg = decode(Channel::Main, &msg.encode(), 0).unwrap();
    assert_eq!(msg.ring_index(), Some(0x1_0001));
    let err = msg.check_ring_index(2).unwrap_err();
    assert!(matches!(err, ProtocolError::RingIndex { index: 0x1_0001, num_rings: 2, .. }));
    assert!(err.to_string().contains("SET_VRING_NUM"));
    let ok = Message::request(FrontendRequest::SET_VRING_NUM, Payload::VringState(VringState { index: 1, num: 8 }));
    assert!(ok.check_ring_index(2).is_ok());
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// qemu-storage-daemon 7.2 (vhost-user-blk export) answers, as captured on the wire.
#[test]
fn golden_qemu_storage_daemon_replies() {
    let features = hex("010000000500000008000000467e007501000000");
    let msg = decode(Channel::Main, &features, 0).unwrap();
    assert_eq!(msg, Message::reply(FrontendRequest::GET_FEATURES, Payload::U64(0x1_7500_7e46)));
    assert_eq!(msg.flags, 0x5);
    assert_eq!(msg.encode(), features);
    let offered = VirtioFeatures(0x1_7500_7e46);
    for f in [
        VirtioFeatures::VERSION_1,
        VirtioFeatures::PROTOCOL_FEATURES,
        VirtioFeatures::EVENT_IDX,
        VirtioFeatures::INDIRECT_DESC,
        VirtioFeatures::LOG_ALL,
    ] {
        assert!(offered.contains(f), "{f:?}");
    }

    let proto = hex("0f00000005000000080000002b8f000000000000");
    let msg = decode(Channel::Main, &proto, 0).unwrap();
    assert_eq!(msg.payload, Payload::U64(0x8f2b));
    let pf = ProtocolFeatures(0x8f2b);
    assert!(pf
        .contains(ProtocolFeatures::REPLY_ACK | ProtocolFeatures::CONFIGURE_MEM_SLOTS | ProtocolFeatures::BACKEND_REQ));
    assert!(!pf.contains(ProtocolFeatures::STATUS));
    assert!(!pf.contains(ProtocolFeatures::INFLIGHT_SHMFD));

    let config = "0080000000000000000000007e0000000000000000020000000001000100000000000200008000000100000001000000008000000100000000000000";
    let mut wire = hex("18000000050000004800000000000000" /* code 24, flags 5, size 72, offset 0 */);
    wire.extend_from_slice(&hex("3c00000000000000")); // size 60, flags 0
    wire.extend_from_slice(&hex(config));
    let msg = decode(Channel::Main, &wire, 0).unwrap();
    let Payload::Config(c) = &msg.payload else { panic!("{msg:?}") };
    assert_eq!((c.offset, c.flags, c.data.len()), (0, 0, 60));
    // virtio_blk_config: capacity (u64) = 0x8000 sectors = 16 MiB, blk_size at offset 20 = 512.
    assert_eq!(u64::from_le_bytes(c.data[0..8].try_into().unwrap()), 0x8000);
    assert_eq!(u32::from_le_bytes(c.data[20..24].try_into().unwrap()), 512);
    assert_eq!(msg.encode(), wire);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn check(channel: Channel, bytes: &[u8], fds: usize) -> Result<(), TestCaseError> {
        if let Ok(msg) = decode(channel, bytes, fds) {
            let again = decode(channel, &msg.encode(), fds);
            prop_assert_eq!(again.as_ref(), Ok(&msg), "re-encoding {} changed it", msg.request);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), fds in 0usize..16, backend: bool) {
            check(if backend { Channel::Backend } else { Channel::Main }, &bytes, fds)?;
        }

        #[test]
        fn random_payloads_under_valid_headers(
            code in 0u32..48,
            flags in prop_oneof![Just(1u32), Just(5), Just(9)],
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            fds in 0usize..10,
            backend: bool,
        ) {
            let mut bytes = Header { code, flags, size: payload.len() as u32 }.to_bytes().to_vec();
            bytes.extend_from_slice(&payload);
            check(if backend { Channel::Backend } else { Channel::Main }, &bytes, fds)?;
        }

        #[test]
        fn sized_payloads_for_every_request(
            code in 1u32..46,
            reply: bool,
            len in prop_oneof![Just(8usize), Just(16), Just(24), Just(32), Just(40), Just(48), Just(72), Just(2056), 0usize..80],
            seed: u64,
            fds in 0usize..3,
        ) {
            // Payloads of plausible sizes filled with structured noise reach the field checks.
            let payload: Vec<u8> = (0..len).map(|i| (seed.rotate_left(i as u32 % 64) as u8) & if i % 8 < 2 { 0xff } else { 0x01 }).collect();
            let mut bytes = Header { code, flags: if reply { 5 } else { 1 }, size: len as u32 }.to_bytes().to_vec();
            bytes.extend_from_slice(&payload);
            check(Channel::Main, &bytes, fds)?;
        }
    }
}
