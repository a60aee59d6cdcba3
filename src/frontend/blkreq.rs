//! virtio-blk requests for a front-end, one at a time or many in flight, with the whole path of
//! a request (stage the header and data, add the chain, publish, kick when the device asks,
//! wait, check the status, copy the data out) in Rust, so a Python caller crosses into native
//! code once per request — or once per batch.
//!
//! Each request gets a staging slot of its own (header, data area, status byte) taken from a
//! pool preallocated in guest memory; the slot stays the request's until its completion has
//! been collected (or, for a cancelled request, until the device has used the chain: virtio
//! 1.2 §2.7.14 — the buffers belong to the device until they are in the used ring). Requests
//! are named by tokens `(generation << 16) | slot`, never reused while the caller could still
//! hold them.
//!
//! Completions are reaped by whoever waits: one waiter at a time sleeps on the call eventfd
//! (the "reaper"), the others on a condition variable it signals after each reap.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::eventfd;
use super::poll::AdaptivePoll;
use crate::error::{Error, Result};
use crate::memory::GuestMemory;
use crate::virtio::blk::{
    RequestHeader, SECTOR_SIZE, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use crate::virtqueue::{AnyDriverQueue, VirtqueueError};

/// Bytes of the per-slot metadata area: the 16-byte request header, then the status byte.
const META: u64 = 32;
const STATUS_OFF: u64 = RequestHeader::SIZE as u64;
/// Upper bound of the per-slot data area.
pub const DEFAULT_SLOT_BYTES: u32 = 128 << 10;
/// Longest sleep between checks for signals, timeouts and a closed engine.
const SLICE: Duration = Duration::from_millis(100);

/// One request as the caller describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// VIRTIO_BLK_T_IN: read `len` bytes at `sector`.
    Read {
        /// First sector.
        sector: u64,
        /// Bytes (a multiple of 512).
        len: u32,
    },
    /// VIRTIO_BLK_T_OUT: write the caller's bytes at `sector`.
    Write {
        /// First sector.
        sector: u64,
    },
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_DISCARD of one segment.
    Discard {
        /// First sector.
        sector: u64,
        /// Sectors.
        sectors: u32,
    },
    /// VIRTIO_BLK_T_WRITE_ZEROES of one segment.
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Sectors.
        sectors: u32,
        /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.
        unmap: bool,
    },
    /// VIRTIO_BLK_T_GET_ID (20 bytes).
    GetId,
}

impl Op {
    fn type_(&self) -> u32 {
        match self {
            Op::Read { .. } => VIRTIO_BLK_T_IN,
            Op::Write { .. } => VIRTIO_BLK_T_OUT,
            Op::Flush => VIRTIO_BLK_T_FLUSH,
            Op::Discard { .. } => VIRTIO_BLK_T_DISCARD,
            Op::WriteZeroes { .. } => VIRTIO_BLK_T_WRITE_ZEROES,
            Op::GetId => VIRTIO_BLK_T_GET_ID,
        }
    }

    /// A request given in bytes, as callers think of them: `offset` and `length` (the length
    /// of a read, DISCARD or WRITE_ZEROES; ignored for the others, a write's length is its
    /// data's) must be multiples of 512 since virtio-blk addresses 512-byte sectors (virtio
    /// 1.2 §5.2.6).
    pub fn from_bytes(type_: u32, offset: u64, length: u64, unmap: bool) -> std::result::Result<Op, String> {
        let sector_size = SECTOR_SIZE;
        let sector = sector_of(offset)?;
        if length % sector_size != 0 {
            return Err("lengths must be non-negative multiples of 512".into());
        }
        let sectors = || u32::try_from(length / sector_size).map_err(|_| "too many sectors in one request".to_string());
        Ok(match type_ {
            VIRTIO_BLK_T_IN => {
                Op::Read { sector, len: u32::try_from(length).map_err(|_| "read too long".to_string())? }
            }
            VIRTIO_BLK_T_OUT => Op::Write { sector },
            VIRTIO_BLK_T_FLUSH => Op::Flush,
            VIRTIO_BLK_T_DISCARD => Op::Discard { sector, sectors: sectors()? },
            VIRTIO_BLK_T_WRITE_ZEROES => Op::WriteZeroes { sector, sectors: sectors()?, unmap },
            VIRTIO_BLK_T_GET_ID => Op::GetId,
            _ => return Err(format!("unsupported virtio-blk request type {type_}")),
        })
    }

    /// Bytes the device writes before the status byte.
    pub fn in_len(&self) -> u32 {
        match self {
            Op::Read { len, .. } => *len,
            Op::GetId => crate::virtio::blk::VIRTIO_BLK_ID_BYTES as u32,
            _ => 0,
        }
    }
}

/// The sector of byte `offset`, which must be a multiple of 512 (virtio-blk addresses 512-byte
/// sectors, virtio 1.2 §5.2.6).
pub fn sector_of(offset: u64) -> std::result::Result<u64, String> {
    if offset % SECTOR_SIZE != 0 {
        return Err("offsets must be non-negative multiples of 512".into());
    }
    Ok(offset / SECTOR_SIZE)
}

/// Copies a completion's data into the buffer it is given (see [`BlockRequests::collect_each`]).
pub type ReadData<'a> = dyn FnMut(&mut [u8]) -> Result<()> + 'a;

/// A collected completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request's token.
    pub token: u64,
    /// The status byte the device wrote (VIRTIO_BLK_S_*; 0xff if it wrote none).
    pub status: u8,
    /// Bytes the device claims to have written (used.len, including the status byte).
    pub written: u32,
    /// Bytes of data to collect (reads and GET_ID).
    pub in_len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    InFlight,
    Done,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    state: State,
    token: u64,
    in_len: u32,
    written: u32,
    cancelled: bool,
    /// Completed before it was collected, in reap order (for `collect_any`).
    done_seq: u64,
}

