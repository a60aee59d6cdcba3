//! The driver side of a virtio-net device (VIRTIO 1.2 §5.1.6): the RX and TX rings of one queue
//! pair, frames in and out in bursts.
//!
//! RX: every descriptor of the ring gets a device-writable buffer at start; each buffer used by
//! the device is copied out and posted again. With MRG_RXBUF a frame spans `num_buffers` used
//! entries (2048-byte buffers); without it one buffer holds a whole frame (sized for the MTU, or
//! for 64 KiB when GUEST_TSO/UFO is negotiated). A frame whose header is short, that is shorter
//! than an Ethernet header, or whose `num_buffers` is 0 or asks for more entries than the device
//! has used, is counted as a drop (what Linux's virtio_net does); an id not in flight or a length beyond the buffer is an error
//! from [`DriverQueue::reap`].
//!
//! TX: one slot (header + frame, contiguous) per descriptor, preallocated; a burst is copied into
//! free slots, published once and kicked once if the device asks; slots come back when their
//! used entries are reaped (lazily, at the next send).

use std::collections::VecDeque;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::eventfd;
use crate::error::{Error, Result};
use crate::memory::GuestMemory;
use crate::protocol::VirtioFeatures;
use crate::virtio::net::{self as vnet, feature, NetHeader};
use crate::virtqueue::{AnyDriverQueue, VirtqueueError};

/// RX buffer size with MRG_RXBUF (what a frame is split into).
pub const MRG_BUFFER_LEN: u32 = 2048;
/// Ethernet header plus one VLAN tag: what a frame adds to the MTU.
const L2_OVERHEAD: usize = 14 + 4;
/// The MTU assumed when the device gives none.
pub const DEFAULT_MTU: u16 = 1500;

/// Buffer sizes of one queue pair for the negotiated `features` and the MTU in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairLayout {
    /// Header bytes before every frame.
    pub header_len: usize,
    /// Whether frames span several RX buffers (MRG_RXBUF).
    pub mrg_rxbuf: bool,
    /// Header and frame in separate TX descriptors (neither VERSION_1 nor ANY_LAYOUT).
    pub split_tx_header: bool,
    /// Size of each RX buffer.
    pub rx_buffer_len: u32,
    /// Size of each TX slot (header + largest frame).
    pub tx_slot_len: u32,
}

impl PairLayout {
    /// The layout a driver with `features` and `mtu` (`None`: 1500) uses.
    pub fn new(features: u64, mtu: Option<u16>) -> PairLayout {
        let header_len = vnet::header_len(features);
        let mtu = usize::from(mtu.unwrap_or(DEFAULT_MTU).max(DEFAULT_MTU));
        let mrg_rxbuf = features & feature::MRG_RXBUF != 0;
        let guest_gso = features & (feature::GUEST_TSO4 | feature::GUEST_TSO6 | feature::GUEST_UFO) != 0;
        let host_gso = features & (feature::HOST_TSO4 | feature::HOST_TSO6 | feature::HOST_UFO) != 0;
        let rx = if mrg_rxbuf {
            MRG_BUFFER_LEN as usize
        } else if guest_gso {
            header_len + vnet::MAX_FRAME_LEN
        } else {
            header_len + mtu + L2_OVERHEAD
        };
        let tx = header_len + if host_gso { vnet::MAX_FRAME_LEN } else { mtu + L2_OVERHEAD };
        let layout_free = VirtioFeatures::VERSION_1.bits() | VirtioFeatures::ANY_LAYOUT.bits();
        PairLayout {
            header_len,
            mrg_rxbuf,
            split_tx_header: features & layout_free == 0,
            rx_buffer_len: rx as u32,
            tx_slot_len: tx as u32,
        }
    }

    /// Largest frame (without header) `send` accepts.
    pub fn max_tx_frame(&self) -> usize {
        self.tx_slot_len as usize - self.header_len
    }

    /// Guest memory the buffers of one pair with rings of `queue_size` take (rings excluded).
    pub fn buffer_memory(&self, queue_size: u16) -> u64 {
        u64::from(queue_size) * (u64::from(self.rx_buffer_len) + u64::from(self.tx_slot_len)).next_multiple_of(64)
    }
}

/// Counters of one queue pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairCounters {
    /// Frames received.
    pub rx_frames: u64,
    /// Bytes received (frames, without headers).
    pub rx_bytes: u64,
    /// Frames the device delivered malformed (short header, bad `num_buffers`).
    pub rx_dropped: u64,
    /// Frames queued for transmission.
    pub tx_frames: u64,
    /// Bytes queued for transmission (frames, without headers).
    pub tx_bytes: u64,
}

fn queue_err(index: u16, source: VirtqueueError) -> Error {
    Error::Queue { queue: index, source }
}

/// A received frame: its header and where its bytes are in guest memory.
#[derive(Debug)]
pub struct RxFrame<'a> {
    /// The header as the device wrote it (copied out of guest memory).
    pub header: NetHeader,
    /// `(guest address, length)` pieces of the frame, header excluded.
    pub pieces: &'a [(u64, u32)],
    /// Total frame length.
    pub len: usize,
}

impl RxFrame<'_> {
    /// Copies the frame into `out` (at least `len` bytes).
    pub fn copy_to(&self, memory: &GuestMemory, out: &mut [u8]) -> Result<()> {
        let mut at = 0;
        for &(gpa, n) in self.pieces {
            let n = n as usize;
            memory.table().read(gpa, &mut out[at..at + n])?;
            at += n;
        }
        Ok(())
    }
}

