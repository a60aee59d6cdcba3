//! When a driver waiting for completions should poll the used ring and when it should sleep on
//! the call eventfd.
//!
//! Polling pays when the device answers faster than a sleep and a cross-CPU wake-up cost (a
//! polling `serve-blk` passes 4 KiB reads at iodepth 32 four times faster, for less CPU per I/O,
//! to a polling driver); it burns a CPU when the device is slow (qemu-storage-daemon at iodepth
//! 32: +20 % IOPS for three times the driver's CPU per I/O). Neither the device's notification
//! suppression nor the wait times tell the two apart reliably — both change with what this side
//! does — so [`AdaptivePoll`] measures, in short alternating spells of each mode, this thread's
//! CPU time per completion and the wall time per completion, and stays with the mode whose
//! product of the two is smaller for a long spell before measuring again. CPU alone is not
//! enough: when the driver's own work dominates (a Python loop reaping 32 requests at a time)
//! both modes cost about the same CPU per completion, but sleeping leaves the thread idle while
//! a wake-up crosses CPUs and completes a third fewer requests per second. The product keeps
//! polling when it buys at least as much speed as it costs CPU, and no longer (polling a slow
//! device that costs 3x the CPU for 1.2x the completions loses).

use std::time::{Duration, Instant};

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

/// A polling policy that picks, by measurement, whichever of polling and sleeping gives the
/// smaller product of this thread's CPU time and wall time per completion. Feed it every batch of completions with [`completed`];
/// [`window`] says how long to poll before sleeping.
///
/// [`completed`]: AdaptivePoll::completed
/// [`window`]: AdaptivePoll::window
#[derive(Debug)]
pub struct AdaptivePoll {
    phase: Phase,
    /// Completions counted in the current spell.
    done: u32,
    /// Thread CPU time and wall time at the start of the spell, and that thread: a spell whose
    /// completions another thread counts is restarted rather than measured across two CPU
    /// clocks. None until the first completion: what the thread did before it (a handshake)
    /// is no part of either mode's cost.
    spell: Option<Spell>,
    /// CPU and wall time per completion measured while polling (valid in ProbeSleep), in ns.
    poll_cost: (u64, u64),
}

#[derive(Clone, Copy, Debug)]
struct Spell {
    cpu: Duration,
    wall: Instant,
    thread: std::thread::ThreadId,
}

impl Spell {
    fn now() -> Spell {
        Spell { cpu: thread_cpu(), wall: Instant::now(), thread: std::thread::current().id() }
    }
}

impl Default for AdaptivePoll {
    fn default() -> AdaptivePoll {
        AdaptivePoll::new()
    }
}

impl AdaptivePoll {
    /// Starts by measuring the polling mode.
    pub fn new() -> AdaptivePoll {
        AdaptivePoll { phase: Phase::ProbePoll, done: 0, spell: None, poll_cost: (0, 0) }
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
        self.completed_with(n, Spell::now);
    }

    /// [`completed`](AdaptivePoll::completed) with the clocks read by `clock` (tests feed
    /// their own).
    #[inline]
    fn completed_with(&mut self, n: u32, mut clock: impl FnMut() -> Spell) {
        if self.spell.is_none() {
            self.spell = Some(clock());
            return;
        }
        self.done = self.done.saturating_add(n);
        let spell = match self.phase {
            Phase::Stay { .. } => STAY,
            _ => PROBE,
        };
        if self.done >= spell {
            self.end_spell(clock);
        }
    }

