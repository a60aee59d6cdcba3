//! What the proxy reports: one record per relayed (or dropped) message and per session event.

use std::time::{Duration, Instant, SystemTime};

use crate::protocol::{self, Channel, Header, Message, ProtocolError, Request};

/// Which peer a message came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The front-end (it connected to the proxy's socket).
    Frontend,
    /// The back-end (the proxy connected to its socket).
    Backend,
}

impl Side {
    /// `F>B` or `B>F`: from this side to the other.
    pub fn arrow(self) -> &'static str {
        match self {
            Side::Frontend => "F>B",
            Side::Backend => "B>F",
        }
    }

    /// The spec's name of the party.
    pub fn name(self) -> &'static str {
        match self {
            Side::Frontend => "front-end",
            Side::Backend => "back-end",
        }
    }
}

/// One message as the proxy received it, and what it did with it.
#[derive(Clone, Debug)]
pub struct Traced {
    /// The channel it travelled on.
    pub channel: Channel,
    /// Who sent it.
    pub from: Side,
    /// The header as received.
    pub header: Header,
    /// The payload as received (`header.size` bytes).
    pub payload: Vec<u8>,
    /// How many fds came with it.
    pub num_fds: usize,
    /// The message decoded by the wire layer, or why it does not decode. The proxy relays
    /// messages that do not decode unchanged: it traces peers, it does not police them.
    pub decoded: Result<Message, ProtocolError>,
    /// Not relayed (a `drop` rule).
    pub dropped: bool,
    /// The inject rules that fired on it, as written.
    pub injected: Vec<String>,
    /// SET_BACKEND_REQ_FD whose fd the proxy replaced by its own channel to the back-end.
    pub substituted: bool,
}

impl Traced {
    /// Builds the record of a received message, decoding it with the wire layer.
    pub fn new(channel: Channel, from: Side, header: Header, payload: &[u8], num_fds: usize) -> Traced {
        let decoded = header.validate(channel).and_then(|()| protocol::decode_body(channel, header, payload, num_fds));
        Traced {
            channel,
            from,
            header,
            payload: payload.to_vec(),
            num_fds,
            decoded,
            dropped: false,
            injected: Vec::new(),
            substituted: false,
        }
    }

    /// The request the header names (a reply names the request it answers).
    pub fn request(&self) -> Request {
        self.header.request(self.channel)
    }
}

/// What happened.
#[derive(Clone, Debug)]
pub enum Event {
    /// A front-end connected and the proxy reached the back-end.
    Connected,
    /// A message crossed (or was dropped by) the proxy.
    Message(Box<Traced>),
    /// Something worth knowing that is not a message (a channel closed or replaced).
    Note(String),
    /// The session ended; `clean` when a peer hung up or the proxy was stopped, not on an error.
    Closed {
        /// Why.
        reason: String,
        /// Whether it was an orderly end.
        clean: bool,
    },
}

/// One line of the trace.
#[derive(Clone, Debug)]
pub struct Record {
    /// Wall-clock time.
    pub time: SystemTime,
    /// Time since the proxy started.
    pub elapsed: Duration,
    /// Session number, from 1 in the order front-ends connected.
    pub session: u64,
    /// What happened.
    pub event: Event,
}

/// When something happened, by the wall clock and the monotonic one.
#[derive(Clone, Copy, Debug)]
pub struct Stamp {
    /// Wall-clock time.
    pub wall: SystemTime,
    /// Monotonic time.
    pub mono: Instant,
}

impl Stamp {
    /// Now.
    pub fn now() -> Stamp {
        Stamp { wall: SystemTime::now(), mono: Instant::now() }
    }
}
