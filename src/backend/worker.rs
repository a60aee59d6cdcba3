//! Worker threads: each waits for the kicks of its rings, drains them through the device and
//! notifies the driver. By default every started ring has a thread of its own; a
//! [`WorkerPolicy`] can put the rings on a fixed number of threads instead (ring `i` on thread
//! `i % n`) and pin the threads to CPUs. Rings join and leave a thread by command, so a thread
//! owns its rings' state outright and the data path takes no lock.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::requests::BackendRequests;
use super::rings::{RingHandle, Rings};
use super::Device;
use crate::eventfd;
use crate::protocol::{BackendRequest, Payload, ProtocolFeatures, VringState};
use crate::virtqueue::{AnyDeviceQueue, ChainBatch, KeptChains, VirtqueueError};

/// Unanswered IOTLB MISSes in a row (for the same address) before a ring is given up on: a
/// front-end that cannot translate an address sends no UPDATE (and, as the MISS does not ask
/// for REPLY_ACK, no failure status), so the ring breaks after this many waits.
const MAX_MISSES: u32 = 5;

/// How long a ring waits for the UPDATE that answers its MISS before it asks again (a late
/// UPDATE costs only a repeated MISS).
const MISS_TIMEOUT: Duration = Duration::from_secs(1);

/// How long sending a MISS may take (the socket buffer being full).
const MISS_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// The IOTLB entry a ring waits for: its MISS went out and the ring is not walked again until
/// an UPDATE covers the address (or the wait times out and the MISS is sent again).
#[derive(Clone, Copy, Debug)]
struct Awaiting {
    iova: u64,
    perm: u8,
    asked: std::time::Instant,
    /// MISSes sent for this address without an answer so far.
    asks: u32,
}

/// How started rings are spread over worker threads.
#[derive(Clone, Debug, Default)]
pub struct WorkerPolicy {
    /// Threads shared with other devices of the process: when set, rings join these threads
    /// (and `threads`, `cpus` and `poll` are the pool's).
    pub pool: Option<Arc<WorkerPool>>,
    /// Number of worker threads shared by all rings (ring `i` runs on thread `i % threads`);
    /// `None`: one thread per ring.
    pub threads: Option<usize>,
    /// Pin worker thread `t` to CPU `cpus[t % cpus.len()]`; empty: no pinning.
    pub cpus: Vec<usize>,
    /// Whether a worker looks at its rings for a while after work before sleeping on the kicks.
    pub poll: Polling,
}

/// After a ring had work, a worker can keep looking at the avail rings (yielding the CPU)
/// before it sleeps on the kick eventfds: a driver on another CPU then finds it awake and needs
/// no kick, which a wake-up of a sleeping thread costs it (a round of scheduling per request at
/// iodepth 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Polling {
    /// Sleep on the kicks at once (eventfd mode).
    #[default]
    Off,
    /// Poll for this long after the last work.
    Fixed(Duration),
    /// Poll for a window between 0 and `max` that follows the load, as Linux's KVM halt-polling
    /// does: a sleep that ended within `max` (a longer window would have caught the work without
    /// a wake-up) doubles the window, a longer sleep halves it, so a device that goes idle soon
    /// polls not at all and costs no CPU.
    Adaptive {
        /// The largest window.
        max: Duration,
    },
}

impl Polling {
    /// The default of serve-blk, serve-net and Python devices: adaptive up to 50 µs, what fixed
    /// windows measured best at (README, `--poll-us 50`).
    pub const DEFAULT_ADAPTIVE: Polling = Polling::Adaptive { max: Duration::from_micros(50) };
}

/// The shortest non-zero adaptive window; halving below it turns polling off.
const MIN_WINDOW: Duration = Duration::from_micros(5);

/// The polling window of one worker thread.
#[derive(Debug)]
struct Window {
    policy: Polling,
    now: Duration,
}

impl Window {
    fn new(policy: Polling) -> Window {
        let now = match policy {
            Polling::Off => Duration::ZERO,
            Polling::Fixed(d) => d,
            Polling::Adaptive { max } => max,
        };
        Window { policy, now }
    }

    /// The worker slept `slept` and was woken by an fd (`woken`), or by the poll timeout.
    fn after_sleep(&mut self, slept: Duration, woken: bool) {
        let Polling::Adaptive { max } = self.policy else { return };
        self.now = if woken && slept <= max {
            (self.now * 2).max(MIN_WINDOW).min(max)
        } else if self.now / 2 < MIN_WINDOW {
            Duration::ZERO
        } else {
            self.now / 2
        };
    }
}

