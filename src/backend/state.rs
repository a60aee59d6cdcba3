//! Device state transfer (DEVICE_STATE, protocol feature 19; protocol.md §6.13): the back-end's
//! internal state moves over a pipe-like channel the front-end passes with
//! SET_DEVICE_STATE_FD, and CHECK_DEVICE_STATE asks whether it was fully saved or loaded.
//!
//! The spec's only phase is STOPPED: both devices are suspended (every ring stopped), so a
//! request while a ring runs is refused. The transfer itself runs on a thread of its own after
//! the reply — the front-end reads (SAVE) or writes (LOAD) the channel only once it has the
//! reply, so doing the I/O before replying would deadlock on any state larger than the pipe
//! buffer. That thread polls with a short timeout so the session can abandon it (a front-end
//! that never reads or never closes its end), and CHECK_DEVICE_STATE waits for it a bounded
//! time. The state itself is a blob the device produces or consumes ([`Device::save_state`],
//! [`Device::load_state`]); its format belongs to the device (the spec leaves it to the
//! back-end), [`StateWriter`] and [`StateReader`] help built-in devices write a checked one.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::Device;
use crate::protocol::DeviceStateParams;

/// SET_DEVICE_STATE_FD reply bit 8: no fd in this reply (the front-end keeps its own channel).
pub const NO_FD: u64 = 1 << 8;

/// Largest state accepted on LOAD: a front-end that keeps writing cannot exhaust our memory.
pub const MAX_STATE: usize = 64 << 20;

/// How long CHECK_DEVICE_STATE waits for the transfer to end before reporting failure (the
/// front-end sends it after it saw EOF or closed its end, so a live transfer ends at once).
const CHECK_WAIT: Duration = Duration::from_secs(5);

/// How often the transfer thread looks at its cancel flag while the channel is idle.
const POLL_SLICE: i32 = 100;

// Error codes of the replies (bits 0-7 of SET_DEVICE_STATE_FD's, the whole u64 of
// CHECK_DEVICE_STATE's); the spec only asks for non-zero, errno values say why.
const E_BUSY: u64 = libc::EBUSY as u64;
const E_NOTSUP: u64 = libc::EOPNOTSUPP as u64;
const E_IO: u64 = libc::EIO as u64;
const E_INVAL: u64 = libc::EINVAL as u64;
const E_TIMEDOUT: u64 = libc::ETIMEDOUT as u64;

/// The state transfer of one session: at most one at a time.
#[derive(Debug, Default)]
pub(crate) struct Transfer {
    running: Option<Running>,
    /// The last transfer's outcome, once known (0 = success).
    result: Option<u64>,
}

