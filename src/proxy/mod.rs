//! A man-in-the-middle tracer between a vhost-user front-end and back-end
//! (`vhostuser-rs proxy`).
//!
//! The proxy listens where the front-end expects the back-end, connects to the real back-end
//! for each front-end that arrives, and relays every message both ways with its fds — on the
//! back-end request channel too, by substituting its own socket pair in SET_BACKEND_REQ_FD.
//! Each message is decoded by [`crate::protocol`] and reported as a [`Record`]; what is relayed
//! is byte for byte what was received, with the same fds (the proxy closes its own copies once
//! they are sent), unless an inject [`Rule`] drops, delays or corrupts it.
//!
//! - `rules.rs`: the `--inject` rule syntax and the occurrence counters;
//! - `relay.rs`: the poll loop of one session;
//! - `record.rs` / `format.rs`: what is reported, as text or JSON lines;
//! - `server.rs`: listener, accept thread, one thread per session, the record queue.

mod format;
mod record;
mod relay;
mod rules;
mod server;

pub use format::{json, text};
pub use record::{Event, Record, Side, Stamp, Traced};
pub use relay::MAX_RELAY_PAYLOAD;
pub use rules::{Action, Corruption, Injector, Rule, RuleError, Verdict, MAX_DELAY};
pub use server::{Proxy, ProxyConfig, MAX_SESSIONS};
