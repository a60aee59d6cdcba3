//! Our front-end driving rust-vmm's back-end framework (the `vhost-user-backend` crate from
//! crates.io, with `virtio-queue` and `vm-memory` on its side): a session handler, memory
//! mapper and ring walker written by others, against our requests, memory table and driver
//! ring. The rust-vmm device upper-cases what it reads into what the driver gave it to write.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use vhostuser_rs::connection::Connection;
use vhostuser_rs::frontend::{Frontend, RequestOptions};
use vhostuser_rs::memory::GuestMemory;
use vhostuser_rs::protocol::{
    DeviceConfig, FrontendRequest as F, MemoryRegion, Payload, VringAddr, VringFd, VringState,
};
use vhostuser_rs::virtqueue::DriverQueue;

mod common;

const VERSION_1: u64 = 1 << 32;
const QSIZE: u16 = 64;

#[derive(Default)]
struct Upper {
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
}

impl VhostUserBackendMut for Upper {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&mut self, _enabled: bool) {}

    // Without an exit event the framework's worker thread cannot be told to end.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some(new_event_consumer_and_notifier(EventFlag::empty()).expect("exit event"))
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = b"rust-vmm upper-case device";
        space.get(offset as usize..(offset + size) as usize).map(<[u8]>::to_vec).unwrap_or_default()
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if device_event != 0 {
            return Ok(());
        }
        let mem = self.mem.as_ref().expect("memory table before kicks").memory();
        let vring = &vrings[0];
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let mut data = Vec::new();
            let mut out = Vec::new();
            for d in chain {
                if d.is_write_only() {
                    out.push(d);
                } else {
                    let mut buf = vec![0u8; d.len() as usize];
                    mem.read_slice(&mut buf, d.addr()).unwrap();
                    data.extend(buf);
                }
            }
            data.make_ascii_uppercase();
            let mut written = 0usize;
            for d in out {
                let n = (d.len() as usize).min(data.len() - written);
                mem.write_slice(&data[written..written + n], d.addr()).unwrap();
                written += n;
            }
            vring.add_used(head, written as u32).unwrap();
        }
        vring.signal_used_queue()
    }
}

fn eventfd() -> OwnedFd {
    // SAFETY: plain syscall; the result is a new descriptor.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: eventfd returned a new descriptor.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[test]
fn our_frontend_drives_a_rust_vmm_backend() {
    let dir = std::env::temp_dir().join(format!("vu-rustvmm-be-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("be.sock");
    let backend = Arc::new(RwLock::new(Upper::default()));
    let mut daemon =
        VhostUserDaemon::new("upper".into(), backend, GuestMemoryAtomic::new(GuestMemoryMmap::new())).unwrap();
    let serve_path = path.clone();
    let server = std::thread::spawn(move || daemon.serve(serve_path));

    let fe = Frontend::new(Connection::connect(&path, Some(Duration::from_secs(10))).unwrap());
    let call = |req: F, payload: Payload, fds: &[BorrowedFd<'_>]| {
        fe.request(req, payload, fds, RequestOptions::default(), &mut || Ok(()))
            .unwrap_or_else(|e| panic!("{req:?}: {e}"))
            .map(|r| r.message.payload)
    };
    let Some(Payload::U64(offered)) = call(F::GET_FEATURES, Payload::Empty, &[]) else { panic!() };
    let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    assert_eq!(offered & (VERSION_1 | protocol_bit), VERSION_1 | protocol_bit);
    let Some(Payload::U64(proto)) = call(F::GET_PROTOCOL_FEATURES, Payload::Empty, &[]) else { panic!() };
    let wanted =
        (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG)
            .bits();
    assert_eq!(proto & wanted, wanted);
    call(F::SET_PROTOCOL_FEATURES, Payload::U64(wanted), &[]);
    // From here on every request is acked (REPLY_ACK): a refusal would fail the test.
    assert_eq!(call(F::GET_QUEUE_NUM, Payload::Empty, &[]), Some(Payload::U64(1)));
    call(F::SET_OWNER, Payload::Empty, &[]);
    call(F::SET_FEATURES, Payload::U64(VERSION_1 | protocol_bit), &[]);

    let mem = Arc::new(GuestMemory::allocate(&[(0, 1 << 20), (1 << 20, 1 << 20)]).unwrap());
    let regions = mem.region_fds();
    let table: Vec<MemoryRegion> = regions
        .iter()
        .map(|(d, _)| MemoryRegion {
            guest_addr: d.guest_addr,
            size: d.size,
            user_addr: d.user_addr,
            mmap_offset: d.mmap_offset,
            xen: None,
        })
        .collect();
    let fds: Vec<BorrowedFd<'_>> = regions.iter().map(|(_, fd)| *fd).collect();
    call(F::SET_MEM_TABLE, Payload::MemoryTable(table), &fds);

    let mut drv = DriverQueue::allocate(mem.clone(), QSIZE, false, 0).unwrap();
    let (desc, avail, used) = drv.user_addrs();
    let (kick, irq) = (eventfd(), eventfd());
    call(F::SET_VRING_NUM, Payload::VringState(VringState { index: 0, num: QSIZE.into() }), &[]);
    let addr = VringAddr {
        index: 0,
        flags: 0,
        desc_user_addr: desc,
        used_user_addr: used,
        avail_user_addr: avail,
        log_guest_addr: 0,
    };
    call(F::SET_VRING_ADDR, Payload::VringAddr(addr), &[]);
    call(F::SET_VRING_BASE, Payload::VringState(VringState { index: 0, num: 0 }), &[]);
    call(F::SET_VRING_CALL, Payload::VringFd(VringFd { index: 0, nofd: false }), &[irq.as_fd()]);
    call(F::SET_VRING_KICK, Payload::VringFd(VringFd { index: 0, nofd: false }), &[kick.as_fd()]);
    call(F::SET_VRING_ENABLE, Payload::VringState(VringState { index: 0, num: 1 }), &[]);

    // Requests whose buffers straddle the two memory regions as well as ordinary ones.
    let words: [&[u8]; 3] = [b"our front-end", b"drives", b"a rust-vmm back-end"];
    let requests: Vec<(u64, &[u8])> = words
        .iter()
        .enumerate()
        .map(|(k, w)| (if k == 2 { (1 << 20) - 8 } else { mem.alloc(w.len() as u64, 8).unwrap() }, *w))
        .collect();
    common::upper_case_round_trip(&mem, &mut drv, &requests, || {
        // SAFETY: writing 8 bytes to our eventfd.
        let n = unsafe { libc::write(std::os::fd::AsRawFd::as_raw_fd(&kick), 1u64.to_ne_bytes().as_ptr().cast(), 8) };
        assert_eq!(n, 8);
    });

    let cfg = call(F::GET_CONFIG, Payload::Config(DeviceConfig { offset: 9, flags: 0, data: vec![0; 10] }), &[]);
    assert_eq!(cfg, Some(Payload::Config(DeviceConfig { offset: 9, flags: 0, data: b"upper-case".to_vec() })));
    assert_eq!(
        call(F::GET_VRING_BASE, Payload::VringState(VringState { index: 0, num: 0 }), &[]),
        Some(Payload::VringState(VringState { index: 0, num: 3 }))
    );
    fe.shutdown();
    drop(fe);
    // The daemon treats the disconnect as the end of its session.
    server.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
