//! The 12-byte message header and its flag bits (spec: "Message format").

use super::error::ProtocolError;
use super::request::{Channel, Request};
use super::MAX_PAYLOAD_SIZE;

/// Size of the header that starts every message on both channels.
pub const HEADER_SIZE: usize = 12;

/// Mask of the version field (bits 0–1 of `flags`).
pub const VERSION_MASK: u32 = 0x3;
/// The only protocol version the spec defines.
pub const VERSION: u32 = 0x1;
/// Set on every reply, clear on requests.
pub const REPLY: u32 = 0x4;
/// The requester asks for an acknowledgement (meaningful with REPLY_ACK).
pub const NEED_REPLY: u32 = 0x8;
/// Bits 4–31: reserved, must be zero.
pub const RESERVED_FLAGS: u32 = !(VERSION_MASK | REPLY | NEED_REPLY);

/// The header exactly as it travels: request code, flags and payload size.
///
/// `Header` is a plain value with no validation; [`Header::validate`] applies the spec's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// Request code (a reply carries the code of the request it answers).
    pub code: u32,
    /// Version, REPLY, NEED_REPLY and reserved bits.
    pub flags: u32,
    /// Number of payload bytes after the header.
    pub size: u32,
}

impl Header {
    /// Reads a header from its 12 bytes (native byte order, as the spec says).
    pub fn from_bytes(bytes: &[u8; HEADER_SIZE]) -> Header {
        let word = |i: usize| u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        Header { code: word(0), flags: word(4), size: word(8) }
    }

    /// Reads a header from the start of `bytes`, which must hold at least 12 bytes.
    pub fn parse(bytes: &[u8]) -> Result<Header, ProtocolError> {
        let head: &[u8; HEADER_SIZE] = bytes
            .get(..HEADER_SIZE)
            .and_then(|b| b.try_into().ok())
            .ok_or(ProtocolError::Truncated { got: bytes.len(), expected: HEADER_SIZE })?;
        Ok(Header::from_bytes(head))
    }

    /// The 12 wire bytes of this header.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..4].copy_from_slice(&self.code.to_ne_bytes());
        out[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        out[8..12].copy_from_slice(&self.size.to_ne_bytes());
        out
    }

    /// The version field (bits 0–1 of flags).
    pub fn version(&self) -> u32 {
        self.flags & VERSION_MASK
    }

    /// Whether the REPLY bit is set.
    pub fn is_reply(&self) -> bool {
        self.flags & REPLY != 0
    }

    /// Whether the NEED_REPLY bit is set.
    pub fn need_reply(&self) -> bool {
        self.flags & NEED_REPLY != 0
    }

    /// The request this header names on `channel` (unknown codes included).
    pub fn request(&self, channel: Channel) -> Request {
        Request::from_code(channel, self.code)
    }

    /// Applies the header rules every receiver should enforce: version 1, reserved bits clear,
    /// a reply never asks for a reply (QEMU requires reply flags of exactly 0x5), and a payload no
    /// larger than [`MAX_PAYLOAD_SIZE`]. Call it before reading the payload so an absurd `size`
    /// is refused without reading it.
    pub fn validate(&self, channel: Channel) -> Result<(), ProtocolError> {
        let request = self.request(channel);
        if self.version() != VERSION {
            return Err(ProtocolError::Version { request, flags: self.flags });
        }
        if self.flags & RESERVED_FLAGS != 0 {
            return Err(ProtocolError::ReservedFlags { request, flags: self.flags });
        }
        if self.is_reply() && self.need_reply() {
            return Err(ProtocolError::Flags { request, flags: self.flags, reason: "a reply must not set NEED_REPLY" });
        }
        if self.size as usize > MAX_PAYLOAD_SIZE {
            return Err(ProtocolError::PayloadTooLarge { request, size: self.size as usize, max: MAX_PAYLOAD_SIZE });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::FrontendRequest;

    #[test]
    fn bytes_round_trip() {
        let h = Header { code: 5, flags: VERSION | NEED_REPLY, size: 40 };
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
        assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn short_input_is_truncated() {
        assert!(matches!(Header::parse(&[1, 0, 0]), Err(ProtocolError::Truncated { got: 3, expected: 12 })));
    }

    #[test]
    fn validation_rules() {
        let ok = Header { code: 1, flags: 1, size: 0 };
        assert!(ok.validate(Channel::Main).is_ok());
        let v0 = Header { flags: 0, ..ok };
        assert!(matches!(v0.validate(Channel::Main), Err(ProtocolError::Version { .. })));
        let v2 = Header { flags: 2, ..ok };
        assert!(matches!(v2.validate(Channel::Main), Err(ProtocolError::Version { .. })));
        let reserved = Header { flags: 1 | 0x10, ..ok };
        let err = reserved.validate(Channel::Main).unwrap_err();
        assert!(matches!(err, ProtocolError::ReservedFlags { .. }));
        assert_eq!(err.request(), Some(Request::Frontend(FrontendRequest::GET_FEATURES)));
        let reply_need = Header { flags: 1 | REPLY | NEED_REPLY, ..ok };
        assert!(matches!(reply_need.validate(Channel::Main), Err(ProtocolError::Flags { .. })));
        let big = Header { size: MAX_PAYLOAD_SIZE as u32 + 1, ..ok };
        assert!(matches!(big.validate(Channel::Main), Err(ProtocolError::PayloadTooLarge { .. })));
        let max = Header { size: MAX_PAYLOAD_SIZE as u32, ..ok };
        assert!(max.validate(Channel::Main).is_ok());
    }
}
