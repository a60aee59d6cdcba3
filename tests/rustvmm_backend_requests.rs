//! rust-vmm's back-end request sender (`vhost::vhost_user::Backend`, what `vhost-user-backend`
//! devices use) talking to our back-end request channel: SHMEM_MAP / SHMEM_UNMAP placed into a
//! [`SharedRegion`] and SHARED_OBJECT_ADD / REMOVE kept in a table, with rust-vmm reading our
//! acks (REPLY_ACK). Its SHARED_OBJECT_LOOKUP, which attaches an fd to the request instead of
//! receiving one in the reply (protocol.md §4.3), is tolerated by the wire layer: the handler's
//! failure reaches rust-vmm and the request's fd is closed.

use std::collections::HashSet;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserMMap, VhostUserSharedMsg};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vm_memory::ByteValued;

use vhostuser_rs::frontend::channel::{BackendChannel, BackendRequestHandler};
use vhostuser_rs::frontend::shmem::SharedRegion;
use vhostuser_rs::protocol::{BackendRequest as B, Message, Payload, Request};
use vhostuser_rs::Error;

const PAGE: u64 = 4096;
const EINVAL: u64 = (-(libc::EINVAL as i64)) as u64;
const EPERM: u64 = (-(libc::EPERM as i64)) as u64;

#[derive(Default)]
struct Seen {
    objects: HashSet<[u8; 16]>,
    malformed: Vec<String>,
    fds_received: usize,
}

struct Handler {
    region: Arc<SharedRegion>,
    seen: Arc<Mutex<Seen>>,
}

impl BackendRequestHandler for Handler {
    fn handle(&mut self, message: &Message, fds: Vec<OwnedFd>) -> (u64, Option<OwnedFd>) {
        let mut seen = self.seen.lock().unwrap();
        seen.fds_received += fds.len();
        let status = match (message.request, &message.payload) {
            (Request::Backend(B::SHMEM_MAP), Payload::Mmap(m)) if m.shmid == 0 && m.flags & !1 == 0 => {
                match self.region.map(fds[0].as_fd(), m.fd_offset, m.shm_offset, m.len, m.flags & 1 != 0) {
                    Ok(()) => 0,
                    Err(_) => EINVAL,
                }
            }
            (Request::Backend(B::SHMEM_UNMAP), Payload::Mmap(m)) if m.shmid == 0 => {
                match self.region.unmap(m.shm_offset, m.len) {
                    Ok(()) => 0,
                    Err(_) => EINVAL,
                }
            }
            (Request::Backend(B::SHARED_OBJECT_ADD), Payload::Shared(uuid)) => {
                if seen.objects.insert(*uuid) {
                    0
                } else {
                    EINVAL
                }
            }
            (Request::Backend(B::SHARED_OBJECT_REMOVE), Payload::Shared(uuid)) => {
                if seen.objects.remove(uuid) {
                    0
                } else {
                    EPERM
                }
            }
            _ => EINVAL,
        };
        (status, None)
    }

    fn malformed(&mut self, error: &Error) {
        self.seen.lock().unwrap().malformed.push(error.to_string());
    }
}

fn memfd(content: &[u8], size: u64) -> std::fs::File {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is new and owned by the File.
    let fd = unsafe { libc::memfd_create(c"rustvmm-shmem".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd was just created and nobody else owns it.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f.write_all(content).unwrap();
    f
}

fn mmap_req(fd_offset: u64, shm_offset: u64, len: u64, flags: u64) -> VhostUserMMap {
    VhostUserMMap { shmid: 0, padding: [0; 7], fd_offset, shm_offset, len, flags }
}

fn uuid(byte: u8) -> VhostUserSharedMsg {
    *VhostUserSharedMsg::from_slice(&[byte; 16]).unwrap()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn rust_vmm_backend_requests_reach_our_channel() {
    let region = Arc::new(SharedRegion::reserve(0, 4 * PAGE).unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let handler = Handler { region: region.clone(), seen: seen.clone() };
    let (mut channel, theirs) = BackendChannel::start(Box::new(handler)).unwrap();
    // SAFETY: `theirs` is a connected Unix stream socket we own; the stream takes it over.
    let stream = unsafe { UnixStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(theirs)) };
    let backend = Backend::from_stream(stream);
    backend.set_reply_ack_flag(true);
    backend.set_shmem_flag(true);
    backend.set_shared_object_flag(true);

    let file = memfd(b"rust-vmm pages", 2 * PAGE);
    // A read-write mapping at offset 1 page: the front-end reads what the back-end wrote and
    // the back-end sees the front-end's writes.
    assert_eq!(backend.shmem_map(&mmap_req(0, PAGE, PAGE, 1), &file).unwrap(), 0);
    assert_eq!(region.read(PAGE, 14).unwrap(), b"rust-vmm pages");
    region.write(PAGE, b"RUST").unwrap();
    let mut head = [0u8; 4];
    // SAFETY: pread into a local buffer of the length given.
    let n = unsafe { libc::pread(file.as_raw_fd(), head.as_mut_ptr().cast(), 4, 0) };
    assert_eq!((n, &head), (4, b"RUST"));
    // Overlap and beyond the region: refused, rust-vmm sees the failure.
    assert!(backend.shmem_map(&mmap_req(0, PAGE, 2 * PAGE, 0), &file).is_err());
    assert!(backend.shmem_map(&mmap_req(0, 3 * PAGE, 2 * PAGE, 0), &file).is_err());
    // UNMAP must name the mapping exactly.
    assert!(backend.shmem_unmap(&mmap_req(0, PAGE, 2 * PAGE, 0)).is_err());
    assert_eq!(backend.shmem_unmap(&mmap_req(0, PAGE, PAGE, 0)).unwrap(), 0);
    assert!(region.read(PAGE, 1).is_err());

    assert_eq!(backend.shared_object_add(&uuid(7)).unwrap(), 0);
    assert!(backend.shared_object_add(&uuid(7)).is_err());
    assert_eq!(backend.shared_object_remove(&uuid(7)).unwrap(), 0);
    assert!(backend.shared_object_remove(&uuid(7)).is_err());

    // rust-vmm's LOOKUP carries an fd on the request (the spec puts it on the reply): it reaches
    // the handler (whose failure rust-vmm gets), is closed after it, and the channel goes on.
    let before = open_fds();
    let lookup = backend.shared_object_lookup(&uuid(8), &file);
    assert!(lookup.is_err(), "{lookup:?}");
    assert_eq!(open_fds(), before);
    assert_eq!(backend.shared_object_add(&uuid(9)).unwrap(), 0);

    let seen = seen.lock().unwrap();
    assert!(seen.malformed.is_empty(), "{:?}", seen.malformed);
    assert_eq!(seen.fds_received, 4, "one fd per SHMEM_MAP and the LOOKUP's");
    drop(seen);
    drop(backend);
    channel.stop();
}
