//! One request and its reply on the main channel as a state machine, so that a blocking caller
//! and an event loop drive the same code: [`Frontend::exchange`] prepares a request,
//! [`Frontend::step`] moves it on without ever waiting (send when the channel is free, read
//! whatever has arrived of the reply, check it), and the caller waits between steps in its own
//! way — [`Frontend::wait`] polls the socket with a timeout, `vhostuser_rs.aio` watches it with
//! `loop.add_reader`.
//!
//! The protocol has no request tags, so one exchange at a time owns the channel (the *line*):
//! the others wait for their turn before sending. An exchange whose owner goes away after
//! sending it (an `asyncio` cancellation, Ctrl-C) becomes an orphan: the next exchange first
//! reads its reply and discards it, recording its effect on the negotiated state, so the stream
//! stays in step. A reply that does not come before its deadline leaves the stream out of step
//! for good: a late reply could be taken for the next request's, so later requests are refused.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::Frontend;
use crate::connection::{Deadline, PartialMessage, Received};
use crate::error::{Error, Result};
use crate::protocol::{
    Channel, FrontendRequest, Message, Payload, ProtocolError, ProtocolFeatures, ReplyRule, Request, MAX_PAYLOAD_SIZE,
};

/// Options of one request.
#[derive(Clone, Copy, Debug)]
pub struct RequestOptions {
    /// Set NEED_REPLY: `None` = policy (every request without a reply of its own, once
    /// REPLY_ACK is negotiated), `Some(x)` = the caller decides.
    pub need_reply: Option<bool>,
    /// Refuse requests whose feature is not negotiated (the hazmat layer turns this off).
    pub check_gate: bool,
    /// Overall deadline of waiting for the turn, sending and the reply.
    pub deadline: Deadline,
    /// Length of the waiting slices between which `interrupt` is called ([`Frontend::wait`]).
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

/// Who holds the main channel, and what has arrived of the reply it waits for.
#[derive(Debug, Default)]
pub(super) struct Line {
    awaiting: Option<Awaiting>,
    partial: PartialMessage,
    next_id: u64,
}

/// The exchange whose reply is due.
#[derive(Debug)]
struct Awaiting {
    id: u64,
    sent: Sent,
    /// Cleared when the [`Exchange`] is dropped: its reply is then read and discarded.
    owner: Arc<AtomicBool>,
}

/// What the reply of a sent request is checked and remembered against.
#[derive(Clone, Copy, Debug)]
struct Sent {
    request: FrontendRequest,
    /// The reply is the request's own (not an ack): never read as a status.
    mandatory: bool,
    /// The value sent, for the requests whose value the front-end remembers.
    value: Option<u64>,
    deadline: Deadline,
}

#[derive(Debug)]
enum State {
    /// Not sent: waiting for the line.
    Queued { payload: Payload, fds: Vec<OwnedFd> },
    /// Sent; the reply is due.
    Awaiting,
    /// Over (the result was handed out).
    Done,
}

/// One request on its way: prepared, sent, or answered. Dropping it after it was sent makes
/// its reply an orphan that the next exchange reads and discards.
#[derive(Debug)]
pub struct Exchange {
    id: u64,
    request: FrontendRequest,
    opts: RequestOptions,
    state: State,
    owner: Arc<AtomicBool>,
}

impl Exchange {
    /// The request.
    pub fn request(&self) -> FrontendRequest {
        self.request
    }

    /// The exchange's deadline.
    pub fn deadline(&self) -> Deadline {
        self.opts.deadline
    }

    /// Whether the result was handed out.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.owner.store(false, Ordering::Release);
    }
}

/// What an exchange needs before it can go on.
#[derive(Debug)]
pub enum Step {
    /// Finished: the reply (or `None` for a request that is not answered).
    Done(Option<Received>),
    /// Step again once the main channel is readable (a reply, ours or an orphan's, is due).
    Readable,
    /// Another exchange (of another thread or task) holds the line: step again later.
    Turn,
}

