//! The proxy between two scripted peers in this process: what crosses it is byte for byte what
//! was sent, with the same fds; the back-end request channel is relayed through the proxy's own
//! socket pair; inject rules do what they say; hang-ups and hostile input end a session cleanly
//! and the next front-end is served.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vhostuser_rs::connection::{Connection, Deadline, Listener, RawMessage};
use vhostuser_rs::protocol::{
    BackendRequest, Channel, FrontendRequest, Header, Message, Payload, VringFd, VringState, MAX_PAYLOAD_SIZE,
};
use vhostuser_rs::proxy::{Event, Proxy, ProxyConfig, Record, Rule, Side};
use vhostuser_rs::Error;

const WAIT: Duration = Duration::from_secs(5);

struct Setup {
    proxy: Proxy,
    backend: Listener,
    listen: PathBuf,
    dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.proxy.close();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup(name: &str, rules: &[&str], io_timeout: Duration) -> Setup {
    let dir = std::env::temp_dir().join(format!("vu-proxy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let listen = dir.join("proxy.sock");
    let connect = dir.join("backend.sock");
    let backend = Listener::bind(&connect, false).unwrap();
    let proxy = Proxy::start(ProxyConfig {
        listen: listen.clone(),
        connect,
        rules: rules.iter().map(|r| Rule::parse(r).unwrap()).collect(),
        connect_timeout: WAIT,
        io_timeout,
        once: false,
    })
    .unwrap();
    Setup { proxy, backend, listen, dir }
}

impl Setup {
    /// A front-end connected through the proxy, and the back-end's end of the relayed session.
    fn session(&self) -> (Connection, Connection) {
        let front = Connection::connect(&self.listen, Some(WAIT)).unwrap();
        let back = self.backend.accept(Deadline::after(Some(WAIT))).unwrap();
        (front, back)
    }

    /// Every record until one matches `done` (which is included).
    fn records_until(&self, done: impl Fn(&Record) -> bool) -> Vec<Record> {
        let deadline = Instant::now() + WAIT;
        let mut out = Vec::new();
        while Instant::now() < deadline {
            for r in self.proxy.next_records(64, Some(Duration::from_millis(100))) {
                let stop = done(&r);
                out.push(r);
                if stop {
                    return out;
                }
            }
        }
        panic!(
            "no such record within {WAIT:?}; got {:#?}",
            out.iter().map(vhostuser_rs::proxy::text).collect::<Vec<_>>()
        );
    }
}

fn eventfd() -> OwnedFd {
    // SAFETY: plain syscall; the result is a new descriptor we own.
    unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)) }
}

/// Whether `a` and `b` are the same open file (the same eventfd or socket end).
fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    // SAFETY: kcmp compares two descriptors of this process; no memory is passed.
    let pid = unsafe { libc::getpid() };
    let r = unsafe {
        libc::syscall(libc::SYS_kcmp, pid, pid, 0 /* KCMP_FILE */, a.as_raw_fd(), b.as_raw_fd())
    };
    r == 0
}

fn recv(conn: &Connection) -> RawMessage {
    conn.recv_raw(Deadline::after(Some(WAIT)), 1 << 20).unwrap()
}

fn send(conn: &Connection, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    conn.send_bytes(bytes, fds, Deadline::after(Some(WAIT))).unwrap();
}

fn is_closed(r: &Record) -> bool {
    matches!(r.event, Event::Closed { .. })
}

fn messages(records: &[Record]) -> Vec<(Channel, Side, String, bool)> {
    records
        .iter()
        .filter_map(|r| match &r.event {
            Event::Message(t) => Some((t.channel, t.from, t.request().to_string(), t.header.is_reply())),
            _ => None,
        })
        .collect()
}

