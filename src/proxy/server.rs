//! The proxy as a whole: a listening socket, an accept thread, one relay thread per session,
//! and the queue of records the caller reads.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::record::{Event, Record, Stamp};
use super::relay::{Context, Session};
use super::rules::{Injector, Rule};
use crate::connection::{Connection, Deadline, Listener};
use crate::error::Result;

/// Records kept for a reader that does not keep up; older ones are discarded beyond it.
const MAX_QUEUED_RECORDS: usize = 1 << 16;

/// Payload bytes kept in those records (a peer sending 64 KiB messages must not make an idle
/// reader's queue grow to gigabytes).
const MAX_QUEUED_BYTES: usize = 64 << 20;

/// Sessions relayed at once; a front-end connecting beyond it is disconnected at once.
pub const MAX_SESSIONS: usize = 32;

/// How the proxy is set up.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Where front-ends connect.
    pub listen: PathBuf,
    /// The back-end's socket, connected to once per front-end.
    pub connect: PathBuf,
    /// Fault-injection rules, in order.
    pub rules: Vec<Rule>,
    /// How long to keep trying to reach the back-end when a front-end connects.
    pub connect_timeout: Duration,
    /// Bound on reading or writing one message (a peer stuck mid-message ends its session).
    pub io_timeout: Duration,
    /// Relay one session, then stop accepting and finish.
    pub once: bool,
}

#[derive(Default)]
struct Queue {
    records: VecDeque<Record>,
    bytes: usize,
    lost: u64,
    finished: bool,
}

fn payload_bytes(record: &Record) -> usize {
    match &record.event {
        Event::Message(t) => t.payload.len(),
        _ => 0,
    }
}

/// The records on their way to the reader; outlives the proxy's threads and fds so that the
/// last records can be read after `close()`.
struct Records {
    start: Instant,
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl Records {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&self, session: u64, event: Event, at: Option<Stamp>) {
        let at = at.unwrap_or_else(Stamp::now);
        let elapsed = at.mono.saturating_duration_since(self.start);
        let record = Record { time: at.wall, elapsed, session, event };
        let size = payload_bytes(&record);
        let mut q = self.lock();
        while q.records.len() >= MAX_QUEUED_RECORDS || (q.bytes + size > MAX_QUEUED_BYTES && !q.records.is_empty()) {
            if let Some(old) = q.records.pop_front() {
                q.bytes -= payload_bytes(&old);
                q.lost += 1;
            }
        }
        q.bytes += size;
        q.records.push_back(record);
        drop(q);
        self.ready.notify_all();
    }

    fn finish(&self) {
        self.lock().finished = true;
        self.ready.notify_all();
    }
}

/// What the accept thread and the sessions share; dropped (closing the stop eventfd) once they
/// are all joined.
struct Shared {
    injector: Injector,
    config: ProxyConfig,
    stop: OwnedFd,
    records: Arc<Records>,
}

impl Shared {
    fn report(&self, session: u64, event: Event) {
        self.records.report(session, event, None);
    }

