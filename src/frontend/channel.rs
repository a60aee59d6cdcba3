//! The back-end request channel, front-end side (the seed's "slave channel"): a socketpair whose
//! other end goes to the back-end with SET_BACKEND_REQ_FD, served by a thread that decodes each
//! request, hands it to a [`BackendRequestHandler`] and acks it when asked.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::connection::{Connection, Deadline, RawMessage};
use crate::error::{Error, Result};
use crate::protocol::{self, BackendRequest, Channel, Message, Payload, Request, MAX_PAYLOAD_SIZE};

/// Status sent back for a request the handler does not support (a failure, per the spec any
/// non-zero value; this is -ENOSYS as rust-vmm sends it).
pub const NOT_SUPPORTED: u64 = (-(libc::ENOSYS as i64)) as u64;
/// Status sent back for a malformed request (-EINVAL).
pub const MALFORMED: u64 = (-(libc::EINVAL as i64)) as u64;

/// What the front-end does with back-end requests.
pub trait BackendRequestHandler: Send + 'static {
    /// Handles one well-formed request. Returns the status of the ack (0 = success) and, for
    /// SHARED_OBJECT_LOOKUP, an optional fd to send with the reply. The received fds are owned by
    /// the handler.
    fn handle(&mut self, message: &Message, fds: Vec<OwnedFd>) -> (u64, Option<OwnedFd>);

    /// Called when a message breaks the spec (it is answered with a failure if it asked).
    fn malformed(&mut self, _error: &Error) {}
}

/// Our end of the channel, shared by [`BackendChannel`] and its serving thread. [`stop`]
/// empties the slot; the serving thread holds its own reference only while it reads or sends,
/// never while the handler runs, so a handler that closes its session (stop from the serving
/// thread itself) releases the fd before `stop` returns, not some time after the handler does.
///
/// [`stop`]: BackendChannel::stop
type Slot = Arc<Mutex<Option<Arc<Connection>>>>;

/// A running back-end request channel.
#[derive(Debug)]
pub struct BackendChannel {
    slot: Slot,
    thread: Option<JoinHandle<()>>,
}

/// The channel's connection while it is served (`None` once stopped).
fn current(slot: &Slot) -> Option<Arc<Connection>> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

impl BackendChannel {
    /// Creates the socketpair and starts serving our end; returns the other end, to be sent with
    /// SET_BACKEND_REQ_FD (and closed here once sent).
    pub fn start(handler: Box<dyn BackendRequestHandler>) -> Result<(BackendChannel, OwnedFd)> {
        let (ours, theirs) = Connection::pair()?;
        let slot: Slot = Arc::new(Mutex::new(Some(Arc::new(ours))));
        let served = slot.clone();
        let thread = std::thread::Builder::new()
            .name("vhostuser_rs back-end request channel (front-end side)".into())
            .spawn(move || serve(&served, handler))
            .map_err(Error::Io)?;
        Ok((BackendChannel { slot, thread: Some(thread) }, theirs.into_fd()))
    }

    /// Stops serving and closes our end: shuts the socket down (a read blocked on the serving
    /// thread wakes up and sees a disconnect) and waits for the thread — unless called from the
    /// serving thread itself (a handler closing its session), which holds no reference to the
    /// connection while its handler runs, so the fd is closed here all the same; that thread
    /// ends once its handler returns, without answering.
    pub fn stop(&mut self) {
        let conn = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(conn) = conn {
            conn.shutdown();
        }
        if let Some(t) = self.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }

