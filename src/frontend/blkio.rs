//! A virtio-blk I/O loop in Rust for the front-end: keeps `iodepth` requests in flight on a
//! driver ring, resubmitting each completion at once, and measures IOPS, bandwidth and latency.
//! It is what `vhostuser-rs bench` runs, so the figures measure the back-end and the ring, not
//! Python.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::eventfd;
use super::poll::{AdaptivePoll, POLL_WINDOW};
use crate::error::{Error, Result};
use crate::memory::GuestMemory;
use crate::virtio::blk::{RequestHeader, SECTOR_SIZE, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use crate::virtqueue::AnyDriverQueue;

/// The access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random, half reads and half writes.
    RandRw,
}

impl Pattern {
    /// Parses fio's names.
    pub fn parse(s: &str) -> Option<Pattern> {
        Some(match s {
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "read" => Pattern::Read,
            "write" => Pattern::Write,
            "rw" | "randrw" => Pattern::RandRw,
            _ => return None,
        })
    }
}

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct Job {
    /// Access pattern.
    pub pattern: Pattern,
    /// Block size in bytes (multiple of 512).
    pub block_size: u32,
    /// Requests kept in flight.
    pub iodepth: u16,
    /// How long to run.
    pub duration: Duration,
    /// Device size in bytes.
    pub capacity: u64,
    /// Stamp written sectors with their number and check read sectors for it.
    pub verify: bool,
    /// Seed of the address generator.
    pub seed: u64,
    /// Hybrid polling: while nothing has completed, yield the CPU and look at the used ring
    /// again for up to this long before sleeping on the call eventfd. Zero sleeps at once.
    /// `None`: [`POLL_WINDOW`] at iodepth ≤ 4 (each I/O would otherwise pay a sleep and a
    /// cross-CPU wake-up, more than the I/O itself), else whichever of polling and sleeping
    /// costs less this thread's CPU per I/O times the time per I/O ([`AdaptivePoll`]).
    pub poll: Option<Duration>,
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Completed requests.
    pub ios: u64,
    /// Bytes transferred.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Latency of every read, nanoseconds (unsorted), from just before its submission to the
    /// loop's seeing it in the used ring (fio's completion latency, clat).
    pub latencies_ns: Vec<u32>,
    /// Latency of every write, nanoseconds (unsorted).
    pub write_latencies_ns: Vec<u32>,
    /// Requests completed with a non-OK status.
    pub errors: u64,
    /// Sectors whose stamp did not match (with `verify`).
    pub verify_failures: u64,
    /// Completed requests per whole second of the run.
    pub per_second: Vec<u64>,
    /// Completed writes per whole second of the run (included in `per_second`).
    pub per_second_writes: Vec<u64>,
}

/// Length of the header descriptor of every request.
const HDR_LEN: u32 = RequestHeader::SIZE as u32;

