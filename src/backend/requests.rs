//! The back-end's end of the back-end request channel (SET_BACKEND_REQ_FD): what a device sends
//! to the front-end on its own initiative (CONFIG_CHANGE_MSG, IOTLB_MSG misses, in-band
//! VRING_CALL...). One request at a time; the handle outlives sessions and is empty between them.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::connection::{Connection, Deadline};
use crate::error::{Error, Result};
use crate::protocol::{BackendRequest, Channel, Message, Payload, ProtocolError, ProtocolFeatures, Request};

#[derive(Debug, Clone)]
struct Open {
    conn: Arc<Connection>,
    protocol: ProtocolFeatures,
}

/// Sends back-end requests on the current session's channel, if the front-end set one up.
#[derive(Debug, Default)]
pub struct BackendRequests {
    open: Mutex<Option<Open>>,
    /// One request and its answer at a time; separate from `open` so that `detach` can shut the
    /// channel down (waking a sender that waits for an answer) without waiting for it.
    io: Mutex<()>,
}

impl BackendRequests {
    /// An empty handle (no session yet).
    pub fn new() -> BackendRequests {
        BackendRequests::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Open>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session received SET_BACKEND_REQ_FD (replaces an earlier channel).
    pub(crate) fn attach(&self, conn: Connection, protocol: ProtocolFeatures) {
        if let Some(old) = self.lock().replace(Open { conn: Arc::new(conn), protocol }) {
            old.conn.shutdown();
        }
    }

    /// The session ended: later requests fail instead of going to a dead peer.
    pub(crate) fn detach(&self) {
        if let Some(open) = self.lock().take() {
            open.conn.shutdown();
        }
    }

    /// Whether a channel is set up now.
    pub fn is_open(&self) -> bool {
        self.lock().is_some()
    }

    /// Sends `request` with `payload` and `fds`. With `need_reply` (which needs REPLY_ACK) the
    /// front-end's status is awaited for up to `timeout` and returned (0 = success). Requests
    /// whose spec gate was not negotiated are refused before anything is sent.
    pub fn send(
        &self,
        request: BackendRequest,
        payload: Payload,
        fds: &[BorrowedFd<'_>],
        need_reply: bool,
        timeout: Option<Duration>,
    ) -> Result<Option<u64>> {
        let Some(open) = self.lock().clone() else {
            return Err(Error::InvalidState {
                request: request.into(),
                state: "the front-end set up no back-end request channel (SET_BACKEND_REQ_FD)",
            });
        };
        let missing = match request.rules().gate {
            crate::protocol::Gate::Protocol(p) | crate::protocol::Gate::Both(p, _) => p.0 & !open.protocol.0,
            _ => 0,
        } | if need_reply { ProtocolFeatures::REPLY_ACK.0 & !open.protocol.0 } else { 0 };
        if missing != 0 {
            return Err(Error::NotNegotiated {
                request: request.into(),
                feature: ProtocolFeatures(missing).names().join("|"),
            });
        }
        let mut message = Message::request(request, payload);
        if need_reply {
            message = message.with_need_reply();
        }
        let deadline = Deadline::after(timeout);
        let _io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        open.conn.send(&message, fds, deadline)?;
        if !need_reply {
            return Ok(None);
        }
        if !open.conn.readable(deadline.remaining())? {
            return Err(Error::Timeout("waiting for the front-end's answer on the back-end request channel"));
        }
        let raw = open.conn.recv_raw(deadline, crate::protocol::MAX_PAYLOAD_SIZE)?;
        let expected = Request::Backend(request);
        let got = raw.header.request(Channel::Backend);
        if !raw.header.is_reply() {
            return Err(ProtocolError::Direction {
                request: expected,
                reason: "the front-end sent a request, not a reply",
            }
            .into());
        }
        if got != expected {
            return Err(ProtocolError::UnexpectedReply { request: expected, got }.into());
        }
        raw.header.validate(Channel::Backend)?;
        match crate::protocol::decode_body(Channel::Backend, raw.header, &raw.payload, raw.fds.len())?.payload {
            Payload::U64(status) => Ok(Some(status)),
            _ => Err(ProtocolError::Direction { request: expected, reason: "the answer is not a u64 status" }.into()),
        }
    }
}
