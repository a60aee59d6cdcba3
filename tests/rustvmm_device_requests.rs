//! rust-vmm's vhost-user front-end (the `vhost` crate) sending the device-facing requests to our
//! back-end: SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE (state saved from one back-end and loaded
//! into another), GET_SHARED_OBJECT and GET_SHMEM_CONFIG; and its back-end request handler
//! receiving what our device sends (SHARED_OBJECT_ADD / REMOVE, SHMEM_MAP / UNMAP).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserMMap, VhostUserProtocolFeatures, VhostUserSharedMsg,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandlerMut,
};
use vhost::VhostBackend;
use vm_memory::ByteValued;

use vhostuser_rs::backend::{
    serve_session, shared_object_add, shared_object_remove, shmem_map, shmem_unmap, BackendRequests, Device,
    WorkerPolicy,
};
use vhostuser_rs::connection::{Deadline, Listener};
use vhostuser_rs::protocol::ProtocolFeatures;
use vhostuser_rs::virtqueue::{AnyDeviceQueue, ChainBatch, VirtqueueError};

const VERSION_1: u64 = 1 << 32;
const UUID: [u8; 16] = *b"vhostuser_rs-obj";

fn page() -> u64 {
    // SAFETY: no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

/// Keeps a state blob, exports `exported` under UUID and declares region 1 of two pages.
struct Stateful {
    state: Mutex<Vec<u8>>,
    can_save: bool,
    exported: File,
}

impl Device for Stateful {
    fn num_queues(&self) -> u16 {
        1
    }
    fn features(&self) -> u64 {
        VERSION_1
    }
    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::DEVICE_STATE
            | ProtocolFeatures::SHARED_OBJECT
            | ProtocolFeatures::SHMEM
            | ProtocolFeatures::BACKEND_SEND_FD
    }
    fn process(&self, _: u16, _: &mut AnyDeviceQueue, _: &ChainBatch) -> Result<(), VirtqueueError> {
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<u8>, String> {
        if !self.can_save {
            return Err("refused".into());
        }
        Ok(self.state.lock().unwrap().clone())
    }
    fn load_state(&self, state: &[u8]) -> Result<(), String> {
        *self.state.lock().unwrap() = state.to_vec();
        Ok(())
    }
    fn shared_object(&self, uuid: &[u8; 16]) -> Option<OwnedFd> {
        (uuid == &UUID).then(|| self.exported.try_clone().unwrap().into())
    }
    fn shmem_regions(&self) -> Vec<u64> {
        vec![0, 2 * page()]
    }
}

fn device(state: &[u8], can_save: bool) -> Arc<Stateful> {
    Arc::new(Stateful { state: Mutex::new(state.to_vec()), can_save, exported: File::open("/proc/self/exe").unwrap() })
}

fn serve(dir: &Path, name: &str, dev: Arc<Stateful>, requests: Arc<BackendRequests>) -> (PathBuf, JoinHandle<()>) {
    let path = dir.join(name);
    let listener = Listener::bind(&path, true).unwrap();
    let t = std::thread::spawn(move || {
        let conn = listener.accept(Deadline::after(Some(Duration::from_secs(10)))).unwrap();
        serve_session(&conn, dev, &requests, &WorkerPolicy::default(), &|| false).unwrap();
    });
    (path, t)
}

fn connect(path: &Path) -> Frontend {
    let mut fe = Frontend::connect(path, 1).unwrap();
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
    fe.set_features(VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()).unwrap();
    let offered = fe.get_protocol_features().unwrap();
    let wanted = VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::DEVICE_STATE
        | VhostUserProtocolFeatures::SHARED_OBJECT
        | VhostUserProtocolFeatures::SHMEM
        | VhostUserProtocolFeatures::BACKEND_SEND_FD;
    assert!(offered.contains(wanted), "offered {offered:?}");
    fe.set_protocol_features(wanted).unwrap();
    fe
}

fn pipe() -> (File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fresh fds that we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: as above.
    unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vu-rustvmm-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn rust_vmm_frontend_moves_device_state_between_our_backends() {
    let dir = temp_dir("state");
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect(); // beyond a pipe's buffer
    let (path, server) = serve(&dir, "src.sock", device(&blob, true), Arc::new(BackendRequests::new()));
    let fe = connect(&path);
    let (mut r, w) = pipe();
    let own = fe.set_device_state_fd(VhostTransferStateDirection::SAVE, VhostTransferStatePhase::STOPPED, w).unwrap();
    assert!(own.is_none());
    let mut saved = Vec::new();
    r.read_to_end(&mut saved).unwrap();
    fe.check_device_state().unwrap();
    assert_eq!(saved, blob);
    drop(fe);
    server.join().unwrap();

    let dst = device(b"", true);
    let (path, server) = serve(&dir, "dst.sock", dst.clone(), Arc::new(BackendRequests::new()));
    let fe = connect(&path);
    let (r, w) = pipe();
    assert!(fe
        .set_device_state_fd(VhostTransferStateDirection::LOAD, VhostTransferStatePhase::STOPPED, r.into())
        .unwrap()
        .is_none());
    std::io::Write::write_all(&mut File::from(w), &saved).unwrap(); // dropped: EOF
    fe.check_device_state().unwrap();
    assert_eq!(*dst.state.lock().unwrap(), blob);

    // A device that cannot save: rust-vmm sees the error reply, and the session goes on.
    drop(fe);
    server.join().unwrap();
    let (path, server) = serve(&dir, "no.sock", device(b"x", false), Arc::new(BackendRequests::new()));
    let fe = connect(&path);
    let (_r, w) = pipe();
    assert!(fe.set_device_state_fd(VhostTransferStateDirection::SAVE, VhostTransferStatePhase::STOPPED, w).is_err());
    assert!(fe.check_device_state().is_err());
    fe.set_vring_num(0, 8).unwrap();
    drop(fe);
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// rust-vmm's front-end side of the back-end request channel, recording what arrives.
#[derive(Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<String>>>,
}

impl VhostUserFrontendReqHandlerMut for Recorder {
    fn shared_object_add(&mut self, uuid: &VhostUserSharedMsg) -> HandlerResult<u64> {
        self.seen.lock().unwrap().push(format!("add {}", uuid.uuid));
        Ok(0)
    }
    fn shared_object_remove(&mut self, uuid: &VhostUserSharedMsg) -> HandlerResult<u64> {
        self.seen.lock().unwrap().push(format!("remove {}", uuid.uuid));
        Ok(0)
    }
    fn shmem_map(&mut self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> HandlerResult<u64> {
        let (shmid, offset, len, flags) = (req.shmid, req.shm_offset, req.len, req.flags);
        assert!(fd.as_raw_fd() >= 0);
        self.seen.lock().unwrap().push(format!("map {shmid} {offset} {len} {flags}"));
        Ok(0)
    }
    fn shmem_unmap(&mut self, req: &VhostUserMMap) -> HandlerResult<u64> {
        let (shmid, offset, len) = (req.shmid, req.shm_offset, req.len);
        self.seen.lock().unwrap().push(format!("unmap {shmid} {offset} {len}"));
        Ok(0)
    }
}

#[test]
fn rust_vmm_frontend_fetches_shared_objects_and_shmem_config_and_handles_our_requests() {
    let dir = temp_dir("shared");
    let dev = device(b"", true);
    let requests = Arc::new(BackendRequests::new());
    let (path, server) = serve(&dir, "be.sock", dev.clone(), requests.clone());
    let mut fe = connect(&path);

    let config = fe.get_shmem_config().unwrap();
    let sizes = config.memory_sizes;
    assert_eq!((config.nregions, sizes[0], sizes[1]), (1, 0, 2 * page()));
    assert!(sizes[2..].iter().all(|&s| s == 0));

    let msg = *VhostUserSharedMsg::from_slice(&UUID).unwrap();
    let file = fe.get_shared_object(&msg).unwrap();
    let ino = |f: &File| {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().ino()
    };
    assert_eq!(ino(&file), ino(&dev.exported));
    let other = *VhostUserSharedMsg::from_slice(&[9u8; 16]).unwrap();
    assert!(fe.get_shared_object(&other).is_err(), "nothing exported: no fd");

    // The back-end request channel, served by rust-vmm's handler on a thread.
    let recorder = Recorder::default();
    let seen = recorder.seen.clone();
    let mut handler = FrontendReqHandler::new(Arc::new(Mutex::new(recorder))).unwrap();
    handler.set_reply_ack_flag(true);
    fe.set_backend_request_fd(&handler.get_tx_raw_fd()).unwrap();
    let channel = std::thread::spawn(move || while handler.handle_request().is_ok() {});

    // rust-vmm does not wait for SET_BACKEND_REQ_FD to be processed: wait until it was.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while !requests.is_open() && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    let timeout = Some(Duration::from_secs(5));
    assert_eq!(shared_object_add(&requests, UUID, true, timeout).unwrap(), Some(0));
    let regions = dev.shmem_regions();
    let fd = dev.exported.try_clone().unwrap();
    use std::os::fd::AsFd;
    let p = page();
    assert_eq!(shmem_map(&requests, &regions, 1, fd.as_fd(), 0, p, p, false, true, timeout).unwrap(), Some(0));
    assert_eq!(shmem_unmap(&requests, &regions, 1, p, p, true, timeout).unwrap(), Some(0));
    assert!(shmem_map(&requests, &regions, 1, fd.as_fd(), 0, p, 2 * p, true, true, timeout).is_err());
    assert_eq!(shared_object_remove(&requests, UUID, true, timeout).unwrap(), Some(0));
    let uuid = uuid_text(&UUID);
    assert_eq!(
        *seen.lock().unwrap(),
        [format!("add {uuid}"), format!("map 1 {p} {p} 0"), format!("unmap 1 {p} {p}"), format!("remove {uuid}")]
    );

    drop(fe);
    server.join().unwrap();
    channel.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

fn uuid_text(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}
