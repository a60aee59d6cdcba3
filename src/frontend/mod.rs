//! The front-end role: send requests to a back-end, await their replies and acks, and remember
//! what was negotiated so a request whose feature is missing is refused before it is sent.
//!
//! One request is in flight at a time on the main channel (the protocol has no tags): each is an
//! [`Exchange`] that a blocking caller or an event loop steps to its end ([`exchange`]). The back-end request channel is served on its own thread
//! ([`channel`]), so an IOTLB miss arriving while a main-channel reply is awaited cannot deadlock.

pub mod blkio;
pub mod blkreq;
pub mod channel;
pub mod exchange;
pub mod latency;
/// Eventfd helpers, shared with the back-end (kept here under their old path).
pub use crate::eventfd;
pub mod netio;
pub mod poll;
pub mod shmem;

use std::sync::atomic::AtomicBool;
use std::sync::{Condvar, Mutex};

pub use exchange::{Exchange, RequestOptions, Step};

use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::protocol::{FrontendRequest, Negotiated, Payload, ProtocolFeatures};

/// A connection to a back-end, as its front-end.
#[derive(Debug)]
pub struct Frontend {
    conn: Connection,
    /// The exchange that holds the main channel ([`exchange`]); `turn` wakes those waiting.
    line: Mutex<exchange::Line>,
    turn: Condvar,
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
            line: Mutex::new(exchange::Line::default()),
            turn: Condvar::new(),
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
