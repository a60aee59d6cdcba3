//! The built-in virtio-blk device: raw image files or block devices, data moved straight between
//! the file and guest memory (no bounce copy), either with io_uring — each ring submits the
//! transfers of a batch with one system call and completes them as the kernel reports them,
//! through the device model's event fds and deferred completion (`uring`) — or with
//! preadv/pwritev on the worker thread.

mod uring;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use crate::backend::{Device, RingHandle, Rings, StateReader, StateWriter};
use crate::protocol::{ProtocolFeatures, VirtioFeatures};
use crate::virtio::blk::{
    config, DiscardWriteZeroes, RequestHeader, CONFIG_SIZE, SECTOR_SIZE, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use crate::virtqueue::{for_each_span, AnyDeviceQueue, Chain, ChainBatch, KeptChains, Segment, VirtqueueError};

/// Tag and format version of the saved state (DEVICE_STATE).
const STATE_TAG: &[u8; 4] = b"VBK1";

/// `seg_max` this device offers.
const SEG_MAX: u32 = 126;

/// How the device moves data between the file and guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring for I/O that waits for a device (O_DIRECT, a block device), when the kernel
    /// allows it (per ring; preadv/pwritev for a ring where it does not); preadv/pwritev for a
    /// buffered image file, whose reads the page cache answers at once: there io_uring only
    /// adds work (measured with serve-blk on tmpfs and ext4: `benches/python/bench_backends.py`).
    #[default]
    Auto,
    /// io_uring or an error at start.
    Uring,
    /// preadv/pwritev/fdatasync on the worker thread.
    Sync,
}

impl IoEngine {
    /// Parses `auto`, `uring`, `sync`.
    pub fn parse(s: &str) -> Option<IoEngine> {
        Some(match s {
            "auto" => IoEngine::Auto,
            "uring" | "io_uring" => IoEngine::Uring,
            "sync" => IoEngine::Sync,
            _ => return None,
        })
    }
}

/// How to open the image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockOptions {
    /// Refuse writes and offer VIRTIO_BLK_F_RO.
    pub readonly: bool,
    /// Queues offered.
    pub num_queues: u16,
    /// O_DIRECT: bypass the host page cache (for real disks). Transfers whose guest buffers do
    /// not meet the alignment O_DIRECT needs go through a second, buffered descriptor.
    pub direct: bool,
    /// The I/O engine.
    pub engine: IoEngine,
}

/// What a parsed and checked request needs.
enum Action {
    /// Answered already: status, bytes written into the chain (status byte included).
    Done(u8, u32),
    /// Data between the file at `offset` and `len` bytes of the chain's readable (`write`) or
    /// writable buffers, `skip` bytes in.
    Transfer { write: bool, skip: u64, len: u64, offset: u64 },
    /// FLUSH.
    Flush,
}

/// A virtio-blk device over a file.
#[derive(Debug)]
pub struct BlockDevice {
    file: File,
    /// The same image without O_DIRECT, for transfers O_DIRECT refuses (`--direct` only).
    buffered: Option<File>,
    capacity: u64,
    readonly: bool,
    num_queues: u16,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    engine: IoEngine,
    /// Per ring: its io_uring while the ring runs (None: stopped, or preadv/pwritev).
    rings: Vec<Mutex<Option<uring::RingIo>>>,
}

impl BlockDevice {
    /// Opens `path` (read-write unless `readonly`) as a device with `num_queues` queues,
    /// preadv/pwritev only (see [`BlockDevice::open_with`]).
    pub fn open(path: &Path, readonly: bool, num_queues: u16) -> io::Result<BlockDevice> {
        BlockDevice::open_with(path, BlockOptions { readonly, num_queues, direct: false, engine: IoEngine::Sync })
    }