struct Slot {
    hdr: u64,
    data: u64,
    status: u64,
    write: bool,
    sector: u64,
    started: Instant,
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// Runs `job` on one ring. `stop` is polled about every millisecond; returning true ends the run
/// early (Ctrl-C, a progress display).
pub fn run(
    queue: &mut AnyDriverQueue,
    memory: &Arc<GuestMemory>,
    kick: BorrowedFd<'_>,
    call: BorrowedFd<'_>,
    job: Job,
    stop: &mut dyn FnMut(&Report) -> bool,
) -> Result<Report> {
    let bs = u64::from(job.block_size);
    if bs == 0 || bs % SECTOR_SIZE != 0 || job.capacity < bs || job.iodepth == 0 {
        return Err(Error::Io(io::Error::new(io::ErrorKind::InvalidInput, "invalid block size, capacity or iodepth")));
    }
    // Every request is a 3-descriptor chain (header, data, status): no more in flight than the
    // ring holds, whichever its format.
    let depth = usize::from(job.iodepth).min(usize::from(queue.size() / 3).max(1));
    let blocks = job.capacity / bs;
    let mem = memory.table();
    let mut slots = Vec::with_capacity(depth);
    for _ in 0..depth {
        slots.push(Slot {
            hdr: memory.alloc(RequestHeader::SIZE as u64, 16)?,
            data: memory.alloc(bs, 4096)?,
            status: memory.alloc(1, 1)?,
            write: false,
            sector: 0,
            started: Instant::now(),
        });
    }
    let mut by_head = vec![usize::MAX; usize::from(queue.size())];
    let mut rng = job.seed | 1;
    let mut next_seq = 0u64;
    let mut report = Report { latencies_ns: Vec::with_capacity(1 << 20), ..Report::default() };
    let mut stamp = vec![0u8; bs as usize];
    let mut check = vec![0u8; bs as usize];
    let mut submit =
        |queue: &mut AnyDriverQueue, i: usize, slots: &mut Vec<Slot>, by_head: &mut Vec<usize>| -> Result<()> {
            let block = match job.pattern {
                Pattern::Read | Pattern::Write => {
                    next_seq += 1;
                    (next_seq - 1) % blocks
                }
                _ => xorshift(&mut rng) % blocks,
            };
            let write = match job.pattern {
                Pattern::RandWrite | Pattern::Write => true,
                Pattern::RandRw => xorshift(&mut rng) & 1 == 1,
                _ => false,
            };
            let s = &mut slots[i];
            s.sector = block * bs / SECTOR_SIZE;
            s.write = write;
            let type_ = if write { VIRTIO_BLK_T_OUT } else { VIRTIO_BLK_T_IN };
            mem.write(s.hdr, &RequestHeader { type_, reserved: 0, sector: s.sector }.to_le_bytes())?;
            mem.write(s.status, &[0xff])?;
            if write && job.verify {
                for (k, chunk) in stamp.chunks_mut(SECTOR_SIZE as usize).enumerate() {
                    chunk[..8].copy_from_slice(&(s.sector + k as u64).to_le_bytes());
                }
                mem.write(s.data, &stamp)?;
            }
            let head = if write {
                queue.add(&[(s.hdr, HDR_LEN), (s.data, job.block_size)], &[(s.status, 1)])
            } else {
                queue.add(&[(s.hdr, HDR_LEN)], &[(s.data, job.block_size), (s.status, 1)])
            }
            .map_err(|e| Error::Queue { queue: 0, source: e })?;
            by_head[usize::from(head)] = i;
            s.started = Instant::now();
            Ok(())
        };
    let start = Instant::now();
    let end = start + job.duration;
    for i in 0..depth {
        submit(queue, i, &mut slots, &mut by_head)?;
    }
    queue.set_interrupts(true);
    queue.publish();
    if queue.kick_needed().map_err(|e| Error::Queue { queue: 0, source: e })? {
        eventfd::signal(kick).map_err(Error::Io)?;
    }
    let mut adaptive = AdaptivePoll::new();
    let mut used = Vec::with_capacity(depth);
    let mut done_slots = Vec::with_capacity(depth);
    let mut last_second = 0u64;
    let mut in_second = 0u64;
    let mut in_second_writes = 0u64;
    let mut ticks = 0u32;
    let mut last_progress = Instant::now();
    loop {
        used.clear();
        queue.reap(&mut used, depth).map_err(|e| Error::Queue { queue: 0, source: e })?;
        let now = Instant::now();
        if used.is_empty() {
            let waited = now.duration_since(last_progress);
            let window = match job.poll {
                Some(window) => window,
                None if job.iodepth <= 4 => POLL_WINDOW,
                None => adaptive.window(),
            };
            if waited < window {
                // Yielding rather than spinning: when the back-end shares this CPU it runs now
                // and completes the request without either side sleeping (no wake-up at all).
                // An adaptive window (QEMU's grow/shrink policy) was measured and lost: one late
                // completion shrinks it, both sides fall asleep, and every later I/O pays two
                // cross-CPU wake-ups.
                std::thread::yield_now();
                continue;
            }
            eventfd::wait(call, 1).map_err(Error::Io)?;
            last_progress = Instant::now();
        } else {
            last_progress = now;
            adaptive.completed(used.len() as u32);
        }
        let running = now < end;
        // First map every completion to its slot, then resubmit: a resubmission may reuse a
        // head that a later entry of this same batch still names.
        done_slots.clear();
        for &(head, _len) in &used {
            let i = by_head[usize::from(head)];
            if i == usize::MAX {
                let source = crate::virtqueue::VirtqueueError::UsedIdNotInFlight { id: head.into() };
                return Err(Error::Queue { queue: 0, source });
            }
            by_head[usize::from(head)] = usize::MAX;
            done_slots.push(i);
        }
        for &i in &done_slots {
            let s = &slots[i];
            let lat = now.duration_since(s.started).as_nanos().min(u128::from(u32::MAX)) as u32;
            if s.write {
                report.write_latencies_ns.push(lat);
                in_second_writes += 1;
            } else {
                report.latencies_ns.push(lat);
            }
            report.ios += 1;
            report.bytes += bs;
            in_second += 1;
            let mut status = [0u8; 1];
            mem.read(s.status, &mut status)?;
            if status[0] != VIRTIO_BLK_S_OK {
                report.errors += 1;
            } else if job.verify && !s.write {
                mem.read(s.data, &mut check)?;
                for (k, chunk) in check.chunks(SECTOR_SIZE as usize).enumerate() {
                    if chunk[..8] != (s.sector + k as u64).to_le_bytes() {
                        report.verify_failures += 1;
                    }
                }
            }
            if running {
                submit(queue, i, &mut slots, &mut by_head)?;
            }
        }
        if !used.is_empty() && running {
            queue.publish();
            if queue.kick_needed().map_err(|e| Error::Queue { queue: 0, source: e })? {
                eventfd::signal(kick).map_err(Error::Io)?;
            }
        }
        let second = now.duration_since(start).as_secs();
        if second > last_second {
            report.per_second.push(in_second);
            report.per_second_writes.push(in_second_writes);
            in_second = 0;
            in_second_writes = 0;
            last_second = second;
        }
        ticks += 1;
        if ticks % 64 == 0 || used.is_empty() {
            report.elapsed = now.duration_since(start);
            if stop(&report) && running {
                // Treat an external stop like the end of the run: drain what is in flight.
                return finish(queue, call, report, start, depth);
            }
        }
        if !running && queue.in_flight() == 0 {
            break;
        }
        if now > end + Duration::from_secs(10) {
            return Err(Error::Timeout("draining the requests in flight"));
        }
    }
    report.elapsed = Instant::now().duration_since(start);
    Ok(report)
}

fn finish(
    queue: &mut AnyDriverQueue,
    call: BorrowedFd<'_>,
    mut report: Report,
    start: Instant,
    depth: usize,
) -> Result<Report> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut used = Vec::with_capacity(depth);
    while queue.in_flight() > 0 {
        used.clear();
        queue.reap(&mut used, depth).map_err(|e| Error::Queue { queue: 0, source: e })?;
        if used.is_empty() {
            eventfd::wait(call, 1).map_err(Error::Io)?;
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout("draining the requests in flight"));
        }
    }
    report.elapsed = Instant::now().duration_since(start);
    Ok(report)
}
