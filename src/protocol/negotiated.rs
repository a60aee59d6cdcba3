//! What a session has negotiated so far, and the rule every request's gate checks against it.
//!
//! Both roles use it: the front-end before it sends a request on the main channel, the back-end
//! before it sends a request on the back-end request channel. The gates themselves are per
//! request ([`Rules::gate`](super::Rules)); this is only the state they are checked against.

use crate::error::{Error, Result};

use super::{Gate, ProtocolFeatures, Request, VirtioFeatures};

/// What has been offered and acknowledged so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// GET_FEATURES answer.
    pub offered_features: Option<u64>,
    /// Last SET_FEATURES value.
    pub acked_features: Option<u64>,
    /// GET_PROTOCOL_FEATURES answer.
    pub offered_protocol: Option<u64>,
    /// Last SET_PROTOCOL_FEATURES value.
    pub acked_protocol: u64,
}

impl Negotiated {
    /// The acknowledged protocol features.
    pub(crate) fn protocol(&self) -> ProtocolFeatures {
        ProtocolFeatures(self.acked_protocol)
    }

    /// The acknowledged virtio features (none before SET_FEATURES).
    pub(crate) fn virtio(&self) -> VirtioFeatures {
        VirtioFeatures(self.acked_features.unwrap_or(0))
    }

    /// Why `request` may not be sent yet, if it may not.
    pub fn check_gate(&self, request: impl Into<Request>) -> Result<()> {
        let request: Request = request.into();
        let not = |feature: String| Err(Error::NotNegotiated { request, feature });
        let pf = VirtioFeatures::PROTOCOL_FEATURES.bits();
        match request.rules().gate {
            Gate::None => Ok(()),
            Gate::ProtocolFeaturesOffered => match self.offered_features {
                Some(f) if f & pf != 0 => Ok(()),
                Some(_) => not("PROTOCOL_FEATURES (not offered by the back-end)".into()),
                None => Err(Error::InvalidState { request, state: "GET_FEATURES was not sent yet" }),
            },
            Gate::ProtocolFeaturesAcked => {
                if self.acked_features.unwrap_or(0) & pf != 0 {
                    Ok(())
                } else {
                    not("PROTOCOL_FEATURES".into())
                }
            }
            Gate::Protocol(p) if self.protocol().contains(p) => Ok(()),
            Gate::Protocol(p) => not((p & !self.protocol()).names().join("|")),
            Gate::Virtio(v) if self.virtio().contains(v) => Ok(()),
            Gate::Virtio(v) => not((v & !self.virtio()).names().join("|")),
            Gate::Both(p, v) => {
                if !self.protocol().contains(p) {
                    not((p & !self.protocol()).names().join("|"))
                } else if !self.virtio().contains(v) {
                    not((v & !self.virtio()).names().join("|"))
                } else {
                    Ok(())
                }
            }
        }
    }
}
