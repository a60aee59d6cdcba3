//! Eventfds, the kicks and calls of both roles: create one, signal it, drain it, wait for it
//! with a timeout. One set of helpers shared by the front-end (driver loops, net client) and the
//! back-end (workers, session), which must not import each other.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A new non-blocking, close-on-exec eventfd.
pub fn new() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is a new descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: eventfd returned a new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Clears the eventfd `fd` (a non-blocking read; nothing pending is not an error).
pub fn drain(fd: BorrowedFd<'_>) {
    let mut v = [0u8; 8];
    // SAFETY: reading 8 bytes into a local buffer from a non-blocking eventfd.
    unsafe { libc::read(fd.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
}

/// Writes the eventfd `fd` (a kick). A full counter (EAGAIN) is already a pending signal.
pub fn signal(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing 8 bytes from a local buffer to an eventfd.
    if unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) } != 8 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(e);
        }
    }
    Ok(())
}

/// Waits up to `timeout_ms` for the eventfd `fd` and clears it; whether it was signalled. A
/// signal interrupting the wait is `false`, so the caller's loop checks for it.
pub fn wait(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
    }
    if n > 0 {
        let mut v = [0u8; 8];
        // SAFETY: reading 8 bytes from an eventfd into a local buffer.
        unsafe { libc::read(fd.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
    }
    Ok(n > 0)
}