#[test]
fn messages_and_fds_cross_unchanged() {
    let s = setup("plain", &[], WAIT);
    let (front, back) = s.session();
    let kick = eventfd();
    let m = Message::request(FrontendRequest::SET_VRING_KICK, Payload::VringFd(VringFd { index: 1, nofd: false }));
    send(&front, &m.encode(), &[kick.as_fd()]);
    let got = recv(&back);
    assert_eq!(got.bytes(), m.encode());
    assert_eq!(got.fds.len(), 1);
    assert!(same_file(got.fds[0].as_fd(), kick.as_fd()), "the back-end must get the front-end's own eventfd");
    // A message the spec forbids (reserved flag, odd size) is relayed as it is, and traced with the error.
    let mut odd = Header { code: 8, flags: 0x11, size: 3 }.to_bytes().to_vec();
    odd.extend_from_slice(&[1, 2, 3]);
    send(&front, &odd, &[]);
    assert_eq!(recv(&back).bytes(), odd);
    let reply = Message::reply(FrontendRequest::GET_FEATURES, Payload::U64(1 << 32));
    send(&back, &reply.encode(), &[]);
    assert_eq!(recv(&front).bytes(), reply.encode());
    drop(front);
    let records = s.records_until(is_closed);
    assert!(matches!(records[0].event, Event::Connected));
    let Event::Message(kick_rec) = &records[1].event else { panic!("{records:?}") };
    assert_eq!((kick_rec.num_fds, kick_rec.from), (1, Side::Frontend));
    assert!(kick_rec.decoded.is_ok());
    let Event::Message(odd_rec) = &records[2].event else { panic!() };
    assert!(odd_rec.decoded.is_err(), "reserved flags must be reported");
    let Event::Message(reply_rec) = &records[3].event else { panic!() };
    assert!(reply_rec.header.is_reply() && reply_rec.from == Side::Backend);
    let Event::Closed { reason, clean } = &records[4].event else { panic!() };
    assert!(*clean && reason.contains("front-end closed"), "{reason}");
    // The back-end sees the hang-up.
    assert!(matches!(back.recv_raw(Deadline::after(Some(WAIT)), 4096), Err(Error::Disconnected)));
}

#[test]
fn backend_request_channel_is_relayed_through_the_proxy() {
    let s = setup("chan", &[], WAIT);
    let (front, back) = s.session();
    let (front_keeps, front_sends) = Connection::pair().unwrap();
    let m = Message::request(FrontendRequest::SET_BACKEND_REQ_FD, Payload::Empty).with_need_reply();
    send(&front, &m.encode(), &[front_sends.as_fd()]);
    drop(front_sends);
    let got = recv(&back);
    assert_eq!(got.bytes(), m.encode(), "the message is unchanged, only its fd is the proxy's");
    assert_eq!(got.fds.len(), 1);
    let back_chan = Connection::from_fd(got.fds.into_iter().next().unwrap()).unwrap();
    send(&back, &Message::reply(FrontendRequest::SET_BACKEND_REQ_FD, Payload::U64(0)).encode(), &[]);
    recv(&front);
    // The back-end's request, with an fd, reaches the front-end's end; the reply goes back.
    let notify = eventfd();
    let req = Message::request(BackendRequest::CONFIG_CHANGE_MSG, Payload::Empty).with_need_reply();
    send(&back_chan, &req.encode(), &[]);
    assert_eq!(recv(&front_keeps).bytes(), req.encode());
    send(&front_keeps, &Message::reply(BackendRequest::CONFIG_CHANGE_MSG, Payload::U64(0)).encode(), &[]);
    assert_eq!(recv(&back_chan).bytes(), Message::reply(BackendRequest::CONFIG_CHANGE_MSG, Payload::U64(0)).encode());
    let host = Message::request(
        BackendRequest::VRING_HOST_NOTIFIER_MSG,
        Payload::VringArea(vhostuser_rs::protocol::VringArea { index: 0, nofd: false, size: 4096, offset: 0 }),
    );
    send(&back_chan, &host.encode(), &[notify.as_fd()]);
    let got = recv(&front_keeps);
    assert!(same_file(got.fds[0].as_fd(), notify.as_fd()));
    // The back-end closing its channel closes the front-end's; the main channel goes on.
    drop(back_chan);
    assert!(matches!(front_keeps.recv_raw(Deadline::after(Some(WAIT)), 4096), Err(Error::Disconnected)));
    let ping = Message::request(FrontendRequest::GET_FEATURES, Payload::Empty);
    send(&front, &ping.encode(), &[]);
    assert_eq!(recv(&back).bytes(), ping.encode());
    drop(front);
    let records = s.records_until(is_closed);
    let msgs = messages(&records);
    let backend = |name: &str, from, reply| (Channel::Backend, from, name.to_string(), reply);
    assert!(msgs.contains(&backend("BACKEND_CONFIG_CHANGE_MSG", Side::Backend, false)), "{msgs:?}");
    assert!(msgs.contains(&backend("BACKEND_CONFIG_CHANGE_MSG", Side::Frontend, true)), "{msgs:?}");
    assert!(msgs.contains(&backend("BACKEND_VRING_HOST_NOTIFIER_MSG", Side::Backend, false)), "{msgs:?}");
    let substituted = records.iter().any(|r| matches!(&r.event, Event::Message(t) if t.substituted));
    assert!(substituted);
    let note =
        records.iter().any(|r| matches!(&r.event, Event::Note(n) if n.contains("closed the back-end request channel")));
    assert!(note, "{records:?}");
}

