//! When a driver waiting for completions should poll the used ring and when it should sleep on
//! the call eventfd.
//!
//! Polling pays when the device answers faster than a sleep and a cross-CPU wake-up cost (a
//! polling `serve-blk` passes 4 KiB reads at iodepth 32 four times faster, for less CPU per I/O,
//! to a polling driver); it burns a CPU when the device is slow (qemu-storage-daemon at iodepth
//! 32: +20 % IOPS for three times the driver's CPU per I/O). Neither the device's notification
//! suppression nor the wait times tell the two apart reliably — both change with what this side
//! does — so [`AdaptivePoll`] measures the quantity to minimise: this thread's CPU time per
//! completion, in short alternating spells of each mode, and stays with the cheaper one for a
//! long spell before measuring again.

use std::time::Duration;

/// The polling window while in the polling mode.
pub const POLL_WINDOW: Duration = Duration::from_micros(50);

/// Completions per measuring spell of each mode.
const PROBE: u32 = 4096;
/// Completions spent in the chosen mode before measuring again.
const STAY: u32 = 32 * PROBE;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Measuring polling, then sleeping.
    ProbePoll,
    ProbeSleep,
    /// Running the cheaper mode.
    Stay {
        poll: bool,
    },
}

/// A polling policy that picks, by measurement, whichever of polling and sleeping costs this
/// thread less CPU per completion. Feed it every batch of completions with [`completed`];
/// [`window`] says how long to poll before sleeping.
///
/// [`completed`]: AdaptivePoll::completed
/// [`window`]: AdaptivePoll::window
#[derive(Debug)]
pub struct AdaptivePoll {
    phase: Phase,
    /// Completions counted in the current spell.
    done: u32,
    /// Thread CPU time at the start of the spell, and that thread: a spell whose completions
    /// another thread counts is restarted rather than measured across two CPU clocks.
    spell_cpu: Duration,
    spell_thread: std::thread::ThreadId,
    /// CPU per completion measured while polling (valid in ProbeSleep).
    poll_cost: Duration,
}

impl Default for AdaptivePoll {
    fn default() -> AdaptivePoll {
        AdaptivePoll::new()
    }
}

impl AdaptivePoll {
    /// Starts by measuring the polling mode.
    pub fn new() -> AdaptivePoll {
        AdaptivePoll {
            phase: Phase::ProbePoll,
            done: 0,
            spell_cpu: thread_cpu(),
            spell_thread: std::thread::current().id(),
            poll_cost: Duration::ZERO,
        }
    }

    /// How long to poll the used ring before sleeping.
    #[inline]
    pub fn window(&self) -> Duration {
        match self.phase {
            Phase::ProbePoll | Phase::Stay { poll: true } => POLL_WINDOW,
            Phase::ProbeSleep | Phase::Stay { poll: false } => Duration::ZERO,
        }
    }

    /// Counts `n` completions reaped; at the end of a spell reads the thread's CPU clock (one
    /// system call per few thousand completions) and moves on.
    #[inline]
    pub fn completed(&mut self, n: u32) {
        self.done = self.done.saturating_add(n);
        let spell = match self.phase {
            Phase::Stay { .. } => STAY,
            _ => PROBE,
        };
        if self.done >= spell {
            self.end_spell();
        }
    }

    #[cold]
    fn end_spell(&mut self) {
        let now = thread_cpu();
        let thread = std::thread::current().id();
        if thread != self.spell_thread {
            self.spell_thread = thread;
            self.done = 0;
            self.spell_cpu = now;
            return;
        }
        let per = now.saturating_sub(self.spell_cpu) / self.done;
        self.phase = match self.phase {
            Phase::ProbePoll => {
                self.poll_cost = per;
                Phase::ProbeSleep
            }
            Phase::ProbeSleep => Phase::Stay { poll: self.poll_cost <= per },
            Phase::Stay { .. } => Phase::ProbePoll,
        };
        self.done = 0;
        self.spell_cpu = thread_cpu();
    }

    /// Whether the policy currently polls (for reports and tests).
    pub fn polling(&self) -> bool {
        self.window() > Duration::ZERO
    }
}

/// CPU time consumed by the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn burn(d: Duration) {
        let start = thread_cpu();
        while thread_cpu().saturating_sub(start) < d {}
    }

    #[test]
    fn it_keeps_the_mode_that_costs_less_cpu_per_completion() {
        for cheap_poll in [true, false] {
            let mut p = AdaptivePoll::new();
            assert!(p.polling(), "it measures polling first");
            // The polling spell costs 2 ms (or nothing), the sleeping spell the opposite.
            burn(if cheap_poll { Duration::ZERO } else { Duration::from_millis(2) });
            p.completed(PROBE);
            assert!(!p.polling(), "then sleeping");
            burn(if cheap_poll { Duration::from_millis(2) } else { Duration::ZERO });
            p.completed(PROBE);
            assert_eq!(p.polling(), cheap_poll);
            p.completed(STAY - 1);
            assert_eq!(p.polling(), cheap_poll, "it stays for a long spell");
            p.completed(1);
            assert!(p.polling(), "then measures again, polling first");
        }
    }

    #[test]
    fn a_spell_ended_on_another_thread_is_measured_again() {
        let mut p = AdaptivePoll::new();
        std::thread::scope(|s| {
            s.spawn(|| {
                p.completed(PROBE);
                assert!(p.polling(), "the spell restarted on this thread");
                p.completed(PROBE);
                assert!(!p.polling(), "and ended here");
            });
        });
    }

    #[test]
    fn a_batch_larger_than_the_spell_ends_it() {
        let mut p = AdaptivePoll::new();
        p.completed(PROBE * 3);
        assert!(!p.polling());
    }
}
