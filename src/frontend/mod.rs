//! The front-end role: send requests to a back-end, await their replies and acks, and remember
//! what was negotiated so a request whose feature is missing is refused before it is sent.
//!
//! One request is in flight at a time on the main channel (the protocol has no tags): the `io`
//! lock covers send + reply. The back-end request channel is served on its own thread
//! ([`channel`]), so an IOTLB miss arriving while a main-channel reply is awaited cannot deadlock.

pub mod blkio;
pub mod blkreq;
pub mod channel;
pub mod latency;
/// Eventfd helpers, shared with the back-end (kept here under their old path).
pub use crate::eventfd;
pub mod netio;
pub mod poll;
pub mod shmem;

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::connection::{Connection, Deadline, Received};
use crate::error::{Error, Result};
use crate::protocol::{
    Channel, FrontendRequest, Message, Negotiated, Payload, ProtocolError, ProtocolFeatures, ReplyRule, Request,
};

/// Options of one request.
#[derive(Clone, Copy, Debug)]
pub struct RequestOptions {
    /// Set NEED_REPLY: `None` = policy (every request without a reply of its own, once
    /// REPLY_ACK is negotiated), `Some(x)` = the caller decides.
    pub need_reply: Option<bool>,
    /// Refuse requests whose feature is not negotiated (the hazmat layer turns this off).
    pub check_gate: bool,
    /// Overall deadline of send + reply.
    pub deadline: Deadline,
    /// Length of the waiting slices between which `interrupt` is called.
    pub slice: Duration,
}

impl Default for RequestOptions {
    fn default() -> Self {
        RequestOptions {
            need_reply: None,
            check_gate: true,
            deadline: Deadline::after(Some(Duration::from_secs(5))),
            slice: Duration::from_millis(100),
        }
    }
}

/// A connection to a back-end, as its front-end.
#[derive(Debug)]
pub struct Frontend {
    conn: Connection,
    io: Mutex<()>,
    state: Mutex<Negotiated>,
    /// Set when a wait was abandoned mid-request: the next reply could belong to it.
    out_of_step: AtomicBool,
}

/// The `log` target of the front-end's request trace (in Python, the logger
/// `vhostuser_rs.trace.frontend`, a child of the back-end's `vhostuser_rs.trace`, so that enabling
/// `vhostuser_rs.trace` shows both roles): every request sent and every reply received, decoded.
/// Back-end requests received on the back-end request channel are not traced (yet): under
/// pyo3-log a record on that thread takes the GIL on first use, one more wait on a thread whose
/// exit `close()` synchronises with.
pub const TRACE: &str = "vhostuser_rs::trace::frontend";

impl Frontend {
    /// A front-end over a connected main channel.
    pub fn new(conn: Connection) -> Frontend {
        Frontend {
            conn,
            io: Mutex::new(()),
            state: Mutex::new(Negotiated::default()),
            out_of_step: AtomicBool::new(false),
        }
    }

