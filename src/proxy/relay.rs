//! The relay loop of one session: four sockets polled by one thread, every message passed on
//! with its fds (byte for byte unless a rule says otherwise), every message reported.
//!
//! ```text
//!  front-end ──main──▶ [0 front]  proxy  [1 back] ──main──▶ back-end
//!  front-end ◀──chan── [2 front]         [3 back] ◀──chan── back-end
//! ```
//!
//! The back-end request channel: SET_BACKEND_REQ_FD carries one end of a socket pair the
//! front-end made. The proxy keeps that fd as endpoint 2, makes its own pair, keeps one end
//! (endpoint 3) and sends the other to the back-end in its place, so both directions of that
//! channel (the back-end's requests and the front-end's replies) cross the proxy too.
//!
//! Nothing here waits for a reply: a message is read when its socket is readable, and each
//! direction has a FIFO of messages to send (a delayed message holds back the ones behind it,
//! so the proxy never reorders a direction). Every read and write of a message is bounded by
//! the I/O timeout: a peer that stops in the middle of a message, or stops reading, ends the
//! session instead of hanging the proxy.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use super::record::{Event, Side, Stamp, Traced};
use super::rules::Injector;
use crate::connection::{dup_cloexec, relabel, Connection, Deadline, RawMessage};
use crate::error::Error;
use crate::protocol::{Channel, FrontendRequest, Header};

/// Largest payload the proxy relays. Larger than any receiver accepts (4 KiB here, as in
/// rust-vmm), so oversized messages still reach the peer that should refuse them; beyond it the
/// session ends, since the stream cannot be followed without reading the whole payload.
pub const MAX_RELAY_PAYLOAD: usize = 64 << 10;

const FRONT: usize = 0;
const BACK: usize = 1;
const FRONT_CHAN: usize = 2;
const BACK_CHAN: usize = 3;

/// Where a message read from endpoint `i` came from, and where it goes.
fn route(i: usize) -> (Channel, Side, usize) {
    match i {
        FRONT => (Channel::Main, Side::Frontend, BACK),
        BACK => (Channel::Main, Side::Backend, FRONT),
        FRONT_CHAN => (Channel::Backend, Side::Frontend, BACK_CHAN),
        _ => (Channel::Backend, Side::Backend, FRONT_CHAN),
    }
}

struct Outgoing {
    due: Instant,
    header: Header,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

#[derive(Default)]
struct Endpoint {
    conn: Option<Connection>,
    queue: VecDeque<Outgoing>,
    /// Bumped whenever `conn` is replaced or closed, so a poll result about the old socket is
    /// not taken for the new one.
    generation: u64,
}

/// What a session needs from its proxy.
pub(super) struct Context<'a> {
    /// Fault-injection rules, shared by every session.
    pub injector: &'a Injector,
    /// Bound on reading or writing one message.
    pub io_timeout: Duration,
    /// Readable when the proxy stops.
    pub stop: BorrowedFd<'a>,
    /// Where records go, with the time the event happened (`None`: now).
    pub report: &'a (dyn Fn(Event, Option<Stamp>) + Sync),
}

/// How a session ended.
pub(super) struct Ending {
    pub reason: String,
    pub clean: bool,
}

enum State {
    Running,
    /// A main-channel peer hung up: read nothing more, deliver what is queued, then end.
    Draining(Ending, Instant),
    Done(Ending),
}

pub(super) struct Session<'a> {
    ctx: &'a Context<'a>,
    ends: [Endpoint; 4],
    state: State,
}

