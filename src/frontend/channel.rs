//! The back-end request channel, front-end side (the seed's "slave channel"): a socketpair whose
//! other end goes to the back-end with SET_BACKEND_REQ_FD, served by a thread that decodes each
//! request, hands it to a [`BackendRequestHandler`] and acks it when asked.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::connection::{Connection, Deadline, RawMessage};
use crate::error::{Error, Result};
use crate::protocol::{self, BackendRequest, Channel, Message, Payload, Request, MAX_PAYLOAD_SIZE};

/// Status sent back for a request the handler does not support (a failure, per the spec any
/// non-zero value; this is -ENOSYS as rust-vmm sends it).
pub const NOT_SUPPORTED: u64 = (-(libc::ENOSYS as i64)) as u64;
/// Status sent back for a malformed request (-EINVAL).
pub const MALFORMED: u64 = (-(libc::EINVAL as i64)) as u64;

/// What the front-end does with back-end requests.
pub trait BackendRequestHandler: Send + 'static {
    /// Handles one well-formed request. Returns the status of the ack (0 = success) and, for
    /// SHARED_OBJECT_LOOKUP, an optional fd to send with the reply. The received fds are owned by
    /// the handler.
    fn handle(&mut self, message: &Message, fds: Vec<OwnedFd>) -> (u64, Option<OwnedFd>);

    /// Called when a message breaks the spec (it is answered with a failure if it asked).
    fn malformed(&mut self, _error: &Error) {}
}

/// A running back-end request channel.
#[derive(Debug)]
pub struct BackendChannel {
    conn: Arc<Connection>,
    thread: Option<JoinHandle<()>>,
}

impl BackendChannel {
    /// Creates the socketpair and starts serving our end; returns the other end, to be sent with
    /// SET_BACKEND_REQ_FD (and closed here once sent).
    pub fn start(handler: Box<dyn BackendRequestHandler>) -> Result<(BackendChannel, OwnedFd)> {
        let (ours, theirs) = Connection::pair()?;
        let conn = Arc::new(ours);
        let served = conn.clone();
        let thread = std::thread::Builder::new()
            .name("vhostuser_rs back-end request channel (front-end side)".into())
            .spawn(move || serve(&served, handler))
            .map_err(Error::Io)?;
        Ok((BackendChannel { conn, thread: Some(thread) }, theirs.into_fd()))
    }

    /// Stops serving: shuts the socket down and waits for the thread — unless called from the
    /// serving thread itself (a handler closing its session), which then ends once its handler
    /// returns.
    pub fn stop(&mut self) {
        self.conn.shutdown();
        if let Some(t) = self.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }

    /// Whether the serving thread is still running.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for BackendChannel {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(conn: &Connection, mut handler: Box<dyn BackendRequestHandler>) {
    loop {
        let raw = match conn.recv_raw(Deadline::never(), MAX_PAYLOAD_SIZE) {
            Ok(raw) => raw,
            Err(Error::Disconnected) => return,
            Err(e) => {
                // Oversized payload or too many fds: the stream is out of step; stop serving.
                handler.malformed(&e);
                return;
            }
        };
        let RawMessage { header, payload, fds } = raw;
        let request = header.request(Channel::Backend);
        let decoded = header
            .validate(Channel::Backend)
            .and_then(|()| protocol::decode_body(Channel::Backend, header, &payload, fds.len()));
        let (status, reply_fd, must_reply) = match decoded {
            Ok(message) if message.is_reply() => {
                handler.malformed(&Error::Protocol(protocol::ProtocolError::Direction {
                    request,
                    reason: "the front-end does not expect replies on the back-end request channel",
                }));
                continue;
            }
            Ok(message) => {
                let must = message.need_reply() || request == Request::Backend(BackendRequest::SHARED_OBJECT_LOOKUP);
                if matches!(request, Request::Unknown(..)) {
                    drop(fds);
                    (NOT_SUPPORTED, None, must)
                } else {
                    let (status, fd) = handler.handle(&message, fds);
                    (status, fd, must)
                }
            }
            Err(e) => {
                drop(fds);
                handler.malformed(&Error::Protocol(e));
                (MALFORMED, None, header.need_reply() && !header.is_reply())
            }
        };
        if must_reply {
            let reply = Message::reply(request, Payload::U64(status));
            let fds: Vec<_> = reply_fd.iter().map(|f| f.as_fd()).collect();
            let deadline = Deadline::after(Some(std::time::Duration::from_secs(5)));
            if let Err(e) = conn.send(&reply, &fds, deadline) {
                // The back-end does not read its replies (or is gone): stop serving it.
                handler.malformed(&e);
                return;
            }
        }
    }
}