impl Frontend {
    /// Prepares `request` without sending it: the checks against the negotiated state are made
    /// when it is sent (its turn may come after requests that change that state). `fds` are
    /// duplicated, so the caller may close its own at once.
    pub fn exchange(
        &self,
        request: FrontendRequest,
        payload: Payload,
        fds: &[BorrowedFd<'_>],
        opts: RequestOptions,
    ) -> Result<Exchange> {
        let fds = fds.iter().map(|f| f.try_clone_to_owned()).collect::<std::io::Result<Vec<_>>>()?;
        let id = {
            let mut line = self.lock_line();
            line.next_id += 1;
            line.next_id
        };
        Ok(Exchange {
            id,
            request,
            opts,
            state: State::Queued { payload, fds },
            owner: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Moves `ex` on without waiting: reads (and discards) an orphan's reply, sends `ex` when the
    /// line is free, reads what has arrived of its reply and checks it. A non-zero ack is
    /// [`Error::Rejected`]; a reply missing at the deadline is [`Error::Timeout`] and leaves
    /// the connection out of step.
    pub fn step(&self, ex: &mut Exchange) -> Result<Step> {
        let mut line = self.lock_line();
        // Over unless put back: an error ends the exchange.
        match std::mem::replace(&mut ex.state, State::Done) {
            State::Done => {
                return Err(Error::InvalidState { request: ex.request.into(), state: "the exchange is over" })
            }
            State::Awaiting => ex.state = State::Awaiting,
            State::Queued { payload, fds } => {
                if let Some(wait) = self.free_line(&mut line, ex.opts.deadline)? {
                    ex.state = State::Queued { payload, fds };
                    return Ok(wait);
                }
                let Some(sent) = self.send(ex.request, payload, &fds, ex.opts)? else {
                    return Ok(Step::Done(None));
                };
                drop(fds);
                line.awaiting = Some(Awaiting { id: ex.id, sent, owner: ex.owner.clone() });
                ex.state = State::Awaiting;
            }
        }
        let sent = match &line.awaiting {
            Some(a) if a.id == ex.id => a.sent,
            _ => {
                ex.state = State::Done;
                return Err(Error::InvalidState { request: ex.request.into(), state: "the exchange was abandoned" });
            }
        };
        let outcome = match self.read_reply(&mut line, sent) {
            Ok(None) if sent.deadline.expired() => {
                self.out_of_step.store(true, Ordering::Release);
                Err(Error::Timeout("waiting for the back-end's reply"))
            }
            Ok(None) => return Ok(Step::Readable),
            Ok(Some(received)) => self.conclude(sent, &received).map(|()| Step::Done(Some(received))),
            Err(e) => Err(e),
        };
        line.awaiting = None;
        self.turn.notify_all();
        ex.state = State::Done;
        outcome
    }

    /// Whether the line is free for a new exchange: `None` once it is (an orphan's reply read
    /// and discarded first), else what to wait for. An orphan whose reply does not come in
    /// time leaves the stream out of step.
    fn free_line(&self, line: &mut Line, deadline: Deadline) -> Result<Option<Step>> {
        let Some(a) = &line.awaiting else {
            return Ok(None);
        };
        if a.owner.load(Ordering::Acquire) {
            if deadline.expired() {
                return Err(Error::Timeout("waiting for another request on the main channel to finish"));
            }
            return Ok(Some(Step::Turn));
        }
        let orphan = a.sent;
        match self.read_reply(line, orphan) {
            Ok(None) if orphan.deadline.expired() || deadline.expired() => {
                line.awaiting = None;
                self.out_of_step.store(true, Ordering::Release);
                Err(Error::Timeout("waiting for the reply of an abandoned request"))
            }
            Ok(None) => Ok(Some(Step::Readable)),
            Ok(Some(received)) => {
                line.awaiting = None;
                self.turn.notify_all();
                if let Err(e) = self.conclude(orphan, &received) {
                    log::info!(target: "vhostuser_rs::frontend", "abandoned request: {e}");
                }
                Ok(None)
            }
            Err(e) => {
                line.awaiting = None;
                self.turn.notify_all();
                Err(e)
            }
        }
    }

    /// Steps `ex` to its end, waiting in between on the main channel (or for the line) in
    /// slices of `opts.slice`; `interrupt` is called between slices and an error from it
    /// abandons the exchange (an orphan if it was sent).
    pub fn wait(&self, ex: &mut Exchange, interrupt: &mut dyn FnMut() -> Result<()>) -> Result<Option<Received>> {
        loop {
            let slice = ex.opts.deadline.remaining().map(|r| r.min(ex.opts.slice)).unwrap_or(ex.opts.slice);
            match self.step(ex)? {
                Step::Done(reply) => return Ok(reply),
                Step::Readable => {
                    if self.conn.readable(Some(slice))? {
                        continue;
                    }
                }
                Step::Turn => {
                    let line = self.lock_line();
                    // Unless the line was freed between the step and now (its notification is gone).
                    if line.awaiting.as_ref().is_some_and(|a| a.owner.load(Ordering::Acquire)) {
                        let _ = self.turn.wait_timeout(line, slice).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
            interrupt()?;
        }
    }

    /// Sends `request` with `payload` and `fds`, then waits for its reply (if it has one) or its
    /// ack (if NEED_REPLY was set): [`exchange`](Self::exchange) + [`wait`](Self::wait).
    pub fn request(
        &self,
        request: FrontendRequest,
        payload: Payload,
        fds: &[BorrowedFd<'_>],
        opts: RequestOptions,
        interrupt: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Received>> {
        let mut ex = self.exchange(request, payload, fds, opts)?;
        self.wait(&mut ex, interrupt)
    }

    fn lock_line(&self) -> std::sync::MutexGuard<'_, Line> {
        self.line.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks and sends; returns what the reply will be checked against, or `None` when no
    /// reply is due (the request's effect is then recorded at once).
    fn send(
        &self,
        request: FrontendRequest,
        payload: Payload,
        fds: &[OwnedFd],
        opts: RequestOptions,
    ) -> Result<Option<Sent>> {
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
        let mandatory = match request.rules().reply {
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
        let value = match payload {
            Payload::U64(v) => Some(v),
            _ => None,
        };
        let mut message = Message::request(request, payload);
        if need_reply {
            message = message.with_need_reply();
        }
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
        self.conn.send(&message, &borrowed, opts.deadline)?;
        log::debug!(target: super::TRACE, "{} {:?} ({} fds){}", request, message.payload, borrowed.len(),
            if need_reply { " NEED_REPLY" } else { "" });
        let sent = Sent { request, mandatory, value, deadline: opts.deadline };
        if mandatory || need_reply {
            Ok(Some(sent))
        } else {
            self.remember(sent, None);
            Ok(None)
        }
    }

    /// Reads what has arrived; the complete reply once it is there, checked for direction and
    /// request before decoding (after a mismatch the stream is out of step).
    fn read_reply(&self, line: &mut Line, sent: Sent) -> Result<Option<Received>> {
        let raw = match self.conn.recv_some(&mut line.partial, MAX_PAYLOAD_SIZE) {
            Ok(Some(raw)) => raw,
            Ok(None) => return Ok(None),
            Err(e) => {
                if !matches!(e, Error::Disconnected) {
                    self.out_of_step.store(true, Ordering::Release);
                }
                return Err(e);
            }
        };
        raw.into_reply(Channel::Main, Request::Frontend(sent.request))
            .inspect_err(|e| {
                if matches!(e, Error::Protocol(ProtocolError::Direction { .. } | ProtocolError::UnexpectedReply { .. }))
                {
                    self.out_of_step.store(true, Ordering::Release);
                }
            })
            .map(Some)
    }

    /// An ack's status, then what the exchange taught about the negotiated state.
    fn conclude(&self, sent: Sent, reply: &Received) -> Result<()> {
        log::debug!(target: super::TRACE, "{} reply {:?} ({} fds)", sent.request, reply.message.payload, reply.fds.len());
        if !sent.mandatory {
            if let Payload::U64(status) = reply.message.payload {
                if status != 0 {
                    return Err(Error::Rejected { request: sent.request.into(), status });
                }
            }
        }
        self.remember(sent, Some(reply));
        Ok(())
    }

    fn remember(&self, sent: Sent, reply: Option<&Received>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let answer = match reply.map(|r| &r.message.payload) {
            Some(Payload::U64(v)) => Some(*v),
            _ => None,
        };
        match (sent.request, sent.value) {
            (FrontendRequest::GET_FEATURES, _) => st.offered_features = answer,
            (FrontendRequest::GET_PROTOCOL_FEATURES, _) => st.offered_protocol = answer,
            (FrontendRequest::SET_FEATURES, Some(v)) => st.acked_features = Some(v),
            (FrontendRequest::SET_PROTOCOL_FEATURES, Some(v)) => st.acked_protocol = v,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::Connection;

    fn pair() -> (Frontend, Connection) {
        let (a, b) = Connection::pair().unwrap();
        (Frontend::new(a), b)
    }

    fn opts(ms: u64) -> RequestOptions {
        RequestOptions { deadline: Deadline::after(Some(Duration::from_millis(ms))), ..RequestOptions::default() }
    }

    fn reply(back: &Connection, request: FrontendRequest, value: u64) {
        back.send(&Message::reply(request, Payload::U64(value)), &[], Deadline::never()).unwrap();
    }

    #[test]
    fn one_exchange_stepped_without_waiting() {
        let (fe, back) = pair();
        let mut ex = fe.exchange(FrontendRequest::GET_FEATURES, Payload::Empty, &[], opts(5000)).unwrap();
        assert!(matches!(fe.step(&mut ex).unwrap(), Step::Readable));
        let got = back.recv(Channel::Main, Deadline::never()).unwrap();
        assert_eq!(got.message.request, FrontendRequest::GET_FEATURES.into());
        // Half a reply: still readable-pending, nothing lost.
        let bytes = Message::reply(FrontendRequest::GET_FEATURES, Payload::U64(7)).encode();
        back.send_bytes(&bytes[..7], &[], Deadline::never()).unwrap();
        assert!(matches!(fe.step(&mut ex).unwrap(), Step::Readable));
        back.send_bytes(&bytes[7..], &[], Deadline::never()).unwrap();
        let Step::Done(Some(r)) = fe.step(&mut ex).unwrap() else { panic!() };
        assert_eq!(r.message.payload, Payload::U64(7));
        assert_eq!(fe.negotiated().offered_features, Some(7));
        assert!(fe.step(&mut ex).is_err(), "an exchange is over once its result was handed out");
    }

    #[test]
    fn the_second_exchange_waits_for_its_turn() {
        let (fe, back) = pair();
        let mut first = fe.exchange(FrontendRequest::GET_FEATURES, Payload::Empty, &[], opts(5000)).unwrap();
        let mut second = fe.exchange(FrontendRequest::GET_QUEUE_NUM, Payload::Empty, &[], opts(5000)).unwrap();
        let mut second_opts = opts(5000);
        second_opts.check_gate = false;
        second.opts = second_opts;
        assert!(matches!(fe.step(&mut first).unwrap(), Step::Readable));
        assert!(matches!(fe.step(&mut second).unwrap(), Step::Turn));
        back.recv(Channel::Main, Deadline::never()).unwrap();
        assert!(!back.readable(Some(Duration::from_millis(10))).unwrap(), "the second was not sent");
        reply(&back, FrontendRequest::GET_FEATURES, 1);
        assert!(matches!(fe.step(&mut first).unwrap(), Step::Done(Some(_))));
        assert!(matches!(fe.step(&mut second).unwrap(), Step::Readable));
        let got = back.recv(Channel::Main, Deadline::never()).unwrap();
        assert_eq!(got.message.request, FrontendRequest::GET_QUEUE_NUM.into());
    }

    #[test]
    fn an_abandoned_reply_is_read_and_discarded_by_the_next_exchange() {
        let (fe, back) = pair();
        let mut first = fe.exchange(FrontendRequest::GET_FEATURES, Payload::Empty, &[], opts(5000)).unwrap();
        assert!(matches!(fe.step(&mut first).unwrap(), Step::Readable));
        drop(first);
        let mut next = fe.exchange(FrontendRequest::GET_FEATURES, Payload::Empty, &[], opts(5000)).unwrap();
        assert!(matches!(fe.step(&mut next).unwrap(), Step::Readable), "the orphan's reply is due first");
        back.recv(Channel::Main, Deadline::never()).unwrap();
        reply(&back, FrontendRequest::GET_FEATURES, 3);
        // The orphan's reply is consumed (and remembered), then ours is sent.
        assert!(matches!(fe.step(&mut next).unwrap(), Step::Readable));
        assert_eq!(fe.negotiated().offered_features, Some(3));
        back.recv(Channel::Main, Deadline::never()).unwrap();
        reply(&back, FrontendRequest::GET_FEATURES, 4);
        let Step::Done(Some(r)) = fe.step(&mut next).unwrap() else { panic!() };
        assert_eq!(r.message.payload, Payload::U64(4));
    }

    #[test]
    fn a_missing_reply_times_out_and_leaves_the_stream_out_of_step() {
        let (fe, back) = pair();
        let err = fe.request(FrontendRequest::GET_FEATURES, Payload::Empty, &[], opts(30), &mut || Ok(())).unwrap_err();
        assert!(matches!(err, Error::Timeout(_)), "{err:?}");
        back.recv(Channel::Main, Deadline::never()).unwrap();
        let err = fe.request(FrontendRequest::GET_FEATURES, Payload::Empty, &[], opts(30), &mut || Ok(())).unwrap_err();
        assert!(matches!(err, Error::InvalidState { .. }), "{err:?}");
    }

    #[test]
    fn an_interrupted_wait_leaves_an_orphan_not_a_broken_stream() {
        let (fe, back) = pair();
        let err = fe
            .request(FrontendRequest::GET_FEATURES, Payload::Empty, &[], opts(5000), &mut || Err(Error::Disconnected))
            .unwrap_err();
        assert!(matches!(err, Error::Disconnected));
        back.recv(Channel::Main, Deadline::never()).unwrap();
        reply(&back, FrontendRequest::GET_FEATURES, 5);
        let t = std::thread::spawn(move || {
            back.recv(Channel::Main, Deadline::never()).unwrap();
            reply(&back, FrontendRequest::GET_FEATURES, 6);
            back
        });
        let r = fe.request(FrontendRequest::GET_FEATURES, Payload::Empty, &[], opts(5000), &mut || Ok(())).unwrap();
        assert_eq!(r.unwrap().message.payload, Payload::U64(6));
        drop(t.join().unwrap());
    }

    #[test]
    fn a_hang_up_mid_exchange_is_a_disconnect() {
        let (fe, back) = pair();
        let mut ex = fe.exchange(FrontendRequest::GET_FEATURES, Payload::Empty, &[], opts(5000)).unwrap();
        assert!(matches!(fe.step(&mut ex).unwrap(), Step::Readable));
        let bytes = Message::reply(FrontendRequest::GET_FEATURES, Payload::U64(7)).encode();
        back.send_bytes(&bytes[..5], &[], Deadline::never()).unwrap();
        drop(back);
        assert!(matches!(fe.step(&mut ex), Err(Error::Disconnected)));
    }
}