/// The RX half of a queue pair.
#[derive(Debug)]
pub struct RxRing {
    memory: Arc<GuestMemory>,
    index: u16,
    layout: PairLayout,
    /// Guest address of each buffer.
    buffers: Vec<u64>,
    /// Buffer posted under each head (`u32::MAX`: none).
    by_head: Vec<u32>,
    /// Used entries reaped and not consumed yet: (buffer, written length).
    pending: VecDeque<(u32, u32)>,
    used: Vec<(u16, u32)>,
    pieces: Vec<(u64, u32)>,
    counters: PairCounters,
}

impl RxRing {
    /// Allocates one buffer per descriptor of `queue` in `memory` and posts them all (not
    /// published: call [`RxRing::flush`]). `index` names the ring in errors.
    pub fn new(memory: Arc<GuestMemory>, queue: &mut AnyDriverQueue, index: u16, layout: PairLayout) -> Result<RxRing> {
        let size = queue.size();
        let mut buffers = Vec::with_capacity(usize::from(size));
        for _ in 0..size {
            buffers.push(memory.alloc(u64::from(layout.rx_buffer_len), 64)?);
        }
        let mut rx = RxRing {
            memory,
            index,
            layout,
            buffers,
            by_head: vec![u32::MAX; usize::from(size)],
            pending: VecDeque::with_capacity(usize::from(size)),
            used: Vec::with_capacity(usize::from(size)),
            pieces: Vec::new(),
            counters: PairCounters::default(),
        };
        for b in 0..u32::from(size) {
            rx.post(queue, b)?;
        }
        queue.publish();
        Ok(rx)
    }

    fn post(&mut self, queue: &mut AnyDriverQueue, buffer: u32) -> Result<()> {
        let gpa = self.buffers[buffer as usize];
        let head = queue.add(&[], &[(gpa, self.layout.rx_buffer_len)]).map_err(|e| queue_err(self.index, e))?;
        self.by_head[usize::from(head)] = buffer;
        Ok(())
    }

    /// The guest memory of the buffers.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Counters of this half (the `rx_*` fields).
    pub fn counters(&self) -> PairCounters {
        self.counters
    }

    /// Whether used entries are waiting to be consumed (a frame was left for the next call).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Reaps what the device used and hands up to `max` frames to `f` (in order), posting
    /// their buffers again and publishing once. Returns how many frames `f` got and whether the
    /// device wants a kick for the reposted buffers.
    pub fn recv(
        &mut self,
        queue: &mut AnyDriverQueue,
        max: usize,
        f: &mut dyn FnMut(RxFrame<'_>) -> Result<()>,
    ) -> Result<(usize, bool)> {
        self.used.clear();
        queue.reap(&mut self.used, usize::MAX).map_err(|e| queue_err(self.index, e))?;
        for &(head, len) in &self.used {
            let b = std::mem::replace(&mut self.by_head[usize::from(head)], u32::MAX);
            if b == u32::MAX {
                // Reap checks the id is in flight, so this is our bookkeeping, not the device.
                return Err(queue_err(self.index, VirtqueueError::UsedIdNotInFlight { id: head.into() }));
            }
            self.pending.push_back((b, len));
        }
        let hl = self.layout.header_len;
        let mut frames = 0;
        let mut reposted = 0usize;
        let mut hdr = [0u8; vnet::HDR_LEN];
        while frames < max {
            let Some(&(b, len)) = self.pending.front() else { break };
            let first = self.buffers[b as usize];
            let mut header = NetHeader::default();
            let mut take = 1usize;
            let mut good = len as usize >= hl;
            if good {
                self.memory.table().read(first, &mut hdr[..hl])?;
                header = NetHeader::from_bytes(&hdr[..hl]);
                if self.layout.mrg_rxbuf {
                    take = usize::from(header.num_buffers);
                    if take == 0 || take > self.pending.len() {
                        // Linux: "rx error: buffers missing", a length error. Drop what is here.
                        good = false;
                        take = take.clamp(1, self.pending.len());
                    }
                }
            }
            self.pieces.clear();
            let mut total = 0usize;
            if good {
                let rest = len as usize - hl;
                if rest > 0 {
                    self.pieces.push((first + hl as u64, rest as u32));
                }
                total += rest;
                for &(b2, len2) in self.pending.iter().skip(1).take(take - 1) {
                    if len2 > 0 {
                        self.pieces.push((self.buffers[b2 as usize], len2));
                    }
                    total += len2 as usize;
                }
            }
            if total < vnet::MIN_FRAME_LEN {
                // A runt (header only, or less than an Ethernet header): Linux's length error.
                good = false;
            }
            let result = if good {
                f(RxFrame { header, pieces: &self.pieces, len: total })
            } else {
                self.counters.rx_dropped += 1;
                Ok(())
            };
            for _ in 0..take {
                if let Some((b, _)) = self.pending.pop_front() {
                    self.post(queue, b)?;
                    reposted += 1;
                }
            }
            result?;
            if good {
                frames += 1;
                self.counters.rx_frames += 1;
                self.counters.rx_bytes += total as u64;
            }
        }
        let kick = if reposted > 0 {
            queue.publish();
            queue.kick_needed().map_err(|e| queue_err(self.index, e))?
        } else {
            false
        };
        Ok((frames, kick))
    }
}

/// The TX half of a queue pair.
///
/// Each descriptor head owns one slot (header and frame): a frame goes into the slot of the head
/// it is added under. With the first-in-first-out free list of [`AnyDriverQueue`] and a device that
/// completes in order, slot, descriptor and avail entry stay the same lap after lap, so the
/// steady state rewrites no descriptor and no avail entry (the device's cached copies stay valid:
/// measured against DPDK's vhost PMD, see the README).
#[derive(Debug)]
pub struct TxRing {
    memory: Arc<GuestMemory>,
    index: u16,
    layout: PairLayout,
    /// Guest address of the slot of each head.
    slots: Vec<u64>,
    /// Host address of each slot (0: it spans two regions, written through the table). The
    /// slots are in our own memory, kept mapped by `memory`: translated once, not per frame.
    slot_host: Vec<usize>,
    /// Descriptors per frame (2 with a split header).
    per_frame: u16,
    /// Frames that fit in the free descriptors.
    free: usize,
    used: Vec<(u16, u32)>,
    scratch: Vec<u8>,
    counters: PairCounters,
}

impl TxRing {
    /// Allocates the slots of `queue`: one per descriptor, used by the heads.
    pub fn new(memory: Arc<GuestMemory>, queue: &AnyDriverQueue, index: u16, layout: PairLayout) -> Result<TxRing> {
        let size = queue.size();
        let mut slots = Vec::with_capacity(usize::from(size));
        for _ in 0..size {
            slots.push(memory.alloc(u64::from(layout.tx_slot_len), 64)?);
        }
        let slot_host = slots
            .iter()
            .map(|&gpa| memory.table().translate(gpa, u64::from(layout.tx_slot_len)).map_or(0, |p| p as usize))
            .collect();
        let per_frame = if layout.split_tx_header { 2 } else { 1 };
        Ok(TxRing {
            memory,
            index,
            layout,
            slots,
            slot_host,
            per_frame,
            free: usize::from(queue.num_free() / per_frame),
            used: Vec::with_capacity(usize::from(size)),
            scratch: Vec::with_capacity(layout.tx_slot_len as usize),
            counters: PairCounters::default(),
        })
    }