fn pin_to(cpu: usize) {
    // cpu_set_t holds CPU_SETSIZE (1024) CPUs; CPU_SET would index past it.
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return;
    }
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks against its size; pid 0 is the
    // calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        // Best effort: a CPU outside the allowed set leaves the thread where it was.
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// How a ring tells the front-end about used buffers and errors besides its eventfds.
#[derive(Debug, Default)]
pub(crate) struct Notifier {
    /// The session's back-end request channel (in-band VRING_CALL / VRING_ERR,
    /// CONFIG_CHANGE_MSG after DEVICE_NEEDS_RESET).
    pub requests: Option<Arc<BackendRequests>>,
    /// INBAND_NOTIFICATIONS was negotiated: a ring without a call (err) fd sends VRING_CALL
    /// (VRING_ERR) on the back-end request channel instead (spec: SET_VRING_CALL / ERR).
    pub inband: bool,
    /// The device status byte the session keeps (SET/GET_STATUS); a ring that breaks sets
    /// DEVICE_NEEDS_RESET in it.
    pub status: Arc<AtomicU8>,
}

/// Shared between the session and the thread running a ring.
#[derive(Debug)]
pub(crate) struct RingShared {
    pub enabled: AtomicBool,
    pub call: Mutex<Option<OwnedFd>>,
    /// The error fd of SET_VRING_ERR, signalled when the ring breaks.
    pub err: Mutex<Option<OwnedFd>>,
    /// The ring broke (malformed chain, IOTLB failure) and was reported.
    pub broken: AtomicBool,
    /// The last in-band notification failed (it was logged).
    inband_failing: AtomicBool,
    /// The ring waits for an IOTLB entry (its MISS went out): the session wakes its thread when
    /// an UPDATE arrives.
    awaiting_entry: AtomicBool,
    notifier: Notifier,
    group: Arc<Group>,
}

/// How long the worker waits for the front-end to process an in-band notification.
const INBAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl RingShared {
    pub fn new(
        enabled: bool,
        call: Option<OwnedFd>,
        err: Option<OwnedFd>,
        notifier: Notifier,
        group: Arc<Group>,
    ) -> Arc<RingShared> {
        Arc::new(RingShared {
            enabled: AtomicBool::new(enabled),
            call: Mutex::new(call),
            err: Mutex::new(err),
            broken: AtomicBool::new(false),
            inband_failing: AtomicBool::new(false),
            awaiting_entry: AtomicBool::new(false),
            notifier,
            group,
        })
    }

    /// Makes the thread look at its rings again (after an enable).
    pub fn wake(&self) {
        self.group.wake();
    }

    /// An IOTLB UPDATE arrived: a ring waiting for an entry looks whether it is there now.
    pub fn iotlb_updated(&self) {
        if self.awaiting_entry.load(Ordering::SeqCst) {
            self.group.wake();
        }
    }

    /// Sends an in-band notification and waits for the front-end's ack (spec: INBAND_NOTIFICATIONS
    /// needs REPLY_ACK "to block until they are processed").
    fn inband(&self, request: BackendRequest, index: u16) {
        let Some(requests) = self.notifier.requests.as_deref().filter(|_| self.notifier.inband) else { return };
        let state = VringState { index: u32::from(index), num: 0 };
        match requests.send(request, Payload::VringState(state), &[], true, Some(INBAND_TIMEOUT)) {
            Ok(_) => self.inband_failing.store(false, Ordering::Relaxed),
            // Once per failing streak: this runs for every used-buffer notification.
            Err(e) if !self.inband_failing.swap(true, Ordering::Relaxed) => {
                log::warn!("ring {index}: in-band {request} failed: {e}")
            }
            Err(_) => {}
        }
    }

    /// Used buffers: signals the call fd; false if there is none and the notification must go
    /// in-band (VRING_CALL), which the worker sends outside the device's wake scope (it waits
    /// for the front-end, and a Python device holds the GIL inside the scope).
    fn signal_call(&self) -> bool {
        let call = self.call.lock().unwrap_or_else(|e| e.into_inner());
        match call.as_ref() {
            Some(fd) => {
                let _ = eventfd::signal(fd.as_fd());
                true
            }
            None => !self.notifier.inband,
        }
    }

    /// The ring broke: signal the error fd (or VRING_ERR in-band), not the call fd, and set
    /// DEVICE_NEEDS_RESET (virtio 1.x §2.1.1: "SHOULD set DEVICE_NEEDS_RESET when it enters an
    /// error state that a reset is needed"; with DRIVER_OK set it "MUST send a device
    /// configuration change notification": CONFIG_CHANGE_MSG when CONFIG and STATUS allow).
    fn report_broken(&self, index: u16) {
        if self.broken.swap(true, Ordering::AcqRel) {
            return;
        }
        log::warn!(
            "ring {index} is broken (malformed ring or unmapped address): not processed until it is set up again"
        );
        let err = self.err.lock().unwrap_or_else(|e| e.into_inner());
        match err.as_ref() {
            Some(fd) => {
                let _ = eventfd::signal(fd.as_fd());
            }
            None => {
                drop(err);
                self.inband(BackendRequest::VRING_ERR, index);
            }
        }
        let before = self.notifier.status.fetch_or(STATUS_NEEDS_RESET, Ordering::AcqRel);
        if before & STATUS_DRIVER_OK != 0 {
            if let Some(requests) = self.notifier.requests.as_deref() {
                let negotiated = requests.acked_protocol();
                if negotiated.contains(ProtocolFeatures::STATUS) && negotiated.contains(ProtocolFeatures::CONFIG) {
                    if let Err(e) = requests.send(
                        BackendRequest::CONFIG_CHANGE_MSG,
                        Payload::Empty,
                        &[],
                        false,
                        Some(INBAND_TIMEOUT),
                    ) {
                        log::warn!("ring {index}: CONFIG_CHANGE_MSG after DEVICE_NEEDS_RESET failed: {e}");
                    }
                }
            }
        }
    }
}

