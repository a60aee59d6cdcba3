//! Random messages with random numbers of fds, sent over a real socketpair: whatever the
//! receiver does (decode, reject), no descriptor outlives it. One test function, so this binary's
//! process has no other thread opening fds while /proc/self/fd is counted.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vhostuser_rs::connection::{Connection, Deadline};
use vhostuser_rs::protocol::{Channel, Header, MAX_FDS};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 succeeded; both are ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn no_fd_outlives_a_random_message() {
    let (a, b) = Connection::pair().unwrap();
    let (r, w) = pipe();
    let baseline = open_fds();
    let mut runner = TestRunner::new(Config { cases: 2000, ..Config::default() });
    let strategy = (
        0u32..50,
        prop_oneof![Just(1u32), Just(5), Just(9), any::<u32>()],
        proptest::collection::vec(any::<u8>(), 0..200),
        0usize..=MAX_FDS,
        any::<bool>(),
        any::<bool>(),
    );
    runner
        .run(&strategy, |(code, flags, body, nfds, lie_size, backend)| {
            let size = if lie_size { body.len() as u32 / 2 } else { body.len() as u32 };
            let mut bytes = Header { code, flags, size }.to_bytes().to_vec();
            bytes.extend_from_slice(&body);
            let fds: Vec<BorrowedFd<'_>> = (0..nfds).map(|i| if i % 2 == 0 { r.as_fd() } else { w.as_fd() }).collect();
            a.send_bytes(&bytes, &fds, Deadline::never()).unwrap();
            let channel = if backend { Channel::Backend } else { Channel::Main };
            let deadline = Deadline::after(Some(Duration::from_secs(5)));
            // Whatever happens, drop everything received before counting.
            let outcome = b.recv(channel, deadline).map(|got| got.fds.len());
            if lie_size {
                // The payload the header did not claim is still queued: drain it.
                let mut rest = vec![0u8; body.len() - size as usize];
                // SAFETY: reading into a buffer we own.
                let n = unsafe {
                    libc::recv(
                        std::os::fd::AsRawFd::as_raw_fd(&b),
                        rest.as_mut_ptr().cast(),
                        rest.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                prop_assert!(rest.is_empty() || n >= 0);
            }
            if let Ok(n) = outcome {
                prop_assert_eq!(n, nfds);
            }
            prop_assert_eq!(open_fds(), baseline, "fds leaked by code {} flags {:#x} nfds {}", code, flags, nfds);
            Ok(())
        })
        .unwrap();
}