    /// Counters of this half (the `tx_*` fields).
    pub fn counters(&self) -> PairCounters {
        self.counters
    }

    /// Frames in flight at most.
    pub fn num_slots(&self) -> usize {
        self.slots.len() / usize::from(self.per_frame)
    }

    /// Frames that can be queued right now (after [`TxRing::reclaim`]).
    pub fn free_slots(&self) -> usize {
        self.free
    }

    /// Takes back the slots the device is done with (the queue checks every used id is a head
    /// in flight).
    pub fn reclaim(&mut self, queue: &mut AnyDriverQueue) -> Result<()> {
        self.used.clear();
        queue.reap(&mut self.used, usize::MAX).map_err(|e| queue_err(self.index, e))?;
        self.free += self.used.len();
        Ok(())
    }

    /// Checks a frame `send` would be given.
    pub fn check(&self, frame_len: usize) -> std::result::Result<(), String> {
        if frame_len < vnet::MIN_FRAME_LEN || frame_len > self.layout.max_tx_frame() {
            return Err(format!(
                "a frame must be {}..={} bytes (the negotiated MTU and offloads), got {frame_len}",
                vnet::MIN_FRAME_LEN,
                self.layout.max_tx_frame()
            ));
        }
        Ok(())
    }

    /// Queues frames from `next` (called until it returns `None` or the slots run out; check
    /// each frame with [`TxRing::check`] first), publishes once. Returns how many were queued
    /// and whether the device wants a kick.
    pub fn send(
        &mut self,
        queue: &mut AnyDriverQueue,
        frames: &mut dyn Iterator<Item = (NetHeader, &[u8])>,
    ) -> Result<(usize, bool)> {
        self.reclaim(queue)?;
        self.fill(queue, frames)
    }

    /// [`TxRing::send`] without reclaiming first: only the slots free now are used.
    pub fn fill(
        &mut self,
        queue: &mut AnyDriverQueue,
        frames: &mut dyn Iterator<Item = (NetHeader, &[u8])>,
    ) -> Result<(usize, bool)> {
        let hl = self.layout.header_len;
        let mut n = 0;
        while self.free > 0 {
            let Some(slot) = queue.next_head() else { break };
            let Some((mut header, frame)) = frames.next() else { break };
            if frame.len() > self.layout.max_tx_frame() {
                // Callers check first (TxRing::check); never write past a slot.
                return Err(queue_err(self.index, VirtqueueError::LengthOverflow { head: slot }));
            }
            let slot = usize::from(slot);
            let gpa = self.slots[slot];
            header.num_buffers = 0; // the driver sets 0 on TX (§5.1.6.2)
            let total = (hl + frame.len()) as u32;
            match self.slot_host[slot] {
                0 => {
                    self.scratch.clear();
                    self.scratch.extend_from_slice(&header.to_bytes()[..hl]);
                    self.scratch.extend_from_slice(frame);
                    self.memory.table().write(gpa, &self.scratch)?;
                }
                host => {
                    let host = host as *mut u8;
                    // SAFETY: the slot was translated with tx_slot_len bytes inside one region
                    // of our memory (kept mapped by self.memory); header + frame fit the slot
                    // (frames were checked against max_tx_frame). The device only reads it.
                    unsafe {
                        std::ptr::copy_nonoverlapping(header.to_bytes().as_ptr(), host, hl);
                        std::ptr::copy_nonoverlapping(frame.as_ptr(), host.add(hl), frame.len());
                    }
                }
            }
            if self.layout.split_tx_header {
                queue.add(&[(gpa, hl as u32), (gpa + hl as u64, total - hl as u32)], &[])
            } else {
                queue.add(&[(gpa, total)], &[])
            }
            .map_err(|e| queue_err(self.index, e))?;
            self.free -= 1;
            self.counters.tx_frames += 1;
            self.counters.tx_bytes += frame.len() as u64;
            n += 1;
        }
        let kick = if n > 0 {
            queue.publish();
            queue.kick_needed().map_err(|e| queue_err(self.index, e))?
        } else {
            false
        };
        Ok((n, kick))
    }
}

/// What [`run_bench`] does on a queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchMode {
    /// Keep the TX ring full, reclaiming slots; receive nothing.
    TxOnly,
    /// Receive whatever the device delivers and post the buffers again; send nothing.
    RxOnly,
    /// Send and receive, keeping at most one RX ring's worth of frames out: what comes back is
    /// counted (against a device that returns every frame, `serve-net --loopback`, testpmd io).
    Loopback,
}