#[derive(Debug)]
struct Running {
    done: Receiver<u64>,
    cancel: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Transfer {
    /// SET_DEVICE_STATE_FD: starts a SAVE or LOAD over `fd`; returns the reply value (0 with
    /// [`NO_FD`] on success; an error code with [`NO_FD`] otherwise — the spec forbids an error
    /// with an fd, and this back-end never offers a channel of its own).
    pub(crate) fn start(
        &mut self,
        device: &Arc<dyn Device>,
        params: DeviceStateParams,
        fd: Option<OwnedFd>,
        rings_running: bool,
    ) -> u64 {
        self.abandon();
        let fail = |this: &mut Transfer, code: u64, why: &str| {
            log::warn!("SET_DEVICE_STATE_FD refused: {why}");
            this.result = Some(code);
            code | NO_FD
        };
        let Some(fd) = fd else { return fail(self, E_INVAL, "no fd") };
        if rings_running {
            // Phase STOPPED: the device must be suspended, i.e. no ring started.
            return fail(self, E_BUSY, "a ring is still started (the STOPPED phase needs every ring stopped)");
        }
        if let Err(e) = set_nonblocking(&fd) {
            return fail(self, E_IO, &format!("the channel cannot be made non-blocking: {e}"));
        }
        // Saving is done before the reply, so a device that cannot save says so in the reply
        // itself (the front-end then does not wait for data that will never come).
        let blob = if params.direction == DeviceStateParams::SAVE {
            match device.save_state() {
                Ok(b) => Some(b),
                Err(why) => return fail(self, E_NOTSUP, &format!("the device cannot save its state: {why}")),
            }
        } else {
            None
        };
        let (tx, done) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = cancel.clone();
        let device = device.clone();
        let spawned = std::thread::Builder::new().name("vhost-user state".into()).spawn(move || {
            let code = match blob {
                Some(blob) => match write_all(&fd, &blob, &stop) {
                    Ok(()) => 0,
                    Err(why) => {
                        log::warn!("device state SAVE failed: {why}");
                        E_IO
                    }
                },
                None => match read_to_end(&fd, &stop) {
                    Ok(blob) => {
                        drop(fd);
                        match device.load_state(&blob) {
                            Ok(()) => 0,
                            Err(why) => {
                                log::warn!("device state LOAD failed: the device refused the state: {why}");
                                E_INVAL
                            }
                        }
                    }
                    Err(why) => {
                        log::warn!("device state LOAD failed: {why}");
                        E_IO
                    }
                },
            };
            // The receiver is gone only if the session ended; nothing left to tell.
            let _ = tx.send(code);
        });
        match spawned {
            Ok(thread) => {
                self.result = None;
                self.running = Some(Running { done, cancel, thread });
                NO_FD
            }
            Err(e) => fail(self, E_IO, &format!("no thread for the transfer: {e}")),
        }
    }

    /// CHECK_DEVICE_STATE: 0 if the last transfer was fully processed, else an error code
    /// (also when no transfer took place).
    pub(crate) fn check(&mut self) -> u64 {
        if let Some(running) = self.running.take() {
            let code = match running.done.recv_timeout(CHECK_WAIT) {
                Ok(code) => code,
                Err(RecvTimeoutError::Timeout) => {
                    log::warn!(
                        "CHECK_DEVICE_STATE: the transfer did not end (the front-end did not close or drain its end)"
                    );
                    running.cancel.store(true, Ordering::Relaxed);
                    E_TIMEDOUT
                }
                Err(RecvTimeoutError::Disconnected) => E_IO,
            };
            if code != E_TIMEDOUT {
                let _ = running.thread.join();
            }
            self.result = Some(code);
        }
        self.result.unwrap_or(E_INVAL)
    }

    /// Abandons a transfer in progress (a new SET_DEVICE_STATE_FD, or the session ends): its
    /// thread ends within one poll slice; a load the device is already doing runs to its end.
    pub(crate) fn abandon(&mut self) {
        if let Some(running) = self.running.take() {
            running.cancel.store(true, Ordering::Relaxed);
        }
        self.result = None;
    }

    /// Abandons a transfer in progress and waits for its thread (within one poll slice, plus
    /// a load the device is already doing): for a device reset, after which no state from
    /// before may land in the device. A later CHECK_DEVICE_STATE fails (no transfer).
    pub(crate) fn abandon_and_wait(&mut self) {
        if let Some(running) = self.running.take() {
            running.cancel.store(true, Ordering::Relaxed);
            let _ = running.thread.join();
        }
        self.result = None;
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        self.abandon();
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until `fd` is ready for `events` or `stop` is set (checked every [`POLL_SLICE`] ms).
fn wait(fd: &OwnedFd, events: libc::c_short, stop: &AtomicBool) -> Result<(), String> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err("abandoned by the session".into());
        }
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, POLL_SLICE) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.to_string());
        }
        if n > 0 {
            return Ok(());
        }
    }
}

fn write_all(fd: &OwnedFd, mut data: &[u8], stop: &AtomicBool) -> Result<(), String> {
    while !data.is_empty() {
        // SAFETY: writes from a live slice into an fd we own.
        let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => wait(fd, libc::POLLOUT, stop)?,
                Some(libc::EINTR) => {}
                _ => return Err(format!("writing the state: {e}")),
            }
            continue;
        }
        data = &data[n as usize..];
    }
    Ok(())
}

fn read_to_end(fd: &OwnedFd, stop: &AtomicBool) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: reads into a live buffer from an fd we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => wait(fd, libc::POLLIN, stop)?,
                Some(libc::EINTR) => {}
                _ => return Err(format!("reading the state: {e}")),
            }
            continue;
        }
        if n == 0 {
            // An EOF after the session gave up on this transfer (CHECK_DEVICE_STATE already
            // answered failure) must not load anything.
            if stop.load(Ordering::Relaxed) {
                return Err("abandoned by the session".into());
            }
            return Ok(out);
        }
        if out.len() + n as usize > MAX_STATE {
            return Err(format!("the state is larger than {MAX_STATE} bytes"));
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
}

/// Builds a device state blob: a 4-byte tag naming the device type and format version, then
/// little-endian fields. The reading side ([`StateReader`]) checks every length.
#[derive(Debug, Default)]
pub struct StateWriter {
    out: Vec<u8>,
}

