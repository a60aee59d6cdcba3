//! VIRTIO Shared Memory Regions (SHMEM, protocol feature 22; protocol.md §6.15): the device
//! declares its regions (GET_SHMEM_CONFIG, read by the front-end at initialisation, fixed for
//! the connection) and later asks the front-end to map an fd into one (SHMEM_MAP, which also
//! needs BACKEND_SEND_FD) or to drop a mapping (SHMEM_UNMAP).

use std::os::fd::BorrowedFd;
use std::time::Duration;

use super::{BackendRequests, Device};
use crate::error::{Error, Result};
use crate::protocol::{BackendRequest, MmapRequest, Payload, ShmemConfig, MAX_SHMEM_REGIONS};

/// GET_SHMEM_CONFIG's answer from the device's declared regions (entries past 256 cannot be
/// expressed and are dropped with a warning).
pub(crate) fn shmem_config(device: &dyn Device) -> ShmemConfig {
    let mut sizes = device.shmem_regions();
    if sizes.len() > MAX_SHMEM_REGIONS {
        log::warn!(
            "the device declares {} shared memory regions; the protocol carries {MAX_SHMEM_REGIONS}",
            sizes.len()
        );
        sizes.truncate(MAX_SHMEM_REGIONS);
    }
    sizes.resize(MAX_SHMEM_REGIONS, 0);
    ShmemConfig { memory_sizes: sizes }
}

/// Checks a device's declared regions: at most 256 ids, every size a multiple of the page size
/// (the front-end maps whole pages of them into the guest, protocol.md §6.15).
pub fn check_regions(regions: &[u64]) -> std::result::Result<(), String> {
    if regions.len() > MAX_SHMEM_REGIONS {
        return Err(format!("{} shared memory regions; at most {MAX_SHMEM_REGIONS} ids exist", regions.len()));
    }
    let page = page_size();
    match regions.iter().position(|s| s % page != 0) {
        Some(id) => Err(format!("shared memory region {id}: {} bytes is not a multiple of the page size", regions[id])),
        None => Ok(()),
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Checks a mapping against the declared `regions` before it is sent, with the checks the
/// front-end makes (protocol.md §4.3): the region exists, the range is non-empty, does not
/// overflow and lies inside it; offsets and length are page multiples (the front-end mmaps
/// them).
pub fn check_mapping(request: BackendRequest, regions: &[u64], m: &MmapRequest) -> Result<()> {
    let bad = |state: &'static str| Err(Error::InvalidState { request: request.into(), state });
    let Some(&size) = regions.get(usize::from(m.shmid)).filter(|&&s| s != 0) else {
        return bad("shmid names no shared memory region the device declared");
    };
    if m.len == 0 {
        return bad("the length is zero");
    }
    let page = page_size();
    if m.shm_offset % page != 0 || m.len % page != 0 || m.fd_offset % page != 0 {
        return bad("offsets and length must be multiples of the page size");
    }
    match m.shm_offset.checked_add(m.len) {
        Some(end) if end <= size => Ok(()),
        _ => bad("the range does not fit in the shared memory region"),
    }
}

/// SHMEM_MAP: asks the front-end to map `len` bytes of `fd` from `fd_offset` at `shm_offset`
/// of region `shmid` (`writable`: read-write, else read-only). Checked against `regions` (the
/// device's declared sizes) first. With `need_reply` (REPLY_ACK) the status is returned.
#[allow(clippy::too_many_arguments)]
pub fn shmem_map(
    requests: &BackendRequests,
    regions: &[u64],
    shmid: u8,
    fd: BorrowedFd<'_>,
    fd_offset: u64,
    shm_offset: u64,
    len: u64,
    writable: bool,
    need_reply: bool,
    timeout: Option<Duration>,
) -> Result<Option<u64>> {
    let flags = if writable { MmapRequest::FLAG_RW } else { 0 };
    let m = MmapRequest { shmid, fd_offset, shm_offset, len, flags };
    check_mapping(BackendRequest::SHMEM_MAP, regions, &m)?;
    requests.send(BackendRequest::SHMEM_MAP, Payload::Mmap(m), &[fd], need_reply, timeout)
}

/// SHMEM_UNMAP: asks the front-end to drop the mapping at `shm_offset` of `len` bytes in
/// region `shmid` (it must name exactly one existing mapping).
pub fn shmem_unmap(
    requests: &BackendRequests,
    regions: &[u64],
    shmid: u8,
    shm_offset: u64,
    len: u64,
    need_reply: bool,
    timeout: Option<Duration>,
) -> Result<Option<u64>> {
    let m = MmapRequest { shmid, fd_offset: 0, shm_offset, len, flags: 0 };
    check_mapping(BackendRequest::SHMEM_UNMAP, regions, &m)?;
    requests.send(BackendRequest::SHMEM_UNMAP, Payload::Mmap(m), &[], need_reply, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_regions_are_whole_pages_and_at_most_256() {
        let p = page_size();
        assert!(check_regions(&[0, p, 8 * p]).is_ok());
        assert!(check_regions(&[p + 1]).is_err());
        assert!(check_regions(&vec![p; 257]).is_err());
    }

    #[test]
    fn mappings_are_checked_against_the_declared_regions() {
        let p = page_size();
        let regions = [0, 4 * p];
        let m = |shmid, shm_offset, len| MmapRequest { shmid, fd_offset: 0, shm_offset, len, flags: 1 };
        let r = BackendRequest::SHMEM_MAP;
        assert!(check_mapping(r, &regions, &m(1, 0, 4 * p)).is_ok());
        assert!(check_mapping(r, &regions, &m(1, 3 * p, p)).is_ok());
        assert!(check_mapping(r, &regions, &m(0, 0, p)).is_err(), "size 0 = unused id");
        assert!(check_mapping(r, &regions, &m(2, 0, p)).is_err(), "undeclared id");
        assert!(check_mapping(r, &regions, &m(1, 0, 0)).is_err());
        assert!(check_mapping(r, &regions, &m(1, 3 * p, 2 * p)).is_err(), "past the end");
        assert!(check_mapping(r, &regions, &m(1, u64::MAX - p + 1, p)).is_err(), "overflow");
        assert!(check_mapping(r, &regions, &m(1, 1, p)).is_err(), "unaligned");
    }
}