impl BenchMode {
    /// Parses `txonly`, `rxonly`, `loopback` (testpmd's names for the first two).
    pub fn parse(s: &str) -> Option<BenchMode> {
        Some(match s {
            "txonly" => BenchMode::TxOnly,
            "rxonly" => BenchMode::RxOnly,
            "loopback" => BenchMode::Loopback,
            _ => return None,
        })
    }
}

/// What [`run_bench`] runs.
#[derive(Clone, Copy, Debug)]
pub struct BenchJob {
    /// The mode.
    pub mode: BenchMode,
    /// Length of every frame sent (Ethernet header onwards, no CRC).
    pub frame_len: usize,
    /// Frames per send and most frames per receive.
    pub burst: usize,
    /// How long to run.
    pub duration: Duration,
    /// Hybrid polling: while nothing arrives, yield the CPU and look at the used ring again for
    /// up to this long before sleeping on the RX call eventfd (zero: sleep at once). A full TX
    /// ring has no notification here (its interrupts are off): the loop yields and retries.
    pub poll: Duration,
}

/// What [`run_bench`] measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct BenchReport {
    /// Frames queued for transmission.
    pub tx_frames: u64,
    /// Their bytes (frames, without headers).
    pub tx_bytes: u64,
    /// Frames received.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames the device delivered malformed.
    pub rx_dropped: u64,
    /// Turns that found fewer free TX slots than the burst and sent nothing (the device was the
    /// bottleneck).
    pub tx_full: u64,
    /// At the end: TX slots the device has not used yet (txonly), frames sent and not received
    /// after a short drain (loopback: frames the device dropped), 0 (rxonly).
    pub in_flight: u64,
    /// Wall time of the timed part (the drain excluded).
    pub elapsed: Duration,
    /// CPU time of the calling thread over the timed part (user + system).
    pub cpu: Duration,
    /// Sleeps on the RX call eventfd.
    pub waits: u64,
}

/// The rings and eventfds of one queue pair, borrowed for a run.
pub struct PairIo<'a> {
    /// RX half and its ring.
    pub rx: &'a mut RxRing,
    /// The RX ring.
    pub rx_queue: &'a mut AnyDriverQueue,
    /// TX half.
    pub tx: &'a mut TxRing,
    /// The TX ring.
    pub tx_queue: &'a mut AnyDriverQueue,
    /// Kick of the RX ring (reposted buffers).
    pub rx_kick: BorrowedFd<'a>,
    /// Call of the RX ring.
    pub rx_call: BorrowedFd<'a>,
    /// Kick of the TX ring.
    pub tx_kick: BorrowedFd<'a>,
}

/// CPU time (user + system) of the calling thread.
pub fn thread_cpu_time() -> Duration {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid rusage pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec * 1000) as u32);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The frame [`run_bench`] sends: locally administered unicast MACs, the local experimental
/// EtherType 0x88b5, a zero payload.
pub fn bench_frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    if len >= vnet::MIN_FRAME_LEN {
        f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        f[12..14].copy_from_slice(&[0x88, 0xb5]);
    }
    f
}