/// Device status bits (virtio 1.x §2.1) the back-end acts on.
pub(crate) const STATUS_DRIVER_OK: u8 = 4;
/// Feature negotiation is complete (the device clears it to refuse the features).
pub(crate) const STATUS_FEATURES_OK: u8 = 8;
/// The driver gave up on the device.
pub(crate) const STATUS_FAILED: u8 = 128;
/// Set by the device when it needs a reset.
pub(crate) const STATUS_NEEDS_RESET: u8 = 64;

/// A ring as its thread holds it.
pub(crate) struct Slot {
    /// The session the ring belongs to (a shared worker runs rings of several devices).
    pub(crate) owner: u64,
    device: Arc<dyn Device>,
    pub(crate) index: u16,
    pub(crate) queue: AnyDeviceQueue,
    kick: OwnedFd,
    shared: Arc<RingShared>,
    requests: Option<Arc<BackendRequests>>,
    batch: ChainBatch,
    /// Scratch for chains popped outside the drain loop (refills of kept chains).
    pub(crate) refill_batch: ChainBatch,
    /// Chains the device keeps past their batch (deferred completion).
    pub(crate) kept: KeptChains,
    /// Used entries were written outside the drain loop: publish at the end of the wake-up.
    pub(crate) dirty: bool,
    /// The driver kicks through a doorbell page (HOST_NOTIFIER), not the kick eventfd: the
    /// worker polls the avail ring instead of sleeping.
    doorbell: bool,
    /// The ring was kicked (or is polled): drain it.
    pub(crate) pending: bool,
    /// The device's fds for this ring, and which were readable at the last poll.
    events: Vec<RawFd>,
    ready: Vec<RawFd>,
    /// Whether `events` are watched (the device pauses them until the next kick).
    listening: bool,
    /// The IOTLB entry the ring waits for; it is not drained meanwhile.
    awaiting: Option<Awaiting>,
    /// Used buffers were published on a ring without a call fd: VRING_CALL is due (in-band).
    inband_call: bool,
    /// The ring was drained for a polling thread and left with kicks disabled: they must be
    /// re-armed (and the ring looked at again) before the thread sleeps.
    disarmed: bool,
}

impl Slot {
    /// Started, enabled and not broken.
    pub(crate) fn usable(&self) -> bool {
        self.shared.enabled.load(Ordering::Acquire) && !self.queue.is_broken()
    }