struct Inner {
    slots: Vec<Slot>,
    free: Vec<u16>,
    by_head: Vec<u16>,
    generation: u64,
    done_seq: u64,
    /// Completions not collected yet, oldest first.
    done: std::collections::VecDeque<u16>,
    reaper: bool,
    /// Waiters asleep on `reaped` (the hot paths skip the notification, a futex call, when
    /// nobody sleeps: an event loop's reader or a lone synchronous waiter).
    sleepers: u32,
    /// The device broke the ring: what it did (every later call fails).
    broken: Option<String>,
    /// The back-end hung up: nothing in flight will complete.
    dead: bool,
    closed: bool,
    /// Whether [`BlockRequests::wait_completions`] polls before sleeping.
    adaptive: AdaptivePoll,
    /// Scratch for reaping, kept to avoid an allocation per reap.
    used: Vec<(u16, u32)>,
}

/// Why a wait on the call eventfd ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// The device signalled (or the slice ran out): reap.
    Call,
    /// The back-end hung up the main channel.
    HungUp,
    /// [`BlockRequests::close`] was called.
    Closed,
}

/// The request engine of one driver ring (see the module).
pub struct BlockRequests {
    memory: Arc<GuestMemory>,
    queue_index: u16,
    indirect: bool,
    slot_bytes: u32,
    meta_base: u64,
    data_base: u64,
    kick: OwnedFd,
    call: OwnedFd,
    /// Whether `call` has O_NONBLOCK (clearing it is then one read, not poll and read).
    call_nonblocking: bool,
    /// The main channel (a duplicate): a hang-up there fails every waiter.
    main: Option<OwnedFd>,
    /// Signalled by `close` to wake waiters.
    wake: OwnedFd,
    inner: Mutex<Inner>,
    reaped: Condvar,
    /// Hybrid polling: how long a synchronous request yields and re-checks the used ring
    /// before sleeping on the call eventfd.
    poll: Duration,
}

fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    fd.try_clone_to_owned().map_err(Error::Io)
}

