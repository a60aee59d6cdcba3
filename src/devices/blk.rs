//! The built-in virtio-blk device: raw image files or block devices, data moved straight between
//! the file and guest memory with preadv/pwritev on the guest buffers (no bounce copy).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::backend::{Device, StateReader, StateWriter};
use crate::protocol::{ProtocolFeatures, VirtioFeatures};
use crate::virtio::blk::{
    config, DiscardWriteZeroes, RequestHeader, CONFIG_SIZE, SECTOR_SIZE, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use crate::virtqueue::{for_each_span, ChainBatch, DeviceQueue, Segment, VirtqueueError};

/// Tag and format version of the saved state (DEVICE_STATE).
const STATE_TAG: &[u8; 4] = b"VBK1";

/// `seg_max` this device offers.
const SEG_MAX: u32 = 126;

/// A virtio-blk device over a file.
#[derive(Debug)]
pub struct BlockDevice {
    file: File,
    capacity: u64,
    readonly: bool,
    num_queues: u16,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
}

impl BlockDevice {
    /// Opens `path` (read-write unless `readonly`) as a device with `num_queues` queues.
    pub fn open(path: &Path, readonly: bool, num_queues: u16) -> io::Result<BlockDevice> {
        let file = OpenOptions::new().read(true).write(!readonly).open(path)?;
        let capacity = file.metadata()?.len() / SECTOR_SIZE;
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        let name = b"vhostuser_rs-blk";
        serial[..name.len()].copy_from_slice(name);
        Ok(BlockDevice { file, capacity, readonly, num_queues: num_queues.max(1), serial })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn handle(&self, batch: &ChainBatch, chain: &crate::virtqueue::Chain) -> (u8, u32) {
        let readable = batch.readable(chain);
        let writable = batch.writable(chain);
        if chain.writable_len == 0 {
            return (VIRTIO_BLK_S_IOERR, 0); // nowhere to put the status: the caller leaves it unset
        }
        let mut hdr = [0u8; RequestHeader::SIZE];
        if copy_out(readable, 0, &mut hdr) < RequestHeader::SIZE {
            return (VIRTIO_BLK_S_IOERR, 1);
        }
        let RequestHeader { type_: rtype, sector, .. } = RequestHeader::from_le_bytes(hdr);
        let data_in = u64::from(chain.writable_len) - 1; // writable bytes before the status byte
        let data_out = u64::from(chain.readable_len) - RequestHeader::SIZE as u64;
        match rtype {
            VIRTIO_BLK_T_IN => {
                if data_in % SECTOR_SIZE != 0 || !self.in_range(sector, data_in) {
                    return (VIRTIO_BLK_S_IOERR, 1);
                }
                match self.io_vectored(writable, 0, data_in, sector * SECTOR_SIZE, false) {
                    Ok(()) => (VIRTIO_BLK_S_OK, data_in as u32 + 1),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 1),
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.readonly {
                    return (VIRTIO_BLK_S_IOERR, 1);
                }
                if data_out % SECTOR_SIZE != 0 || !self.in_range(sector, data_out) {
                    return (VIRTIO_BLK_S_IOERR, 1);
                }
                match self.io_vectored(readable, RequestHeader::SIZE as u64, data_out, sector * SECTOR_SIZE, true) {
                    Ok(()) => (VIRTIO_BLK_S_OK, 1),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 1),
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                // SAFETY: plain syscall on our file.
                let ok = unsafe { libc::fdatasync(self.file.as_raw_fd()) } == 0;
                (if ok { VIRTIO_BLK_S_OK } else { VIRTIO_BLK_S_IOERR }, 1)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = data_in.min(VIRTIO_BLK_ID_BYTES as u64) as usize;
                copy_in(writable, 0, &self.serial[..n]);
                (VIRTIO_BLK_S_OK, n as u32 + 1)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.readonly {
                    return (VIRTIO_BLK_S_IOERR, 1);
                }
                let seg_size = DiscardWriteZeroes::SIZE as u64;
                if data_out == 0 || data_out % seg_size != 0 || data_out / seg_size > 1 {
                    return (VIRTIO_BLK_S_UNSUPP, 1); // max_discard_seg / max_write_zeroes_seg are 1
                }
                let mut seg = [0u8; DiscardWriteZeroes::SIZE];
                copy_out(readable, RequestHeader::SIZE, &mut seg);
                let DiscardWriteZeroes { sector: s, num_sectors, flags } = DiscardWriteZeroes::from_le_bytes(seg);
                let n = u64::from(num_sectors);
                if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || !self.in_range(s, n * SECTOR_SIZE) {
                    return (VIRTIO_BLK_S_UNSUPP, 1);
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
                    (VIRTIO_BLK_S_OK, 1)
                } else {
                    match self.write_zeros(s * SECTOR_SIZE, n * SECTOR_SIZE) {
                        Ok(()) => (VIRTIO_BLK_S_OK, 1),
                        Err(_) => (VIRTIO_BLK_S_IOERR, 1),
                    }
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 1),
        }
    }

    fn in_range(&self, sector: u64, bytes: u64) -> bool {
        sector.checked_add(bytes / SECTOR_SIZE).is_some_and(|end| end <= self.capacity)
    }

    fn write_zeros(&self, mut offset: u64, mut len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let zeros = vec![0u8; 65536];
        while len > 0 {
            let n = len.min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }

    /// preadv/pwritev straight on the guest buffers: `len` bytes of `segs` starting `skip`
    /// bytes in, at file offset `offset`.
    fn io_vectored(&self, segs: &[Segment], skip: u64, len: u64, offset: u64, write: bool) -> io::Result<()> {
        let mut iov = Vec::with_capacity(segs.len());
        let (mut skip, mut left) = (skip, len);
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
        let (mut done, mut first) = (0u64, 0usize);
        while done < len {
            // SAFETY: iov points at live guest buffers; the kernel reads or writes them.
            let r = unsafe {
                let rest = &iov[first..];
                if write {
                    libc::pwritev(self.file.as_raw_fd(), rest.as_ptr(), rest.len() as i32, (offset + done) as i64)
                } else {
                    libc::preadv(self.file.as_raw_fd(), rest.as_ptr(), rest.len() as i32, (offset + done) as i64)
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
            // Advance the iovec array past what was transferred.
            let mut adv = r as usize;
            while adv > 0 && first < iov.len() {
                if adv >= iov[first].iov_len {
                    adv -= iov[first].iov_len;
                    first += 1;
                } else {
                    // SAFETY: stays inside the same iovec.
                    iov[first].iov_base = unsafe { iov[first].iov_base.cast::<u8>().add(adv) }.cast();
                    iov[first].iov_len -= adv;
                    adv = 0;
                }
            }
        }
        Ok(())
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
        let mut f = VirtioFeatures::VERSION_1.bits()
            | VirtioFeatures::EVENT_IDX.bits()
            | VirtioFeatures::INDIRECT_DESC.bits()
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

    fn process(&self, _queue_index: u16, queue: &mut DeviceQueue, batch: &ChainBatch) -> Result<(), VirtqueueError> {
        for chain in batch.chains() {
            let (status, written) = self.handle(batch, chain);
            if chain.writable_len > 0 {
                write_status(batch.writable(chain), status);
            }
            queue.complete(batch, chain, written.min(chain.writable_len))?;
        }
        Ok(())
    }
}