#[test]
fn inject_rules_drop_delay_and_corrupt() {
    let s = setup(
        "inject",
        &["drop:GET_FEATURES@1", "delay:SET_OWNER:300ms", "corrupt:SET_VRING_NUM", "corrupt:GET_QUEUE_NUM.reply:size"],
        WAIT,
    );
    let (front, back) = s.session();
    let features = Message::request(FrontendRequest::GET_FEATURES, Payload::Empty).encode();
    send(&front, &features, &[]);
    send(&front, &features, &[]);
    // Only the second one arrives.
    assert_eq!(recv(&back).bytes(), features);
    assert!(!back.readable(Some(Duration::from_millis(50))).unwrap());
    // The delayed message holds back the next one of its direction, never reorders it.
    let t0 = Instant::now();
    let owner = Message::request(FrontendRequest::SET_OWNER, Payload::Empty).encode();
    send(&front, &owner, &[]);
    let num = Message::request(FrontendRequest::SET_VRING_NUM, Payload::VringState(VringState { index: 0, num: 256 }));
    send(&front, &num.encode(), &[]);
    assert_eq!(recv(&back).bytes(), owner);
    assert!(t0.elapsed() >= Duration::from_millis(300), "{:?}", t0.elapsed());
    let corrupted = recv(&back);
    assert_eq!(corrupted.header.flags, num.flags | 0x10);
    assert_eq!(corrupted.payload, num.encode()[12..]);
    assert!(corrupted.header.validate(Channel::Main).is_err(), "a receiver must refuse it");
    let reply = Message::reply(FrontendRequest::GET_QUEUE_NUM, Payload::U64(1));
    send(&back, &reply.encode(), &[]);
    let short = recv(&front);
    assert_eq!((short.header.size, short.payload.len()), (7, 7));
    drop(front);
    let records = s.records_until(is_closed);
    let fired: Vec<(bool, Vec<String>)> = records
        .iter()
        .filter_map(|r| match &r.event {
            Event::Message(t) if !t.injected.is_empty() => Some((t.dropped, t.injected.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        fired,
        vec![
            (true, vec!["drop:GET_FEATURES@1".to_string()]),
            (false, vec!["delay:SET_OWNER:300ms".to_string()]),
            (false, vec!["corrupt:SET_VRING_NUM".to_string()]),
            (false, vec!["corrupt:GET_QUEUE_NUM.reply:size".to_string()]),
        ]
    );
}

#[test]
fn next_front_end_gets_a_new_session() {
    let s = setup("next", &[], WAIT);
    for round in 0..3u64 {
        let (front, back) = s.session();
        let m = Message::request(FrontendRequest::SET_FEATURES, Payload::U64(round));
        send(&front, &m.encode(), &[]);
        assert_eq!(recv(&back).bytes(), m.encode());
        // This time the back-end hangs up: the front-end sees it.
        drop(back);
        assert!(matches!(front.recv_raw(Deadline::after(Some(WAIT)), 4096), Err(Error::Disconnected)));
        let records = s.records_until(is_closed);
        let last = records.last().unwrap();
        assert_eq!(last.session, round + 1);
        assert!(matches!(&last.event, Event::Closed { reason, clean: true } if reason.contains("back-end closed")));
    }
}

#[test]
fn hostile_input_ends_the_session_with_a_reason() {
    let s = setup("hostile", &[], Duration::from_millis(300));
    // A size the proxy will not read.
    let (front, back) = s.session();
    send(&front, &Header { code: 1, flags: 1, size: 1 << 30 }.to_bytes(), &[]);
    let records = s.records_until(is_closed);
    let Event::Closed { reason, clean } = &records.last().unwrap().event else { panic!() };
    assert!(!clean && reason.contains("exceeds the limit"), "{reason}");
    assert!(matches!(back.recv_raw(Deadline::after(Some(WAIT)), 4096), Err(Error::Disconnected)));
    drop(front);
    // More fds than any message may carry.
    let (front, back) = s.session();
    let fds: Vec<OwnedFd> = (0..9).map(|_| eventfd()).collect();
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let sent = Message::request(FrontendRequest::GET_FEATURES, Payload::Empty).encode();
    // send_bytes refuses > 8 fds itself: go around it with a raw sendmsg.
    raw_sendmsg(&front, &sent, &borrowed);
    let records = s.records_until(is_closed);
    let Event::Closed { reason, .. } = &records.last().unwrap().event else { panic!() };
    assert!(reason.contains("GET_FEATURES") && reason.contains("9 file descriptors"), "{reason}");
    assert!(matches!(back.recv_raw(Deadline::after(Some(WAIT)), 4096), Err(Error::Disconnected)));
    drop(front);
    // Half a message, then silence: the I/O timeout ends the session.
    let (front, _back) = s.session();
    send(&front, &[1, 0, 0, 0, 1], &[]);
    let records = s.records_until(is_closed);
    let Event::Closed { reason, .. } = &records.last().unwrap().event else { panic!() };
    assert!(reason.contains("timed out"), "{reason}");
    // An oversized payload the receiver refuses, but small enough to relay, is relayed.
    let (front, back) = s.session();
    let mut big = Header { code: 25, flags: 1, size: (MAX_PAYLOAD_SIZE + 8) as u32 }.to_bytes().to_vec();
    big.resize(12 + MAX_PAYLOAD_SIZE + 8, 7);
    send(&front, &big, &[]);
    assert_eq!(recv(&back).bytes(), big);
}

fn raw_sendmsg(conn: &Connection, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let len = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE is a size computation; the buffers below outlive the sendmsg call.
    let space = unsafe { libc::CMSG_SPACE(len as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
    // SAFETY: zeroed msghdr is valid; every pointer set below points at live buffers.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(len as u32) as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(cmsg).cast(), raw.len());
        assert_eq!(libc::sendmsg(conn.as_raw_fd(), &msg, 0), bytes.len() as isize);
    }
}

#[test]
fn stopping_the_proxy_closes_both_peers() {
    let s = setup("stop", &[], WAIT);
    let (front, back) = s.session();
    s.proxy.close();
    assert!(matches!(front.recv_raw(Deadline::after(Some(WAIT)), 4096), Err(Error::Disconnected)));
    assert!(matches!(back.recv_raw(Deadline::after(Some(WAIT)), 4096), Err(Error::Disconnected)));
    let records = s.records_until(is_closed);
    assert!(
        matches!(&records.last().unwrap().event, Event::Closed { reason, clean: true } if reason.contains("stopped"))
    );
    assert!(s.proxy.is_finished());
    assert!(!s.listen.exists(), "the listening socket is removed");
}

#[test]
fn set_backend_req_fd_odd_cases() {
    let s = setup("odd-chan", &[], WAIT);
    let (front, back) = s.session();
    // An fd that is not a socket: relayed as it is (the proxy cannot relay a channel over it).
    let not_a_socket = eventfd();
    let m = Message::request(FrontendRequest::SET_BACKEND_REQ_FD, Payload::Empty);
    send(&front, &m.encode(), &[not_a_socket.as_fd()]);
    let got = recv(&back);
    assert!(same_file(got.fds[0].as_fd(), not_a_socket.as_fd()));
    // Twice: the second channel replaces the first, whose front-end end sees the hang-up.
    let (first_keeps, first_sends) = Connection::pair().unwrap();
    send(&front, &m.encode(), &[first_sends.as_fd()]);
    drop(first_sends);
    let first_back = Connection::from_fd(recv(&back).fds.pop().unwrap()).unwrap();
    let (second_keeps, second_sends) = Connection::pair().unwrap();
    send(&front, &m.encode(), &[second_sends.as_fd()]);
    drop(second_sends);
    let second_back = Connection::from_fd(recv(&back).fds.pop().unwrap()).unwrap();
    assert!(matches!(first_keeps.recv_raw(Deadline::after(Some(WAIT)), 4096), Err(Error::Disconnected)));
    assert!(matches!(first_back.recv_raw(Deadline::after(Some(WAIT)), 4096), Err(Error::Disconnected)));
    let req = Message::request(BackendRequest::VRING_CALL, Payload::VringState(VringState { index: 0, num: 0 }));
    send(&second_back, &req.encode(), &[]);
    assert_eq!(recv(&second_keeps).bytes(), req.encode());
    drop(front);
    let records = s.records_until(is_closed);
    let notes: Vec<&String> = records
        .iter()
        .filter_map(|r| match &r.event {
            Event::Note(n) => Some(n),
            _ => None,
        })
        .collect();
    assert!(notes[0].contains("relayed with the front-end's own fd"), "{notes:?}");
    assert!(notes[1].contains("replaced the back-end request channel"), "{notes:?}");
}

#[test]
fn queued_messages_are_delivered_before_a_hang_up_is_passed_on() {
    let s = setup("drain", &["delay:SET_OWNER:200ms"], WAIT);
    let (front, back) = s.session();
    let owner = Message::request(FrontendRequest::SET_OWNER, Payload::Empty).encode();
    let enable =
        Message::request(FrontendRequest::SET_VRING_ENABLE, Payload::VringState(VringState { index: 0, num: 1 }));
    send(&front, &owner, &[]);
    send(&front, &enable.encode(), &[]);
    drop(front);
    assert_eq!(recv(&back).bytes(), owner);
    assert_eq!(recv(&back).bytes(), enable.encode());
    assert!(matches!(back.recv_raw(Deadline::after(Some(WAIT)), 4096), Err(Error::Disconnected)));
    let records = s.records_until(is_closed);
    assert!(matches!(&records.last().unwrap().event, Event::Closed { clean: true, .. }));
}

#[test]
fn once_relays_one_session_then_finishes() {
    let dir = std::env::temp_dir().join(format!("vu-proxy-once-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (listen, connect) = (dir.join("proxy.sock"), dir.join("backend.sock"));
    let backend = Listener::bind(&connect, false).unwrap();
    let config = ProxyConfig {
        listen: listen.clone(),
        connect,
        rules: vec![],
        connect_timeout: WAIT,
        io_timeout: WAIT,
        once: true,
    };
    let proxy = Proxy::start(config).unwrap();
    let front = Connection::connect(&listen, Some(WAIT)).unwrap();
    let back = backend.accept(Deadline::after(Some(WAIT))).unwrap();
    // A second front-end finds no listener while the first session runs.
    let deadline = Instant::now() + WAIT;
    while listen.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(Connection::connect(&listen, Some(Duration::ZERO)).is_err());
    let m = Message::request(FrontendRequest::GET_FEATURES, Payload::Empty).encode();
    send(&front, &m, &[]);
    assert_eq!(recv(&back).bytes(), m);
    drop(back);
    let mut records = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !proxy.is_finished() {
        assert!(Instant::now() < deadline, "the proxy did not finish: {records:?}");
        records.extend(proxy.next_records(64, Some(Duration::from_millis(100))));
    }
    assert!(matches!(records.last().map(|r| &r.event), Some(Event::Closed { clean: true, .. })), "{records:?}");
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_replaced_channel_is_not_read_in_place_of_the_new_one() {
    let s = setup("regen", &[], Duration::from_secs(2));
    let (front, back) = s.session();
    let set_fd = Message::request(FrontendRequest::SET_BACKEND_REQ_FD, Payload::Empty).encode();
    let (old_keeps, old_sends) = Connection::pair().unwrap();
    send(&front, &set_fd, &[old_sends.as_fd()]);
    drop(old_sends);
    let _old_back = Connection::from_fd(recv(&back).fds.pop().unwrap()).unwrap();
    // Hold the proxy inside a half-sent message, so that what follows is seen by one poll: a
    // message on the old channel and a SET_BACKEND_REQ_FD replacing it.
    let features = Message::request(FrontendRequest::SET_FEATURES, Payload::U64(1)).encode();
    send(&front, &features[..14], &[]);
    std::thread::sleep(Duration::from_millis(50));
    send(&old_keeps, &Message::reply(BackendRequest::CONFIG_CHANGE_MSG, Payload::U64(0)).encode(), &[]);
    let (new_keeps, new_sends) = Connection::pair().unwrap();
    let mut rest = features[14..].to_vec();
    rest.extend_from_slice(&set_fd);
    send(&front, &rest[..features.len() - 14], &[]);
    send(&front, &rest[features.len() - 14..], &[new_sends.as_fd()]);
    drop(new_sends);
    assert_eq!(recv(&back).bytes(), features);
    let new_back = Connection::from_fd(recv(&back).fds.pop().unwrap()).unwrap();
    // The new channel works at once (it was not read in place of the old one, which would have
    // waited out the I/O timeout and closed it).
    let t0 = Instant::now();
    let req = Message::request(BackendRequest::CONFIG_CHANGE_MSG, Payload::Empty);
    send(&new_back, &req.encode(), &[]);
    assert_eq!(new_keeps.recv_raw(Deadline::after(Some(Duration::from_secs(1))), 4096).unwrap().bytes(), req.encode());
    assert!(t0.elapsed() < Duration::from_secs(1));
}