    /// Drains the ring if it was kicked, then handles its ready fds (inside the device's wake
    /// scope). An IOTLB miss is returned for [`Slot::after_miss`], outside the scope.
    /// `polling`: the thread polls the rings after this wake-up, so the ring is left with kicks
    /// disabled (see [`AnyDeviceQueue::drain_then`]; [`Slot::rearm`] before sleeping).
    fn run(&mut self, device: &dyn Device, others: &mut Rings<'_>, polling: bool) -> Option<(u64, u8)> {
        if !self.usable() {
            self.ready.clear();
            return None;
        }
        let mut miss = None;
        // A ring waiting for an IOTLB entry keeps its kick pending until the entry arrives.
        if self.pending && self.awaiting.is_none() {
            self.pending = false;
            // A kick means new buffers: watch the device's fds again.
            self.listening = true;
            let used_before = self.queue.used_mark();
            let (index, queue, batch, kept) = (self.index, &mut self.queue, &mut self.batch, &mut self.kept);
            let (shared, mut inband_due) = (&self.shared, false);
            let rearm = !polling || self.doorbell;
            self.disarmed |= !rearm;
            let result = queue.drain_then(
                batch,
                device.drain_batch().max(1),
                rearm,
                |q, b| {
                    let r = device.process_batch(index, q, b, kept, others);
                    // Other rings written by this batch (net: the RX ring of the pair) are
                    // published now, not after the drain: a driver that keeps transmitting
                    // would otherwise never see them.
                    others.flush();
                    r
                },
                // Each batch's completions go to the driver at once (see Device::drain_batch).
                || inband_due |= !shared.signal_call(),
            );
            self.inband_call |= inband_due;
            match result {
                Ok(()) => {}
                Err(VirtqueueError::IotlbMiss { iova, perm }) => {
                    // Chains before the miss may have completed: let the driver know.
                    if self.queue.used_mark() != used_before {
                        self.notify_driver();
                    }
                    miss = Some((iova, perm));
                }
                Err(e) => {
                    log::warn!("ring {}: {e}", self.index);
                    // The queue is broken (malformed ring): stop processing it, keep the session.
                    // The worker reports it on the error fd after the wake-up; the call fd only
                    // hears about chains completed before the bad one.
                    if self.queue.used_mark() != used_before {
                        self.notify_driver();
                    }
                }
            }
        }
        let ready = std::mem::take(&mut self.ready);
        for &fd in &ready {
            if !self.listening || !self.usable() {
                break;
            }
            match device.event(fd, RingHandle::new(self), others) {
                Ok(keep) => self.listening &= keep,
                Err(_) => self.listening = false,
            }
        }
        self.ready = ready;
        self.ready.clear();
        miss
    }

    /// The drain stopped at a chain whose buffer has no IOTLB entry (the chain stays on the
    /// ring): asks the front-end for it with an IOTLB MISS, outside the device's wake scope.
    ///
    /// The MISS does not ask for REPLY_ACK and the thread does not wait for an answer: it goes
    /// on running its loop (commands, other rings) and walks the chain again once an UPDATE
    /// covers the address ([`Slot::check_wait`]). Waiting here would deadlock against the
    /// front-end: QEMU sends main-channel requests (an INVALIDATE from the vIOMMU) and waits
    /// for their answers before it reads the back-end request channel, and an INVALIDATE of the
    /// ring's own pages makes the session take the ring off this thread, which would wait for
    /// this wait (protocol.md §4.3: handle the two channels independently).
    fn after_miss(&mut self, iova: u64, perm: u8) -> bool {
        // Only MISSes that went unanswered count (check_wait): an entry that arrives, is used
        // and is invalidated again (the guest reusing an IOVA) starts afresh.
        self.ask(iova, perm, 0)
    }

    /// Sends the MISS for `iova` (the `asks + 1`th in a row) and waits for the entry, or breaks
    /// the ring when it cannot be had. True if the entry is there already (walk again at once).
    fn ask(&mut self, iova: u64, perm: u8, asks: u32) -> bool {
        self.awaiting = None;
        self.shared.awaiting_entry.store(false, Ordering::SeqCst);
        if asks >= MAX_MISSES {
            // The front-end does not map it: an unusable ring, like a malformed one (reported
            // on the error fd with DEVICE_NEEDS_RESET; the chain is neither used nor lost).
            log::warn!("ring {}: no IOTLB entry for {iova:#x} after {asks} MISSes", self.index);
            self.queue.mark_broken();
            return false;
        }
        let Some(requests) = self.requests.as_deref() else {
            self.queue.mark_broken();
            return false;
        };
        // Set before the MISS goes out, so that the UPDATE answering it finds it set.
        self.shared.awaiting_entry.store(true, Ordering::SeqCst);
        if let Err(e) = requests.iotlb_miss(iova, perm, false, Some(MISS_SEND_TIMEOUT)) {
            log::warn!("ring {}: IOTLB MISS for {iova:#x} failed: {e}", self.index);
            self.shared.awaiting_entry.store(false, Ordering::SeqCst);
            self.queue.mark_broken();
            return false;
        }
        self.awaiting = Some(Awaiting { iova, perm, asked: std::time::Instant::now(), asks: asks + 1 });
        // The UPDATE may have come already.
        self.check_wait()
    }