impl BlockRequests {
    /// An engine for `queue` (ring `queue_index`): `slots` staging slots of up to `slot_bytes`
    /// data each are allocated in `memory` (`slot_bytes` is halved down to 4 KiB while the
    /// memory is too small). `kick`, `call` and `main` are duplicated.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        memory: Arc<GuestMemory>,
        queue: &AnyDriverQueue,
        queue_index: u16,
        indirect: bool,
        slot_bytes: u32,
        kick: BorrowedFd<'_>,
        call: BorrowedFd<'_>,
        main: Option<BorrowedFd<'_>>,
        poll: Duration,
    ) -> Result<BlockRequests> {
        let size = queue.size();
        let n = u64::from(size);
        let mut slot_bytes = slot_bytes.max(4096) & !4095;
        let meta_base = memory.alloc(n * META, 64)?;
        let data_base = loop {
            match memory.alloc(n * u64::from(slot_bytes), 4096) {
                Ok(a) => break a,
                Err(e) if slot_bytes <= 4096 => return Err(e.into()),
                Err(_) => slot_bytes /= 2,
            }
        };
        let wake = eventfd::new().map_err(Error::Io)?;
        let slot = Slot { state: State::Free, token: 0, in_len: 0, written: 0, cancelled: false, done_seq: 0 };
        Ok(BlockRequests {
            memory,
            queue_index,
            indirect,
            slot_bytes,
            meta_base,
            data_base,
            kick: dup(kick)?,
            call: dup(call)?,
            call_nonblocking: {
                // SAFETY: F_GETFL on a valid fd.
                let flags = unsafe { libc::fcntl(call.as_raw_fd(), libc::F_GETFL) };
                flags >= 0 && flags & libc::O_NONBLOCK != 0
            },
            main: main.map(dup).transpose()?,
            wake,
            inner: Mutex::new(Inner {
                slots: vec![slot; usize::from(size)],
                free: (0..size).rev().collect(),
                by_head: vec![u16::MAX; usize::from(size)],
                generation: 0,
                done_seq: 0,
                done: std::collections::VecDeque::new(),
                reaper: false,
                sleepers: 0,
                broken: None,
                dead: false,
                closed: false,
                adaptive: AdaptivePoll::new(),
                used: Vec::with_capacity(usize::from(size)),
            }),
            reaped: Condvar::new(),
            poll,
        })
    }

    /// The largest data length one request may carry.
    pub fn slot_bytes(&self) -> u32 {
        self.slot_bytes
    }

    /// The call eventfd (a duplicate owned by the engine): an event loop watches it.
    pub fn call_fd(&self) -> BorrowedFd<'_> {
        self.call.as_fd()
    }

    /// The duplicate of the main channel, if any: readable with a hang-up when the back-end dies.
    pub fn main_fd(&self) -> Option<BorrowedFd<'_>> {
        self.main.as_ref().map(|f| f.as_fd())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, inner: &Inner) -> Result<()> {
        if inner.closed || inner.dead {
            return Err(Error::Disconnected);
        }
        if inner.broken.is_some() {
            let source = VirtqueueError::InvalidChain("the device broke this ring earlier (see the first error)");
            return Err(Error::Queue { queue: self.queue_index, source });
        }
        Ok(())
    }

    fn qerr(&self, source: VirtqueueError) -> Error {
        Error::Queue { queue: self.queue_index, source }
    }

    /// Stages and adds as many of `ops` as there is room for (slots and descriptors), in
    /// order; `data[i]` is the payload of `ops[i]` for writes. Publishes them with one store
    /// and kicks if the device asks. Returns the tokens of the requests added (a prefix of
    /// `ops`: fewer when the ring is full).
    pub fn submit(&self, queue: &Mutex<AnyDriverQueue>, ops: &[(Op, &[u8])]) -> Result<Vec<u64>> {
        let mut tokens = Vec::with_capacity(ops.len());
        self.submit_each(queue, ops, &mut |t| tokens.push(t))?;
        Ok(tokens)
    }

    /// Checks one request against the slot size and virtio-blk's 512-byte units; returns the
    /// bytes of its driver-written payload and of its device-written data.
    fn validate(&self, op: Op, data: &[u8]) -> Result<(usize, usize)> {
        let payload_len = match op {
            Op::Write { .. } => data.len(),
            Op::Discard { .. } | Op::WriteZeroes { .. } => 16,
            _ => 0,
        };
        let in_len = op.in_len() as usize;
        if payload_len.max(in_len) > self.slot_bytes as usize {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "request of {} bytes is larger than a staging slot ({})",
                    payload_len.max(in_len),
                    self.slot_bytes
                ),
            )));
        }
        if let Op::Read { len, .. } = op {
            if len == 0 || u64::from(len) % SECTOR_SIZE != 0 {
                return Err(Error::Io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "read length must be a non-zero multiple of 512",
                )));
            }
        }
        if matches!(op, Op::Write { .. }) && (data.is_empty() || data.len() as u64 % SECTOR_SIZE != 0) {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write length must be a non-zero multiple of 512",
            )));
        }
        Ok((payload_len, in_len))
    }

    /// [`submit`](Self::submit), handing each token to `token` (no allocation).
    fn submit_each(
        &self,
        queue: &Mutex<AnyDriverQueue>,
        ops: &[(Op, &[u8])],
        on_token: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let mut inner = self.lock();
        self.check(&inner)?;
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        let mem = self.memory.table();
        let mut added = false;
        // Every request is checked before any is added: a bad one in the middle of a batch
        // must not leave the ones before it on the ring unpublished and unnamed.
        for &(op, data) in ops {
            self.validate(op, data)?;
        }
        for &(op, data) in ops {
            let (payload_len, in_len) = self.validate(op, data)?;
            let ndesc = if payload_len > 0 || in_len > 0 { 3 } else { 2 };
            let room = if self.indirect { 1 } else { ndesc };
            if inner.free.is_empty() || usize::from(q.num_free()) < room {
                break;
            }
            let Some(&s) = inner.free.last() else { break };
            let meta = self.meta_base + u64::from(s) * META;
            let buf = self.data_base + u64::from(s) * u64::from(self.slot_bytes);
            let sector = match op {
                Op::Read { sector, .. } | Op::Write { sector } => sector,
                _ => 0,
            };
            mem.write(meta, &RequestHeader { type_: op.type_(), reserved: 0, sector }.to_le_bytes())?;
            mem.write(meta + STATUS_OFF, &[0xff])?;
            match op {
                Op::Write { .. } => mem.write(buf, data)?,
                Op::Discard { sector, sectors } | Op::WriteZeroes { sector, sectors, .. } => {
                    // struct virtio_blk_discard_write_zeroes (virtio 1.2 §5.2.6).
                    let flags = matches!(op, Op::WriteZeroes { unmap: true, .. }) as u32
                        * crate::virtio::blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
                    let mut seg = [0u8; 16];
                    seg[..8].copy_from_slice(&sector.to_le_bytes());
                    seg[8..12].copy_from_slice(&sectors.to_le_bytes());
                    seg[12..].copy_from_slice(&flags.to_le_bytes());
                    mem.write(buf, &seg)?;
                }
                // GET_ID: a device that writes fewer than 20 bytes must not hand back an
                // earlier request's data.
                Op::GetId => mem.write(buf, &[0u8; crate::virtio::blk::VIRTIO_BLK_ID_BYTES])?,
                _ => {}
            }
            let hdr = (meta, RequestHeader::SIZE as u32);
            let status = (meta + STATUS_OFF, 1u32);
            let head = {
                let add = |r: &[(u64, u32)], w: &[(u64, u32)], q: &mut AnyDriverQueue| {
                    if self.indirect {
                        q.add_indirect(r, w)
                    } else {
                        q.add(r, w)
                    }
                };
                if in_len > 0 {
                    add(&[hdr], &[(buf, in_len as u32), status], &mut q)
                } else if payload_len > 0 {
                    add(&[hdr, (buf, payload_len as u32)], &[status], &mut q)
                } else {
                    add(&[hdr], &[status], &mut q)
                }
            }
            .map_err(|e| self.qerr(e))?;
            inner.free.pop();
            inner.generation += 1;
            let tok = (inner.generation << 16) | u64::from(s);
            inner.by_head[usize::from(head)] = s;
            inner.slots[usize::from(s)] = Slot {
                state: State::InFlight,
                token: tok,
                in_len: in_len as u32,
                written: 0,
                cancelled: false,
                done_seq: 0,
            };
            added = true;
            on_token(tok);
        }
        if added {
            q.publish();
            // A device event suppression area filled wrongly (packed rings) breaks the ring
            // like a bad used entry: the requests just added are the engine's to forget.
            let kick = q.kick_needed().inspect_err(|e| {
                inner.broken = Some(e.to_string());
                self.reaped.notify_all();
            });
            if kick.map_err(|e| self.qerr(e))? {
                eventfd::signal(self.kick.as_fd()).map_err(Error::Io)?;
            }
        }
        Ok(())
    }

    /// Reaps the used ring until it is empty (a second look after used_event was moved closes
    /// the window in which the device could have skipped the call, virtio 1.2 §2.7.10);
    /// returns how many completed. A used id that is not in flight, or a length beyond the
    /// chain's writable buffers, breaks the ring for good (VirtqueueError).
    fn reap_locked(&self, inner: &mut Inner, queue: &Mutex<AnyDriverQueue>) -> Result<usize> {
        self.check(inner)?;
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        let mut used = std::mem::take(&mut inner.used);
        let result = self.reap_into(inner, &mut q, &mut used);
        inner.used = used;
        result
    }

    fn reap_into(&self, inner: &mut Inner, q: &mut AnyDriverQueue, used: &mut Vec<(u16, u32)>) -> Result<usize> {
        let mut total = 0;
        loop {
            used.clear();
            if let Err(e) = q.reap(used, usize::MAX) {
                inner.broken = Some(e.to_string());
                self.reaped.notify_all();
                return Err(self.qerr(e));
            }
            if used.is_empty() {
                break;
            }
            for &(head, written) in used.iter() {
                let s = inner.by_head[usize::from(head)];
                if s == u16::MAX {
                    // In flight in the ring but not ours: added through the AnyDriverQueue
                    // directly. Not for this engine to judge; it only tracks its own.
                    continue;
                }
                inner.by_head[usize::from(head)] = u16::MAX;
                let slot = &mut inner.slots[usize::from(s)];
                slot.written = written;
                if slot.cancelled {
                    slot.state = State::Free;
                    inner.free.push(s);
                } else {
                    slot.state = State::Done;
                    inner.done_seq += 1;
                    slot.done_seq = inner.done_seq;
                    inner.done.push_back(s);
                }
                total += 1;
            }
        }
        if total > 0 {
            inner.adaptive.completed(total as u32);
            self.wake_sleepers(inner);
        }
        Ok(total)
    }

    /// Reaps without waiting; returns how many requests completed.
    pub fn reap(&self, queue: &Mutex<AnyDriverQueue>) -> Result<usize> {
        let mut inner = self.lock();
        self.reap_locked(&mut inner, queue)
    }

    fn slot_of(&self, inner: &Inner, token: u64) -> Option<u16> {
        let s = (token & 0xffff) as u16;
        inner.slots.get(usize::from(s)).filter(|sl| sl.token == token && sl.state != State::Free).map(|_| s)
    }

    /// Collects `token`'s completion if it is there: copies its data (up to `out.len()`) into
    /// `out` and frees the slot. `None`: still in flight. An unknown token is an error.
    pub fn collect(&self, token: u64, out: &mut [u8]) -> Result<Option<Completion>> {
        let mut inner = self.lock();
        self.collect_locked(&mut inner, token, out)
    }

    fn collect_locked(&self, inner: &mut Inner, token: u64, out: &mut [u8]) -> Result<Option<Completion>> {
        let s = self.slot_of(inner, token).ok_or_else(|| {
            Error::Io(io::Error::new(io::ErrorKind::InvalidInput, format!("unknown or collected token {token:#x}")))
        })?;
        let slot = inner.slots[usize::from(s)];
        if slot.state != State::Done {
            return Ok(None);
        }
        let mem = self.memory.table();
        let mut status = [0u8];
        mem.read(self.meta_base + u64::from(s) * META + STATUS_OFF, &mut status)?;
        let n = out.len().min(slot.in_len as usize);
        if n > 0 {
            mem.read(self.data_base + u64::from(s) * u64::from(self.slot_bytes), &mut out[..n])?;
        }
        inner.slots[usize::from(s)].state = State::Free;
        inner.free.push(s);
        if let Some(pos) = inner.done.iter().position(|&d| d == s) {
            inner.done.remove(pos);
        }
        Ok(Some(Completion { token, status: status[0], written: slot.written, in_len: slot.in_len }))
    }

    /// Collects up to `max` completions, oldest first, without a copy in between: `sink` gets
    /// each completion and a reader that copies its data (the first `out.len()` of `in_len`
    /// bytes) into the caller's buffer, e.g. a new Python object. `sink` returning false stops
    /// before that completion, which stays to be collected later. The slot is freed after
    /// `sink` returns (it must not call back into the engine: the engine is locked).
    pub fn collect_each(
        &self,
        max: usize,
        sink: &mut dyn FnMut(Completion, &mut ReadData<'_>) -> bool,
    ) -> Result<usize> {
        let mut inner = self.lock();
        let mem = self.memory.table();
        let mut n = 0;
        while n < max {
            let Some(&s) = inner.done.front() else { break };
            let slot = inner.slots[usize::from(s)];
            let mut status = [0u8];
            mem.read(self.meta_base + u64::from(s) * META + STATUS_OFF, &mut status)?;
            let data = self.data_base + u64::from(s) * u64::from(self.slot_bytes);
            let c = Completion { token: slot.token, status: status[0], written: slot.written, in_len: slot.in_len };
            let mut read = |out: &mut [u8]| -> Result<()> {
                let k = out.len().min(slot.in_len as usize);
                if k > 0 {
                    mem.read(data, &mut out[..k])?;
                }
                Ok(())
            };
            if !sink(c, &mut read) {
                break;
            }
            inner.done.pop_front();
            inner.slots[usize::from(s)].state = State::Free;
            inner.free.push(s);
            n += 1;
        }
        Ok(n)
    }

    /// The slot a token names (tokens are `(generation << 16) | slot`), for a caller that keeps
    /// something per request in flight (at most the ring's size of them).
    pub fn slot_index(token: u64) -> usize {
        (token & 0xffff) as usize
    }

    /// Collects up to `max` completions, oldest first; `sink` gets each with its data (empty
    /// for requests without any).
    pub fn collect_any(&self, max: usize, sink: &mut dyn FnMut(Completion, &[u8])) -> Result<usize> {
        let mut inner = self.lock();
        let mut buf = Vec::new();
        let mut n = 0;
        while n < max {
            let Some(&s) = inner.done.front() else { break };
            let token = inner.slots[usize::from(s)].token;
            buf.resize(inner.slots[usize::from(s)].in_len as usize, 0);
            if let Some(c) = self.collect_locked(&mut inner, token, &mut buf)? {
                sink(c, &buf);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Completions waiting to be collected.
    pub fn pending_completions(&self) -> usize {
        self.lock().done.len()
    }

    /// Requests submitted and not completed yet.
    pub fn in_flight(&self) -> usize {
        self.lock().slots.iter().filter(|s| s.state == State::InFlight).count()
    }

    /// Gives up on `token`: a completed request is dropped now; one still in flight keeps its
    /// slot until the device uses the chain, then the slot is freed (never reused early).
    pub fn cancel(&self, token: u64) {
        let mut inner = self.lock();
        if let Some(s) = self.slot_of(&inner, token) {
            match inner.slots[usize::from(s)].state {
                State::InFlight => inner.slots[usize::from(s)].cancelled = true,
                State::Done => {
                    inner.slots[usize::from(s)].state = State::Free;
                    inner.free.push(s);
                    if let Some(pos) = inner.done.iter().position(|&d| d == s) {
                        inner.done.remove(pos);
                    }
                }
                State::Free => {}
            }
        }
    }

    /// Waits up to `timeout` for the call eventfd (clearing it), the main channel's hang-up or
    /// [`close`](Self::close).
    pub fn wait_call(&self, timeout: Duration) -> Result<Wake> {
        let mut pfds = [
            libc::pollfd { fd: self.call.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: -1, events: libc::POLLRDHUP, revents: 0 },
        ];
        if let Some(m) = &self.main {
            pfds[2].fd = m.as_raw_fd();
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: three valid pollfds (a negative fd is ignored by poll).
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 3, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(Wake::Call) } else { Err(Error::Io(e)) };
        }
        if pfds[1].revents != 0 {
            return Ok(Wake::Closed);
        }
        if pfds[0].revents != 0 {
            eventfd::drain(self.call.as_fd());
            return Ok(Wake::Call);
        }
        if pfds[2].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            return Ok(Wake::HungUp);
        }
        Ok(Wake::Call)
    }

    /// Clears the call eventfd without waiting (an event loop's reader callback).
    pub fn clear_call(&self) {
        if self.call_nonblocking {
            eventfd::drain(self.call.as_fd()); // one read, EAGAIN when not set
        } else {
            // A zero-timeout wait reads the counter only if it is set.
            let _ = eventfd::wait(self.call.as_fd(), 0);
        }
    }

    /// Wakes the waiters asleep on `reaped`, if any (`inner` is locked).
    fn wake_sleepers(&self, inner: &Inner) {
        if inner.sleepers > 0 {
            self.reaped.notify_all();
        }
    }

    /// Whether the back-end hung up the main channel (nothing is read).
    pub fn hung_up(&self) -> bool {
        let Some(m) = &self.main else { return false };
        let mut pfd = libc::pollfd { fd: m.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd, no waiting.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
    }

    /// Sleeps once: as the reaper on the call eventfd, or on the condition variable while
    /// another waiter is the reaper; then reaps. A hang-up of the main channel or `close` is
    /// `Disconnected` (after a last reap: the device may have completed work before dying).
    fn sleep_once<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
        queue: &Mutex<AnyDriverQueue>,
        deadline: Option<Instant>,
    ) -> Result<MutexGuard<'a, Inner>> {
        let now = Instant::now();
        let slice = deadline.map_or(SLICE, |d| d.saturating_duration_since(now).min(SLICE));
        if inner.reaper {
            inner.sleepers += 1;
            inner = self.reaped.wait_timeout(inner, slice).unwrap_or_else(|e| e.into_inner()).0;
            inner.sleepers -= 1;
        } else {
            inner.reaper = true;
            drop(inner);
            let woke = self.wait_call(slice);
            inner = self.lock();
            inner.reaper = false;
            self.wake_sleepers(&inner);
            match woke? {
                Wake::Call => {}
                Wake::Closed => return Err(Error::Disconnected),
                Wake::HungUp => {
                    self.reap_locked(&mut inner, queue)?;
                    inner.dead = true;
                    self.reaped.notify_all();
                    return Err(Error::Disconnected);
                }
            }
        }
        self.check(&inner)?;
        self.reap_locked(&mut inner, queue)?;
        Ok(inner)
    }

    /// Waits until `token` completed and collects it into `out` (see [`collect`](Self::collect)).
    /// Polls the used ring (yielding the CPU) for the engine's polling window first, then sleeps
    /// on the call eventfd in slices, calling `interrupt` between them.
    pub fn wait_for(
        &self,
        queue: &Mutex<AnyDriverQueue>,
        token: u64,
        out: &mut [u8],
        deadline: Option<Instant>,
        interrupt: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Completion> {
        let start = Instant::now();
        let mut inner = self.lock();
        let mut polled = false;
        loop {
            if !polled {
                self.reap_locked(&mut inner, queue)?;
            }
            polled = false;
            if let Some(c) = self.collect_locked(&mut inner, token, out)? {
                return Ok(c);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::Timeout("waiting for a virtio-blk request"));
            }
            if now.duration_since(start) < self.poll {
                drop(inner);
                std::thread::yield_now();
                inner = self.lock();
                continue;
            }
            inner = match self.sleep_once(inner, queue, deadline) {
                Ok(i) => i,
                Err(e) => {
                    // Completed just before the back-end died: still a success.
                    let mut i = self.lock();
                    if let Ok(Some(c)) = self.collect_locked(&mut i, token, out) {
                        return Ok(c);
                    }
                    return Err(e);
                }
            };
            polled = true;
            drop(inner);
            interrupt()?;
            inner = self.lock();
        }
    }

    /// Waits until at least one completion can be collected (or `deadline`); returns whether.
    /// Polls the used ring first (up to the engine's polling window) while [`AdaptivePoll`]
    /// finds polling cheaper than sleeping on the call eventfd.
    pub fn wait_completions(
        &self,
        queue: &Mutex<AnyDriverQueue>,
        deadline: Option<Instant>,
        interrupt: &mut dyn FnMut() -> Result<()>,
    ) -> Result<bool> {
        let start = Instant::now();
        let mut inner = self.lock();
        self.reap_locked(&mut inner, queue)?;
        loop {
            if !inner.done.is_empty() {
                return Ok(true);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(false);
            }
            // Many requests in flight: poll only while it buys at least as much speed as it
            // costs CPU (a polling device answers within the window; a slow one does not).
            if now.duration_since(start) < self.poll.min(inner.adaptive.window()) {
                drop(inner);
                std::thread::yield_now();
                inner = self.lock();
                self.reap_locked(&mut inner, queue)?;
                continue;
            }
            inner = self.sleep_once(inner, queue, deadline)?;
            drop(inner);
            interrupt()?;
            inner = self.lock();
        }
    }

    /// Waits until a request could be submitted (a free slot and room in the ring).
    fn wait_room(
        &self,
        queue: &Mutex<AnyDriverQueue>,
        deadline: Option<Instant>,
        interrupt: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let mut inner = self.lock();
        self.reap_locked(&mut inner, queue)?;
        loop {
            let ring_free = queue.lock().unwrap_or_else(|e| e.into_inner()).num_free();
            if !inner.free.is_empty() && ring_free >= 3 {
                return Ok(());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::Timeout("waiting for room in the ring"));
            }
            inner = self.sleep_once(inner, queue, deadline)?;
            drop(inner);
            interrupt()?;
            inner = self.lock();
        }
    }

    /// One request, waited for: reads and writes longer than a slot are split into slot-sized
    /// requests, all in flight at once. `data` is the payload of a write, `out` receives what a
    /// read or GET_ID returns. Returns the first non-OK status (VIRTIO_BLK_S_OK if none). On an
    /// error the requests still in flight are cancelled (their slots come back when the device
    /// completes them).
    pub fn run(
        &self,
        queue: &Mutex<AnyDriverQueue>,
        op: Op,
        data: &[u8],
        out: &mut [u8],
        deadline: Option<Instant>,
        interrupt: &mut dyn FnMut() -> Result<()>,
    ) -> Result<u8> {
        let chunk = self.slot_bytes as usize;
        let single = match op {
            Op::Read { len, .. } => len > 0 && len as usize <= chunk,
            Op::Write { .. } => !data.is_empty() && data.len() <= chunk,
            _ => true,
        };
        if single {
            return self.run_one(queue, op, data, out, deadline, interrupt);
        }
        let mut pieces: Vec<(Op, std::ops::Range<usize>)> = Vec::new();
        match op {
            Op::Read { sector, len } => {
                let len = len as usize;
                if out.len() < len {
                    return Err(Error::Io(io::Error::new(io::ErrorKind::InvalidInput, "buffer smaller than the read")));
                }
                let mut off = 0;
                while off < len || len == 0 {
                    let n = chunk.min(len - off);
                    let s = sector + (off as u64) / SECTOR_SIZE;
                    pieces.push((Op::Read { sector: s, len: n as u32 }, off..off + n));
                    off += n;
                    if len == 0 {
                        break;
                    }
                }
            }
            Op::Write { sector } => {
                let mut off = 0;
                while off < data.len() || data.is_empty() {
                    let n = chunk.min(data.len() - off);
                    pieces.push((Op::Write { sector: sector + (off as u64) / SECTOR_SIZE }, off..off + n));
                    off += n;
                    if data.is_empty() {
                        break;
                    }
                }
            }
            _ => pieces.push((op, 0..out.len().min(op.in_len() as usize))),
        }
        let mut status = crate::virtio::blk::VIRTIO_BLK_S_OK;
        let mut waiting: std::collections::VecDeque<(u64, std::ops::Range<usize>)> = Default::default();
        let mut next = 0;
        let result = (|| -> Result<()> {
            while next < pieces.len() || !waiting.is_empty() {
                if next < pieces.len() {
                    let batch: Vec<(Op, &[u8])> = pieces[next..]
                        .iter()
                        .map(|(o, r)| (*o, if matches!(o, Op::Write { .. }) { &data[r.clone()] } else { &[][..] }))
                        .collect();
                    let tokens = self.submit(queue, &batch)?;
                    for t in tokens {
                        waiting.push_back((t, pieces[next].1.clone()));
                        next += 1;
                    }
                }
                match waiting.front().cloned() {
                    Some((t, range)) => {
                        let buf = if matches!(pieces[0].0, Op::Write { .. }) { &mut [][..] } else { &mut out[range] };
                        let c = self.wait_for(queue, t, buf, deadline, interrupt)?;
                        waiting.pop_front();
                        if c.status != crate::virtio::blk::VIRTIO_BLK_S_OK
                            && status == crate::virtio::blk::VIRTIO_BLK_S_OK
                        {
                            status = c.status;
                        }
                    }
                    None => self.wait_room(queue, deadline, interrupt)?,
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (t, _) in waiting {
                self.cancel(t);
            }
            return Err(e);
        }
        Ok(status)
    }

    /// [`run`](Self::run) of a request that fits one slot, without allocating: the path of
    /// every `read`/`write` of up to a slot from Python.
    fn run_one(
        &self,
        queue: &Mutex<AnyDriverQueue>,
        op: Op,
        data: &[u8],
        out: &mut [u8],
        deadline: Option<Instant>,
        interrupt: &mut dyn FnMut() -> Result<()>,
    ) -> Result<u8> {
        let out_len = match op {
            Op::Read { len, .. } if out.len() < len as usize => {
                return Err(Error::Io(io::Error::new(io::ErrorKind::InvalidInput, "buffer smaller than the read")));
            }
            Op::Read { len, .. } => len as usize,
            Op::Write { .. } => 0,
            _ => out.len().min(op.in_len() as usize),
        };
        let token = loop {
            let mut token = None;
            self.submit_each(queue, &[(op, data)], &mut |t| token = Some(t))?;
            if let Some(t) = token {
                break t;
            }
            self.wait_room(queue, deadline, interrupt)?;
        };
        match self.wait_for(queue, token, &mut out[..out_len], deadline, interrupt) {
            Ok(c) => Ok(c.status),
            Err(e) => {
                self.cancel(token);
                Err(e)
            }
        }
    }

    /// Wakes every waiter with an error and refuses new requests; releases the eventfd and
    /// main-channel duplicates when the engine is dropped. Idempotent.
    pub fn close(&self) {
        self.lock().closed = true;
        let _ = eventfd::signal(self.wake.as_fd());
        self.reaped.notify_all();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn closed(&self) -> bool {
        self.lock().closed
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::virtqueue::{
        ChainBatch, DriverQueue, DriverRing, PackedBase, PackedDeviceQueue, PackedDriverQueue, PackedDriverRing,
        PackedQueueConfig, RingAddressSpace,
    };

    fn eventfd() -> OwnedFd {
        super::eventfd::new().unwrap()
    }

    /// The device side of a split ring, played by hand on the shared ring memory.
    struct SplitDevice {
        mem: Arc<GuestMemory>,
        ring: DriverRing,
        seen: u16,
        used: u16,
    }

    /// The device side of a packed ring: the crate's device queue, plus raw used descriptors
    /// for the hostile cases.
    struct PackedDevice {
        mem: Arc<GuestMemory>,
        ring: PackedDriverRing,
        dq: PackedDeviceQueue,
        chains: std::collections::HashMap<u16, Vec<(u64, u32)>>,
    }

    enum Device {
        Split(SplitDevice),
        Packed(PackedDevice),
    }

    impl SplitDevice {
        fn u16_at(&self, gpa: u64) -> u16 {
            let mut b = [0u8; 2];
            self.mem.table().read(gpa, &mut b).unwrap();
            u16::from_le_bytes(b)
        }
    }

    impl Device {
        fn mem(&self) -> &Arc<GuestMemory> {
            match self {
                Device::Split(d) => &d.mem,
                Device::Packed(d) => &d.mem,
            }
        }

        fn take(&mut self) -> Vec<u16> {
            match self {
                Device::Split(d) => {
                    let idx = d.u16_at(d.ring.avail + 2);
                    let mut heads = vec![];
                    while d.seen != idx {
                        let slot = u64::from(d.seen % d.ring.size);
                        heads.push(d.u16_at(d.ring.avail + 4 + 2 * slot));
                        d.seen = d.seen.wrapping_add(1);
                    }
                    heads
                }
                Device::Packed(d) => {
                    let mut batch = ChainBatch::new();
                    d.dq.pop_batch(&mut batch, 64).unwrap();
                    let mut heads = vec![];
                    for c in batch.chains() {
                        d.chains.insert(c.head, batch.segments(c).iter().map(|s| (s.gpa, s.len)).collect());
                        heads.push(c.head);
                    }
                    heads
                }
            }
        }

        /// (addr, len) of each descriptor of the chain.
        fn chain(&self, head: u16) -> Vec<(u64, u32)> {
            match self {
                Device::Split(d) => {
                    let mut out = vec![];
                    let mut i = head;
                    loop {
                        let mut b = [0u8; 16];
                        d.mem.table().read(d.ring.desc + 16 * u64::from(i), &mut b).unwrap();
                        let addr = u64::from_le_bytes(b[..8].try_into().unwrap());
                        let len = u32::from_le_bytes(b[8..12].try_into().unwrap());
                        let flags = u16::from_le_bytes(b[12..14].try_into().unwrap());
                        out.push((addr, len));
                        if flags & 1 == 0 {
                            return out;
                        }
                        i = u16::from_le_bytes(b[14..16].try_into().unwrap());
                    }
                }
                Device::Packed(d) => d.chains[&head].clone(),
            }
        }

        fn complete(&mut self, head: u16, data: &[u8], status: u8) {
            let chain = self.chain(head);
            self.mem().table().write(chain[1].0, data).unwrap();
            self.mem().table().write(chain.last().unwrap().0, &[status]).unwrap();
            match self {
                Device::Split(_) => self.publish(u32::from(head), data.len() as u32 + 1),
                Device::Packed(d) => {
                    d.dq.complete_with(head, std::iter::empty(), data.len() as u32 + 1).unwrap();
                    d.dq.publish_used().unwrap();
                }
            }
        }

        /// Writes a used entry as a hostile device would: any id, any length.
        fn publish(&mut self, id: u32, len: u32) {
            match self {
                Device::Split(d) => {
                    let slot = u64::from(d.used % d.ring.size);
                    let mut e = [0u8; 8];
                    e[..4].copy_from_slice(&id.to_le_bytes());
                    e[4..].copy_from_slice(&len.to_le_bytes());
                    d.mem.table().write(d.ring.used + 4 + 8 * slot, &e).unwrap();
                    d.used = d.used.wrapping_add(1);
                    d.mem.table().write(d.ring.used + 2, &d.used.to_le_bytes()).unwrap();
                }
                Device::Packed(d) => {
                    let at = d.dq.base().used;
                    let flags = crate::virtqueue::packed::used_bits(at.wrap) | crate::virtqueue::VIRTQ_DESC_F_WRITE;
                    let mut raw = [0u8; 16];
                    raw[8..12].copy_from_slice(&len.to_le_bytes());
                    raw[12..14].copy_from_slice(&(id as u16).to_le_bytes());
                    raw[14..16].copy_from_slice(&flags.to_le_bytes());
                    d.mem.table().write(d.ring.desc + 16 * u64::from(at.index), &raw).unwrap();
                }
            }
        }
    }

    fn setup_ring(packed: bool) -> (Mutex<AnyDriverQueue>, BlockRequests, Device, [OwnedFd; 2]) {
        let mem = Arc::new(GuestMemory::allocate(&[(0, 8 << 20)]).unwrap());
        let (q, dev) = if packed {
            let q = PackedDriverQueue::allocate(mem.clone(), 16, true, 0).unwrap();
            let (desc, drv, devev) = q.user_addrs();
            let cfg = PackedQueueConfig {
                size: 16,
                desc_addr: desc,
                driver_event_addr: drv,
                device_event_addr: devev,
                addr_space: RingAddressSpace::User,
                event_idx: true,
                indirect: false,
                base: PackedBase::START,
            };
            let dq = PackedDeviceQueue::new(Arc::new(mem.table().clone()), cfg).unwrap();
            let dev = PackedDevice { mem: mem.clone(), ring: q.ring(), dq, chains: Default::default() };
            (AnyDriverQueue::Packed(q), Device::Packed(dev))
        } else {
            let q = DriverQueue::allocate(mem.clone(), 16, true, 0).unwrap();
            let dev = SplitDevice { mem: mem.clone(), ring: q.ring(), seen: 0, used: 0 };
            (AnyDriverQueue::Split(q), Device::Split(dev))
        };
        let (kick, call) = (eventfd(), eventfd());
        let engine =
            BlockRequests::new(mem.clone(), &q, 0, false, 4096, kick.as_fd(), call.as_fd(), None, Duration::ZERO)
                .unwrap();
        (Mutex::new(q), engine, dev, [kick, call])
    }

    /// Every test runs on both ring formats.
    fn each_format(test: impl Fn(&dyn Fn() -> (Mutex<AnyDriverQueue>, BlockRequests, Device, [OwnedFd; 2]))) {
        for packed in [false, true] {
            test(&|| setup_ring(packed));
        }
    }

    #[test]
    fn out_of_order_completions_and_a_full_ring() {
        each_format(|setup| {
            let (q, e, mut dev, _fds) = setup();
            let ops: Vec<(Op, &[u8])> = (0..8).map(|i| (Op::Read { sector: i, len: 512 }, &[][..])).collect();
            let tokens = e.submit(&q, &ops).unwrap();
            assert_eq!(tokens.len(), 5, "16 descriptors hold five 3-descriptor chains");
            let heads = dev.take();
            for (i, &h) in heads.iter().enumerate().rev() {
                dev.complete(h, &[i as u8; 512], 0);
            }
            let mut got = vec![];
            e.wait_completions(&q, None, &mut || Ok(())).unwrap();
            e.collect_any(64, &mut |c, d| got.push((c.token, d[0]))).unwrap();
            let want: Vec<(u64, u8)> = (0..5).rev().map(|i| (tokens[i], i as u8)).collect();
            assert_eq!(got, want);
            assert_eq!(e.in_flight(), 0);
        });
    }

    #[test]
    fn collect_each_reads_into_the_callers_buffer_and_a_refusal_leaves_the_rest() {
        each_format(|setup| {
            let (q, e, mut dev, _fds) = setup();
            let ops: Vec<(Op, &[u8])> = (0..3).map(|i| (Op::Read { sector: i, len: 512 }, &[][..])).collect();
            let tokens = e.submit(&q, &ops).unwrap();
            for (i, h) in dev.take().into_iter().enumerate() {
                dev.complete(h, &[i as u8 + 1; 512], 0);
            }
            e.wait_completions(&q, None, &mut || Ok(())).unwrap();
            let mut got = vec![];
            // Takes two, refuses the third: it stays, its slot reserved, for the next call.
            let n = e
                .collect_each(64, &mut |c, read| {
                    if got.len() == 2 {
                        return false;
                    }
                    let mut buf = vec![0u8; c.in_len as usize];
                    read(&mut buf).unwrap();
                    got.push((c.token, c.status, buf[0], buf[511]));
                    true
                })
                .unwrap();
            assert_eq!(n, 2);
            assert_eq!(got, vec![(tokens[0], 0, 1, 1), (tokens[1], 0, 2, 2)]);
            assert_eq!(e.pending_completions(), 1);
            let mut rest = vec![];
            e.collect_any(64, &mut |c, d| rest.push((c.token, d[0]))).unwrap();
            assert_eq!(rest, vec![(tokens[2], 3)]);
            assert_eq!((e.in_flight(), e.pending_completions()), (0, 0));
        });
    }

    #[test]
    fn a_bad_request_in_a_batch_adds_none_of_it() {
        each_format(|setup| {
            let (q, e, mut dev, _fds) = setup();
            let ops: Vec<(Op, &[u8])> =
                vec![(Op::Read { sector: 0, len: 512 }, &[][..]), (Op::Read { sector: 1, len: 100 }, &[][..])];
            assert!(e.submit(&q, &ops).is_err());
            assert_eq!(e.in_flight(), 0);
            assert!(dev.take().is_empty());
            // The ring and the slots are all there: a full ring's worth still goes in.
            let ops: Vec<(Op, &[u8])> = (0..5).map(|i| (Op::Read { sector: i, len: 512 }, &[][..])).collect();
            assert_eq!(e.submit(&q, &ops).unwrap().len(), 5);
        });
    }

    #[test]
    fn a_cancelled_request_keeps_its_slot_until_the_device_uses_it() {
        each_format(|setup| {
            let (q, e, mut dev, _fds) = setup();
            let t = e.submit(&q, &[(Op::Read { sector: 0, len: 4096 }, &[][..])]).unwrap()[0];
            let [h] = dev.take()[..] else { panic!() };
            let victim = dev.chain(h)[1].0;
            e.cancel(t);
            let more: Vec<(Op, &[u8])> = (0..8).map(|i| (Op::Read { sector: i, len: 4096 }, &[][..])).collect();
            let others = e.submit(&q, &more).unwrap();
            assert_eq!(others.len(), 4);
            for h2 in dev.take() {
                assert_ne!(dev.chain(h2)[1].0, victim);
            }
            assert_eq!(e.in_flight(), 5);
            dev.complete(h, &[1; 4096], 0);
            e.reap(&q).unwrap();
            assert_eq!(e.pending_completions(), 0, "nothing reported for the cancelled request");
            assert_eq!(e.in_flight(), 4);
            assert!(e.collect(t, &mut []).is_err());
        });
    }

    #[test]
    fn hostile_used_entries_break_the_ring_for_good() {
        each_format(|setup| {
            let (q, e, mut dev, _fds) = setup();
            e.submit(&q, &[(Op::Flush, &[][..])]).unwrap();
            let [h] = dev.take()[..] else { panic!() };
            dev.publish(u32::from(h) + 5, 1);
            assert!(matches!(e.reap(&q), Err(Error::Queue { source: VirtqueueError::UsedIdNotInFlight { .. }, .. })));
            assert!(matches!(e.submit(&q, &[(Op::Flush, &[][..])]), Err(Error::Queue { .. })));
            let (q, e, mut dev, _fds) = setup();
            e.submit(&q, &[(Op::Read { sector: 0, len: 512 }, &[][..])]).unwrap();
            let [h] = dev.take()[..] else { panic!() };
            dev.publish(u32::from(h), 4096);
            assert!(matches!(e.reap(&q), Err(Error::Queue { source: VirtqueueError::UsedLenTooLarge { .. }, .. })));
        });
    }

    #[test]
    fn long_reads_are_split_into_slots_and_close_wakes_a_waiter() {
        each_format(|setup| {
            let (q, e, mut dev, _fds) = setup();
            let e = Arc::new(e);
            let q = Arc::new(q);
            let (e2, q2) = (e.clone(), q.clone());
            let reader = std::thread::spawn(move || {
                let mut out = vec![0u8; 3 * 4096];
                e2.run(&q2, Op::Read { sector: 0, len: 3 * 4096 }, &[], &mut out, None, &mut || Ok(()))
                    .map(|s| (s, out))
            });
            let mut heads = vec![];
            while heads.len() < 3 {
                heads.extend(dev.take());
                std::thread::yield_now();
            }
            for (i, &h) in heads.iter().enumerate() {
                assert_eq!(dev.chain(h)[1].1, 4096);
                dev.complete(h, &[i as u8 + 1; 4096], 0);
            }
            let (status, out) = reader.join().unwrap().unwrap();
            assert_eq!(status, 0);
            assert_eq!((out[0], out[4096], out[8191 + 4096]), (1, 2, 3));
            let (e2, q2) = (e.clone(), q.clone());
            let waiter =
                std::thread::spawn(move || e2.run(&q2, Op::Flush, &[], &mut [], None, &mut || Ok(())).map(|_| ()));
            std::thread::sleep(Duration::from_millis(50));
            e.close();
            assert!(matches!(waiter.join().unwrap(), Err(Error::Disconnected)));
        });
    }
}
