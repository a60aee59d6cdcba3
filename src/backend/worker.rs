//! One thread per started ring: waits for kicks, drains the ring through the device, notifies
//! the driver. Stopped (GET_VRING_BASE) by a wake eventfd; returns the ring's state.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::requests::BackendRequests;
use super::Device;
use crate::protocol::{BackendRequest, IotlbMsg, Payload};
use crate::virtqueue::{ChainBatch, DeviceQueue, VirtqueueError};

/// Misses for the same address in a row before a ring is given up on.
const MAX_MISSES: u32 = 3;

/// Sends an IOTLB MISS and waits for the front-end's ack, which it sends after the UPDATE (on
/// the main channel, handled by the session thread meanwhile). False if that did not happen.
fn ask_for_entry(requests: Option<&BackendRequests>, iova: u64, perm: u8) -> bool {
    let Some(requests) = requests else { return false };
    let miss = IotlbMsg { iova, size: 0, uaddr: 0, perm, kind: 1 };
    let answer = requests.send(
        BackendRequest::IOTLB_MSG,
        Payload::Iotlb(miss),
        &[],
        true,
        Some(std::time::Duration::from_secs(5)),
    );
    matches!(answer, Ok(Some(0)))
}

/// Shared between the session and a ring's worker.
#[derive(Debug)]
pub(crate) struct RingShared {
    pub enabled: AtomicBool,
    pub call: Mutex<Option<OwnedFd>>,
    stop: AtomicBool,
    wake: OwnedFd,
}

impl RingShared {
    pub fn new(enabled: bool, call: Option<OwnedFd>) -> io::Result<Arc<RingShared>> {
        // SAFETY: plain syscall; the result is a new descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: eventfd returned a new descriptor.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Arc::new(RingShared {
            enabled: AtomicBool::new(enabled),
            call: Mutex::new(call),
            stop: AtomicBool::new(false),
            wake,
        }))
    }

    /// Makes the worker look at the ring (after enable) or notice `stop`.
    pub fn wake(&self) {
        signal(self.wake.as_raw_fd());
    }

    fn notify_driver(&self) {
        let call = self.call.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = call.as_ref() {
            signal(fd.as_raw_fd());
        }
    }
}

fn signal(fd: i32) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing 8 bytes to an eventfd we hold.
    unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
}

fn drain_fd(fd: i32) {
    let mut v = [0u8; 8];
    // SAFETY: reading 8 bytes into a local buffer from a non-blocking eventfd.
    unsafe { libc::read(fd, v.as_mut_ptr().cast(), 8) };
}

/// A running ring.
#[derive(Debug)]
pub(crate) struct Worker {
    pub shared: Arc<RingShared>,
    thread: Option<JoinHandle<DeviceQueue>>,
}

impl Worker {
    pub fn start(
        index: u16,
        mut queue: DeviceQueue,
        kick: OwnedFd,
        shared: Arc<RingShared>,
        device: Arc<dyn Device>,
        requests: Option<Arc<BackendRequests>>,
    ) -> io::Result<Worker> {
        let s = shared.clone();
        let thread = std::thread::Builder::new().name(format!("vhost-user ring {index}")).spawn(move || {
            let mut batch = ChainBatch::new();
            // A kick may have come before the worker existed: look at the ring once.
            let mut pending = true;
            let mut last_miss = None;
            let mut misses = 0u32;
            loop {
                if s.stop.load(Ordering::Acquire) {
                    return queue;
                }
                if pending && s.enabled.load(Ordering::Acquire) && !queue.is_broken() {
                    let mut result = Ok(false);
                    device.wake_scope(&mut || {
                        result = queue.drain(&mut batch, 64, |q, b| device.process(index, q, b));
                    });
                    match result {
                        Ok(true) => s.notify_driver(),
                        Ok(false) => {}
                        Err(VirtqueueError::IotlbMiss { iova, perm }) => {
                            // Chains before the miss may have completed: let the driver know.
                            s.notify_driver();
                            misses = if last_miss == Some(iova) { misses + 1 } else { 1 };
                            last_miss = Some(iova);
                            if misses > MAX_MISSES || !ask_for_entry(requests.as_deref(), iova, perm) {
                                // The front-end does not map it: an unusable ring, like a
                                // malformed one. Stop processing it; the session goes on.
                                queue.mark_broken();
                            } else {
                                // The UPDATE has arrived (REPLY_ACK): walk the chain again.
                                continue;
                            }
                        }
                        Err(_) => {
                            // The queue is broken (malformed ring): stop processing it, keep the
                            // session. Signal once so a waiting driver notices nothing more comes.
                            s.notify_driver();
                        }
                    }
                }
                let mut fds = [
                    libc::pollfd { fd: kick.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                    libc::pollfd { fd: s.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                ];
                // SAFETY: two valid pollfds.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
                pending = n > 0 && fds[0].revents != 0 || fds[1].revents != 0;
                if fds[0].revents != 0 {
                    drain_fd(kick.as_raw_fd());
                }
                if fds[1].revents != 0 {
                    drain_fd(s.wake.as_raw_fd());
                }
            }
        })?;
        Ok(Worker { shared, thread: Some(thread) })
    }

    /// Stops the worker and returns the ring state (for GET_VRING_BASE).
    pub fn stop(mut self) -> Option<DeviceQueue> {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shared.stop.store(true, Ordering::Release);
            self.shared.wake();
            let _ = t.join();
        }
    }
}