    /// A ring waiting for an IOTLB entry: once an UPDATE covers the address the ring is walked
    /// again (returns true: look at it at once); after [`MISS_TIMEOUT`] the MISS is sent again.
    fn check_wait(&mut self) -> bool {
        let Some(a) = self.awaiting else { return false };
        if !self.usable() {
            // Disabled (or broken) meanwhile: no more MISSes; the walk asks afresh when the
            // ring is enabled again.
            self.awaiting = None;
            self.shared.awaiting_entry.store(false, Ordering::SeqCst);
            return false;
        }
        let arrived = self.queue.iotlb().is_some_and(|t| {
            // An entry without the permission counts as an answer too: the walk then fails
            // on it and breaks the ring.
            !matches!(
                t.read().unwrap_or_else(|e| e.into_inner()).lookup(a.iova, a.perm),
                Err(crate::memory::IotlbFault::Miss { .. })
            )
        });
        if arrived {
            self.awaiting = None;
            self.shared.awaiting_entry.store(false, Ordering::SeqCst);
            self.pending = true;
            return true;
        }
        if a.asked.elapsed() >= MISS_TIMEOUT {
            return self.ask(a.iova, a.perm, a.asks);
        }
        false
    }

    /// Re-arms the kicks of a ring drained for polling, before the thread sleeps; true if
    /// chains arrived meanwhile (drain instead of sleeping: no kick is coming for them).
    fn rearm(&mut self) -> bool {
        if !std::mem::take(&mut self.disarmed) || !self.usable() {
            return false;
        }
        match self.queue.enable_notifications() {
            Ok(true) => {
                self.pending = true;
                true
            }
            Ok(false) => false,
            // A broken ring is reported after the wake-up; nothing to wait for on it.
            Err(_) => false,
        }
    }

    /// Publishes used entries written outside the drain loop and notifies the driver.
    pub(crate) fn flush(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        match self.queue.publish_used() {
            Ok(true) => self.notify_driver(),
            Ok(false) => {}
            Err(_) => self.queue.mark_broken(),
        }
    }

    /// Used buffers for the driver: the call fd now, or VRING_CALL after the wake-up.
    fn notify_driver(&mut self) {
        if !self.shared.signal_call() {
            self.inband_call = true;
        }
    }

    /// What must go to the front-end on the back-end request channel after a wake-up (it waits
    /// for answers, so never inside the device's wake scope): in-band VRING_CALL, and the report
    /// of a ring that broke.
    fn after_wakeup(&mut self) {
        if std::mem::take(&mut self.inband_call) {
            self.shared.inband(BackendRequest::VRING_CALL, self.index);
        }
        if self.queue.is_broken() && !self.shared.broken.load(Ordering::Acquire) {
            self.shared.report_broken(self.index);
        }
    }

    /// Whether the device's fds are watched now.
    fn watching(&self) -> bool {
        self.listening && !self.events.is_empty() && self.usable()
    }

    /// Hands unused kept chains back to the ring when possible (they are the last popped, as
    /// RX buffers are); otherwise they stay in flight. Returns the queue.
    fn into_queue(mut self) -> AnyDeviceQueue {
        let heads: Vec<u16> = self.kept.heads().collect();
        if !heads.is_empty() {
            self.queue.return_chains(&heads);
        }
        self.kept.clear();
        self.queue
    }
}

enum Command {
    Add(Box<Slot>),
    Remove(u64, u16, mpsc::Sender<AnyDeviceQueue>),
}

/// One worker thread and the rings it runs.
pub(crate) struct Group {
    wake: OwnedFd,
    commands: Mutex<Vec<Command>>,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("wake", &self.wake).finish_non_exhaustive()
    }
}

fn add_event_fds(slots: &[Box<Slot>], fds: &mut Vec<libc::pollfd>, owners: &mut Vec<usize>) {
    for (k, slot) in slots.iter().enumerate() {
        if slot.watching() {
            for &fd in &slot.events {
                fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
                owners.push(k);
            }
        }
    }
}

fn collect_ready(slots: &mut [Box<Slot>], fds: &[libc::pollfd], owners: &[usize]) {
    for (p, &k) in fds.iter().zip(owners) {
        if p.revents != 0 {
            slots[k].ready.push(p.fd);
        }
    }
}

impl Group {
    fn start(name: String, cpu: Option<usize>, poll: Polling) -> io::Result<Arc<Group>> {
        let group = Arc::new(Group {
            wake: eventfd::new()?,
            commands: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let g = group.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            if let Some(cpu) = cpu {
                pin_to(cpu);
            }
            g.run(poll);
        })?;
        *group.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
        Ok(group)
    }

    fn wake(&self) {
        let _ = eventfd::signal(self.wake.as_fd());
    }

    fn command(&self, c: Command) {
        self.commands.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        self.wake();
    }