    /// Opens `path` as `options` say.
    pub fn open_with(path: &Path, options: BlockOptions) -> io::Result<BlockDevice> {
        let BlockOptions { readonly, num_queues, direct, engine } = options;
        let open = |direct: bool| {
            OpenOptions::new()
                .read(true)
                .write(!readonly)
                .custom_flags(if direct { libc::O_DIRECT } else { 0 })
                .open(path)
        };
        let file = open(direct)?;
        let buffered = if direct { Some(open(false)?) } else { None };
        let engine = match engine {
            IoEngine::Auto if !direct && file.metadata()?.is_file() => IoEngine::Sync,
            e => e,
        };
        // A block device's size is not its inode's: seek to the end for both kinds.
        let bytes = {
            use std::io::Seek;
            (&file).seek(io::SeekFrom::End(0))?
        };
        let capacity = bytes / SECTOR_SIZE;
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        let name = b"vhostuser_rs-blk";
        serial[..name.len()].copy_from_slice(name);
        let num_queues = num_queues.max(1);
        if engine == IoEngine::Uring {
            // Fail at start, not at the first ring, when io_uring was asked for explicitly.
            uring::RingIo::new(1)?;
        }
        Ok(BlockDevice {
            file,
            buffered,
            capacity,
            readonly,
            num_queues,
            serial,
            engine,
            rings: (0..num_queues).map(|_| Mutex::new(None)).collect(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn handle(&self, batch: &ChainBatch, chain: &Chain) -> (u8, u32) {
        match self.classify(batch.readable(chain), batch.writable(chain), chain.readable_len, chain.writable_len) {
            Action::Done(status, written) => (status, written),
            Action::Transfer { write, skip, len, offset } => {
                let segs = if write { batch.readable(chain) } else { batch.writable(chain) };
                match self.transfer(segs, skip, len, offset, write) {
                    Ok(()) => (VIRTIO_BLK_S_OK, if write { 1 } else { len as u32 + 1 }),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 1),
                }
            }
            Action::Flush => (if self.flush() { VIRTIO_BLK_S_OK } else { VIRTIO_BLK_S_IOERR }, 1),
        }
    }

    fn flush(&self) -> bool {
        // SAFETY: plain syscall on our file.
        unsafe { libc::fdatasync(self.file.as_raw_fd()) == 0 }
    }

    /// Parses and checks a request; answers what needs no file I/O (or only a small one).
    fn classify(&self, readable: &[Segment], writable: &[Segment], readable_len: u32, writable_len: u32) -> Action {
        use Action::Done;
        if writable_len == 0 {
            return Done(VIRTIO_BLK_S_IOERR, 0); // nowhere to put the status: the caller leaves it unset
        }
        let mut hdr = [0u8; RequestHeader::SIZE];
        if copy_out(readable, 0, &mut hdr) < RequestHeader::SIZE {
            return Done(VIRTIO_BLK_S_IOERR, 1);
        }
        let RequestHeader { type_: rtype, sector, .. } = RequestHeader::from_le_bytes(hdr);
        let data_in = u64::from(writable_len) - 1; // writable bytes before the status byte
        let data_out = u64::from(readable_len) - RequestHeader::SIZE as u64;
        match rtype {
            VIRTIO_BLK_T_IN => {
                if data_in % SECTOR_SIZE != 0 || !self.in_range(sector, data_in) {
                    return Done(VIRTIO_BLK_S_IOERR, 1);
                }
                Action::Transfer { write: false, skip: 0, len: data_in, offset: sector * SECTOR_SIZE }
            }
            VIRTIO_BLK_T_OUT => {
                if self.readonly {
                    return Done(VIRTIO_BLK_S_IOERR, 1);
                }
                if data_out % SECTOR_SIZE != 0 || !self.in_range(sector, data_out) {
                    return Done(VIRTIO_BLK_S_IOERR, 1);
                }
                Action::Transfer {
                    write: true,
                    skip: RequestHeader::SIZE as u64,
                    len: data_out,
                    offset: sector * SECTOR_SIZE,
                }
            }
            VIRTIO_BLK_T_FLUSH => Action::Flush,
            VIRTIO_BLK_T_GET_ID => {
                let n = data_in.min(VIRTIO_BLK_ID_BYTES as u64) as usize;
                copy_in(writable, 0, &self.serial[..n]);
                Done(VIRTIO_BLK_S_OK, n as u32 + 1)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.readonly {
                    return Done(VIRTIO_BLK_S_IOERR, 1);
                }
                let seg_size = DiscardWriteZeroes::SIZE as u64;
                if data_out == 0 || data_out % seg_size != 0 || data_out / seg_size > 1 {
                    return Done(VIRTIO_BLK_S_UNSUPP, 1); // max_discard_seg / max_write_zeroes_seg are 1
                }
                let mut seg = [0u8; DiscardWriteZeroes::SIZE];
                copy_out(readable, RequestHeader::SIZE, &mut seg);
                let DiscardWriteZeroes { sector: s, num_sectors, flags } = DiscardWriteZeroes::from_le_bytes(seg);
                let n = u64::from(num_sectors);
                if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || !self.in_range(s, n * SECTOR_SIZE) {
                    return Done(VIRTIO_BLK_S_UNSUPP, 1);
                }
                let mode = if rtype == VIRTIO_BLK_T_DISCARD {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                // SAFETY: plain syscall on our file with checked offsets.
                let r = unsafe {
                    libc::fallocate(self.file.as_raw_fd(), mode, (s * SECTOR_SIZE) as i64, (n * SECTOR_SIZE) as i64)
                };
                if r == 0 || rtype == VIRTIO_BLK_T_DISCARD {
                    // A discard that the file system cannot do is still a valid no-op.
                    Done(VIRTIO_BLK_S_OK, 1)
                } else {
                    match self.write_zeros(s * SECTOR_SIZE, n * SECTOR_SIZE) {
                        Ok(()) => Done(VIRTIO_BLK_S_OK, 1),
                        Err(_) => Done(VIRTIO_BLK_S_IOERR, 1),
                    }
                }
            }
            _ => Done(VIRTIO_BLK_S_UNSUPP, 1),
        }
    }

    fn in_range(&self, sector: u64, bytes: u64) -> bool {
        sector.checked_add(bytes / SECTOR_SIZE).is_some_and(|end| end <= self.capacity)
    }

    fn write_zeros(&self, mut offset: u64, mut len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let zeros = vec![0u8; 65536];
        let file = self.buffered.as_ref().unwrap_or(&self.file);
        while len > 0 {
            let n = len.min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }

    /// preadv/pwritev straight on the guest buffers: `len` bytes of `segs` starting `skip`
    /// bytes in, at file offset `offset`.
    fn transfer(&self, segs: &[Segment], skip: u64, len: u64, offset: u64, write: bool) -> io::Result<()> {
        let mut iov = Vec::with_capacity(segs.len());
        iovecs(segs, skip, len, &mut iov);
        self.transfer_iov(&mut iov, len, offset, write)
    }

    /// Moves `len` bytes through `iov` at `offset`; through the buffered descriptor when
    /// O_DIRECT refuses the buffers' alignment.
    fn transfer_iov(&self, iov: &mut [libc::iovec], len: u64, offset: u64, write: bool) -> io::Result<()> {
        match rw_iov(self.file.as_raw_fd(), iov, len, offset, write) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && self.buffered.is_some() => {
                let fd = self.buffered.as_ref().map_or(self.file.as_raw_fd(), |f| f.as_raw_fd());
                rw_iov(fd, iov, len, offset, write)
            }
            r => r,
        }
    }

    fn config_bytes(&self) -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_SIZE];
        let mut put = |offset: usize, value: &[u8]| c[offset..offset + value.len()].copy_from_slice(value);
        put(config::CAPACITY, &self.capacity.to_le_bytes());
        put(config::SEG_MAX, &SEG_MAX.to_le_bytes());
        put(config::BLK_SIZE, &512u32.to_le_bytes());
        put(config::MIN_IO_SIZE, &1u16.to_le_bytes());
        put(config::OPT_IO_SIZE, &1u32.to_le_bytes());
        put(config::NUM_QUEUES, &self.num_queues.to_le_bytes());
        let max = u32::try_from(self.capacity).unwrap_or(u32::MAX).min(1 << 22);
        put(config::MAX_DISCARD_SECTORS, &max.to_le_bytes());
        put(config::MAX_DISCARD_SEG, &1u32.to_le_bytes());
        put(config::DISCARD_SECTOR_ALIGNMENT, &1u32.to_le_bytes());
        put(config::MAX_WRITE_ZEROES_SECTORS, &max.to_le_bytes());
        put(config::MAX_WRITE_ZEROES_SEG, &1u32.to_le_bytes());
        c
    }
}

/// The iovecs of `len` bytes of `segs` starting `skip` bytes in.
fn iovecs(segs: &[Segment], mut skip: u64, len: u64, iov: &mut Vec<libc::iovec>) {
    let mut left = len;
    for s in segs {
        if left == 0 {
            break;
        }
        let seg_len = u64::from(s.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(left);
        // SAFETY: host..host+len lies in a mapping the queue keeps alive (validated when the
        // chain was walked); skip < seg_len.
        iov.push(libc::iovec { iov_base: unsafe { s.host.add(skip as usize) }.cast(), iov_len: n as usize });
        left -= n;
        skip = 0;
    }
}

/// Drops the first `n` bytes of `iov` (after a short transfer); returns the first iovec left.
fn advance(iov: &mut [libc::iovec], mut n: usize) -> usize {
    let mut first = 0;
    while n > 0 && first < iov.len() {
        if n >= iov[first].iov_len {
            n -= iov[first].iov_len;
            first += 1;
        } else {
            // SAFETY: stays inside the same iovec.
            iov[first].iov_base = unsafe { iov[first].iov_base.cast::<u8>().add(n) }.cast();
            iov[first].iov_len -= n;
            n = 0;
        }
    }
    first
}

/// preadv/pwritev `len` bytes through `iov` at `offset`, resuming after short transfers.
fn rw_iov(fd: RawFd, iov: &mut [libc::iovec], len: u64, offset: u64, write: bool) -> io::Result<()> {
    let (mut done, mut first) = (0u64, 0usize);
    while done < len {
        let rest = &iov[first..];
        // SAFETY: iov points at live guest buffers; the kernel reads or writes them.
        let r = unsafe {
            if write {
                libc::pwritev(fd, rest.as_ptr(), rest.len() as i32, (offset + done) as i64)
            } else {
                libc::preadv(fd, rest.as_ptr(), rest.len() as i32, (offset + done) as i64)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        done += r as u64;
        first += advance(&mut iov[first..], r as usize);
    }
    Ok(())
}

fn spans(segs: &[Segment]) -> impl Iterator<Item = (*mut u8, usize)> + '_ {
    segs.iter().map(|s| (s.host, s.len as usize))
}

/// Copies bytes out of guest segments (from byte `skip`) into `out`; returns how many.
fn copy_out(segs: &[Segment], skip: usize, out: &mut [u8]) -> usize {
    let dst = out.as_mut_ptr();
    for_each_span(spans(segs), skip, out.len(), |host, at, n| {
        // SAFETY: host..+n lies in a live mapping, at..+n in `out`; a raw copy, no reference
        // to guest memory.
        unsafe { std::ptr::copy_nonoverlapping(host, dst.add(at), n) }
    })
}

/// Copies `data` into guest segments from byte `skip`.
fn copy_in(segs: &[Segment], skip: usize, data: &[u8]) {
    for_each_span(spans(segs), skip, data.len(), |host, at, n| {
        // SAFETY: host..+n lies in a live mapping, at..+n in `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().add(at), host, n) }
    });
}

fn write_status(segs: &[Segment], status: u8) {
    if let Some(last) = segs.iter().rev().find(|s| s.len > 0) {
        // SAFETY: the last byte of the last writable segment, inside a live mapping.
        unsafe { std::ptr::write_volatile(last.host.add(last.len as usize - 1), status) };
    }
}

impl Device for BlockDevice {
    fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn features(&self) -> u64 {
        // RING_PACKED: the worker, inflight tracking and I/O completion run on either format.
        let mut f = VirtioFeatures::VERSION_1.bits()
            | VirtioFeatures::EVENT_IDX.bits()
            | VirtioFeatures::INDIRECT_DESC.bits()
            | VirtioFeatures::RING_PACKED.bits()
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn config(&self) -> Vec<u8> {
        self.config_bytes()
    }

    /// A buffered 4 KiB read takes ~1.5 µs here: 16 of them (a few tens of µs) is about what a
    /// driver's wake-up costs, so completions reach it while the ring still holds work.
    /// serve-blk at iodepth 32, random data on tmpfs: 64 → 16 took 300 K to 530 K IOPS
    /// (`benches/python/bench_python_blk.py`); 8 was no better.
    fn drain_batch(&self) -> usize {
        16
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::DEVICE_STATE
    }

    /// A virtio-blk device keeps no state between requests (every request completes before its
    /// ring stops, and there is no writeback-cache toggle): what migrates is the identity the
    /// driver saw, which the destination checks against its own image, since a driver that does
    /// not re-initialise must find the same disk.
    fn save_state(&self) -> Result<Vec<u8>, String> {
        Ok(StateWriter::new(STATE_TAG)
            .u64(self.capacity)
            .u8(u8::from(self.readonly))
            .u16(self.num_queues)
            .bytes(&self.serial)
            .finish())
    }

    fn load_state(&self, state: &[u8]) -> Result<(), String> {
        let mut r = StateReader::new(state, STATE_TAG)?;
        let (capacity, readonly, num_queues) = (r.u64()?, r.u8()? != 0, r.u16()?);
        let serial = r.bytes(VIRTIO_BLK_ID_BYTES)?;
        r.end()?;
        if capacity != self.capacity {
            return Err(format!("the source disk had {capacity} sectors, this one has {}", self.capacity));
        }
        if readonly != self.readonly || num_queues != self.num_queues || serial != self.serial {
            return Err("the source disk differs (read-only flag, queue count or serial)".into());
        }
        Ok(())
    }

    fn process(&self, _queue_index: u16, queue: &mut AnyDeviceQueue, batch: &ChainBatch) -> Result<(), VirtqueueError> {
        for chain in batch.chains() {
            let (status, written) = self.handle(batch, chain);
            if chain.writable_len > 0 {
                write_status(batch.writable(chain), status);
            }
            queue.complete(batch, chain, written.min(chain.writable_len))?;
        }
        Ok(())
    }

    fn event_fds(&self, queue_index: u16) -> Vec<RawFd> {
        if self.engine == IoEngine::Sync {
            return Vec::new();
        }
        let Some(cell) = self.rings.get(usize::from(queue_index)) else { return Vec::new() };
        let mut ring = cell.lock().unwrap_or_else(|e| e.into_inner());
        if ring.is_none() {
            // As many operations as the largest ring has chains: a full ring never waits for room.
            match uring::RingIo::new(u32::from(self.max_queue_size())) {
                Ok(io) => *ring = Some(io),
                Err(e) => {
                    log::warn!("ring {queue_index}: io_uring unavailable ({e}), using preadv/pwritev");
                    return Vec::new();
                }
            }
        }
        ring.as_ref().map(|io| vec![io.eventfd()]).unwrap_or_default()
    }

    fn process_batch(
        &self,
        queue_index: u16,
        queue: &mut AnyDeviceQueue,
        batch: &ChainBatch,
        kept: &mut KeptChains,
        _others: &mut Rings<'_>,
    ) -> Result<(), VirtqueueError> {
        let Some(cell) = self.rings.get(usize::from(queue_index)) else {
            return self.process(queue_index, queue, batch);
        };
        let mut guard = cell.lock().unwrap_or_else(|e| e.into_inner());
        let Some(io) = guard.as_mut() else {
            drop(guard);
            return self.process(queue_index, queue, batch);
        };
        let fd = self.file.as_raw_fd();
        for chain in batch.chains() {
            let kind = match self.classify(
                batch.readable(chain),
                batch.writable(chain),
                chain.readable_len,
                chain.writable_len,
            ) {
                Action::Done(status, written) => {
                    if chain.writable_len > 0 {
                        write_status(batch.writable(chain), status);
                    }
                    queue.complete(batch, chain, written.min(chain.writable_len))?;
                    continue;
                }
                Action::Transfer { write, skip, len, offset } => (uring::OpKind::Transfer { write, len, offset }, skip),
                Action::Flush => (uring::OpKind::Flush, 0),
            };
            let chain = kept.detach(batch, chain);
            let mut iov = Vec::new();
            if let (uring::OpKind::Transfer { write, len, .. }, skip) = kind {
                iovecs(if write { chain.readable() } else { chain.writable() }, skip, len, &mut iov);
            }
            if let Err(op) = io.push(fd, uring::Op { chain, iov, kind: kind.0 }) {
                // No room in flight: this one is done here and now.
                let (chain, written) = self.finish(op, None);
                complete_kept(queue, kept, chain, written)?;
            }
        }
        // A failed submission leaves the operations queued; the next batch or completion sends them.
        let _ = io.submit();
        // What the kernel finished during the submission (page-cache hits) goes out with this batch.
        let mut result = Ok(());
        io.reap(&mut |op, res| {
            let (chain, written) = self.finish(op, Some(res));
            if let Err(e) = complete_kept(queue, kept, chain, written) {
                result = Err(e);
            }
        });
        result
    }

    fn event(&self, _fd: RawFd, mut ring: RingHandle<'_>, _others: &mut Rings<'_>) -> Result<bool, VirtqueueError> {
        let Some(cell) = self.rings.get(usize::from(ring.index())) else { return Ok(true) };
        let mut guard = cell.lock().unwrap_or_else(|e| e.into_inner());
        let Some(io) = guard.as_mut() else { return Ok(true) };
        let mut result = Ok(());
        io.reap(&mut |op, res| {
            let (chain, written) = self.finish(op, Some(res));
            if let Err(e) = ring.complete(chain, written) {
                result = Err(e);
            }
        });
        result.map(|()| true)
    }

    fn ring_stopping(&self, mut ring: RingHandle<'_>) {
        let Some(cell) = self.rings.get(usize::from(ring.index())) else { return };
        let mut guard = cell.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut io) = guard.take() {
            // Every chain submitted is answered before the ring's state goes back to the
            // front-end (GET_VRING_BASE), and the kernel is done with the guest buffers. The
            // io_uring goes with the ring (a stopped ring holds no fds); the next start makes one.
            io.drain(&mut |op, res| {
                let (chain, written) = self.finish(op, Some(res));
                let _ = ring.complete(chain, written);
            });
        }
    }
}

impl BlockDevice {
    /// Ends an operation: `res` is its io_uring result (None: not submitted, do it now). Writes
    /// the status byte; returns the chain and the bytes written into it.
    fn finish(&self, op: uring::Op, res: Option<i32>) -> (crate::virtqueue::KeptChain, u32) {
        let uring::Op { chain, mut iov, kind } = op;
        let status = match (kind, res) {
            (uring::OpKind::Flush, Some(r)) => {
                if r >= 0 {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                }
            }
            (uring::OpKind::Flush, None) => {
                if self.flush() {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                }
            }
            (uring::OpKind::Transfer { write, len, offset }, res) => {
                let r = match res {
                    None => self.transfer_iov(&mut iov, len, offset, write),
                    Some(r) if r == -libc::EINVAL && self.buffered.is_some() => {
                        // O_DIRECT refused the buffers' alignment: the buffered descriptor takes it.
                        self.transfer_iov(&mut iov, len, offset, write)
                    }
                    Some(r) if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                    Some(r) if (r as u64) < len => {
                        // A short transfer: the rest is done here.
                        let first = advance(&mut iov, r as usize);
                        rw_iov(self.file.as_raw_fd(), &mut iov[first..], len - r as u64, offset + r as u64, write)
                    }
                    Some(_) => Ok(()),
                };
                if r.is_ok() {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                }
            }
        };
        write_status(chain.writable(), status);
        let written = match kind {
            uring::OpKind::Transfer { write: false, len, .. } if status == VIRTIO_BLK_S_OK => len as u32 + 1,
            _ => 1,
        };
        let written = written.min(chain.writable_len);
        (chain, written)
    }
}

/// Completes a chain held outside the ring's kept list.
fn complete_kept(
    queue: &mut AnyDeviceQueue,
    kept: &mut KeptChains,
    chain: crate::virtqueue::KeptChain,
    written: u32,
) -> Result<(), VirtqueueError> {
    let result = queue.complete_with(chain.head, chain.writable().iter().map(|s| (s.gpa, s.len)), written);
    kept.recycle(chain);
    result
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::memory::{DirtyLog, GuestMemory, LOG_PAGE_SIZE};
    use crate::virtqueue::{DeviceQueue, DriverQueue, QueueConfig, RingAddressSpace};

    const MIB: u64 = 1 << 20;
    const PAGE: u64 = LOG_PAGE_SIZE;

    struct Rig {
        mem: Arc<GuestMemory>,
        driver: DriverQueue,
        device: AnyDeviceQueue,
        blk: BlockDevice,
        log: DirtyLog,
        image: std::path::PathBuf,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.image);
        }
    }

    /// A 64 KiB image behind a ring over 4 MiB of guest memory, with LOG_ALL on.
    fn rig(name: &str) -> Rig {
        let image = std::env::temp_dir().join(format!("vhostuser_rs-blk-{}-{name}.img", std::process::id()));
        std::fs::write(&image, vec![0x5a; 64 << 10]).unwrap();
        let blk = BlockDevice::open(&image, false, 1).unwrap();
        let mem = Arc::new(GuestMemory::allocate(&[(0, 4 * MIB)]).unwrap());
        let driver = DriverQueue::allocate(mem.clone(), 8, false, 0).unwrap();
        let (desc_addr, avail_addr, used_addr) = driver.user_addrs();
        let cfg = QueueConfig {
            size: 8,
            desc_addr,
            avail_addr,
            used_addr,
            addr_space: RingAddressSpace::User,
            event_idx: false,
            indirect: false,
            next_avail: 0,
        };
        let mut device = AnyDeviceQueue::Split(DeviceQueue::new(Arc::new(mem.table().clone()), cfg).unwrap());
        let log = DirtyLog::allocate(4 * MIB).unwrap();
        device.set_dirty_log(Some(log.clone()), None);
        Rig { mem, driver, device, blk, log, image }
    }

    impl Rig {
        /// Sends one request (header at page 0x100, `data` writable bytes at page 0x110, the
        /// status byte alone at page 0x120, as Linux lays them out) and returns the status, the
        /// used length and the pages the device logged.
        fn request(&mut self, type_: u32, sector: u64, data: u32) -> (u8, u32, Vec<u64>) {
            let (hdr, buf, status) = (0x100 * PAGE, 0x110 * PAGE, 0x120 * PAGE);
            self.driver.write(hdr, &RequestHeader { type_, reserved: 0, sector }.to_le_bytes()).unwrap();
            self.driver.write(status, &[0xff]).unwrap();
            let mut writable = vec![(status, 1)];
            if data > 0 {
                writable.insert(0, (buf, data));
            }
            self.driver.add(&[(hdr, RequestHeader::SIZE as u32)], &writable).unwrap();
            self.driver.publish();
            let mut batch = ChainBatch::new();
            assert_eq!(self.device.pop_batch(&mut batch, 8).unwrap(), 1);
            self.blk.process(0, &mut self.device, &batch).unwrap();
            self.device.publish_used().unwrap();
            let mut used = Vec::new();
            assert_eq!(self.driver.reap(&mut used, 8).unwrap(), 1);
            let mut st = [0u8];
            self.mem.table().read(status, &mut st).unwrap();
            (st[0], used[0].1, self.log.take_dirty())
        }
    }

    const STATUS_PAGE: u64 = 0x120;

    #[test]
    fn the_status_byte_is_logged_when_a_request_fails() {
        let mut r = rig("ioerr");
        // A read past the end of the image: IOERR, used length 1, no data written, but the
        // status byte (the chain's last writable byte, on a page of its own) was.
        let (status, len, dirty) = r.request(VIRTIO_BLK_T_IN, 1 << 20, 4096);
        assert_eq!((status, len), (VIRTIO_BLK_S_IOERR, 1));
        assert!(dirty.contains(&STATUS_PAGE), "status page not logged: {dirty:x?}");
        // An unknown request type: UNSUPP.
        let (status, len, dirty) = r.request(99, 0, 512);
        assert_eq!((status, len), (VIRTIO_BLK_S_UNSUPP, 1));
        assert!(dirty.contains(&STATUS_PAGE), "status page not logged: {dirty:x?}");
        // A write has only the status byte writable.
        let (status, _, dirty) = r.request(VIRTIO_BLK_T_OUT, 1 << 20, 0);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        assert_eq!(dirty, [STATUS_PAGE]);
    }

    #[test]
    fn get_id_logs_the_id_and_the_status_byte() {
        let mut r = rig("getid");
        // Linux asks with a 20-byte buffer; a driver may give more: 20 bytes are written at its
        // start and the status after the whole buffer.
        let (status, len, dirty) = r.request(VIRTIO_BLK_T_GET_ID, 0, 4096);
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, VIRTIO_BLK_ID_BYTES as u32 + 1));
        assert!(dirty.contains(&0x110) && dirty.contains(&STATUS_PAGE), "{dirty:x?}");
    }

    #[test]
    fn a_read_logs_its_data_and_status_pages() {
        let mut r = rig("read");
        let (status, len, dirty) = r.request(VIRTIO_BLK_T_IN, 0, 2 * PAGE as u32);
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 2 * PAGE as u32 + 1));
        assert_eq!(dirty, [0x110, 0x111, STATUS_PAGE]);
        let mut data = vec![0u8; 2 * PAGE as usize];
        r.mem.table().read(0x110 * PAGE, &mut data).unwrap();
        assert!(data.iter().all(|&b| b == 0x5a));
    }
}
