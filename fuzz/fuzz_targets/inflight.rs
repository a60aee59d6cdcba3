//! Fuzzes the recovery of an inflight buffer handed over by a front-end (SET_INFLIGHT_FD): the
//! region's bytes are the fuzzer's; recovery must either refuse the region or return heads that
//! are in range, distinct and no more than the ring holds — never panic, loop or read outside.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use vhostuser_rs::memory::memfd;
use vhostuser_rs::virtqueue::{queue_region_size, InflightBuffer};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let size = 1u16 << (data[0] % 9); // 1..256
    let used_idx = u16::from_le_bytes([data[1], data[2]]);
    let body = &data[3..];
    let len = queue_region_size(size);
    let fd = memfd("fuzz-inflight", len).unwrap();
    let mut file = std::fs::File::from(fd);
    file.write_all(&body[..body.len().min(len as usize)]).unwrap();
    let buffer = InflightBuffer::from_fd(file.into(), len, 0, 1, size).unwrap();
    let mut region = buffer.queue(0).unwrap();
    if let Ok(r) = region.recover(used_idx) {
        assert!(r.resubmit.len() <= usize::from(size));
        let mut seen = vec![false; usize::from(size)];
        for &h in &r.resubmit {
            assert!(h < size && !seen[usize::from(h)]);
            seen[usize::from(h)] = true;
        }
        // A recovered region is consistent: recovering again resubmits the same heads.
        let again = buffer.queue(0).unwrap().recover(used_idx).unwrap();
        assert_eq!(again.resubmit, r.resubmit);
    }
});