    /// Whether the thread still runs (it ends at shutdown, or if a device panicked).
    fn alive(&self) -> bool {
        self.thread.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Takes ring `index` of session `owner` off the thread and returns its state.
    fn remove(&self, owner: u64, index: u16) -> Option<AnyDeviceQueue> {
        let (tx, rx) = mpsc::channel();
        self.command(Command::Remove(owner, index, tx));
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(q) => return Some(q),
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(mpsc::RecvTimeoutError::Timeout) if !self.alive() => return None,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn run(&self, poll: Polling) {
        let mut devices: Vec<u64> = Vec::new();
        let mut window = Window::new(poll);
        let mut slots: Vec<Box<Slot>> = Vec::new();
        let mut fds: Vec<libc::pollfd> = Vec::new();
        // For each pollfd after the kicks and the wake fd: the slot it belongs to.
        let mut owners: Vec<usize> = Vec::new();
        let mut misses: Vec<(usize, u64, u8)> = Vec::new();
        let mut last_work = std::time::Instant::now();
        loop {
            let commands = std::mem::take(&mut *self.commands.lock().unwrap_or_else(|e| e.into_inner()));
            for c in commands {
                match c {
                    Command::Add(slot) => slots.push(slot),
                    Command::Remove(owner, index, reply) => {
                        if let Some(pos) = slots.iter().position(|s| s.owner == owner && s.index == index) {
                            let mut slot = slots.swap_remove(pos);
                            let device = slot.device.clone();
                            device.ring_stopping(RingHandle::new(&mut slot));
                            slot.flush();
                            if std::mem::take(&mut slot.disarmed) {
                                // Handed back as a sleeping thread leaves a ring: kicks armed, for
                                // whoever drives it next (NO_NOTIFY stays in guest memory).
                                let _ = slot.queue.enable_notifications();
                            }
                            let _ = reply.send(slot.into_queue());
                        }
                    }
                }
            }
            if self.stop.load(Ordering::Acquire) {
                for slot in &mut slots {
                    let device = slot.device.clone();
                    device.ring_stopping(RingHandle::new(slot));
                }
                return;
            }
            let mut again = false;
            let mut worked = false;
            // Whether the thread polls after this wake-up (it does whenever the window is open).
            let polling = !window.now.is_zero();
            // The devices with work (most threads serve one; a shared pool serves several).
            devices.clear();
            for s in slots.iter().filter(|s| ((s.pending && s.awaiting.is_none()) || !s.ready.is_empty()) && s.usable())
            {
                if !devices.contains(&s.owner) {
                    devices.push(s.owner);
                }
            }
            for &owner in &devices {
                let Some(device) = slots.iter().find(|s| s.owner == owner).map(|s| s.device.clone()) else { continue };
                // One wake scope per device and wake-up (the Python adapter takes the GIL once).
                device.wake_scope(&mut || {
                    for k in 0..slots.len() {
                        if slots[k].owner != owner {
                            continue;
                        }
                        let (before, rest) = slots.split_at_mut(k);
                        let Some((cur, after)) = rest.split_first_mut() else { break };
                        let (avail, used) = (cur.queue.avail_mark(), cur.queue.used_mark());
                        if let Some((iova, perm)) = cur.run(&*device, &mut Rings::new(before, after, owner), polling) {
                            misses.push((k, iova, perm));
                        }
                        worked |= cur.queue.avail_mark() != avail || cur.queue.used_mark() != used;
                    }
                    for slot in slots.iter_mut().filter(|s| s.owner == owner) {
                        slot.flush();
                    }
                });
            }
            for (k, iova, perm) in misses.drain(..) {
                again |= slots[k].after_miss(iova, perm);
            }
            for slot in &mut slots {
                again |= slot.check_wait();
            }
            for slot in &mut slots {
                slot.after_wakeup();
            }
            if worked {
                last_work = std::time::Instant::now();
            }
            let watching = slots.iter().any(|s| s.watching());
            // Rings kicked through a doorbell page: the avail index is the only kick there is.
            let mut doorbells = false;
            for slot in slots.iter_mut().filter(|s| s.doorbell) {
                doorbells = true;
                if slot.queue.avail_pending() {
                    slot.pending = true;
                }
            }
            if !window.now.is_zero() && last_work.elapsed() < window.now {
                // Polling window: look at the rings themselves instead of sleeping, so a
                // driver on another CPU does not pay for waking this thread. Yield rather than
                // spin: a driver sharing this CPU gets to run.
                let mut found = false;
                for slot in &mut slots {
                    if slot.queue.avail_pending() {
                        slot.pending = true;
                        found = true;
                    }
                }
                if watching {
                    // The device's fds are polled too (without sleeping).
                    found |= self.poll_events(&mut slots, &mut fds, &mut owners, 0) > 0;
                }
                if !found {
                    std::thread::yield_now();
                }
                continue;
            }
            // About to sleep: rings drained for polling get their kicks back first.
            let mut arrived = false;
            for slot in &mut slots {
                arrived |= slot.rearm();
            }
            if arrived {
                continue;
            }
            fds.clear();
            owners.clear();
            fds.extend(slots.iter().map(|s| libc::pollfd { fd: s.kick.as_raw_fd(), events: libc::POLLIN, revents: 0 }));
            fds.push(libc::pollfd { fd: self.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            add_event_fds(&slots, &mut fds, &mut owners);
            // A ring waiting for an IOTLB entry asks again when its wait ends.
            let wait_ms = slots
                .iter()
                .filter_map(|s| s.awaiting.map(|a| MISS_TIMEOUT.saturating_sub(a.asked.elapsed())))
                .min()
                .map_or(1000, |d| d.as_millis().clamp(1, 1000) as i32);
            let slept = std::time::Instant::now();
            let sleeps = !again && !doorbells;
            // SAFETY: a valid array of pollfds; the fds stay open (only this thread drops slots,
            // and devices keep their event fds open while the ring runs).
            let n =
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, if sleeps { wait_ms } else { 0 }) };
            if sleeps {
                window.after_sleep(slept.elapsed(), n > 0);
            }
            if n <= 0 {
                if doorbells && n == 0 && !slots.iter().any(|s| s.pending) {
                    // Nothing anywhere: let a driver sharing this CPU run.
                    std::thread::yield_now();
                }
                continue;
            }
            let kicks = slots.len();
            for (slot, p) in slots.iter_mut().zip(&fds) {
                if p.revents != 0 {
                    eventfd::drain(slot.kick.as_fd());
                    slot.pending = true;
                }
            }
            if fds[kicks].revents != 0 {
                eventfd::drain(self.wake.as_fd());
                // An enable or a new ring: look at every ring once.
                for slot in &mut slots {
                    slot.pending = true;
                }
            }
            collect_ready(&mut slots, &fds[kicks + 1..], &owners);
        }
    }

    /// Polls only the device fds of the slots (timeout in ms); marks the ready ones.
    fn poll_events(
        &self,
        slots: &mut [Box<Slot>],
        fds: &mut Vec<libc::pollfd>,
        owners: &mut Vec<usize>,
        timeout: i32,
    ) -> i32 {
        fds.clear();
        owners.clear();
        add_event_fds(slots, fds, owners);
        if fds.is_empty() {
            return 0;
        }
        // SAFETY: a valid array of pollfds that stay open (see `run`).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n > 0 {
            collect_ready(slots, fds, owners);
        }
        n
    }

    fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake();
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

/// Worker threads shared by the devices of a process (SPDK's model): every session's rings join
/// these `threads` threads, so the thread count stays the same however many devices are served.
/// A device's ring group `g` runs on thread `(d + g) % threads`, `d` counting the sessions, so
/// the devices spread over the threads.
#[derive(Debug)]
pub struct WorkerPool {
    threads: usize,
    cpus: Vec<usize>,
    poll: Polling,
    groups: Mutex<Vec<Option<Arc<Group>>>>,
}

impl WorkerPool {
    /// A pool of `threads` threads (at least 1), started as rings need them, thread `t` pinned
    /// to `cpus[t % cpus.len()]` when `cpus` is not empty.
    pub fn new(threads: usize, cpus: Vec<usize>, poll: Polling) -> WorkerPool {
        WorkerPool { threads: threads.max(1), cpus, poll, groups: Mutex::new(Vec::new()) }
    }

    fn group(&self, t: usize) -> io::Result<Arc<Group>> {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if groups.len() < self.threads {
            groups.resize(self.threads, None);
        }
        if let Some(g) = groups[t].as_ref().filter(|g| g.alive()) {
            return Ok(g.clone());
        }
        let cpu = (!self.cpus.is_empty()).then(|| self.cpus[t % self.cpus.len()]);
        let g = Group::start(format!("vhost-user worker {t}"), cpu, self.poll)?;
        groups[t] = Some(g.clone());
        Ok(g)
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        for g in self.groups.get_mut().unwrap_or_else(|e| e.into_inner()).iter().flatten() {
            g.shutdown();
        }
    }
}

/// Sessions so far (the owner of their rings on shared threads).
static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The worker threads of one session, started as rings need them (or a process-wide pool's).
#[derive(Debug)]
pub(crate) struct Workers {
    policy: WorkerPolicy,
    /// Per-ring threads (index = ring) or shared threads (index = thread), started lazily.
    groups: Vec<Option<Arc<Group>>>,
    /// This session's id on the threads.
    pub(crate) owner: u64,
}

impl Default for Workers {
    fn default() -> Workers {
        Workers::new(WorkerPolicy::default())
    }
}

impl Workers {
    pub fn new(policy: WorkerPolicy) -> Workers {
        Workers { policy, groups: Vec::new(), owner: SESSIONS.fetch_add(1, Ordering::Relaxed) }
    }

    /// The thread that runs ring `index` (started if needed).
    pub fn group_for(&mut self, index: u16, device: &Arc<dyn Device>) -> io::Result<Arc<Group>> {
        let group = device.ring_group(index);
        if let Some(pool) = &self.policy.pool {
            return pool.group((self.owner as usize).wrapping_add(usize::from(group)) % pool.threads);
        }
        let (slot, name) = match self.policy.threads {
            Some(n) if n > 0 => {
                let t = usize::from(group) % n;
                (t, format!("vhost-user worker {t}"))
            }
            _ => (usize::from(group), format!("vhost-user ring {group}")),
        };
        if self.groups.len() <= slot {
            self.groups.resize(slot + 1, None);
        }
        if let Some(g) = &self.groups[slot] {
            return Ok(g.clone());
        }
        let cpus = &self.policy.cpus;
        let cpu = (!cpus.is_empty()).then(|| cpus[slot % cpus.len()]);
        let g = Group::start(name, cpu, self.policy.poll)?;
        self.groups[slot] = Some(g.clone());
        Ok(g)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // A pool's threads outlive the session (its rings left them when they stopped).
        for g in self.groups.iter().flatten() {
            g.shutdown();
        }
    }
}

/// A started ring, running on its worker thread.
#[derive(Debug)]
pub(crate) struct Worker {
    pub shared: Arc<RingShared>,
    owner: u64,
    index: u16,
    stopped: bool,
}

impl Worker {
    /// Hands ring `index` of session `owner` (served by `device`) to the thread of `shared`'s
    /// group.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        owner: u64,
        device: Arc<dyn Device>,
        index: u16,
        queue: AnyDeviceQueue,
        kick: OwnedFd,
        shared: Arc<RingShared>,
        requests: Option<Arc<BackendRequests>>,
        events: Vec<RawFd>,
        doorbell: bool,
    ) -> Worker {
        let slot = Slot {
            owner,
            device,
            doorbell,
            index,
            queue,
            kick,
            shared: shared.clone(),
            requests,
            batch: ChainBatch::new(),
            refill_batch: ChainBatch::new(),
            kept: KeptChains::new(),
            dirty: false,
            // A kick may have come before the ring joined its thread: look at it once.
            pending: true,
            events,
            ready: Vec::new(),
            listening: true,
            awaiting: None,
            inband_call: false,
            disarmed: false,
        };
        shared.group.command(Command::Add(Box::new(slot)));
        Worker { shared, owner, index, stopped: false }
    }

    /// Takes the ring off its thread and returns its state (for GET_VRING_BASE).
    pub fn stop(mut self) -> Option<AnyDeviceQueue> {
        self.stopped = true;
        self.shared.group.remove(self.owner, self.index)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.stopped {
            self.shared.group.remove(self.owner, self.index);
        }
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn the_adaptive_window_follows_the_load_and_dies_out_when_idle() {
        let max = Duration::from_micros(50);
        let mut w = Window::new(Polling::Adaptive { max });
        assert_eq!(w.now, max);
        // Idle: every long sleep halves the window, down to no polling at all.
        for _ in 0..8 {
            w.after_sleep(Duration::from_millis(1), true);
        }
        assert_eq!(w.now, Duration::ZERO);
        // A poll timeout counts as idle too.
        w.after_sleep(Duration::from_secs(1), false);
        assert_eq!(w.now, Duration::ZERO);
        // Work arriving soon after each sleep: the window comes back and stops at max.
        w.after_sleep(Duration::from_micros(20), true);
        assert_eq!(w.now, MIN_WINDOW);
        for _ in 0..10 {
            w.after_sleep(Duration::from_micros(20), true);
        }
        assert_eq!(w.now, max);
        // Fixed and off do not move.
        let mut f = Window::new(Polling::Fixed(Duration::from_micros(30)));
        f.after_sleep(Duration::from_secs(1), false);
        assert_eq!(f.now, Duration::from_micros(30));
        assert_eq!(Window::new(Polling::Off).now, Duration::ZERO);
    }
}
