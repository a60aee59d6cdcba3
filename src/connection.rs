//! Unix stream sockets carrying whole vhost-user messages with their file descriptors.
//!
//! This layer moves bytes and fds and nothing else: framing (12-byte header, then exactly `size`
//! payload bytes), SCM_RIGHTS, partial reads and writes, EINTR, deadlines, and ownership of every
//! received fd. Interpreting the bytes is [`crate::protocol`]'s job.
//!
//! Every fd this module creates or receives is close-on-exec. Received fds are [`OwnedFd`]s, so
//! whatever path drops them (an error, a rejected request) closes them.

use std::ffi::OsStr;
use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::protocol::{self, Channel, Header, Message, ProtocolError, HEADER_SIZE, MAX_FDS, MAX_PAYLOAD_SIZE};

/// Room for more fds than any message may carry, so a surplus is seen (and closed) rather than
/// truncated by the kernel.
const RECV_FD_CAPACITY: usize = 64;

/// A point in time after which a wait gives up; `None` waits forever.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(Option<Instant>);

impl Deadline {
    /// A deadline `timeout` from now; `None` never expires.
    pub fn after(timeout: Option<Duration>) -> Deadline {
        Deadline(timeout.map(|t| Instant::now().checked_add(t).unwrap_or_else(far_future)))
    }

    /// A deadline that never expires.
    pub fn never() -> Deadline {
        Deadline(None)
    }

    /// Milliseconds left for `poll()`, capped by `slice` (so callers can wake periodically);
    /// `-1` means "wait forever".
    fn poll_ms(&self, slice: Option<Duration>) -> i32 {
        let left = self.0.map(|d| d.saturating_duration_since(Instant::now()));
        let wait = match (left, slice) {
            (Some(l), Some(s)) => Some(l.min(s)),
            (Some(l), None) => Some(l),
            (None, s) => s,
        };
        match wait {
            None => -1,
            // Round up so a 0.4 ms remainder still waits instead of spinning.
            Some(d) => d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
        }
    }

    /// Time left, `None` if the deadline never expires.
    pub fn remaining(&self) -> Option<Duration> {
        self.0.map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        self.0.is_some_and(|d| Instant::now() >= d)
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365 * 30)
}

/// Maps an errno to the crate error: disconnections are not I/O errors to callers.
fn classify(err: io::Error) -> Error {
    match err.raw_os_error() {
        Some(libc::ECONNRESET) | Some(libc::EPIPE) | Some(libc::ENOTCONN) => Error::Disconnected,
        _ => Error::Io(err),
    }
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Waits until `fd` is ready for `events` or the deadline passes.
fn wait_ready(fd: BorrowedFd<'_>, events: libc::c_short, deadline: Deadline, what: &'static str) -> Result<()> {
    loop {
        if deadline.expired() {
            return Err(Error::Timeout(what));
        }
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, deadline.poll_ms(None)) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Io(err));
        }
        if n > 0 {
            // POLLHUP/POLLERR: let the following syscall report what happened.
            return Ok(());
        }
    }
}

/// A raw message as it came off the socket: header, payload and fds, with no validation beyond
/// the payload size cap.
#[derive(Debug)]
pub struct RawMessage {
    /// The header as received.
    pub header: Header,
    /// Exactly `header.size` bytes.
    pub payload: Vec<u8>,
    /// Every fd that arrived with the message, owned.
    pub fds: Vec<OwnedFd>,
}

impl RawMessage {
    /// Decodes this as the reply to `expected` on `channel`. Direction and request are checked
    /// before the payload, so the error says what went wrong: a request where a reply was due
    /// is [`ProtocolError::Direction`], a reply to something else
    /// [`ProtocolError::UnexpectedReply`] (after either the stream may be out of step).
    pub fn into_reply(self, channel: Channel, expected: protocol::Request) -> Result<Received> {
        if !self.header.is_reply() {
            return Err(
                ProtocolError::Direction { request: expected, reason: "the peer sent a request, not a reply" }.into()
            );
        }
        let got = self.header.request(channel);
        if got != expected {
            return Err(ProtocolError::UnexpectedReply { request: expected, got }.into());
        }
        self.header.validate(channel)?;
        let message = protocol::decode_body(channel, self.header, &self.payload, self.fds.len())?;
        Ok(Received { message, fds: self.fds })
    }