    #[cold]
    fn end_spell(&mut self, mut clock: impl FnMut() -> Spell) {
        let now = clock();
        let start = match self.spell.replace(now) {
            Some(start) if start.thread == now.thread => start,
            _ => {
                self.done = 0;
                return;
            }
        };
        let per = |d: Duration| (d.as_nanos() / u128::from(self.done)) as u64;
        let cost = (per(now.cpu.saturating_sub(start.cpu)), per(now.wall.duration_since(start.wall)));
        self.phase = match self.phase {
            Phase::ProbePoll => {
                self.poll_cost = cost;
                Phase::ProbeSleep
            }
            Phase::ProbeSleep => {
                let product = |(cpu, wall): (u64, u64)| u128::from(cpu) * u128::from(wall);
                Phase::Stay { poll: product(self.poll_cost) <= product(cost) }
            }
            Phase::Stay { .. } => Phase::ProbePoll,
        };
        self.done = 0;
        // The clock restarts after the decision's own system call.
        self.spell = Some(clock());
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

    /// Clocks the test advances: what a spell costs is set, not measured (a loaded machine
    /// would stretch real wall times).
    struct Fake {
        base: Instant,
        cpu: Duration,
        wall: Duration,
    }

    impl Fake {
        fn new() -> Fake {
            Fake { base: Instant::now(), cpu: Duration::ZERO, wall: Duration::ZERO }
        }

        fn now(&self) -> Spell {
            Spell { cpu: self.cpu, wall: self.base + self.wall, thread: std::thread::current().id() }
        }

        /// A spell of `n` completions costing `cpu` of the thread's CPU and `idle` more wall time.
        fn spell(&mut self, p: &mut AdaptivePoll, n: u32, cpu: Duration, idle: Duration) {
            self.cpu += cpu;
            self.wall += cpu + idle;
            let now = self.now();
            p.completed_with(n, || now);
        }
    }

    #[test]
    fn it_keeps_the_mode_that_costs_less_cpu_per_completion() {
        // With the real clocks: a spell that burns 2 ms of CPU against one that burns none.
        for cheap_poll in [true, false] {
            let mut p = AdaptivePoll::new();
            assert!(p.polling(), "it measures polling first");
            p.completed(1); // the first completion starts the clock
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

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn at_equal_cpu_the_mode_that_completes_faster_wins() {
        // The driver's own work dominates: both modes cost 10 ms of CPU per spell, but
        // sleeping also waits 5 ms for wake-ups.
        let (mut f, mut p) = (Fake::new(), AdaptivePoll::new());
        f.spell(&mut p, 1, ms(0), ms(0)); // the first completion starts the clock
        f.spell(&mut p, PROBE, ms(10), ms(0));
        f.spell(&mut p, PROBE, ms(10), ms(5));
        assert!(p.polling());
        // CPU alone would have chosen sleeping: polling cost a little more of it.
        let (mut f, mut p) = (Fake::new(), AdaptivePoll::new());
        f.spell(&mut p, 1, ms(0), ms(0));
        f.spell(&mut p, PROBE, ms(11), ms(0));
        f.spell(&mut p, PROBE, ms(10), ms(5));
        assert!(p.polling());
    }

    #[test]
    fn polling_that_costs_more_cpu_than_it_saves_time_loses() {
        // Polling a slow device: 30 ms of CPU (all of the spell) against 10 ms in 25 ms.
        let (mut f, mut p) = (Fake::new(), AdaptivePoll::new());
        f.spell(&mut p, 1, ms(0), ms(0));
        f.spell(&mut p, PROBE, ms(30), ms(0));
        f.spell(&mut p, PROBE, ms(10), ms(15));
        assert!(!p.polling());
    }

    #[test]
    fn what_came_before_the_first_completion_is_not_measured() {
        // A handshake's 200 ms of CPU before the first completion would make polling look dear.
        let (mut f, mut p) = (Fake::new(), AdaptivePoll::new());
        f.cpu += ms(200);
        f.wall += ms(200);
        f.spell(&mut p, 1, ms(0), ms(0));
        f.spell(&mut p, PROBE, ms(10), ms(0));
        f.spell(&mut p, PROBE, ms(10), ms(5));
        assert!(p.polling());
    }

    #[test]
    fn a_spell_ended_on_another_thread_is_measured_again() {
        let mut p = AdaptivePoll::new();
        p.completed(1);
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
        p.completed(1);
        p.completed(PROBE * 3);
        assert!(!p.polling());
    }
}
