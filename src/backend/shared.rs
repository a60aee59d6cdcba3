//! Shared objects (SHARED_OBJECT, protocol feature 18; protocol.md §6.15): a back-end exports
//! dma-bufs under UUIDs (SHARED_OBJECT_ADD / REMOVE on the back-end request channel), other
//! back-ends import them through the front-end (SHARED_OBJECT_LOOKUP), and the front-end asks
//! the exporter for the fd with GET_SHARED_OBJECT on the main channel.

use std::os::fd::OwnedFd;
use std::time::Duration;

use super::{BackendRequests, Device};
use crate::error::Result;
use crate::protocol::{BackendRequest, Payload};

/// GET_SHARED_OBJECT: the reply payload and the dma-buf fd the device exported under the UUID
/// (none if it exported nothing under it — the spec's failure answer). The spec's reply payload
/// is the fd alone: the body is empty (rust-vmm's front-end insists on that; QEMU ignores it).
///
/// QEMU sends this request with size 0, the UUID never transmitted (protocol.md §9.24): such a
/// request asks for the nil UUID, which is what a device would have to export to answer QEMU.
pub(crate) fn get_shared_object(device: &dyn Device, payload: &Payload) -> (Payload, Vec<OwnedFd>) {
    let uuid = match payload {
        Payload::Shared(uuid) => *uuid,
        Payload::Empty => [0; 16],
        other => {
            // 8 bytes is neither a UUID nor QEMU's empty request: answer "nothing" (no fd).
            log::warn!("GET_SHARED_OBJECT with a {}-byte payload: not a UUID", other.encoded_len());
            return (Payload::Empty, Vec::new());
        }
    };
    let fd = device.shared_object(&uuid);
    if fd.is_none() {
        log::info!("GET_SHARED_OBJECT: nothing exported under {}", uuid_string(&uuid));
    }
    (Payload::Empty, fd.into_iter().collect())
}

/// SHARED_OBJECT_ADD: tells the front-end this device exports `uuid` (it then answers
/// GET_SHARED_OBJECT for it). With `need_reply` (REPLY_ACK) the front-end's status is returned.
pub fn shared_object_add(
    requests: &BackendRequests,
    uuid: [u8; 16],
    need_reply: bool,
    timeout: Option<Duration>,
) -> Result<Option<u64>> {
    requests.send(BackendRequest::SHARED_OBJECT_ADD, Payload::Shared(uuid), &[], need_reply, timeout)
}

/// SHARED_OBJECT_REMOVE: stops exporting `uuid` (only its exporter may remove it).
pub fn shared_object_remove(
    requests: &BackendRequests,
    uuid: [u8; 16],
    need_reply: bool,
    timeout: Option<Duration>,
) -> Result<Option<u64>> {
    requests.send(BackendRequest::SHARED_OBJECT_REMOVE, Payload::Shared(uuid), &[], need_reply, timeout)
}

/// SHARED_OBJECT_LOOKUP: asks the front-end for the dma-buf exported under `uuid` (by this or
/// another back-end). The reply is mandatory: a u64 status, and the fd on success (the spec's
/// shape; protocol.md §4.3 lists front-ends that deviate). Returns `(status, fd)`.
pub fn shared_object_lookup(
    requests: &BackendRequests,
    uuid: [u8; 16],
    timeout: Option<Duration>,
) -> Result<(u64, Option<OwnedFd>)> {
    let (status, mut fds) =
        requests.request_with_reply(BackendRequest::SHARED_OBJECT_LOOKUP, Payload::Shared(uuid), timeout)?;
    let fd = if status == 0 { fds.pop() } else { None };
    Ok((status, fd))
}

/// RFC 4122 text form, for log lines.
fn uuid_string(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtqueue::{AnyDeviceQueue, ChainBatch, VirtqueueError};

    struct Exporter(std::fs::File);
    impl Device for Exporter {
        fn num_queues(&self) -> u16 {
            1
        }
        fn features(&self) -> u64 {
            0
        }
        fn process(&self, _: u16, _: &mut AnyDeviceQueue, _: &ChainBatch) -> std::result::Result<(), VirtqueueError> {
            Ok(())
        }
        fn shared_object(&self, uuid: &[u8; 16]) -> Option<OwnedFd> {
            (uuid == &[7; 16]).then(|| OwnedFd::from(self.0.try_clone().unwrap()))
        }
    }

    #[test]
    fn get_shared_object_answers_with_the_exported_fd_or_none() {
        let dev = Exporter(std::fs::File::open("/dev/null").unwrap());
        let (p, fds) = get_shared_object(&dev, &Payload::Shared([7; 16]));
        assert_eq!((p, fds.len()), (Payload::Empty, 1));
        let (_, fds) = get_shared_object(&dev, &Payload::Shared([8; 16]));
        assert!(fds.is_empty());
        // QEMU's size-0 request asks for the nil UUID.
        let (p, fds) = get_shared_object(&dev, &Payload::Empty);
        assert_eq!((p, fds.len()), (Payload::Empty, 0));
        assert!(get_shared_object(&dev, &Payload::U64(7)).1.is_empty());
        assert_eq!(uuid_string(&[0xab; 16]), "abababab-abab-abab-abab-abababababab");
    }
}