    /// Header and payload bytes together.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = self.header.to_bytes().to_vec();
        out.extend_from_slice(&self.payload);
        out
    }
}

/// A decoded message and the fds that came with it.
#[derive(Debug)]
pub struct Received {
    /// The decoded message.
    pub message: Message,
    /// Its fds, owned; dropping them closes them.
    pub fds: Vec<OwnedFd>,
}

/// What has arrived so far of one message (header bytes, payload bytes, fds), for readers
/// that must not block: [`Connection::recv_some`] fills it across calls.
#[derive(Debug, Default)]
pub struct PartialMessage {
    head: [u8; HEADER_SIZE],
    /// Bytes received: header first, then payload.
    got: usize,
    /// Sized once the header is complete.
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl PartialMessage {
    /// Whether no byte of a message has arrived yet.
    pub fn is_empty(&self) -> bool {
        self.got == 0 && self.fds.is_empty()
    }

    /// The complete message (the payload was read even with surplus fds, so the stream stays
    /// in step); `self` is empty again.
    fn finish(&mut self) -> Result<RawMessage> {
        if self.fds.len() > MAX_FDS {
            return Err(self.too_many_fds());
        }
        let done = mem::take(self);
        Ok(RawMessage { header: Header::from_bytes(&done.head), payload: done.payload, fds: done.fds })
    }

    /// Closes the fds received and empties `self`.
    fn too_many_fds(&mut self) -> Error {
        let done = mem::take(self);
        let request = protocol::Request::Unknown(Channel::Main, Header::from_bytes(&done.head).code);
        ProtocolError::FdCount { request, got: done.fds.len(), expected: format!("at most {MAX_FDS}") }.into()
    }
}

/// One end of a vhost-user channel (main or back-end request channel).
#[derive(Debug)]
pub struct Connection {
    fd: OwnedFd,
}

impl Connection {
    /// Connects to a listening back-end (or front-end) at `path`. While the socket does not
    /// exist yet or refuses connections, retries until `timeout` (a back-end that is still
    /// starting); `Some(0)` tries once, `None` retries forever.
    pub fn connect(path: &Path, timeout: Option<Duration>) -> Result<Connection> {
        let deadline = Deadline::after(timeout);
        let addr = sockaddr_un(path)?;
        let mut pause = Duration::from_millis(1);
        loop {
            let fd = new_socket()?;
            // SAFETY: addr is a valid, initialised sockaddr_un of the stated length.
            let ret = unsafe {
                libc::connect(fd.as_raw_fd(), &addr.0 as *const libc::sockaddr_un as *const libc::sockaddr, addr.1)
            };
            if ret == 0 {
                return Ok(Connection { fd });
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOENT) | Some(libc::ECONNREFUSED) | Some(libc::EAGAIN) if !deadline.expired() => {
                    let left = deadline.poll_ms(Some(pause));
                    std::thread::sleep(Duration::from_millis(left.max(0) as u64));
                    pause = (pause * 2).min(Duration::from_millis(50));
                    if deadline.expired() {
                        return Err(Error::Io(err));
                    }
                }
                _ => return Err(Error::Io(err)),
            }
        }
    }

    /// Adopts a connected Unix stream socket (e.g. the `--fd` of the spec's back-end program
    /// conventions). Refuses anything else, and makes it close-on-exec.
    pub fn from_fd(fd: OwnedFd) -> Result<Connection> {
        check_unix_stream(fd.as_fd())?;
        set_cloexec(fd.as_fd())?;
        Ok(Connection { fd })
    }

