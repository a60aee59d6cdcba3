//! One front-end session served one readable event at a time, so that a blocking loop
//! ([`serve_session`](super::serve_session)) and an event loop (`Backend.serve_async`, which
//! watches the socket with `loop.add_reader`) run the same per-message code.
//!
//! [`ServedSession::handle_ready`] never waits for a message: it handles the whole messages that
//! have arrived and keeps a partial one for the next call. Handling a message can still take a
//! bounded time: GET_VRING_BASE waits for the ring's worker to finish its current batch (and a
//! device's `ring_stopping`, e.g. its I/O in flight), CHECK_DEVICE_STATE for a state transfer
//! (at most 5 s), and a reply waits for room in the socket (at most 5 s).

use std::sync::Arc;
use std::time::Duration;

use super::requests::BackendRequests;
use super::session::{Session, TRACE};
use super::worker::WorkerPolicy;
use super::Device;
use crate::connection::{Connection, Deadline, PartialMessage};
use crate::error::{Error, Result};
use crate::protocol::Channel;

/// Messages handled per [`ServedSession::handle_ready`] call at most, so that a front-end
/// flooding the socket cannot keep an event loop from its other work.
const BURST: usize = 64;

/// How long a reply may wait for room in the socket.
const REPLY_DEADLINE: Duration = Duration::from_secs(5);

/// A session of `device` with one front-end, stepped by its caller.
pub struct ServedSession {
    session: Option<Session>,
    device: Arc<dyn Device>,
    requests: Arc<BackendRequests>,
    partial: PartialMessage,
}

impl ServedSession {
    /// A new session; the device sends back-end requests through `requests` while it lasts.
    pub fn new(device: Arc<dyn Device>, requests: Arc<BackendRequests>, policy: WorkerPolicy) -> ServedSession {
        super::session::install_trace_logger();
        let session = Session::with_options(device.clone(), requests.clone(), policy);
        ServedSession { session: Some(session), device, requests, partial: PartialMessage::default() }
    }

    /// Handles the messages that have arrived on `conn` (up to a burst), without waiting for
    /// more. `Ok(true)` while the session goes on; `Ok(false)` once the front-end hung up (the
    /// session is then over: [`finish`](Self::finish) was called). An error (a message that
    /// breaks the spec, a refusal the spec answers by closing) also ends it.
    pub fn handle_ready(&mut self, conn: &Connection) -> Result<bool> {
        let outcome = self.handle_burst(conn);
        if !matches!(outcome, Ok(true)) {
            self.finish();
        }
        outcome
    }

    fn handle_burst(&mut self, conn: &Connection) -> Result<bool> {
        let Some(session) = self.session.as_mut() else {
            return Ok(false);
        };
        for _ in 0..BURST {
            let received = match conn.try_recv(&mut self.partial, Channel::Main) {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(true),
                Err(Error::Disconnected) => return Ok(false),
                Err(e) => return Err(e),
            };
            let m = &received.message;
            log::debug!(target: TRACE, "{} {:?} ({} fds)", m.request, m.payload, received.fds.len());
            if let Some((reply, fds)) = session.handle(&received.message, received.fds)? {
                let borrowed: Vec<_> = fds.iter().map(std::os::fd::AsFd::as_fd).collect();
                conn.send(&reply, &borrowed, Deadline::after(Some(REPLY_DEADLINE)))?;
            }
        }
        Ok(true)
    }

    /// Whether the session is over.
    pub fn is_finished(&self) -> bool {
        self.session.is_none()
    }

    /// Ends the session: closes the back-end request channel first (a worker waiting for an
    /// answer on it, an IOTLB miss, wakes at once instead of holding up the end), stops every
    /// ring (their workers finish their current batch), resets the device. Idempotent.
    pub fn finish(&mut self) {
        if let Some(session) = self.session.take() {
            self.requests.detach();
            drop(session);
            self.device.reset();
        }
    }
}

impl Drop for ServedSession {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FrontendRequest, Message, Payload};
    use crate::virtqueue::{AnyDeviceQueue, ChainBatch, VirtqueueError};

    struct Null;
    impl Device for Null {
        fn num_queues(&self) -> u16 {
            1
        }
        fn features(&self) -> u64 {
            1 << 32
        }
        fn process(&self, _: u16, _: &mut AnyDeviceQueue, _: &ChainBatch) -> std::result::Result<(), VirtqueueError> {
            Ok(())
        }
    }

    #[test]
    fn a_step_handles_what_arrived_and_keeps_a_partial_message() {
        let (ours, theirs) = Connection::pair().unwrap();
        let mut served = ServedSession::new(Arc::new(Null), Arc::new(BackendRequests::new()), WorkerPolicy::default());
        assert!(served.handle_ready(&ours).unwrap(), "nothing arrived: the session goes on");
        let bytes = Message::request(FrontendRequest::GET_FEATURES, Payload::Empty).encode();
        theirs.send_bytes(&bytes[..5], &[], Deadline::never()).unwrap();
        assert!(served.handle_ready(&ours).unwrap());
        assert!(!theirs.readable(Some(Duration::from_millis(10))).unwrap(), "no reply to half a message");
        // The rest, and two more whole messages in the same event.
        let mut more = bytes[5..].to_vec();
        more.extend(Message::request(FrontendRequest::GET_PROTOCOL_FEATURES, Payload::Empty).encode());
        more.extend(Message::request(FrontendRequest::GET_FEATURES, Payload::Empty).encode());
        theirs.send_bytes(&more, &[], Deadline::never()).unwrap();
        assert!(served.handle_ready(&ours).unwrap());
        let deadline = Deadline::after(Some(Duration::from_secs(5)));
        for expected in
            [FrontendRequest::GET_FEATURES, FrontendRequest::GET_PROTOCOL_FEATURES, FrontendRequest::GET_FEATURES]
        {
            let reply = theirs.recv(Channel::Main, deadline).unwrap();
            assert_eq!(reply.message.request, expected.into());
        }
        drop(theirs);
        assert!(!served.handle_ready(&ours).unwrap(), "a hang-up ends the session");
        assert!(served.is_finished());
        assert!(!served.handle_ready(&ours).unwrap());
    }

    #[test]
    fn a_message_that_breaks_the_spec_ends_the_session_with_an_error() {
        let (ours, theirs) = Connection::pair().unwrap();
        let mut served = ServedSession::new(Arc::new(Null), Arc::new(BackendRequests::new()), WorkerPolicy::default());
        let header =
            crate::protocol::Header { code: 1, flags: 1, size: (crate::protocol::MAX_PAYLOAD_SIZE + 1) as u32 };
        theirs.send_bytes(&header.to_bytes(), &[], Deadline::never()).unwrap();
        assert!(served.handle_ready(&ours).is_err());
        assert!(served.is_finished());
    }
}