    /// The main channel.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// What was negotiated so far.
    pub fn negotiated(&self) -> Negotiated {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `request` with `payload` and `fds`, then waits for its reply (if it has one) or its
    /// ack (if NEED_REPLY was set). A non-zero ack is [`Error::Rejected`]. `interrupt` is called
    /// between waiting slices; an error from it abandons the wait (and marks the connection out
    /// of step: later requests fail until reconnect).
    pub fn request(
        &self,
        request: FrontendRequest,
        payload: Payload,
        fds: &[BorrowedFd<'_>],
        opts: RequestOptions,
        interrupt: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Received>> {
        if self.out_of_step.load(Ordering::Acquire) {
            return Err(Error::InvalidState {
                request: request.into(),
                state: "an earlier request was abandoned; the connection is out of step (reconnect)",
            });
        }
        let negotiated = self.negotiated();
        let reply_ack = negotiated.protocol().contains(ProtocolFeatures::REPLY_ACK);
        if opts.check_gate {
            negotiated.check_gate(request)?;
            self.check_values(&negotiated, request, &payload)?;
            if opts.need_reply == Some(true) && !reply_ack {
                return Err(Error::NotNegotiated { request: request.into(), feature: "REPLY_ACK".into() });
            }
        }
        let rules = request.rules();
        let mandatory = match rules.reply {
            ReplyRule::Always(..) => true,
            ReplyRule::IfLogShmfd(_) => negotiated.protocol().contains(ProtocolFeatures::LOG_SHMFD),
            _ => false,
        };
        // QEMU always sets NEED_REPLY on these (their reply is ack-shaped).
        let forced = matches!(
            request,
            FrontendRequest::IOTLB_MSG | FrontendRequest::POSTCOPY_LISTEN | FrontendRequest::POSTCOPY_END
        );
        let need_reply = forced || opts.need_reply.unwrap_or(reply_ack && !mandatory);
        let mut message = Message::request(request, payload);
        if need_reply {
            message = message.with_need_reply();
        }
        let _io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        self.conn.send(&message, fds, opts.deadline)?;
        log::debug!(target: TRACE, "{} {:?} ({} fds){}", request, message.payload, fds.len(),
            if need_reply { " NEED_REPLY" } else { "" });
        let reply = if mandatory || need_reply { Some(self.await_reply(request, opts, interrupt)?) } else { None };
        if let Some(r) = &reply {
            log::debug!(target: TRACE, "{} reply {:?} ({} fds)", request, r.message.payload, r.fds.len());
        }
        if let Some(r) = &reply {
            if !mandatory {
                if let Payload::U64(status) = r.message.payload {
                    if status != 0 {
                        return Err(Error::Rejected { request: request.into(), status });
                    }
                }
            }
        }
        self.remember(request, &message.payload, reply.as_ref());
        Ok(reply)
    }

    fn await_reply(
        &self,
        request: FrontendRequest,
        opts: RequestOptions,
        interrupt: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Received> {
        loop {
            let slice = opts.deadline.remaining().map(|r| r.min(opts.slice)).unwrap_or(opts.slice);
            if self.conn.readable(Some(slice))? {
                break;
            }
            if let Err(e) = interrupt() {
                self.out_of_step.store(true, Ordering::Release);
                return Err(e);
            }
            if opts.deadline.expired() {
                self.out_of_step.store(true, Ordering::Release);
                return Err(Error::Timeout("waiting for the back-end's reply"));
            }
        }
        let raw = self.conn.recv_raw(opts.deadline, crate::protocol::MAX_PAYLOAD_SIZE);
        let raw = raw.inspect_err(|e| {
            if !matches!(e, Error::Disconnected) {
                self.out_of_step.store(true, Ordering::Release);
            }
        })?;
        raw.into_reply(Channel::Main, Request::Frontend(request)).inspect_err(|e| {
            if matches!(e, Error::Protocol(ProtocolError::Direction { .. } | ProtocolError::UnexpectedReply { .. })) {
                self.out_of_step.store(true, Ordering::Release);
            }
        })
    }

    /// Value rules the front-end enforces on itself: only acknowledge what was offered.
    fn check_values(&self, n: &Negotiated, request: FrontendRequest, payload: &Payload) -> Result<()> {
        let subset = |value: u64, offered: Option<u64>, what: &'static str| -> Result<()> {
            match offered {
                None => Err(Error::InvalidState { request: request.into(), state: what }),
                Some(o) if value & !o != 0 => Err(Error::NotNegotiated {
                    request: request.into(),
                    feature: format!("{:#x} (bits the back-end did not offer)", value & !o),
                }),
                Some(_) => Ok(()),
            }
        };
        match (request, payload) {
            (FrontendRequest::SET_FEATURES, Payload::U64(v)) => {
                subset(*v, n.offered_features, "GET_FEATURES was not sent yet")
            }
            (FrontendRequest::SET_PROTOCOL_FEATURES, Payload::U64(v)) => {
                subset(*v, n.offered_protocol, "GET_PROTOCOL_FEATURES was not sent yet")?;
                if let Some((bit, needs)) = ProtocolFeatures(*v).missing_dependency() {
                    return Err(Error::NotNegotiated {
                        request: request.into(),
                        feature: format!("{} (needed by {})", needs.names().join("|"), bit.names().join("|")),
                    });
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn remember(&self, request: FrontendRequest, sent: &Payload, reply: Option<&Received>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let answer = match reply.map(|r| &r.message.payload) {
            Some(Payload::U64(v)) => Some(*v),
            _ => None,
        };
        match (request, sent) {
            (FrontendRequest::GET_FEATURES, _) => st.offered_features = answer,
            (FrontendRequest::GET_PROTOCOL_FEATURES, _) => st.offered_protocol = answer,
            (FrontendRequest::SET_FEATURES, Payload::U64(v)) => st.acked_features = Some(*v),
            (FrontendRequest::SET_PROTOCOL_FEATURES, Payload::U64(v)) => st.acked_protocol = *v,
            _ => {}
        }
    }

    /// Whether the back-end hung up: the main channel reads end-of-file (or is in error). Looks
    /// without waiting and consumes nothing; an unread message waiting there is not a hang-up.
    pub fn peer_closed(&self) -> bool {
        use std::os::fd::AsRawFd;
        let fd = self.conn.as_raw_fd();
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call; no waiting.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n <= 0 {
            return false;
        }
        if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL | libc::POLLRDHUP) != 0 {
            return true;
        }
        let mut byte = 0u8;
        // SAFETY: peeks one byte into a local; MSG_DONTWAIT never blocks.
        let got = unsafe { libc::recv(fd, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        got == 0
    }

    /// Wakes any blocked request (it fails with a disconnect) and closes the channel for I/O.
    pub fn shutdown(&self) {
        self.conn.shutdown();
    }
}