impl<'a> Session<'a> {
    pub(super) fn new(ctx: &'a Context<'a>, front: Connection, back: Connection) -> Session<'a> {
        let mut ends: [Endpoint; 4] = Default::default();
        ends[FRONT].conn = Some(front);
        ends[BACK].conn = Some(back);
        Session { ctx, ends, state: State::Running }
    }

    /// Relays until a peer hangs up, an error, or the proxy stops. Every socket and every fd
    /// still queued is closed when the session is dropped.
    pub(super) fn run(mut self) -> Ending {
        loop {
            self.send_due();
            match std::mem::replace(&mut self.state, State::Running) {
                State::Done(ending) => return ending,
                State::Draining(ending, deadline) => {
                    let idle = self.ends.iter().all(|e| e.queue.is_empty() || e.conn.is_none());
                    if idle {
                        return ending;
                    }
                    if Instant::now() >= deadline {
                        return Ending {
                            reason: format!("{}; messages still queued were not delivered", ending.reason),
                            clean: false,
                        };
                    }
                    self.state = State::Draining(ending, deadline);
                }
                State::Running => {}
            }
            if let Err(e) = self.wait_and_read() {
                return Ending { reason: format!("poll failed: {e}"), clean: false };
            }
        }
    }

    fn wait_and_read(&mut self) -> io::Result<()> {
        let reading = matches!(self.state, State::Running);
        let mut pfds = vec![libc::pollfd { fd: self.ctx.stop.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        let mut which = Vec::with_capacity(4);
        if reading {
            for (i, end) in self.ends.iter().enumerate() {
                if let Some(conn) = &end.conn {
                    pfds.push(libc::pollfd { fd: conn.as_raw_fd(), events: libc::POLLIN, revents: 0 });
                    which.push((i, end.generation));
                }
            }
        }
        let now = Instant::now();
        let mut wake: Option<Instant> = self.ends.iter().filter_map(|e| e.queue.front().map(|o| o.due)).min();
        if let State::Draining(_, deadline) = &self.state {
            wake = Some(wake.map_or(*deadline, |w| w.min(*deadline)));
        }
        let ms = match wake {
            None => -1,
            Some(w) => w.saturating_duration_since(now).as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
        };
        // SAFETY: pfds is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
        }
        if pfds[0].revents != 0 {
            self.state = State::Done(Ending { reason: "the proxy was stopped".into(), clean: true });
            return Ok(());
        }
        for (pfd, &(i, generation)) in pfds[1..].iter().zip(&which) {
            // POLLHUP/POLLERR too: the read then reports the hang-up or the error. A message
            // handled just before may have replaced or closed the back-end request channel.
            if pfd.revents != 0 && matches!(self.state, State::Running) && self.ends[i].generation == generation {
                self.receive(i);
            }
        }
        Ok(())
    }

    fn receive(&mut self, i: usize) {
        let (channel, from, _) = route(i);
        let Some(conn) = &self.ends[i].conn else { return };
        let deadline = Deadline::after(Some(self.ctx.io_timeout));
        match conn.recv_raw(deadline, MAX_RELAY_PAYLOAD).map_err(|e| relabel(e, channel)) {
            Ok(raw) => self.relay(i, raw),
            Err(Error::Disconnected) if channel == Channel::Main => {
                let ending = Ending { reason: format!("the {} closed the connection", from.name()), clean: true };
                self.state = State::Draining(ending, Instant::now() + self.ctx.io_timeout);
            }
            Err(Error::Disconnected) => {
                self.close_channel(&format!("the {} closed the back-end request channel", from.name()));
            }
            // The stream is out of step (a payload too large to read, a message cut short) or
            // its fds were refused: nothing after it can be relayed faithfully.
            Err(e) if channel == Channel::Main => {
                self.state = State::Done(Ending { reason: format!("from the {}: {e}", from.name()), clean: false });
            }
            Err(e) => self.close_channel(&format!("from the {} on the back-end request channel: {e}", from.name())),
        }
    }

    fn relay(&mut self, i: usize, raw: RawMessage) {
        let received = Stamp::now();
        let (channel, from, dest) = route(i);
        let RawMessage { mut header, mut payload, mut fds } = raw;
        let mut traced = Traced::new(channel, from, header, &payload, fds.len());
        let verdict = self.ctx.injector.verdict(traced.request(), header.is_reply());
        traced.injected = verdict.fired;
        if verdict.drop {
            traced.dropped = true;
            (self.ctx.report)(Event::Message(Box::new(traced)), Some(received));
            return; // `fds` dropped: closed.
        }
        for corruption in &verdict.corrupt {
            corruption.apply(&mut header, &mut payload, &mut fds);
        }
        let substitute = channel == Channel::Main
            && from == Side::Frontend
            && !header.is_reply()
            && header.code == FrontendRequest::SET_BACKEND_REQ_FD.code()
            && fds.len() == 1;
        if substitute {
            match self.substitute(&fds[0]) {
                Ok(theirs) => {
                    // Our copy of the front-end's fd lives on as endpoint 2 (a duplicate).
                    fds[0] = theirs;
                    traced.substituted = true;
                }
                Err(reason) => (self.ctx.report)(
                    Event::Note(format!("SET_BACKEND_REQ_FD relayed with the front-end's own fd: {reason}")),
                    None,
                ),
            }
        }
        if self.ends[dest].conn.is_some() {
            let due = received.mono + verdict.delay;
            self.ends[dest].queue.push_back(Outgoing { due, header, payload, fds });
            // Relay first, report after: waking whoever reads the records must not delay the
            // message (the record keeps the time it arrived).
            self.send_due();
        } // Else the channel it was meant for is gone: nobody to tell.
        (self.ctx.report)(Event::Message(Box::new(traced)), Some(received));
    }

    /// Installs a new back-end request channel: the front-end's end `fd` (duplicated) becomes
    /// endpoint 2, a new pair gives endpoint 3 and the fd returned for the back-end.
    fn substitute(&mut self, fd: &OwnedFd) -> Result<OwnedFd, String> {
        let front = dup_cloexec(fd.as_fd()).map_err(|e| e.to_string())?;
        let front = Connection::from_fd(front).map_err(|e| format!("its fd is not usable: {e}"))?;
        let (ours, theirs) = Connection::pair().map_err(|e| e.to_string())?;
        if self.ends[FRONT_CHAN].conn.is_some() {
            self.close_channel("SET_BACKEND_REQ_FD replaced the back-end request channel");
        }
        self.ends[FRONT_CHAN].conn = Some(front);
        self.ends[BACK_CHAN].conn = Some(ours);
        self.ends[FRONT_CHAN].generation += 1;
        self.ends[BACK_CHAN].generation += 1;
        Ok(theirs.into_fd())
    }

    /// Closes both halves of the back-end request channel and drops what was queued on them.
    fn close_channel(&mut self, why: &str) {
        for i in [FRONT_CHAN, BACK_CHAN] {
            if let Some(conn) = self.ends[i].conn.take() {
                // The peer may still hold a duplicate of the end we were given: shutting down
                // makes sure it sees the hang-up.
                conn.shutdown();
            }
            self.ends[i].queue.clear();
            self.ends[i].generation += 1;
        }
        (self.ctx.report)(Event::Note(why.to_string()), None);
    }

    /// Sends every queued message whose time has come, in order per direction. Our copies of
    /// the fds are closed once the kernel holds the receiver's.
    fn send_due(&mut self) {
        let now = Instant::now();
        for i in 0..4 {
            while self.ends[i].queue.front().is_some_and(|o| o.due <= now) {
                let Some(out) = self.ends[i].queue.pop_front() else { break };
                let Some(conn) = &self.ends[i].conn else {
                    self.ends[i].queue.clear();
                    break;
                };
                let mut bytes = Vec::with_capacity(out.payload.len() + 12);
                bytes.extend_from_slice(&out.header.to_bytes());
                bytes.extend_from_slice(&out.payload);
                let fds: Vec<BorrowedFd<'_>> = out.fds.iter().map(|f| f.as_fd()).collect();
                let sent = conn.send_bytes(&bytes, &fds, Deadline::after(Some(self.ctx.io_timeout)));
                drop(fds);
                drop(out);
                if let Err(e) = sent {
                    // Endpoint i's queue goes to the peer behind endpoint i.
                    let (channel, to, _) = route(i);
                    if channel == Channel::Backend {
                        self.close_channel(&format!(
                            "sending to the {} on the back-end request channel: {e}",
                            to.name()
                        ));
                        break;
                    }
                    let clean = matches!(e, Error::Disconnected);
                    let reason = if clean {
                        format!("the {} closed the connection", to.name())
                    } else {
                        format!("sending to the {}: {e}", to.name())
                    };
                    self.state = State::Done(Ending { reason, clean });
                    return;
                }
            }
        }
    }
}
