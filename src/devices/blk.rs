//! The built-in virtio-blk device: raw image files or block devices, data moved straight between
//! the file and guest memory with preadv/pwritev on the guest buffers (no bounce copy).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::backend::Device;
use crate::protocol::VirtioFeatures;
use crate::virtqueue::{for_each_span, ChainBatch, DeviceQueue, Segment, VirtqueueError};

/// Sector size of virtio-blk addressing.
pub const SECTOR: u64 = 512;

/// virtio-blk feature bits used here.
pub mod feature {
    /// `seg_max` valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// Read-only device.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// FLUSH supported.
    pub const FLUSH: u64 = 1 << 9;
    /// `num_queues` valid.
    pub const MQ: u64 = 1 << 12;
    /// DISCARD supported.
    pub const DISCARD: u64 = 1 << 13;
    /// WRITE_ZEROES supported.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const SEG_MAX: u32 = 126;

/// A virtio-blk device over a file.
#[derive(Debug)]
pub struct BlockDevice {
    file: File,
    capacity: u64,
    readonly: bool,
    num_queues: u16,
    serial: [u8; 20],
}

impl BlockDevice {
    /// Opens `path` (read-write unless `readonly`) as a device with `num_queues` queues.
    pub fn open(path: &Path, readonly: bool, num_queues: u16) -> io::Result<BlockDevice> {
        let file = OpenOptions::new().read(true).write(!readonly).open(path)?;
        let capacity = file.metadata()?.len() / SECTOR;
        let mut serial = [0u8; 20];
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
            return (S_IOERR, 0); // nowhere to put the status: the caller leaves it unset
        }
        let mut hdr = [0u8; 16];
        if copy_out(readable, 0, &mut hdr) < 16 {
            return (S_IOERR, 1);
        }
        let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or([0; 8]));
        let data_in = u64::from(chain.writable_len) - 1; // writable bytes before the status byte
        let data_out = u64::from(chain.readable_len) - 16;
        match rtype {
            T_IN => {
                if data_in % SECTOR != 0 || !self.in_range(sector, data_in) {
                    return (S_IOERR, 1);
                }
                match self.io_vectored(writable, 0, data_in, sector * SECTOR, false) {
                    Ok(()) => (S_OK, data_in as u32 + 1),
                    Err(_) => (S_IOERR, 1),
                }
            }
            T_OUT => {
                if self.readonly {
                    return (S_IOERR, 1);
                }
                if data_out % SECTOR != 0 || !self.in_range(sector, data_out) {
                    return (S_IOERR, 1);
                }
                match self.io_vectored(readable, 16, data_out, sector * SECTOR, true) {
                    Ok(()) => (S_OK, 1),
                    Err(_) => (S_IOERR, 1),
                }
            }
            T_FLUSH => {
                // SAFETY: plain syscall on our file.
                let ok = unsafe { libc::fdatasync(self.file.as_raw_fd()) } == 0;
                (if ok { S_OK } else { S_IOERR }, 1)
            }
            T_GET_ID => {
                let n = data_in.min(20) as usize;
                copy_in(writable, 0, &self.serial[..n]);
                (S_OK, n as u32 + 1)
            }
            T_DISCARD | T_WRITE_ZEROES => {
                if self.readonly {
                    return (S_IOERR, 1);
                }
                if data_out == 0 || data_out % 16 != 0 || data_out / 16 > 1 {
                    return (S_UNSUPP, 1); // max_discard_seg / max_write_zeroes_seg are 1
                }
                let mut seg = [0u8; 16];
                copy_out(readable, 16, &mut seg);
                let s = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
                let n = u64::from(u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]));
                let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                if flags & !1 != 0 || !self.in_range(s, n * SECTOR) {
                    return (S_UNSUPP, 1);
                }
                let mode = if rtype == T_DISCARD {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                // SAFETY: plain syscall on our file with checked offsets.
                let r =
                    unsafe { libc::fallocate(self.file.as_raw_fd(), mode, (s * SECTOR) as i64, (n * SECTOR) as i64) };
                if r == 0 || rtype == T_DISCARD {
                    // A discard that the file system cannot do is still a valid no-op.
                    (S_OK, 1)
                } else {
                    match self.write_zeros(s * SECTOR, n * SECTOR) {
                        Ok(()) => (S_OK, 1),
                        Err(_) => (S_IOERR, 1),
                    }
                }
            }
            _ => (S_UNSUPP, 1),
        }
    }

    fn in_range(&self, sector: u64, bytes: u64) -> bool {
        sector.checked_add(bytes / SECTOR).is_some_and(|end| end <= self.capacity)
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
        let mut c = vec![0u8; 60];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        c[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size
        c[28..32].copy_from_slice(&1u32.to_le_bytes()); // opt_io_size
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        let max = u32::try_from(self.capacity).unwrap_or(u32::MAX).min(1 << 22);
        c[36..40].copy_from_slice(&max.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&max.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
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
            | feature::SEG_MAX
            | feature::BLK_SIZE
            | feature::FLUSH
            | feature::MQ
            | feature::DISCARD
            | feature::WRITE_ZEROES;
        if self.readonly {
            f |= feature::RO;
        }
        f
    }

    fn config(&self) -> Vec<u8> {
        self.config_bytes()
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