    /// A connected pair, as the front-end creates for SET_BACKEND_REQ_FD.
    pub fn pair() -> Result<(Connection, Connection)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds has room for the two descriptors socketpair writes.
        cvt(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) })?;
        // SAFETY: socketpair succeeded, so both are new descriptors we own.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Connection { fd: a }, Connection { fd: b }))
    }

    /// Shuts the socket down in both directions: a call blocked on it in another thread wakes
    /// up and sees a disconnect. The fd itself is closed when the connection is dropped.
    pub fn shutdown(&self) {
        // SAFETY: plain syscall on a socket we own; failure (already shut down) is harmless.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Gives up ownership of the socket.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Sends one whole message (`bytes` = header + payload) with `fds` attached to its first
    /// byte, as the spec's peers expect. Partial writes are continued, EINTR retried; a full
    /// socket buffer is waited on until `deadline`.
    pub fn send_bytes(&self, bytes: &[u8], fds: &[BorrowedFd<'_>], deadline: Deadline) -> Result<()> {
        if fds.len() > MAX_FDS {
            return Err(ProtocolError::FdCount {
                request: protocol::Request::Unknown(Channel::Main, bytes_code(bytes)),
                got: fds.len(),
                expected: format!("at most {MAX_FDS}"),
            }
            .into());
        }
        // A stream socket cannot carry fds without at least one data byte.
        let mut sent = 0usize;
        while sent < bytes.len() {
            let attach = if sent == 0 { fds } else { &[] };
            match sendmsg_fds(self.fd.as_fd(), &bytes[sent..], attach) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_ready(self.fd.as_fd(), libc::POLLOUT, deadline, "sending a message")?;
                }
                Err(e) => return Err(classify(e)),
            }
        }
        Ok(())
    }

    /// Encodes and sends a message with its fds.
    pub fn send(&self, message: &Message, fds: &[BorrowedFd<'_>], deadline: Deadline) -> Result<()> {
        self.send_bytes(&message.encode(), fds, deadline)
    }

    /// Receives one message without interpreting it: the header (with any fds), then exactly
    /// `size` payload bytes. A `size` above `max_payload` is refused before reading it (the
    /// stream is then out of step and the connection should be dropped). More than
    /// [`MAX_FDS`] fds, or a truncated fd list, closes all of them and fails.
    pub fn recv_raw(&self, deadline: Deadline, max_payload: usize) -> Result<RawMessage> {
        let mut partial = PartialMessage::default();
        loop {
            if let Some(raw) = self.recv_some(&mut partial, max_payload)? {
                return Ok(raw);
            }
            wait_ready(self.fd.as_fd(), libc::POLLIN, deadline, "waiting for a message")?;
        }
    }

    /// Reads what has arrived of one message into `partial`, without waiting: `Some` once the
    /// message is complete (`partial` is then empty again), `None` when more bytes are due
    /// (call again when the socket is readable). The same checks as [`recv_raw`](Self::recv_raw).
    pub fn recv_some(&self, partial: &mut PartialMessage, max_payload: usize) -> Result<Option<RawMessage>> {
        loop {
            let (buf, in_header) = if partial.got < HEADER_SIZE {
                (&mut partial.head[partial.got..], true)
            } else {
                let at = partial.got - HEADER_SIZE;
                (&mut partial.payload[at..], false)
            };
            if !buf.is_empty() {
                match recvmsg_fds(self.fd.as_fd(), buf, &mut partial.fds) {
                    // EOF between messages or in the middle of one: either way the peer is gone.
                    Ok(0) => return Err(Error::Disconnected),
                    Ok(n) => partial.got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(e) => {
                        *partial = PartialMessage::default();
                        return Err(classify(e));
                    }
                }
                if partial.fds.len() > RECV_FD_CAPACITY {
                    // A flood of fds: stop here rather than collect more (the stream is lost).
                    return Err(partial.too_many_fds());
                }
                if !(in_header && partial.got == HEADER_SIZE) {
                    if partial.got >= HEADER_SIZE && partial.got - HEADER_SIZE == partial.payload.len() {
                        return partial.finish().map(Some);
                    }
                    continue;
                }
            }
            // The header is complete: size the payload (refused before reading it when too large).
            let header = Header::from_bytes(&partial.head);
            if header.size as usize > max_payload {
                *partial = PartialMessage::default();
                let request = protocol::Request::Unknown(Channel::Main, header.code);
                return Err(
                    ProtocolError::PayloadTooLarge { request, size: header.size as usize, max: max_payload }.into()
                );
            }
            partial.payload = vec![0u8; header.size as usize];
            if header.size == 0 {
                return partial.finish().map(Some);
            }
        }
    }

    /// Receives and decodes one message on `channel`. The payload is read even when the header
    /// breaks a rule, so a rejected message leaves the stream in step; its fds are closed.
    pub fn recv(&self, channel: Channel, deadline: Deadline) -> Result<Received> {
        let raw = self.recv_raw(deadline, MAX_PAYLOAD_SIZE).map_err(|e| relabel(e, channel))?;
        decode(raw, channel)
    }

    /// [`recv`](Self::recv) without waiting: `None` while the message is incomplete (what has
    /// arrived stays in `partial`; call again when the socket is readable).
    pub fn try_recv(&self, partial: &mut PartialMessage, channel: Channel) -> Result<Option<Received>> {
        match self.recv_some(partial, MAX_PAYLOAD_SIZE).map_err(|e| relabel(e, channel))? {
            Some(raw) => decode(raw, channel).map(Some),
            None => Ok(None),
        }
    }

    /// Whether a message (or EOF) is waiting, without blocking longer than `timeout`. A signal
    /// ends the wait early with `false` (not an error): the caller's loop then checks for it.
    pub fn readable(&self, timeout: Option<Duration>) -> Result<bool> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = Deadline::after(timeout).poll_ms(None);
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(Error::Io(e));
        }
        Ok(n > 0)
    }
}