/// Runs `job` on one queue pair with everything in this thread: no allocation, no lock, one
/// `send` and one `recv` of the rings per turn. `stop` is called about every millisecond;
/// returning true ends the run early (Ctrl-C).
pub fn run_bench(io: PairIo<'_>, job: BenchJob, stop: &mut dyn FnMut() -> bool) -> Result<BenchReport> {
    let PairIo { rx, rx_queue, tx, tx_queue, rx_kick, rx_call, tx_kick } = io;
    if job.burst == 0 {
        return Err(Error::Io(io::Error::new(io::ErrorKind::InvalidInput, "the burst must be at least 1")));
    }
    if job.mode != BenchMode::RxOnly {
        tx.check(job.frame_len).map_err(|e| Error::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    }
    let frame = bench_frame(job.frame_len);
    let header = NetHeader::default();
    let sends = job.mode != BenchMode::RxOnly;
    let receives = job.mode != BenchMode::TxOnly;
    // Loopback keeps at most one RX ring of frames out, so the device never finds it empty.
    let window = u64::from(rx_queue.size());
    let rx0 = rx.counters();
    let tx0 = tx.counters();
    let mut report = BenchReport::default();
    let mut count = |_: RxFrame<'_>| Ok(());
    // One turn: a send and a receive. Returns the frames moved and whether TX was short of slots.
    let mut turn = |rx: &mut RxRing,
                    rx_queue: &mut AnyDriverQueue,
                    tx: &mut TxRing,
                    tx_queue: &mut AnyDriverQueue,
                    sending: bool|
     -> Result<(usize, bool)> {
        let mut moved = 0;
        let mut full = false;
        if sending {
            let out = tx.counters().tx_frames - tx0.tx_frames;
            let back = rx.counters().rx_frames - rx0.rx_frames + rx.counters().rx_dropped - rx0.rx_dropped;
            let room = if receives { window.saturating_sub(out - back.min(out)) as usize } else { job.burst };
            let want = room.min(job.burst);
            if want > 0 {
                // Reclaim lazily, when a burst no longer fits (DPDK's tx_free_thresh), and send
                // whole bursts only: refilling slot by slot moves avail.idx by one entry at a
                // time and the device dequeues in bursts of one (measured: a third slower
                // against DPDK's vhost PMD).
                if tx.free_slots() < want {
                    tx.reclaim(tx_queue)?;
                }
                full = tx.free_slots() < want;
                if !full {
                    let mut it = std::iter::repeat_n((header, &frame[..]), want);
                    let (n, kick) = tx.fill(tx_queue, &mut it)?;
                    if kick {
                        eventfd::signal(tx_kick).map_err(Error::Io)?;
                    }
                    moved += n;
                }
            }
        }
        if receives {
            let (n, kick) = rx.recv(rx_queue, job.burst, &mut count)?;
            if kick {
                eventfd::signal(rx_kick).map_err(Error::Io)?;
            }
            moved += n;
        }
        Ok((moved, full))
    };
    rx_queue.set_interrupts(false);
    let cpu0 = thread_cpu_time();
    let start = Instant::now();
    let end = start + job.duration;
    let mut last_progress = start;
    let mut last_stop = start;
    let mut now = start;
    while now < end {
        let (moved, full) = turn(rx, rx_queue, tx, tx_queue, sends)?;
        report.tx_full += u64::from(full);
        now = Instant::now();
        if moved > 0 {
            last_progress = now;
        } else if !receives || now.duration_since(last_progress) < job.poll {
            // Yielding rather than spinning: a back-end sharing this CPU runs now.
            std::thread::yield_now();
        } else {
            // Ask for an interrupt, look once more (the device may have used buffers before it
            // saw the request), then sleep.
            rx_queue.set_interrupts(true);
            if turn(rx, rx_queue, tx, tx_queue, false)?.0 == 0 {
                report.waits += 1;
                eventfd::wait(rx_call, 1).map_err(Error::Io)?;
            }
            rx_queue.set_interrupts(false);
            now = Instant::now();
            last_progress = now;
        }
        if now.duration_since(last_stop) >= Duration::from_millis(1) {
            last_stop = now;
            if stop() {
                break;
            }
        }
    }
    report.elapsed = now.duration_since(start);
    report.cpu = thread_cpu_time().saturating_sub(cpu0);
    // Drain: what loopback has out comes back (or is lost); TX slots are taken back.
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut quiet_since = Instant::now();
    loop {
        let moved = if receives { turn(rx, rx_queue, tx, tx_queue, false)?.0 } else { 0 };
        tx.reclaim(tx_queue)?;
        let out = tx.counters().tx_frames - tx0.tx_frames;
        let back = rx.counters().rx_frames - rx0.rx_frames + rx.counters().rx_dropped - rx0.rx_dropped;
        let now = Instant::now();
        if moved > 0 {
            quiet_since = now;
        }
        let settled = match job.mode {
            BenchMode::Loopback => back >= out,
            _ => tx.free_slots() == tx.num_slots(),
        };
        if settled || now > deadline || now.duration_since(quiet_since) > Duration::from_millis(50) {
            break;
        }
        std::thread::yield_now();
    }
    rx_queue.set_interrupts(true);
    let (rx1, tx1) = (rx.counters(), tx.counters());
    report.tx_frames = tx1.tx_frames - tx0.tx_frames;
    report.tx_bytes = tx1.tx_bytes - tx0.tx_bytes;
    report.rx_frames = rx1.rx_frames - rx0.rx_frames;
    report.rx_bytes = rx1.rx_bytes - rx0.rx_bytes;
    report.rx_dropped = rx1.rx_dropped - rx0.rx_dropped;
    report.in_flight = match job.mode {
        BenchMode::TxOnly => (tx.num_slots() - tx.free_slots()) as u64,
        BenchMode::RxOnly => 0,
        BenchMode::Loopback => report.tx_frames.saturating_sub(report.rx_frames + report.rx_dropped),
    };
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtqueue::{DriverQueue, DriverRing};

    const MB: u64 = 1 << 20;

    fn setup(features: u64, size: u16) -> (Arc<GuestMemory>, AnyDriverQueue, AnyDriverQueue, PairLayout) {
        let mem = Arc::new(GuestMemory::allocate(&[(0, 16 * MB)]).unwrap());
        let rx = AnyDriverQueue::Split(DriverQueue::allocate(mem.clone(), size, false, 0).unwrap());
        let tx = AnyDriverQueue::Split(DriverQueue::allocate(mem.clone(), size, false, 0).unwrap());
        (mem, rx, tx, PairLayout::new(features, None))
    }

    fn split_ring(q: &AnyDriverQueue) -> DriverRing {
        match q {
            AnyDriverQueue::Split(q) => q.ring(),
            AnyDriverQueue::Packed(_) => unreachable!("a split ring test"),
        }
    }

    /// Writes what a device would into the RX buffer under `head` and uses it (by hand, as a
    /// hostile or careful device would: the used ring is written directly).
    fn use_rx(mem: &GuestMemory, q: &AnyDriverQueue, entries: &[(u16, &[u8])]) {
        let r = split_ring(q);
        let t = mem.table();
        let mut idx = [0u8; 2];
        t.read(r.used + 2, &mut idx).unwrap();
        let mut used = u16::from_le_bytes(idx);
        for &(head, data) in entries {
            let mut d = [0u8; 16];
            t.read(r.desc + 16 * u64::from(head), &mut d).unwrap();
            let addr = u64::from_le_bytes(d[..8].try_into().unwrap());
            t.write(addr, data).unwrap();
            let slot = u64::from(used % r.size);
            let mut e = [0u8; 8];
            e[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            e[4..].copy_from_slice(&(data.len() as u32).to_le_bytes());
            t.write(r.used + 4 + 8 * slot, &e).unwrap();
            used = used.wrapping_add(1);
        }
        t.write(r.used + 2, &used.to_le_bytes()).unwrap();
    }

    fn hdr(num_buffers: u16) -> Vec<u8> {
        NetHeader { num_buffers, ..NetHeader::default() }.to_bytes().to_vec()
    }

    #[test]
    fn layout_follows_features() {
        let v1 = VirtioFeatures::VERSION_1.bits();
        let l = PairLayout::new(v1, None);
        assert_eq!((l.header_len, l.rx_buffer_len, l.mrg_rxbuf, l.split_tx_header), (12, 12 + 1518, false, false));
        assert_eq!(PairLayout::new(v1 | feature::MRG_RXBUF, Some(9000)).rx_buffer_len, MRG_BUFFER_LEN);
        assert_eq!(PairLayout::new(v1 | feature::MRG_RXBUF, Some(9000)).max_tx_frame(), 9018);
        assert_eq!(PairLayout::new(v1 | feature::GUEST_TSO4, None).rx_buffer_len as usize, 12 + vnet::MAX_FRAME_LEN);
        assert!(PairLayout::new(0, None).split_tx_header);
    }

    #[test]
    fn merged_frames_are_reassembled_and_buffers_reposted() {
        let f = VirtioFeatures::VERSION_1.bits() | feature::MRG_RXBUF;
        let (mem, mut q, _tx, layout) = setup(f, 8);
        let mut rx = RxRing::new(mem.clone(), &mut q, 0, layout).unwrap();
        assert_eq!(q.in_flight(), 8);
        // Heads 0..8 were posted in order. A 3000-byte frame over two buffers, then a small one.
        let big: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let mut a = hdr(2);
        a.extend_from_slice(&big[..2036]);
        let mut c = hdr(1);
        c.extend_from_slice(&[7u8; 60]);
        use_rx(&mem, &q, &[(0, &a), (1, &big[2036..]), (2, &c)]);
        let mut got = Vec::new();
        let (n, _) = rx
            .recv(&mut q, 64, &mut |fr| {
                let mut v = vec![0u8; fr.len];
                fr.copy_to(&mem, &mut v)?;
                got.push((fr.header.num_buffers, v));
                Ok(())
            })
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(got[0], (2, big));
        assert_eq!(got[1], (1, vec![7u8; 60]));
        assert_eq!(q.in_flight(), 8, "every used buffer is posted again");
        assert_eq!(rx.counters().rx_frames, 2);
    }

    #[test]
    fn bad_num_buffers_and_short_headers_are_drops() {
        let f = VirtioFeatures::VERSION_1.bits() | feature::MRG_RXBUF;
        let (mem, mut q, _tx, layout) = setup(f, 8);
        let mut rx = RxRing::new(mem.clone(), &mut q, 0, layout).unwrap();
        let mut big = hdr(200); // more buffers than were used
        big.extend_from_slice(&[1u8; 100]);
        use_rx(&mem, &q, &[(0, &big), (1, &[0u8; 5]), (2, &hdr(0))]);
        let mut count = 0;
        rx.recv(&mut q, 64, &mut |_| {
            count += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(count, 0);
        assert_eq!(rx.counters().rx_dropped, 1, "the frame and the entries after it are one drop");
        assert_eq!(q.in_flight(), 8);
        // A short header, then a zero num_buffers.
        use_rx(&mem, &q, &[(3, &[0u8; 5]), (4, &hdr(0))]);
        rx.recv(&mut q, 64, &mut |_| Ok(())).unwrap();
        assert_eq!(rx.counters().rx_dropped, 3);
        // A runt: a header and 13 bytes.
        let mut runt = hdr(1);
        runt.extend_from_slice(&[0u8; 13]);
        use_rx(&mem, &q, &[(5, &runt)]);
        rx.recv(&mut q, 64, &mut |_| Ok(())).unwrap();
        assert_eq!((rx.counters().rx_dropped, rx.counters().rx_frames), (4, 0));
    }

    #[test]
    fn used_length_beyond_the_buffer_is_an_error() {
        let (mem, mut q, _tx, layout) = setup(VirtioFeatures::VERSION_1.bits(), 4);
        let mut rx = RxRing::new(mem.clone(), &mut q, 0, layout).unwrap();
        let r = split_ring(&q);
        let mut e = [0u8; 8];
        e[4..].copy_from_slice(&(layout.rx_buffer_len + 1).to_le_bytes());
        mem.table().write(r.used + 4, &e).unwrap();
        mem.table().write(r.used + 2, &1u16.to_le_bytes()).unwrap();
        let err = rx.recv(&mut q, 64, &mut |_| Ok(())).unwrap_err();
        assert!(matches!(err, Error::Queue { source: VirtqueueError::UsedLenTooLarge { .. }, .. }), "{err}");
    }

    /// The avail ring entries from index `from` up to the driver's avail index (what a device
    /// starting at `from`, e.g. after SET_VRING_BASE, is offered): (head, the head descriptor's
    /// address and length).
    fn avail_from(mem: &GuestMemory, q: &AnyDriverQueue, from: u16) -> Vec<(u16, u64, u32)> {
        let r = split_ring(q);
        let t = mem.table();
        let mut b = [0u8; 2];
        t.read(r.avail + 2, &mut b).unwrap();
        let avail = u16::from_le_bytes(b);
        let mut out = Vec::new();
        let mut i = from;
        while i != avail {
            t.read(r.avail + 4 + 2 * u64::from(i % r.size), &mut b).unwrap();
            let head = u16::from_le_bytes(b);
            let mut d = [0u8; 16];
            t.read(r.desc + 16 * u64::from(head), &mut d).unwrap();
            let addr = u64::from_le_bytes(d[..8].try_into().unwrap());
            out.push((head, addr, u32::from_le_bytes(d[8..12].try_into().unwrap())));
            i = i.wrapping_add(1);
        }
        out
    }

    /// Uses every chain published on `q` from avail index `from` on with length 0; returns
    /// their head descriptors' (addr, len).
    fn use_all_tx(mem: &GuestMemory, q: &AnyDriverQueue, from: u16) -> Vec<(u64, u32)> {
        let r = split_ring(q);
        let t = mem.table();
        let offered = avail_from(mem, q, from);
        let mut i = from;
        for &(head, _, _) in &offered {
            let mut e = [0u8; 8];
            e[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            t.write(r.used + 4 + 8 * u64::from(i % r.size), &e).unwrap();
            i = i.wrapping_add(1);
        }
        t.write(r.used + 2, &i.to_le_bytes()).unwrap();
        offered.into_iter().map(|(_, addr, len)| (addr, len)).collect()
    }

    /// A reconnect hands the RX ring over with SET_VRING_BASE = the used index the old device
    /// published (what QEMU restores after a back-end crash): the new device is offered every
    /// buffer the old one had not used (one it had taken without using is offered again), and
    /// the frames the old one used are still received and their buffers posted again behind.
    #[test]
    fn rx_hand_over_offers_every_posted_buffer_again() {
        let f = VirtioFeatures::VERSION_1.bits() | feature::MRG_RXBUF;
        let (mem, mut q, _tx, layout) = setup(f, 8);
        let mut rx = RxRing::new(mem.clone(), &mut q, 0, layout).unwrap();
        let mut a = hdr(1);
        a.extend_from_slice(&[5u8; 60]);
        // The old device used heads 0 and 1 (and had taken 2 and 3, which it never used).
        use_rx(&mem, &q, &[(0, &a), (1, &a)]);
        let base = q.hand_over().unwrap();
        assert_eq!(base, 2);
        let offered = avail_from(&mem, &q, base as u16);
        assert_eq!(offered.iter().map(|&(h, _, _)| h).collect::<Vec<_>>(), (2..8).collect::<Vec<_>>());
        let mut n = 0;
        rx.recv(&mut q, 64, &mut |fr| {
            assert_eq!(fr.len, 60);
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 2, "what the old device used is received");
        let offered = avail_from(&mem, &q, base as u16);
        assert_eq!(offered.len(), 8, "all 8 buffers are offered to the new device");
        let mut addrs: Vec<u64> = offered.iter().map(|&(_, a, _)| a).collect();
        addrs.sort_unstable();
        addrs.dedup();
        assert_eq!(addrs.len(), 8, "each buffer once");
    }

    /// TX across a hand-over is at least once: every frame the old device had not marked used
    /// is read again by the new one, whether or not the old one had sent it.
    #[test]
    fn tx_hand_over_offers_every_uncompleted_frame_again() {
        let (mem, _rx, mut q, layout) = setup(VirtioFeatures::VERSION_1.bits(), 8);
        let mut tx = TxRing::new(mem.clone(), &q, 1, layout).unwrap();
        let frames: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 60]).collect();
        let mut it = frames.iter().map(|f| (NetHeader::default(), &f[..]));
        assert_eq!(tx.send(&mut q, &mut it).unwrap().0, 5);
        // The old device completed the first two only.
        let r = split_ring(&q);
        for (slot, head) in [(0u64, 0u32), (1, 1)] {
            let mut e = [0u8; 8];
            e[..4].copy_from_slice(&head.to_le_bytes());
            mem.table().write(r.used + 4 + 8 * slot, &e).unwrap();
        }
        mem.table().write(r.used + 2, &2u16.to_le_bytes()).unwrap();
        let base = q.hand_over().unwrap();
        let offered = avail_from(&mem, &q, base as u16);
        assert_eq!(offered.len(), 3);
        for (k, &(_, addr, _)) in offered.iter().enumerate() {
            let mut data = vec![0u8; 72];
            mem.table().read(addr, &mut data).unwrap();
            assert_eq!(&data[12..], &frames[2 + k][..]);
        }
        tx.reclaim(&mut q).unwrap();
        assert_eq!(tx.free_slots(), 8 - 3, "the two completed slots came back, three still out");
    }

    #[test]
    fn tx_slots_are_recycled() {
        let (mem, _rx, mut q, layout) = setup(VirtioFeatures::VERSION_1.bits(), 4);
        let mut tx = TxRing::new(mem.clone(), &q, 1, layout).unwrap();
        let frame = [0xabu8; 60];
        let mut it = std::iter::repeat_n((NetHeader { num_buffers: 9, ..NetHeader::default() }, &frame[..]), 6);
        let (n, _) = tx.send(&mut q, &mut it).unwrap();
        assert_eq!(n, 4, "only as many as there are slots");
        let descs = use_all_tx(&mem, &q, 0);
        assert_eq!(descs.len(), 4);
        let mut data = vec![0u8; 72];
        mem.table().read(descs[0].0, &mut data).unwrap();
        assert_eq!(descs[0].1, 72);
        assert_eq!(&data[..12], &[0u8; 12], "num_buffers is 0 on TX");
        assert_eq!(&data[12..], &frame[..]);
        let (n, _) = tx.send(&mut q, &mut it).unwrap();
        assert_eq!(n, 2);
        assert_eq!(tx.counters().tx_frames, 6);
        assert!(tx.check(10).is_err() && tx.check(layout.max_tx_frame() + 1).is_err() && tx.check(60).is_ok());
    }
}

#[cfg(test)]
mod packed_tests {
    use super::*;
    use crate::virtqueue::{
        ChainBatch, PackedBase, PackedDeviceQueue, PackedDriverQueue, PackedQueueConfig, RingAddressSpace,
        VirtqueueError,
    };

    fn device(q: &AnyDriverQueue) -> PackedDeviceQueue {
        let (desc, drv, dev) = q.user_addrs();
        let cfg = PackedQueueConfig {
            size: q.size(),
            desc_addr: desc,
            driver_event_addr: drv,
            device_event_addr: dev,
            addr_space: RingAddressSpace::User,
            event_idx: false,
            indirect: false,
            base: PackedBase::START,
        };
        PackedDeviceQueue::new(Arc::new(q.memory().table().clone()), cfg).unwrap()
    }

    /// Frames sent on a packed TX ring come back on a packed RX ring through a device that
    /// copies each TX chain into the next RX buffer (a loopback), over several laps of both
    /// rings (sizes that are not powers of two: packed rings allow any).
    #[test]
    fn frames_loop_through_packed_rings() {
        let mem = Arc::new(GuestMemory::allocate(&[(0, 16 << 20)]).unwrap());
        let layout = PairLayout::new(VirtioFeatures::VERSION_1.bits(), None);
        let mut rxq = AnyDriverQueue::Packed(PackedDriverQueue::allocate(mem.clone(), 6, false, 0).unwrap());
        let mut txq = AnyDriverQueue::Packed(PackedDriverQueue::allocate(mem.clone(), 5, false, 0).unwrap());
        let mut rx = RxRing::new(mem.clone(), &mut rxq, 0, layout).unwrap();
        let mut tx = TxRing::new(mem.clone(), &txq, 1, layout).unwrap();
        let (mut rxdev, mut txdev) = (device(&rxq), device(&txq));
        let (mut rb, mut tb) = (ChainBatch::new(), ChainBatch::new());
        let t = mem.table();
        let mut got = Vec::new();
        for round in 0..20u8 {
            let frames: Vec<Vec<u8>> =
                (0..3).map(|i| vec![round.wrapping_mul(3).wrapping_add(i); 60 + usize::from(i)]).collect();
            let mut it = frames.iter().map(|f| (NetHeader::default(), &f[..]));
            assert_eq!(tx.send(&mut txq, &mut it).unwrap().0, 3);
            tb.clear();
            rb.clear();
            txdev.pop_batch(&mut tb, 8).unwrap();
            rxdev.pop_batch(&mut rb, 3).unwrap();
            assert_eq!((tb.chains().len(), rb.chains().len()), (3, 3));
            for (tc, rc) in tb.chains().iter().zip(rb.chains()) {
                let seg = tb.segments(tc)[0];
                let mut data = vec![0u8; seg.len as usize];
                t.read(seg.gpa, &mut data).unwrap();
                t.write(rb.segments(rc)[0].gpa, &data).unwrap();
                txdev.complete_with(tc.head, std::iter::empty(), 0).unwrap();
                rxdev.complete_with(rc.head, std::iter::empty(), seg.len).unwrap();
            }
            txdev.publish_used().unwrap();
            rxdev.publish_used().unwrap();
            got.clear();
            rx.recv(&mut rxq, 64, &mut |fr| {
                let mut v = vec![0u8; fr.len];
                fr.copy_to(&mem, &mut v)?;
                got.push(v);
                Ok(())
            })
            .unwrap();
            assert_eq!(got, frames);
        }
        assert_eq!(rx.counters().rx_frames, 60);
        assert_eq!(rxq.in_flight(), 6, "every RX buffer posted again");
    }

    /// A packed device that returns an RX buffer id not in flight, or a length beyond the
    /// buffer, breaks nothing: `recv` fails with the queue's error; a used descriptor with the
    /// wrong wrap counter is not a completion at all.
    #[test]
    fn hostile_packed_rx_completions_are_errors() {
        let mem = Arc::new(GuestMemory::allocate(&[(0, 16 << 20)]).unwrap());
        let layout = PairLayout::new(VirtioFeatures::VERSION_1.bits(), None);
        let mut rxq = AnyDriverQueue::Packed(PackedDriverQueue::allocate(mem.clone(), 4, false, 0).unwrap());
        let mut rx = RxRing::new(mem.clone(), &mut rxq, 2, layout).unwrap();
        let desc = rxq.guest_addrs().0;
        let used = |id: u16, len: u32, wrap: bool| {
            let flags: u16 = crate::virtqueue::VIRTQ_DESC_F_WRITE | if wrap { 0x8080 } else { 0 };
            let mut raw = [0u8; 16];
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&id.to_le_bytes());
            raw[14..16].copy_from_slice(&flags.to_le_bytes());
            mem.table().write(desc, &raw).unwrap();
        };
        let mut frames = 0;
        used(0, 100, false);
        assert_eq!(rx.recv(&mut rxq, 8, &mut |_| Ok(())).unwrap().0, 0, "a previous lap's used descriptor");
        used(9, 100, true);
        let err = rx.recv(&mut rxq, 8, &mut |_| Ok(())).unwrap_err();
        assert!(matches!(err, Error::Queue { queue: 2, source: VirtqueueError::UsedIdNotInFlight { id: 9 } }), "{err}");
        used(0, layout.rx_buffer_len + 1, true);
        let err = rx.recv(&mut rxq, 8, &mut |_| Ok(())).unwrap_err();
        assert!(matches!(err, Error::Queue { source: VirtqueueError::UsedLenTooLarge { .. }, .. }), "{err}");
        used(0, 80, true);
        rx.recv(&mut rxq, 8, &mut |_| {
            frames += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(frames, 1, "the ring still works");
    }
}
