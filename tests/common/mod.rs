//! What the rust-vmm interop tests share: one round of upper-case requests on a driver ring.

use std::time::{Duration, Instant};

use vhostuser_rs::memory::GuestMemory;
use vhostuser_rs::virtqueue::DriverQueue;

/// Puts each `(out, word)` on the ring (`word` written at guest address `out`, readable; a
/// writable buffer of the same size after it), publishes, calls `kick`, and checks that every
/// request comes back within 5 s with `word` upper-cased in its writable buffer.
pub fn upper_case_round_trip(mem: &GuestMemory, drv: &mut DriverQueue, requests: &[(u64, &[u8])], kick: impl FnOnce()) {
    let mut expect = Vec::new();
    for &(out, w) in requests {
        let len = w.len() as u64;
        let back = mem.alloc(len, 8).unwrap();
        mem.table().write(out, w).unwrap();
        let head = drv.add(&[(out, len as u32)], &[(back, len as u32)]).unwrap();
        expect.push((head, back, w.to_ascii_uppercase()));
    }
    drv.publish();
    kick();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut done = Vec::new();
    while done.len() < expect.len() {
        drv.reap(&mut done, 64).unwrap();
        assert!(Instant::now() < deadline, "only {} of {} completed", done.len(), expect.len());
        std::thread::sleep(Duration::from_millis(1));
    }
    for (head, back, upper) in &expect {
        let &(_, len) = done.iter().find(|(h, _)| h == head).unwrap();
        assert_eq!(len as usize, upper.len());
        let mut got = vec![0u8; upper.len()];
        mem.table().read(*back, &mut got).unwrap();
        assert_eq!(&got, upper);
    }
}