/// Validates and decodes a whole message of `channel`. The payload was read even when the
/// header breaks a rule, so a rejected message leaves the stream in step; its fds are closed.
fn decode(raw: RawMessage, channel: Channel) -> Result<Received> {
    raw.header.validate(channel)?;
    let message = protocol::decode_body(channel, raw.header, &raw.payload, raw.fds.len())?;
    Ok(Received { message, fds: raw.fds })
}

/// Names the request of a size or fd-count error from [`Connection::recv_raw`] (which does not
/// know the channel) after the channel it arrived on.
pub(crate) fn relabel(err: Error, channel: Channel) -> Error {
    match err {
        Error::Protocol(ProtocolError::PayloadTooLarge { request, size, max }) => {
            let request = protocol::Request::from_code(channel, request.code());
            Error::Protocol(ProtocolError::PayloadTooLarge { request, size, max })
        }
        Error::Protocol(ProtocolError::FdCount { request, got, expected }) => {
            let request = protocol::Request::from_code(channel, request.code());
            Error::Protocol(ProtocolError::FdCount { request, got, expected })
        }
        other => other,
    }
}

fn bytes_code(bytes: &[u8]) -> u32 {
    Header::parse(bytes).map(|h| h.code).unwrap_or(0)
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A listening Unix socket; the socket file of a listener that bound it is removed when the
/// listener is dropped (an adopted one leaves it to whoever created it).
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
    remove_on_drop: bool,
}

