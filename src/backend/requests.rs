//! The back-end's end of the back-end request channel (SET_BACKEND_REQ_FD): what a device sends
//! to the front-end on its own initiative (CONFIG_CHANGE_MSG, IOTLB_MSG misses, in-band
//! VRING_CALL...). One request at a time; the handle outlives sessions and is empty between them.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::connection::{Connection, Deadline};
use crate::error::{Error, Result};
use crate::protocol::{
    BackendRequest, Channel, IotlbMsg, Message, Negotiated, Payload, ProtocolError, ProtocolFeatures, Request,
};

/// Sends back-end requests on the current session's channel, if the front-end set one up.
#[derive(Debug, Default)]
pub struct BackendRequests {
    open: Mutex<Option<Arc<Connection>>>,
    /// What the session has acknowledged so far: the gates of back-end requests are checked
    /// against it as the front-end's requests are (`Negotiated::check_gate`).
    negotiated: Mutex<Negotiated>,
    /// One request and its answer at a time; separate from `open` so that `detach` can shut the
    /// channel down (waking a sender that waits for an answer) without waiting for it.
    io: Mutex<()>,
}

impl BackendRequests {
    /// An empty handle (no session yet).
    pub fn new() -> BackendRequests {
        BackendRequests::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Connection>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session received SET_BACKEND_REQ_FD (replaces an earlier channel).
    pub(crate) fn attach(&self, conn: Connection) {
        if let Some(old) = self.lock().replace(Arc::new(conn)) {
            old.shutdown();
        }
    }

    /// The session's acknowledged virtio and protocol features changed.
    pub(crate) fn negotiated(&self, acked_features: u64, acked_protocol: ProtocolFeatures) {
        *self.negotiated.lock().unwrap_or_else(|e| e.into_inner()) = Negotiated {
            offered_features: Some(acked_features),
            acked_features: Some(acked_features),
            offered_protocol: Some(acked_protocol.bits()),
            acked_protocol: acked_protocol.bits(),
        };
    }

    /// The session ended: later requests fail instead of going to a dead peer.
    pub(crate) fn detach(&self) {
        if let Some(conn) = self.lock().take() {
            conn.shutdown();
        }
        self.negotiated(0, ProtocolFeatures::empty());
    }

    /// The protocol features the session has acknowledged.
    pub fn acked_protocol(&self) -> ProtocolFeatures {
        ProtocolFeatures(self.negotiated.lock().unwrap_or_else(|e| e.into_inner()).acked_protocol)
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
        let Some(conn) = self.lock().clone() else {
            return Err(Error::InvalidState {
                request: request.into(),
                state: "the front-end set up no back-end request channel (SET_BACKEND_REQ_FD)",
            });
        };
        let negotiated = *self.negotiated.lock().unwrap_or_else(|e| e.into_inner());
        if need_reply && !ProtocolFeatures(negotiated.acked_protocol).contains(ProtocolFeatures::REPLY_ACK) {
            return Err(Error::NotNegotiated { request: request.into(), feature: "REPLY_ACK".into() });
        }
        negotiated.check_gate(request)?;
        let mut message = Message::request(request, payload);
        if need_reply {
            message = message.with_need_reply();
        }
        let deadline = Deadline::after(timeout);
        let _io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        conn.send(&message, fds, deadline)?;
        if !need_reply {
            return Ok(None);
        }
        let answer = Self::await_status(&conn, request, deadline);
        if answer.is_err() {
            // A missing or wrong answer leaves the stream out of step (a late answer would be
            // taken for the next request's): this channel is done, later requests fail clearly.
            let mut open = self.lock();
            if open.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                open.take();
            }
            conn.shutdown();
        }
        answer
    }

    fn await_status(conn: &Connection, request: BackendRequest, deadline: Deadline) -> Result<Option<u64>> {
        if !conn.readable(deadline.remaining())? {
            return Err(Error::Timeout("waiting for the front-end's answer on the back-end request channel"));
        }
        let raw = conn.recv_raw(deadline, crate::protocol::MAX_PAYLOAD_SIZE)?;
        match raw.into_reply(Channel::Backend, Request::Backend(request))?.message.payload {
            Payload::U64(status) => Ok(Some(status)),
            _ => {
                Err(ProtocolError::Direction { request: request.into(), reason: "the answer is not a u64 status" }
                    .into())
            }
        }
    }

    /// Asks the front-end for the IOTLB entry of `iova` (an IOTLB_MSG MISS needing `perm`).
    /// With `need_reply` the front-end answers after it has sent the UPDATE.
    pub fn iotlb_miss(&self, iova: u64, perm: u8, need_reply: bool, timeout: Option<Duration>) -> Result<Option<u64>> {
        let miss = IotlbMsg { iova, size: 0, uaddr: 0, perm, kind: IotlbMsg::MISS };
        self.send(BackendRequest::IOTLB_MSG, Payload::Iotlb(miss), &[], need_reply, timeout)
    }
}

impl BackendRequests {
    /// Sends a request whose reply is mandatory whatever REPLY_ACK says (SHARED_OBJECT_LOOKUP)
    /// and returns the reply's u64 and fds. Gated like [`send`](Self::send); a missing or wrong
    /// reply closes the channel.
    pub fn request_with_reply(
        &self,
        request: BackendRequest,
        payload: Payload,
        timeout: Option<Duration>,
    ) -> Result<(u64, Vec<std::os::fd::OwnedFd>)> {
        let Some(conn) = self.lock().clone() else {
            return Err(Error::InvalidState {
                request: request.into(),
                state: "the front-end set up no back-end request channel (SET_BACKEND_REQ_FD)",
            });
        };
        let negotiated = *self.negotiated.lock().unwrap_or_else(|e| e.into_inner());
        negotiated.check_gate(request)?;
        let deadline = Deadline::after(timeout);
        let _io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        conn.send(&Message::request(request, payload), &[], deadline)?;
        let answer = (|| {
            if !conn.readable(deadline.remaining())? {
                return Err(Error::Timeout("waiting for the front-end's reply on the back-end request channel"));
            }
            let raw = conn.recv_raw(deadline, crate::protocol::MAX_PAYLOAD_SIZE)?;
            let received = raw.into_reply(Channel::Backend, Request::Backend(request))?;
            match received.message.payload {
                Payload::U64(status) => Ok((status, received.fds)),
                _ => Err(ProtocolError::Direction { request: request.into(), reason: "the reply is not a u64 status" }
                    .into()),
            }
        })();
        if answer.is_err() {
            let mut open = self.lock();
            if open.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                open.take();
            }
            conn.shutdown();
        }
        answer
    }
}
