//! `vhostuser_rs`: the vhost-user protocol in both roles, with a Python API.
//!
//! Layers, bottom up (see `docs/architecture.md`):
//! - [`protocol`]: the wire format, pure (bytes + fd counts <-> typed messages);
//! - [`connection`]: Unix stream sockets that move whole messages with their fds;
//! - `python`: the only module that touches PyO3.
#![deny(missing_docs)]

pub mod backend;
pub mod connection;
pub mod devices;
pub mod error;
pub mod eventfd;
pub mod frontend;
pub mod memory;
pub mod protocol;
pub mod proxy;
#[cfg(feature = "python")]
mod python;
pub mod virtio;
pub mod virtqueue;

pub use error::Error;
