//! The built-in virtio-blk device: raw image files or block devices, data moved straight between
//! the file and guest memory with preadv/pwritev on the guest buffers (no bounce copy).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::backend::Device;
use crate::protocol::VirtioFeatures;
use crate::virtio::blk::{
    config, DiscardWriteZeroes, RequestHeader, CONFIG_SIZE, SECTOR_SIZE, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use crate::virtqueue::{for_each_span, ChainBatch, DeviceQueue, Segment, VirtqueueError};

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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::memory::{DirtyLog, GuestMemory, LOG_PAGE_SIZE};
    use crate::virtqueue::{DriverQueue, QueueConfig, RingAddressSpace};

    const MIB: u64 = 1 << 20;
    const PAGE: u64 = LOG_PAGE_SIZE;

    struct Rig {
        mem: Arc<GuestMemory>,
        driver: DriverQueue,
        device: DeviceQueue,
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
        let mut device = DeviceQueue::new(Arc::new(mem.table().clone()), cfg).unwrap();
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