impl Listener {
    /// Binds and listens on `path`. An existing socket file is replaced only if
    /// `replace_existing` is set and nothing answers on it.
    pub fn bind(path: &Path, replace_existing: bool) -> Result<Listener> {
        let addr = sockaddr_un(path)?;
        if replace_existing && is_stale_socket(path) {
            let _ = std::fs::remove_file(path);
        }
        let fd = new_socket()?;
        // SAFETY: addr is a valid sockaddr_un of the stated length.
        cvt(unsafe {
            libc::bind(fd.as_raw_fd(), &addr.0 as *const libc::sockaddr_un as *const libc::sockaddr, addr.1)
        })?;
        let listener = Listener { fd, path: path.to_path_buf(), remove_on_drop: true };
        // SAFETY: plain syscall on a socket we own.
        cvt(unsafe { libc::listen(listener.fd.as_raw_fd(), 16) })?;
        Ok(listener)
    }

    /// Adopts a listening Unix stream socket (the `--fd` of the spec's back-end program
    /// conventions, when the management layer bound it). Refuses anything else and makes it
    /// close-on-exec; its file status flags (shared with the management layer's copy) are left
    /// as they are, and so is its socket file, if any, on drop.
    pub fn from_fd(fd: OwnedFd) -> Result<Listener> {
        check_unix_stream(fd.as_fd())?;
        if !is_listening(fd.as_fd())? {
            return Err(Error::Io(io::Error::new(io::ErrorKind::InvalidInput, "the socket is not listening")));
        }
        set_cloexec(fd.as_fd())?;
        Ok(Listener { fd, path: PathBuf::new(), remove_on_drop: false })
    }

    /// The socket path (empty for an adopted listener).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to the deadline for one connection.
    pub fn accept(&self, deadline: Deadline) -> Result<Connection> {
        loop {
            wait_ready(self.fd.as_fd(), libc::POLLIN, deadline, "waiting for a connection")?;
            // SAFETY: accept4 with null address pointers is allowed.
            let ret = unsafe {
                libc::accept4(self.fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
            };
            if ret >= 0 {
                // SAFETY: accept4 returned a new descriptor we now own.
                return Ok(Connection { fd: unsafe { OwnedFd::from_raw_fd(ret) } });
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ECONNABORTED) => continue,
                _ => return Err(Error::Io(err)),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if !self.remove_on_drop {
            return;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn is_stale_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => Connection::connect(path, Some(Duration::ZERO)).is_err(),
        _ => false,
    }
}

fn new_socket() -> Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket() returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_un(path: &Path) -> Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = OsStr::as_bytes(path.as_os_str());
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(Error::Io(io::Error::from_raw_os_error(libc::ENAMETOOLONG)));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn socket_option(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for getsockopt to write an int.
    cvt(unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, opt, &mut v as *mut _ as *mut libc::c_void, &mut len)
    })?;
    Ok(v)
}

/// Whether `fd` is a listening socket (SO_ACCEPTCONN): the spec's `--fd` may be a socket the
/// management layer bound and listens on, or one end of a connected pair.
pub fn is_listening(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(socket_option(fd, libc::SO_ACCEPTCONN)? != 0)
}

fn check_unix_stream(fd: BorrowedFd<'_>) -> Result<()> {
    let get = |opt| socket_option(fd, opt);
    let domain = get(libc::SO_DOMAIN)?;
    let kind = get(libc::SO_TYPE)?;
    if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM {
        return Err(Error::Io(io::Error::new(io::ErrorKind::InvalidInput, "vhost-user needs a Unix stream socket")));
    }
    Ok(())
}

/// Sets FD_CLOEXEC on `fd`.
pub fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we borrow; F_GETFD/F_SETFD take and return ints.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) })?;
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags | libc::FD_CLOEXEC) })?;
    Ok(())
}

/// Duplicates `fd` into a new close-on-exec descriptor.
pub fn dup_cloexec(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

fn cmsg_space(nfds: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE((nfds * mem::size_of::<RawFd>()) as u32) as usize }
}