    fn stopped(&self) -> bool {
        let mut pfd = libc::pollfd { fd: self.stop.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd; zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
    }
}

struct Running {
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

/// A running proxy. Dropping it stops it and waits for its threads.
pub struct Proxy {
    config: ProxyConfig,
    records: Arc<Records>,
    running: Mutex<Option<Running>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("config", &self.config).finish()
    }
}

impl Proxy {
    /// Binds the listening socket (replacing a stale socket file) and starts accepting.
    pub fn start(config: ProxyConfig) -> Result<Proxy> {
        if config.listen == config.connect {
            // Each session would connect to the proxy itself, and that one again.
            let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "the proxy cannot connect to its own socket");
            return Err(e.into());
        }
        let listener = Listener::bind(&config.listen, true)?;
        let records =
            Arc::new(Records { start: Instant::now(), queue: Mutex::new(Queue::default()), ready: Condvar::new() });
        let shared = Arc::new(Shared {
            injector: Injector::new(config.rules.clone()),
            config: config.clone(),
            stop: crate::eventfd::new()?,
            records: Arc::clone(&records),
        });
        let for_thread = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("vu-proxy-accept".into())
            .spawn(move || accept_loop(for_thread, listener))?;
        Ok(Proxy { config, records, running: Mutex::new(Some(Running { shared, accept })) })
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Takes up to `max` records, waiting up to `timeout` for the first (`None`: until one
    /// comes or the proxy finishes). Records discarded because nobody read them in time are
    /// reported by a note in their place.
    pub fn next_records(&self, max: usize, timeout: Option<Duration>) -> Vec<Record> {
        let deadline = Deadline::after(timeout);
        let mut q = self.records.lock();
        while q.records.is_empty() && q.lost == 0 && !q.finished {
            match deadline.remaining() {
                Some(left) if left.is_zero() => break,
                Some(left) => q = self.records.ready.wait_timeout(q, left).unwrap_or_else(|e| e.into_inner()).0,
                None => q = self.records.ready.wait(q).unwrap_or_else(|e| e.into_inner()),
            }
        }
        let mut out = Vec::new();
        if q.lost > 0 {
            let note = format!("{} trace records were discarded: they were not read in time", q.lost);
            q.lost = 0;
            out.push(Record {
                time: SystemTime::now(),
                elapsed: self.records.start.elapsed(),
                session: 0,
                event: Event::Note(note),
            });
        }
        let n = q.records.len().min(max.max(1).saturating_sub(out.len()));
        out.extend(q.records.drain(..n));
        q.bytes -= out.iter().map(payload_bytes).sum::<usize>();
        out
    }

    /// Whether the proxy has finished (stopped, or its one session ended with `once`) and every
    /// record has been read.
    pub fn is_finished(&self) -> bool {
        let q = self.records.lock();
        q.finished && q.records.is_empty() && q.lost == 0
    }

    /// Stops accepting, ends every session (closing both peers' connections), waits for the
    /// threads and closes every fd of the proxy; the records not read yet stay readable.
    /// Idempotent.
    pub fn close(&self) {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(Running { shared, accept }) = running {
            let _ = crate::eventfd::signal(shared.stop.as_fd());
            let _ = accept.join();
            // The last reference: the stop eventfd closes here.
            drop(shared);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.close();
    }
}

fn accept_loop(shared: Arc<Shared>, listener: Listener) {
    let next = AtomicU64::new(1);
    let mut sessions: Vec<JoinHandle<()>> = Vec::new();
    loop {
        sessions.retain(|s| !s.is_finished());
        let mut pfds = [
            libc::pollfd { fd: shared.stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: a valid array of two pollfds. The timeout reaps finished sessions now and then.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, 1000) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            shared.report(0, Event::Note(format!("the proxy stops accepting: poll failed: {e}")));
            break;
        }
        if pfds[0].revents != 0 {
            break;
        }
        if pfds[1].revents == 0 {
            continue;
        }
        let front = match listener.accept(Deadline::after(Some(Duration::from_millis(100)))) {
            Ok(front) => front,
            Err(crate::Error::Timeout(_)) => continue,
            Err(e) => {
                shared.report(0, Event::Note(format!("the proxy stops accepting: {e}")));
                break;
            }
        };
        let id = next.fetch_add(1, Ordering::Relaxed);
        if sessions.len() >= MAX_SESSIONS {
            shared.report(
                id,
                Event::Closed { reason: format!("refused: {MAX_SESSIONS} sessions are already relayed"), clean: false },
            );
            continue;
        }
        let for_session = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(format!("vu-proxy-{id}"))
            .spawn(move || run_session(&for_session, id, front));
        match spawned {
            Ok(handle) => sessions.push(handle),
            Err(e) => {
                shared.report(id, Event::Closed { reason: format!("no thread for the session: {e}"), clean: false })
            }
        }
        if shared.config.once {
            break;
        }
    }
    // No further front-end: with `once` one connecting now is refused at once instead of
    // waiting in the backlog. The session runs to its end (or to the stop signal).
    drop(listener);
    for s in sessions {
        let _ = s.join();
    }
    // Every session has ended and the listener is closed: no record will follow.
    let records = Arc::clone(&shared.records);
    drop(shared);
    records.finish();
}

fn run_session(shared: &Shared, id: u64, front: Connection) {
    let back = match Connection::connect(&shared.config.connect, Some(shared.config.connect_timeout)) {
        Ok(back) => back,
        Err(e) => {
            let reason = format!("could not reach the back-end at {}: {e}", shared.config.connect.display());
            shared.report(id, Event::Closed { reason, clean: false });
            return;
        }
    };
    if shared.stopped() {
        shared.report(id, Event::Closed { reason: "the proxy was stopped".into(), clean: true });
        return;
    }
    shared.report(id, Event::Connected);
    let report = |event: Event, at: Option<Stamp>| shared.records.report(id, event, at);
    let ctx = Context {
        injector: &shared.injector,
        io_timeout: shared.config.io_timeout,
        stop: shared.stop.as_fd(),
        report: &report,
    };
    let ending = Session::new(&ctx, front, back).run();
    shared.report(id, Event::Closed { reason: ending.reason, clean: ending.clean });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Channel, Header};
    use crate::proxy::{Side, Traced};

    fn proxy_over(records: Arc<Records>) -> Proxy {
        let config = ProxyConfig {
            listen: PathBuf::new(),
            connect: PathBuf::new(),
            rules: Vec::new(),
            connect_timeout: Duration::ZERO,
            io_timeout: Duration::ZERO,
            once: false,
        };
        Proxy { config, records, running: Mutex::new(None) }
    }

    #[test]
    fn an_unread_queue_is_bounded_in_records_and_bytes() {
        let records =
            Arc::new(Records { start: Instant::now(), queue: Mutex::new(Queue::default()), ready: Condvar::new() });
        for _ in 0..MAX_QUEUED_RECORDS + 10 {
            records.report(1, Event::Connected, None);
        }
        let big = vec![0u8; 64 << 10];
        let header = Header { code: 25, flags: 1, size: big.len() as u32 };
        for _ in 0..(MAX_QUEUED_BYTES / big.len()) + 5 {
            let t = Traced::new(Channel::Main, Side::Frontend, header, &big, 0);
            records.report(1, Event::Message(Box::new(t)), None);
        }
        {
            let q = records.lock();
            assert!(q.bytes <= MAX_QUEUED_BYTES && q.records.len() <= MAX_QUEUED_RECORDS);
            assert_eq!(q.bytes, q.records.iter().map(payload_bytes).sum::<usize>());
        }
        let proxy = proxy_over(Arc::clone(&records));
        let first = proxy.next_records(10, Some(Duration::ZERO));
        let Event::Note(note) = &first[0].event else { panic!("{first:?}") };
        assert!(note.contains("discarded"), "{note}");
        assert_eq!(first.len(), 10);
        while !proxy.next_records(1 << 20, Some(Duration::ZERO)).is_empty() {}
        assert_eq!(records.lock().bytes, 0);
    }
}
