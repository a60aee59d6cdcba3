//! Fuzzes the recovery of an inflight buffer handed over by a front-end (SET_INFLIGHT_FD): the
//! region's bytes are the fuzzer's; recovery must either refuse the region or return heads that
//! are in range, distinct and no more than the ring holds — never panic, loop or read outside.
//! The first byte picks the layout: split (high bit clear) or packed (set), and the ring size.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use vhostuser_rs::memory::memfd;
use vhostuser_rs::virtqueue::packed::{packed_queue_region_size, RingPos};
use vhostuser_rs::virtqueue::{queue_region_size, InflightBuffer};

fn buffer(body: &[u8], len: u64, size: u16, packed: bool) -> InflightBuffer {
    let fd = memfd("fuzz-inflight", len).unwrap();
    let mut file = std::fs::File::from(fd);
    file.write_all(&body[..body.len().min(len as usize)]).unwrap();
    InflightBuffer::from_fd_for(file.into(), len, 0, 1, size, packed).unwrap()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let packed = data[0] & 0x80 != 0;
    let word = u16::from_le_bytes([data[1], data[2]]);
    let body = &data[3..];
    if !packed {
        let size = 1u16 << (data[0] % 9); // 1..256
        let used_idx = word;
        let buffer = buffer(body, queue_region_size(size), size, false);
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
        return;
    }
    // Packed: any size; the base's used position and the ring's flags (what settles a publish
    // a crash interrupted) come from the input too.
    let size = u16::from(data[0] & 0x3f) + 1; // 1..64
    let base = RingPos { index: (word & 0x7fff) % size, wrap: word & 0x8000 != 0 };
    let flags = |slot: u16| if word.rotate_left(u32::from(slot)) & 1 != 0 { 1 << 15 } else { 1 << 7 };
    let buffer = buffer(body, packed_queue_region_size(size), size, true);
    if let Ok(r) = buffer.packed_queue(0).unwrap().recover(base, flags) {
        assert!(r.used.index < size);
        let mut seen = vec![false; usize::from(size)];
        let mut slots = 0u32;
        for l in &r.resubmit {
            assert!(l.id < size && !seen[usize::from(l.id)]);
            seen[usize::from(l.id)] = true;
            assert_eq!(usize::from(l.slots), l.descs.len());
            slots += u32::from(l.slots);
        }
        assert!(slots <= u32::from(size));
        // Settled: recovering again gives the same lists and position, whatever the ring says.
        let again = buffer.packed_queue(0).unwrap().recover(base, |_| 0).unwrap();
        assert_eq!(again, r);
    }
});