fn sendmsg_fds(fd: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; cmsg_space(MAX_FDS).div_ceil(8)];
    // SAFETY: msghdr is plain old data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let space = cmsg_space(fds.len());
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds `space` bytes, enough for one cmsghdr with fds.len()
        // descriptors; CMSG_FIRSTHDR is non-null because msg_controllen >= sizeof(cmsghdr).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * mem::size_of::<RawFd>()) as u32) as _;
            let data = libc::CMSG_DATA(cmsg) as *mut RawFd;
            for (i, f) in fds.iter().enumerate() {
                data.add(i).write_unaligned(f.as_raw_fd());
            }
        }
    }
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn recvmsg_fds(fd: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    let mut control = vec![0u64; cmsg_space(RECV_FD_CAPACITY).div_ceil(8)];
    // SAFETY: msghdr is plain old data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = (control.len() * 8) as _;
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // Take ownership of every fd first, so that any early return below closes them.
    // SAFETY: the kernel filled msg_control; the CMSG_* walk stays within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let bytes = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..bytes / mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        // Some fds were dropped by the kernel: the message cannot be trusted. Close ours too.
        fds.clear();
        return Err(io::Error::new(io::ErrorKind::InvalidData, "file descriptors truncated (MSG_CTRUNC)"));
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FrontendRequest, Payload, VringFd};

    fn eventfd() -> OwnedFd {
        // SAFETY: plain syscall; the result is a new descriptor we own.
        unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) }
    }

    #[test]
    fn message_with_fd_crosses_a_socketpair() {
        let (a, b) = Connection::pair().unwrap();
        let kick = eventfd();
        let msg =
            Message::request(FrontendRequest::SET_VRING_KICK, Payload::VringFd(VringFd { index: 3, nofd: false }));
        a.send(&msg, &[kick.as_fd()], Deadline::never()).unwrap();
        let got = b.recv(Channel::Main, Deadline::after(Some(Duration::from_secs(5)))).unwrap();
        assert_eq!(got.message, msg);
        assert_eq!(got.fds.len(), 1);
        // The received fd is the same eventfd: a write on one is read on the other.
        let one = 1u64.to_ne_bytes();
        assert_eq!(unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), 8) }, 8);
        let mut buf = [0u8; 8];
        assert_eq!(unsafe { libc::read(got.fds[0].as_raw_fd(), buf.as_mut_ptr().cast(), 8) }, 8);
        assert_eq!(u64::from_ne_bytes(buf), 1);
        let flags = unsafe { libc::fcntl(got.fds[0].as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "received fds must be close-on-exec");
    }

    #[test]
    fn surplus_fds_are_closed_and_rejected() {
        let (a, b) = Connection::pair().unwrap();
        let extra: Vec<OwnedFd> = (0..3).map(|_| eventfd()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = extra.iter().map(|f| f.as_fd()).collect();
        let msg = Message::request(FrontendRequest::GET_FEATURES, Payload::Empty);
        a.send(&msg, &borrowed, Deadline::never()).unwrap();
        drop(extra);
        let err = b.recv(Channel::Main, Deadline::never()).unwrap_err();
        assert!(matches!(err, Error::Protocol(ProtocolError::FdCount { got: 3, .. })), "{err:?}");
        // (That the three received fds were closed is checked in tests/fd_leaks.rs, which owns
        // its process and can count /proc/self/fd without racing other tests.)
    }

    #[test]
    fn partial_writes_are_reassembled() {
        let (a, b) = Connection::pair().unwrap();
        let msg = Message::request(FrontendRequest::SET_FEATURES, Payload::U64(0x1234_5678_9abc));
        let bytes = msg.encode();
        // Three writes: half a header, the rest of the header, the payload.
        a.send_bytes(&bytes[..5], &[], Deadline::never()).unwrap();
        a.send_bytes(&bytes[5..12], &[], Deadline::never()).unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            a.send_bytes(&bytes[12..], &[], Deadline::never()).unwrap();
            a
        });
        let got = b.recv(Channel::Main, Deadline::after(Some(Duration::from_secs(5)))).unwrap();
        assert_eq!(got.message, msg);
        drop(writer.join().unwrap());
    }

    #[test]
    fn closed_peer_is_a_disconnect_and_silence_a_timeout() {
        let (a, b) = Connection::pair().unwrap();
        let err = b.recv(Channel::Main, Deadline::after(Some(Duration::from_millis(20)))).unwrap_err();
        assert!(matches!(err, Error::Timeout(_)), "{err:?}");
        drop(a);
        let err = b.recv(Channel::Main, Deadline::never()).unwrap_err();
        assert!(matches!(err, Error::Disconnected), "{err:?}");
        let msg = Message::request(FrontendRequest::GET_FEATURES, Payload::Empty);
        assert!(matches!(b.send(&msg, &[], Deadline::never()), Err(Error::Disconnected)));
    }

    #[test]
    fn oversized_payload_is_refused_before_reading() {
        let (a, b) = Connection::pair().unwrap();
        let header = Header { code: 1, flags: 1, size: (MAX_PAYLOAD_SIZE + 1) as u32 };
        a.send_bytes(&header.to_bytes(), &[], Deadline::never()).unwrap();
        let err = b.recv(Channel::Main, Deadline::never()).unwrap_err();
        assert!(matches!(err, Error::Protocol(ProtocolError::PayloadTooLarge { .. })), "{err:?}");
    }

    #[test]
    fn listen_connect_accept() {
        let dir = std::env::temp_dir().join(format!("vu-conn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        // Nothing is listening yet: a zero timeout fails at once with ENOENT.
        let err = Connection::connect(&path, Some(Duration::ZERO)).unwrap_err();
        assert!(matches!(&err, Error::Io(e) if e.raw_os_error() == Some(libc::ENOENT)), "{err:?}");
        // A back-end that starts late is waited for.
        let p2 = path.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            let l = Listener::bind(&p2, false).unwrap();
            let c = l.accept(Deadline::after(Some(Duration::from_secs(5)))).unwrap();
            let got = c.recv(Channel::Main, Deadline::after(Some(Duration::from_secs(5)))).unwrap();
            assert_eq!(got.message.request, FrontendRequest::GET_FEATURES.into());
        });
        let c = Connection::connect(&path, Some(Duration::from_secs(5))).unwrap();
        c.send(&Message::request(FrontendRequest::GET_FEATURES, Payload::Empty), &[], Deadline::never()).unwrap();
        server.join().unwrap();
        assert!(!path.exists(), "the listener removes its socket file");
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn adopted_listener_accepts_and_leaves_its_socket_file() {
        let dir = std::env::temp_dir().join(format!("vu-adopt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let std_listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let fd: OwnedFd = std_listener.into();
        assert!(is_listening(fd.as_fd()).unwrap());
        let l = Listener::from_fd(fd).unwrap();
        let c = Connection::connect(&path, Some(Duration::from_secs(5))).unwrap();
        c.send(&Message::request(FrontendRequest::GET_FEATURES, Payload::Empty), &[], Deadline::never()).unwrap();
        let s = l.accept(Deadline::after(Some(Duration::from_secs(5)))).unwrap();
        let got = s.recv(Channel::Main, Deadline::after(Some(Duration::from_secs(5)))).unwrap();
        assert_eq!(got.message.request, FrontendRequest::GET_FEATURES.into());
        drop(l);
        assert!(path.exists(), "an adopted listener leaves the socket file to its creator");
        // A connected socket is not a listener; a listener is not a connection.
        let (a, _b) = Connection::pair().unwrap();
        assert!(!is_listening(a.as_fd()).unwrap());
        assert!(Listener::from_fd(a.into_fd()).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn adopting_a_non_socket_fails() {
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(Connection::from_fd(f.into()).is_err());
    }
}
