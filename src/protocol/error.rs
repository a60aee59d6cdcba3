//! Errors of the wire-format layer. Every variant that comes from a message names its request.

use super::request::Request;

/// A message that breaks the wire format of the spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Fewer bytes than a header (or a stated payload) needs.
    #[error("message truncated: {got} bytes, expected at least {expected}")]
    Truncated {
        /// Bytes available.
        got: usize,
        /// Bytes required.
        expected: usize,
    },
    /// Version field other than 1.
    #[error("{request}: unsupported version in flags {flags:#x} (expected version 1)")]
    Version {
        /// Request named by the header.
        request: Request,
        /// The flags received.
        flags: u32,
    },
    /// Reserved flag bits set.
    #[error("{request}: reserved flag bits set in {flags:#x}")]
    ReservedFlags {
        /// Request named by the header.
        request: Request,
        /// The flags received.
        flags: u32,
    },
    /// Flag combination the spec forbids.
    #[error("{request}: invalid flags {flags:#x}: {reason}")]
    Flags {
        /// Request named by the header.
        request: Request,
        /// The flags received.
        flags: u32,
        /// Which rule was broken.
        reason: &'static str,
    },
    /// Payload size above the implementation limit.
    #[error("{request}: payload of {size} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// Request named by the header.
        request: Request,
        /// Declared size.
        size: usize,
        /// Limit.
        max: usize,
    },
    /// Payload size that does not fit the request's layout.
    #[error("{request}: payload is {got} bytes, expected {expected}")]
    PayloadSize {
        /// Request named by the header.
        request: Request,
        /// Size received.
        got: usize,
        /// What the layout allows, in words ("8", "8 + 32*n", "0, 8 or 16").
        expected: String,
    },
    /// Wrong number of file descriptors for the request.
    #[error("{request}: carries {got} file descriptors, expected {expected}")]
    FdCount {
        /// Request named by the header.
        request: Request,
        /// Number received.
        got: usize,
        /// What the request allows, in words.
        expected: String,
    },
    /// A field with a value the spec does not allow.
    #[error("{request}: invalid {field} {value:#x}: {reason}")]
    InvalidField {
        /// Request named by the header.
        request: Request,
        /// Field name as in the spec's struct.
        field: &'static str,
        /// Value received.
        value: u64,
        /// Which rule was broken.
        reason: &'static str,
    },
    /// An (address or offset, size) pair whose end does not fit in 64 bits.
    #[error("{request}: {field} + size overflows 64 bits")]
    Overflow {
        /// Request named by the header.
        request: Request,
        /// The start field.
        field: &'static str,
    },
    /// Ring index at or above the number of rings.
    #[error("{request}: ring index {index} out of range (device has {num_rings} rings)")]
    RingIndex {
        /// Request named by the header.
        request: Request,
        /// Index received (full width).
        index: u64,
        /// Number of rings of the device.
        num_rings: u32,
    },
    /// A reply that does not answer the request that is waiting for one.
    #[error("reply to {got} received while waiting for the reply to {request}")]
    UnexpectedReply {
        /// The request waiting for its reply.
        request: Request,
        /// What the peer answered.
        got: Request,
    },
    /// A request arrived where a reply was expected, or the other way round.
    #[error("{request}: {reason}")]
    Direction {
        /// Request named by the header.
        request: Request,
        /// What was wrong.
        reason: &'static str,
    },
    /// Code that cannot be encoded on this channel.
    #[error("unknown {family} request code {code}")]
    UnknownRequest {
        /// Which family ("front-end" or "back-end").
        family: &'static str,
        /// The code.
        code: u32,
    },
}

impl ProtocolError {
    /// The request the error is about, when it came from a message.
    pub fn request(&self) -> Option<Request> {
        use ProtocolError::*;
        match self {
            Version { request, .. }
            | ReservedFlags { request, .. }
            | Flags { request, .. }
            | PayloadTooLarge { request, .. }
            | PayloadSize { request, .. }
            | FdCount { request, .. }
            | InvalidField { request, .. }
            | Overflow { request, .. }
            | RingIndex { request, .. }
            | UnexpectedReply { request, .. }
            | Direction { request, .. } => Some(*request),
            Truncated { .. } | UnknownRequest { .. } => None,
        }
    }
}