impl StateWriter {
    /// A blob that starts with `tag`.
    pub fn new(tag: &[u8; 4]) -> StateWriter {
        StateWriter { out: tag.to_vec() }
    }
    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.out.push(v);
        self
    }
    /// Appends a little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends raw bytes of a length both sides know.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.out.extend_from_slice(v);
        self
    }
    /// The blob.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }
}

/// Reads a blob written by [`StateWriter`]: every read is bounds-checked, so a truncated or
/// foreign blob is an error, never a panic.
#[derive(Debug)]
pub struct StateReader<'a> {
    data: &'a [u8],
}

impl<'a> StateReader<'a> {
    /// Checks the tag and returns a reader of what follows it.
    pub fn new(data: &'a [u8], tag: &[u8; 4]) -> Result<StateReader<'a>, String> {
        match data.split_first_chunk::<4>() {
            Some((t, rest)) if t == tag => Ok(StateReader { data: rest }),
            _ => Err(format!("not a {} state (wrong tag or version)", String::from_utf8_lossy(tag))),
        }
    }
    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.data.len() < n {
            return Err("the state is truncated".into());
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }
    /// A byte.
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.bytes(1)?[0])
    }
    /// A little-endian u16.
    pub fn u16(&mut self) -> Result<u16, String> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    /// A little-endian u64.
    pub fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_le_bytes(b))
    }
    /// Everything not read yet (a part whose format belongs to someone else).
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
    /// Fails unless every byte was read (trailing bytes mean another format).
    pub fn end(&self) -> Result<(), String> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(format!("{} unexpected bytes after the state", self.data.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Mutex;

    use super::*;
    use crate::backend::Session;
    use crate::protocol::{FrontendRequest, Message, Payload, ProtocolFeatures};
    use crate::virtqueue::{AnyDeviceQueue, ChainBatch, VirtqueueError};

    /// Saves `state` (or refuses to when it is None) and records what it loads.
    struct Stateful {
        state: Option<Vec<u8>>,
        loaded: Mutex<Vec<u8>>,
    }
    impl Device for Stateful {
        fn num_queues(&self) -> u16 {
            1
        }
        fn features(&self) -> u64 {
            crate::protocol::VirtioFeatures::PROTOCOL_FEATURES.bits()
        }
        fn protocol_features(&self) -> ProtocolFeatures {
            ProtocolFeatures::DEVICE_STATE
        }
        fn process(&self, _: u16, _: &mut AnyDeviceQueue, _: &ChainBatch) -> Result<(), VirtqueueError> {
            Ok(())
        }
        fn save_state(&self) -> Result<Vec<u8>, String> {
            self.state.clone().ok_or_else(|| "no".into())
        }
        fn load_state(&self, state: &[u8]) -> Result<(), String> {
            if state.starts_with(b"bad") {
                return Err("bad state".into());
            }
            *self.loaded.lock().unwrap() = state.to_vec();
            Ok(())
        }
    }

    fn session(state: Option<Vec<u8>>) -> (Session, Arc<Stateful>) {
        let dev = Arc::new(Stateful { state, loaded: Mutex::new(Vec::new()) });
        let mut s = Session::new(dev.clone());
        let ack = Message::request(
            FrontendRequest::SET_PROTOCOL_FEATURES,
            Payload::U64(ProtocolFeatures::DEVICE_STATE.bits()),
        );
        assert!(s.handle(&ack, Vec::new()).unwrap().is_none());
        (s, dev)
    }

    fn u64_reply(s: &mut Session, m: Message, fds: Vec<OwnedFd>) -> (u64, usize) {
        let (reply, fds) = s.handle(&m, fds).unwrap().expect("a reply");
        match reply.payload {
            Payload::U64(v) => (v, fds.len()),
            p => panic!("not a u64: {p:?}"),
        }
    }

    fn set_fd(direction: u32, fd: OwnedFd) -> (Message, Vec<OwnedFd>) {
        let p = DeviceStateParams { direction, phase: 0 };
        (Message::request(FrontendRequest::SET_DEVICE_STATE_FD, Payload::DeviceStateParams(p)), vec![fd])
    }

    fn check() -> Message {
        Message::request(FrontendRequest::CHECK_DEVICE_STATE, Payload::Empty)
    }

    fn pipe() -> (std::fs::File, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds we then own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh fds from pipe2.
        unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) }
    }
    use std::os::fd::FromRawFd;

    #[test]
    fn save_then_load_a_state_larger_than_the_pipe() {
        // 1 MiB: far beyond the 64 KiB pipe buffer, so the transfer must happen after the reply.
        let blob: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let (mut src, _) = session(Some(blob.clone()));
        let (r, w) = pipe();
        let (m, fds) = set_fd(DeviceStateParams::SAVE, w.into());
        assert_eq!(u64_reply(&mut src, m, fds), (NO_FD, 0));
        let mut got = Vec::new();
        (&r).read_to_end(&mut got).unwrap();
        assert_eq!(got, blob);
        assert_eq!(u64_reply(&mut src, check(), Vec::new()).0, 0);

        let (mut dst, dev) = session(None);
        let (r, mut w) = pipe();
        let (m, fds) = set_fd(DeviceStateParams::LOAD, r.into());
        assert_eq!(u64_reply(&mut dst, m, fds), (NO_FD, 0));
        w.write_all(&got).unwrap();
        drop(w);
        assert_eq!(u64_reply(&mut dst, check(), Vec::new()).0, 0);
        assert_eq!(*dev.loaded.lock().unwrap(), blob);
    }

    #[test]
    fn failures_are_reported_and_the_session_goes_on() {
        // CHECK before any transfer.
        let (mut s, dev) = session(None);
        assert_ne!(u64_reply(&mut s, check(), Vec::new()).0, 0);
        // A device that cannot save: an error in the reply (with the no-fd bit), and in CHECK.
        let (_r, w) = pipe();
        let (m, fds) = set_fd(DeviceStateParams::SAVE, w.into());
        let (status, nfds) = u64_reply(&mut s, m, fds);
        assert_eq!((status & 0xff, status & NO_FD, nfds), (E_NOTSUP, NO_FD, 0));
        assert_eq!(u64_reply(&mut s, check(), Vec::new()).0, E_NOTSUP);
        // A state the device refuses: CHECK fails, nothing loaded.
        let (r, mut w) = pipe();
        let (m, fds) = set_fd(DeviceStateParams::LOAD, r.into());
        assert_eq!(u64_reply(&mut s, m, fds).0, NO_FD);
        w.write_all(b"bad state").unwrap();
        drop(w);
        assert_eq!(u64_reply(&mut s, check(), Vec::new()).0, E_INVAL);
        assert!(dev.loaded.lock().unwrap().is_empty());
        // The session still answers, and a good load works afterwards.
        let (r, mut w) = pipe();
        let (m, fds) = set_fd(DeviceStateParams::LOAD, r.into());
        assert_eq!(u64_reply(&mut s, m, fds).0, NO_FD);
        w.write_all(b"good").unwrap();
        drop(w);
        assert_eq!(u64_reply(&mut s, check(), Vec::new()).0, 0);
        assert_eq!(*dev.loaded.lock().unwrap(), b"good");
    }

    #[test]
    fn without_device_state_negotiated_the_request_is_refused() {
        let dev = Arc::new(Stateful { state: Some(vec![1]), loaded: Mutex::new(Vec::new()) });
        let mut s = Session::new(dev);
        let (_r, w) = pipe();
        let (m, fds) = set_fd(DeviceStateParams::SAVE, w.into());
        // The spec's failure answer (an error in bits 0-7, "no fd" in bit 8), the session goes on.
        let (reply, _) = s.handle(&m, fds).unwrap().expect("a reply");
        let Payload::U64(v) = reply.payload else { panic!("{reply:?}") };
        assert!(v & 0xff != 0 && v & 0x100 != 0, "{v:#x}");
    }

    #[test]
    fn state_reader_checks_every_length() {
        let blob = StateWriter::new(b"TEST").u8(1).u16(2).u64(3).bytes(b"xy").finish();
        let mut r = StateReader::new(&blob, b"TEST").unwrap();
        assert_eq!((r.u8(), r.u16(), r.u64(), r.bytes(2)), (Ok(1), Ok(2), Ok(3), Ok(&b"xy"[..])));
        assert!(r.end().is_ok());
        assert!(r.u8().is_err());
        assert!(StateReader::new(&blob, b"OTHR").is_err());
        assert!(StateReader::new(b"TE", b"TEST").is_err());
        let mut r = StateReader::new(&blob[..6], b"TEST").unwrap();
        assert!(r.u8().is_ok() && r.u16().is_err());
    }
}
