//! Eventfd kicks and calls as the driver side uses them (the block and net I/O loops, the net
//! client): signal one, wait for one with a timeout.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

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
