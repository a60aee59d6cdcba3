//! rust-vmm's vhost-user front-end (the `vhost` crate from crates.io) driving our back-end: a
//! message encoder and request sequence written by others, against our session, inflight
//! handling and rings. The device upper-cases what it reads into what the driver gave it to
//! write.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vhostuser_rs::backend::{serve_connection, Device};
use vhostuser_rs::connection::{Deadline, Listener};
use vhostuser_rs::memory::GuestMemory;
use vhostuser_rs::virtqueue::{AnyDeviceQueue, ChainBatch, DriverQueue, VirtqueueError};

mod common;

const VERSION_1: u64 = 1 << 32;
const QSIZE: u16 = 64;

struct Upper;

impl Device for Upper {
    fn num_queues(&self) -> u16 {
        2
    }

    fn features(&self) -> u64 {
        VERSION_1
    }

    fn config(&self) -> Vec<u8> {
        b"upper-case device".to_vec()
    }

    fn process(&self, _index: u16, queue: &mut AnyDeviceQueue, batch: &ChainBatch) -> Result<(), VirtqueueError> {
        for chain in batch.chains() {
            let mut data = Vec::new();
            for s in batch.readable(chain) {
                // SAFETY: the segment lies in a mapping the queue keeps alive.
                data.extend_from_slice(unsafe { std::slice::from_raw_parts(s.host, s.len as usize) });
            }
            data.make_ascii_uppercase();
            let mut written = 0usize;
            for s in batch.writable(chain) {
                let n = (s.len as usize).min(data.len() - written);
                // SAFETY: as above; the driver gave these bytes to the device to write.
                unsafe { std::ptr::copy_nonoverlapping(data[written..].as_ptr(), s.host, n) };
                written += n;
            }
            queue.complete(batch, chain, written as u32)?;
        }
        Ok(())
    }
}

#[test]
fn rust_vmm_frontend_drives_our_backend() {
    let dir = std::env::temp_dir().join(format!("vu-rustvmm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("be.sock");
    let listener = Listener::bind(&path, true).unwrap();
    let server = std::thread::spawn(move || {
        let conn = listener.accept(Deadline::after(Some(Duration::from_secs(10)))).unwrap();
        serve_connection(&conn, Arc::new(Upper), &|| false)
    });

    let mut fe = Frontend::connect(&path, 2).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    assert_eq!(offered & (VERSION_1 | protocol_bit), VERSION_1 | protocol_bit);
    fe.set_features(VERSION_1 | protocol_bit).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    let wanted = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    assert!(proto.contains(wanted), "offered {proto:?}");
    fe.set_protocol_features(wanted).unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 2);

    let mem = Arc::new(GuestMemory::allocate(&[(0, 1 << 20)]).unwrap());
    let regions: Vec<VhostUserMemoryRegionInfo> = mem
        .region_fds()
        .iter()
        .map(|(d, fd)| VhostUserMemoryRegionInfo {
            guest_phys_addr: d.guest_addr,
            memory_size: d.size,
            userspace_addr: d.user_addr,
            mmap_offset: d.mmap_offset,
            mmap_handle: fd.as_raw_fd(),
        })
        .collect();
    fe.set_mem_table(&regions).unwrap();

    let (inflight, file) = fe.get_inflight_fd(&VhostUserInflight::new(0, 0, 2, QSIZE)).unwrap();
    assert_eq!(inflight.mmap_size, 2 * vhostuser_rs::virtqueue::queue_region_size(QSIZE));
    fe.set_inflight_fd(&inflight, file.as_raw_fd()).unwrap();

    let mut drv = DriverQueue::allocate(mem.clone(), QSIZE, false, 0).unwrap();
    let (desc, avail, used) = drv.user_addrs();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_num(0, QSIZE).unwrap();
    let config = VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: desc,
        used_ring_addr: used,
        avail_ring_addr: avail,
        log_addr: None,
    };
    fe.set_vring_addr(0, &config).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();

    let words: [&[u8]; 3] = [b"rust-vmm", b"drives", b"vhostuser_rs"];
    let requests: Vec<(u64, &[u8])> = words.iter().map(|w| (mem.alloc(w.len() as u64, 8).unwrap(), *w)).collect();
    common::upper_case_round_trip(&mem, &mut drv, &requests, || kick.write(1).unwrap());
    assert!(call.read().is_ok(), "the back-end signalled the call eventfd");

    // Config space through rust-vmm's GET_CONFIG, then GET_VRING_BASE stops the ring at 3.
    let (_, cfg) =
        fe.get_config(0, 17, vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE, &[0u8; 17]).unwrap();
    assert_eq!(&cfg[..], b"upper-case device");
    assert_eq!(fe.get_vring_base(0).unwrap(), 3);
    drop(fe);
    server.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