    /// Whether the serving thread is still running.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for BackendChannel {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(slot: &Slot, mut handler: Box<dyn BackendRequestHandler>) {
    loop {
        let Some(conn) = current(slot) else { return };
        let received = conn.recv_raw(Deadline::never(), MAX_PAYLOAD_SIZE);
        // Not held while the handler runs (see `Slot`).
        drop(conn);
        let raw = match received {
            Ok(raw) => raw,
            Err(Error::Disconnected) => return,
            Err(e) => {
                // Oversized payload or too many fds: the stream is out of step; stop serving.
                handler.malformed(&e);
                return;
            }
        };
        let RawMessage { header, payload, fds } = raw;
        let request = header.request(Channel::Backend);
        let decoded = header
            .validate(Channel::Backend)
            .and_then(|()| protocol::decode_body(Channel::Backend, header, &payload, fds.len()));
        let (status, reply_fd, must_reply) = match decoded {
            Ok(message) if message.is_reply() => {
                handler.malformed(&Error::Protocol(protocol::ProtocolError::Direction {
                    request,
                    reason: "the front-end does not expect replies on the back-end request channel",
                }));
                continue;
            }
            Ok(message) => {
                let must = message.need_reply() || request == Request::Backend(BackendRequest::SHARED_OBJECT_LOOKUP);
                if matches!(request, Request::Unknown(..)) {
                    drop(fds);
                    (NOT_SUPPORTED, None, must)
                } else {
                    let (status, fd) = handler.handle(&message, fds);
                    (status, fd, must)
                }
            }
            Err(e) => {
                drop(fds);
                handler.malformed(&Error::Protocol(e));
                (MALFORMED, None, header.need_reply() && !header.is_reply())
            }
        };
        if must_reply {
            // Stopped meanwhile (by the handler itself): no one to answer.
            let Some(conn) = current(slot) else { return };
            let reply = Message::reply(request, Payload::U64(status));
            let fds: Vec<_> = reply_fd.iter().map(|f| f.as_fd()).collect();
            let deadline = Deadline::after(Some(std::time::Duration::from_secs(5)));
            if let Err(e) = conn.send(&reply, &fds, deadline) {
                // The back-end does not read its replies (or is gone): stop serving it.
                handler.malformed(&e);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::mpsc;
    use std::time::Duration;

    /// The inode of a socket fd, as /proc/self/fd shows it (`socket:[ino]`).
    fn link_of(conn: &Connection) -> String {
        std::fs::read_link(format!("/proc/self/fd/{}", conn.as_raw_fd())).unwrap().display().to_string()
    }

    /// Whether any fd of this process still refers to the socket `link` names (an inode is not
    /// reused while some fd holds it, so tests running beside this one cannot fool it).
    fn still_open(link: &str) -> bool {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .any(|l| l.display().to_string() == link)
    }

    /// A handler that stops its own channel (a front-end closing its session from a
    /// back-end request) and reports whether our end (`link`, set once started) was still
    /// open right after.
    struct Closer {
        channel: Arc<Mutex<Option<BackendChannel>>>,
        link: Arc<Mutex<String>>,
        report: mpsc::Sender<bool>,
    }

    impl BackendRequestHandler for Closer {
        fn handle(&mut self, _message: &Message, _fds: Vec<OwnedFd>) -> (u64, Option<OwnedFd>) {
            let mut chan = self.channel.lock().unwrap().take().expect("the channel");
            chan.stop();
            assert!(!chan.is_running());
            let link = self.link.lock().unwrap().clone();
            self.report.send(still_open(&link)).unwrap();
            (0, None)
        }
    }

    #[test]
    fn a_handler_stopping_its_channel_closes_our_end_before_it_returns() {
        let channel = Arc::new(Mutex::new(None));
        let link = Arc::new(Mutex::new(String::new()));
        let (report, reports) = mpsc::channel();
        let closer = Closer { channel: channel.clone(), link: link.clone(), report };
        let (chan, theirs) = BackendChannel::start(Box::new(closer)).unwrap();
        *link.lock().unwrap() = link_of(&current(&chan.slot).unwrap());
        *channel.lock().unwrap() = Some(chan);
        let backend = Connection::from_fd(theirs).unwrap();
        let ask = Message::request(BackendRequest::CONFIG_CHANGE_MSG, Payload::Empty).with_need_reply();
        backend.send(&ask, &[], Deadline::after(Some(Duration::from_secs(5)))).unwrap();
        let open_after_stop = reports.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(!open_after_stop, "our end of the channel outlived stop() on the serving thread");
        // The back-end gets no answer, only end-of-file.
        assert!(matches!(
            backend.recv(Channel::Backend, Deadline::after(Some(Duration::from_secs(5)))),
            Err(Error::Disconnected)
        ));
    }

    #[test]
    fn stop_from_another_thread_closes_our_end_and_joins() {
        struct Idle;
        impl BackendRequestHandler for Idle {
            fn handle(&mut self, _message: &Message, _fds: Vec<OwnedFd>) -> (u64, Option<OwnedFd>) {
                (0, None)
            }
        }
        let (mut chan, _theirs) = BackendChannel::start(Box::new(Idle)).unwrap();
        let link = link_of(&current(&chan.slot).unwrap());
        chan.stop();
        assert!(!chan.is_running());
        assert!(!still_open(&link));
    }
}
