//! The crate-level error: one variant per layer, plus the session-level failures.

use crate::memory::MemoryError;
use crate::protocol::{ProtocolError, Request};
use crate::virtqueue::VirtqueueError;

/// Any failure of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer (or a caller building a message) broke the wire format.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A guest-memory access or mapping failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A ring broke the virtio rules (the ring index says which).
    #[error("queue {queue}: {source}")]
    Queue {
        /// Ring index.
        queue: u16,
        /// What went wrong.
        #[source]
        source: VirtqueueError,
    },
    /// The request needs a feature that was not negotiated (checked before sending).
    #[error("{request} needs {feature}, which was not negotiated")]
    NotNegotiated {
        /// The request.
        request: Request,
        /// The missing feature bits, by name.
        feature: String,
    },
    /// The request is not allowed in the current state.
    #[error("{request} is not allowed: {state}")]
    InvalidState {
        /// The request.
        request: Request,
        /// What is wrong with the state.
        state: &'static str,
    },
    /// The peer closed the connection (EOF, ECONNRESET or EPIPE).
    #[error("peer closed the connection")]
    Disconnected,
    /// A wait ran out of time.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// A request was answered with a non-zero status.
    #[error("peer answered {request} with status {status:#x}")]
    Rejected {
        /// The request that was refused.
        request: Request,
        /// The status the peer sent.
        status: u64,
    },
    /// An operating-system failure that is not a disconnection.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
