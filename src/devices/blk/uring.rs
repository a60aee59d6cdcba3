//! io_uring for one ring of the block device: the transfers of a batch go to the kernel with one
//! system call, and their completions come back on an eventfd the ring's worker watches (the
//! device model's event fds), so a wake-up no longer waits for each request's I/O in turn.
//!
//! Every submitted operation keeps its chain and iovecs here until its completion is reaped: the
//! kernel writes guest memory through those iovecs, so a ring that stops first waits for all of
//! them ([`RingIo::drain`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use io_uring::{opcode, types, IoUring};

use crate::virtqueue::KeptChain;

/// What an operation does.
#[derive(Clone, Copy, Debug)]
pub(super) enum OpKind {
    /// preadv/pwritev of `len` bytes at `offset`.
    Transfer { write: bool, len: u64, offset: u64 },
    /// fdatasync.
    Flush,
}

/// An operation in flight and the chain it answers.
pub(super) struct Op {
    pub chain: KeptChain,
    pub iov: Vec<libc::iovec>,
    pub kind: OpKind,
}

/// The io_uring of one ring.
pub(super) struct RingIo {
    ring: IoUring,
    eventfd: OwnedFd,
    /// Operations by their `user_data`.
    ops: Vec<Option<Op>>,
    free: Vec<u32>,
    in_flight: usize,
}

// SAFETY: the raw iovec pointers in `ops` point into guest memory that stays mapped while the
// ring runs (see the module comment); a RingIo is used by one worker thread at a time, under the
// device's lock.
unsafe impl Send for RingIo {}

impl std::fmt::Debug for RingIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingIo").field("in_flight", &self.in_flight).finish_non_exhaustive()
    }
}

impl RingIo {
    /// An io_uring with room for `entries` operations in flight and its completion eventfd.
    pub fn new(entries: u32) -> io::Result<RingIo> {
        let entries = entries.max(1).next_power_of_two();
        let ring = IoUring::new(entries)?;
        let eventfd = crate::eventfd::new()?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let n = entries as usize;
        Ok(RingIo {
            ring,
            eventfd,
            ops: (0..n).map(|_| None).collect(),
            free: (0..n as u32).rev().collect(),
            in_flight: 0,
        })
    }

    /// The fd that becomes readable when completions are waiting.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Queues `op` on `fd` (sent with the next [`submit`](Self::submit)); gives it back when the
    /// ring has no room, for the caller to do synchronously.
    pub fn push(&mut self, fd: RawFd, op: Op) -> Result<(), Op> {
        let Some(&slot) = self.free.last() else { return Err(op) };
        let entry = match op.kind {
            OpKind::Transfer { write: true, offset, .. } => {
                opcode::Writev::new(types::Fd(fd), op.iov.as_ptr(), op.iov.len() as u32).offset(offset).build()
            }
            OpKind::Transfer { write: false, offset, .. } => {
                opcode::Readv::new(types::Fd(fd), op.iov.as_ptr(), op.iov.len() as u32).offset(offset).build()
            }
            OpKind::Flush => opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build(),
        }
        .user_data(u64::from(slot));
        // SAFETY: the iovecs (a heap buffer that does not move with the Vec) and the guest buffers
        // they name stay alive in `self.ops[slot]` until the completion is reaped.
        let mut pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        if !pushed {
            // Submission queue full: hand what is queued to the kernel and try once more.
            let _ = self.submit();
            // SAFETY: as above.
            pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        }
        if !pushed {
            return Err(op);
        }
        self.free.pop();
        self.ops[slot as usize] = Some(op);
        self.in_flight += 1;
        Ok(())
    }

    /// Hands the queued operations to the kernel (one system call). Operations the kernel could
    /// not take stay queued for the next call.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY/EAGAIN: the completion queue is full; reaping makes room.
                Err(e) => return Err(e),
            }
        }
    }

    /// Passes every completion waiting to `done` with the operation's result (bytes moved, or
    /// -errno). Returns how many.
    pub fn reap(&mut self, done: &mut dyn FnMut(Op, i32)) -> usize {
        crate::eventfd::drain(self.eventfd.as_fd());
        let mut n = 0;
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(op) = self.ops.get_mut(slot).and_then(Option::take) else { continue };
            self.free.push(slot as u32);
            self.in_flight -= 1;
            n += 1;
            done(op, cqe.result());
        }
        if !self.ring.submission().is_empty() {
            // Room in the completion queue again: send what an earlier submit left queued.
            let _ = self.submit();
        }
        n
    }

    /// Waits for every operation in flight and passes it to `done` (before the ring stops: the
    /// kernel must be done with the guest buffers).
    pub fn drain(&mut self, done: &mut dyn FnMut(Op, i32)) {
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => {
                    // Nothing more can be waited for; what completed is still reaped.
                    if self.reap(done) == 0 {
                        break;
                    }
                    continue;
                }
            }
            self.reap(done);
        }
    }
}

impl Drop for RingIo {
    fn drop(&mut self) {
        // The kernel may still write guest buffers of operations in flight: wait for them.
        self.drain(&mut |_, _| {});
    }
}
