"""The front-end against hostile and scripted back-ends (test peers built on hazmat): every
misbehaviour is a clear exception or a refused request, never a hang or an fd leak. Also the
back-end request channel: dispatch, acks, unhandled requests, handler errors, floods, and an
IOTLB miss that arrives while a main-channel reply is awaited."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import vhostuser_rs as vu
from vhostuser_rs import BackendRequest as B
from vhostuser_rs import Channel
from vhostuser_rs import FrontendRequest as F
from vhostuser_rs import hazmat
from vhostuser_rs import messages as m

PROTOCOL = vu.VirtioFeature.PROTOCOL_FEATURES | vu.VirtioFeature.VERSION_1


@contextmanager
def fake_backend(sock_dir: Path, script: Callable[[vu.Connection], None]) -> Iterator[Path]:
    """A back-end that accepts one front-end and runs `script` on the connection."""
    path = sock_dir / "fake.sock"
    listener = vu.Listener.bind(path)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with listener.accept(timeout=10) as conn:
                script(conn)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
        finally:
            listener.close()

    t = threading.Thread(target=run)
    t.start()
    try:
        yield path
    except BaseException as e:
        t.join(20)
        listener.close()
        # Show what the back-end side saw: it usually explains the front-end's error.
        if errors and not isinstance(errors[0], vu.ConnectionClosedError):
            raise errors[0] from e
        raise
    t.join(20)
    assert not t.is_alive()
    listener.close()
    if errors and not isinstance(errors[0], vu.ConnectionClosedError):
        raise errors[0]


def expect(conn: vu.Connection, request: F) -> m.Message:
    msg, fds = conn.recv(timeout=10)
    hazmat.close_fds(fds)
    assert msg.request is request, msg
    return msg


def negotiate_reply_ack(conn: vu.Connection, proto: int = int(vu.ProtocolFeature.REPLY_ACK)) -> None:
    expect(conn, F.GET_FEATURES)
    hazmat.send(conn, hazmat.reply(F.GET_FEATURES, int(PROTOCOL)))
    expect(conn, F.GET_PROTOCOL_FEATURES)
    hazmat.send(conn, hazmat.reply(F.GET_PROTOCOL_FEATURES, proto))
    expect(conn, F.SET_PROTOCOL_FEATURES)


def client_negotiate(fe: vu.Frontend, proto: int = int(vu.ProtocolFeature.REPLY_ACK)) -> None:
    fe.get_features()
    fe.get_protocol_features()
    fe.set_protocol_features(proto)


def test_wrong_reply_id(sock_dir: Path) -> None:
    def script(conn: vu.Connection) -> None:
        expect(conn, F.GET_FEATURES)
        hazmat.send(conn, hazmat.reply(F.GET_PROTOCOL_FEATURES, 1))

    with fake_backend(sock_dir, script) as path, vu.Frontend.connect(path) as fe:
        with pytest.raises(vu.UnexpectedReplyError) as info:
            fe.get_features()
        assert info.value.request is F.GET_FEATURES
        # The stream is out of step: later requests are refused instead of mismatched.
        with pytest.raises(vu.InvalidStateError, match="out of step"):
            fe.get_features()


@pytest.mark.parametrize(
    ("raw", "error", "fragment"),
    [
        (hazmat.encode_raw(F.GET_FEATURES, b"\0" * 4, flags=0x5), vu.MalformedMessageError, "payload is 4 bytes"),
        (hazmat.encode_raw(F.GET_FEATURES, b"\0" * 8, flags=0x1), vu.UnexpectedReplyError, "not a reply"),
        (hazmat.encode_raw(F.GET_FEATURES, b"\0" * 8, flags=0xD), vu.MalformedMessageError, "NEED_REPLY"),
        (hazmat.encode_raw(F.GET_FEATURES, b"\0" * 8, flags=0x6), vu.MalformedMessageError, "version"),
        (hazmat.encode_raw(F.GET_FEATURES, b"\0" * 8, flags=0x25), vu.MalformedMessageError, "reserved"),
        (hazmat.encode_raw(F.GET_FEATURES, b"", flags=0x5, size=1 << 20), vu.MalformedMessageError, "exceeds"),
    ],
)
def test_malformed_replies(sock_dir: Path, raw: bytes, error: type[Exception], fragment: str) -> None:
    def script(conn: vu.Connection) -> None:
        expect(conn, F.GET_FEATURES)
        conn.send(raw)

    with fake_backend(sock_dir, script) as path, vu.Frontend.connect(path) as fe:
        with pytest.raises(error, match=fragment):
            fe.get_features()


def test_unexpected_and_missing_fds(sock_dir: Path) -> None:
    def script(conn: vu.Connection) -> None:
        expect(conn, F.GET_FEATURES)
        r, w = os.pipe()
        hazmat.send(conn, hazmat.reply(F.GET_FEATURES, int(PROTOCOL)), [r, w])
        hazmat.close_fds([r, w])

    with fake_backend(sock_dir, script) as path, vu.Frontend.connect(path) as fe:
        with pytest.raises(vu.MalformedMessageError, match="file descriptors"):
            fe.get_features()

    def script2(conn: vu.Connection) -> None:
        negotiate_reply_ack(conn, int(vu.ProtocolFeature.INFLIGHT_SHMFD | vu.ProtocolFeature.REPLY_ACK))
        expect(conn, F.GET_INFLIGHT_FD)
        hazmat.send(conn, hazmat.reply(F.GET_INFLIGHT_FD, m.InflightDesc(4096, 0, 1, 8)))  # fd missing

    with fake_backend(sock_dir, script2) as path, vu.Frontend.connect(path) as fe:
        client_negotiate(fe, int(vu.ProtocolFeature.INFLIGHT_SHMFD | vu.ProtocolFeature.REPLY_ACK))
        with pytest.raises(vu.MalformedMessageError, match="file descriptors"):
            fe.get_inflight_fd(1, 8)


def test_unsolicited_reply_silence_and_hangup(sock_dir: Path) -> None:
    done = threading.Event()

    def script(conn: vu.Connection) -> None:
        hazmat.send(conn, hazmat.reply(F.GET_STATUS, 0))  # nobody asked
        expect(conn, F.GET_FEATURES)
        done.wait(10)

    with fake_backend(sock_dir, script) as path, vu.Frontend.connect(path) as fe:
        with pytest.raises(vu.UnexpectedReplyError):
            fe.get_features()
        done.set()

    def silent(conn: vu.Connection) -> None:
        expect(conn, F.GET_FEATURES)
        done2.wait(10)

    done2 = threading.Event()
    with fake_backend(sock_dir, silent) as path, vu.Frontend.connect(path, timeout=0.3) as fe:
        with pytest.raises(vu.VhostUserTimeoutError):
            fe.get_features()
        done2.set()

    def hangup(conn: vu.Connection) -> None:
        expect(conn, F.GET_FEATURES)

    with fake_backend(sock_dir, hangup) as path, vu.Frontend.connect(path) as fe:
        with pytest.raises(vu.ConnectionClosedError):
            fe.get_features()


def test_rejected_ack_and_gates(sock_dir: Path) -> None:
    def script(conn: vu.Connection) -> None:
        negotiate_reply_ack(conn, int(vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.INBAND_NOTIFICATIONS))
        msg = expect(conn, F.SET_OWNER)
        assert msg.need_reply, "REPLY_ACK negotiated: the front-end asks for an ack"
        hazmat.send(conn, hazmat.reply(F.SET_OWNER, 22))
        msg = expect(conn, F.SET_FEATURES)
        hazmat.send(conn, hazmat.reply(F.SET_FEATURES, 0))

    with fake_backend(sock_dir, script) as path, vu.Frontend.connect(path) as fe:
        client_negotiate(fe)
        with pytest.raises(vu.RequestRejectedError) as info:
            fe.set_owner()
        assert info.value.status == 22 and info.value.request is F.SET_OWNER
        with pytest.raises(vu.FeatureNotNegotiatedError, match="bits the back-end did not offer"):
            fe.set_features(1 << 40)
        with pytest.raises(vu.FeatureNotNegotiatedError, match="MQ"):
            fe.get_queue_num()
        with pytest.raises(vu.FeatureNotNegotiatedError, match="needed by INBAND_NOTIFICATIONS"):
            fe.set_protocol_features(vu.ProtocolFeature.INBAND_NOTIFICATIONS)
        fe.set_features(PROTOCOL)


class Recorder(vu.BackendRequestHandler):
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def config_change_msg(self) -> None:
        self.calls.append(("config_change_msg", None))

    def iotlb_msg(self, msg: m.IotlbMsg) -> int:
        self.calls.append(("iotlb_msg", msg))
        return 0

    def shared_object_add(self, uuid: bytes) -> int:
        raise RuntimeError("handler bug")

    def shared_object_lookup(self, uuid: bytes) -> tuple[int, int | None]:
        self.calls.append(("lookup", uuid))
        return 0, self.lookup_fd

    lookup_fd: int | None = None


def test_backend_request_channel(sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    proto = vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.BACKEND_REQ | vu.ProtocolFeature.CONFIG | vu.ProtocolFeature.SHARED_OBJECT
    results: dict[str, object] = {}

    def script(conn: vu.Connection) -> None:
        negotiate_reply_ack(conn, int(proto))
        msg, fds = conn.recv(timeout=10)
        assert msg.request is F.SET_BACKEND_REQ_FD and len(fds) == 1
        chan = vu.Connection.from_fd(fds[0])
        hazmat.close_fds(fds)
        hazmat.send(conn, hazmat.reply(F.SET_BACKEND_REQ_FD, 0))
        with chan:
            def ask(req: B, payload: m.Payload = None, **kw: bool) -> tuple[m.Message, list[int]]:
                hazmat.send(chan, hazmat.request(req, payload, need_reply=True))
                return chan.recv(Channel.BACKEND, timeout=10)

            results["config"] = ask(B.CONFIG_CHANGE_MSG)[0].payload
            results["unhandled"] = ask(B.VRING_CALL, m.VringState(0, 0))[0].payload
            results["raises"] = ask(B.SHARED_OBJECT_ADD, m.SharedObject(b"u" * 16))[0].payload
            reply, fds = ask(B.SHARED_OBJECT_LOOKUP, m.SharedObject(b"v" * 16))
            results["lookup"] = (reply.payload, len(fds))
            hazmat.close_fds(fds)
            # A malformed request (wrong size) with NEED_REPLY: answered with a failure.
            chan.send(hazmat.encode_raw(B.CONFIG_CHANGE_MSG, b"xx", flags=0x9))
            results["malformed"] = chan.recv(Channel.BACKEND, timeout=10)[0].payload
            # A flood (replies read by a second thread, as a back-end that does not wait for each
            # ack would): every request is answered, in order.
            flood: list[object] = []
            reader = threading.Thread(
                target=lambda: flood.extend(chan.recv(Channel.BACKEND, timeout=10)[0].payload for _ in range(500))
            )
            reader.start()
            for _ in range(500):
                hazmat.send(chan, hazmat.request(B.CONFIG_CHANGE_MSG, need_reply=True))
            reader.join(30)
            results["flood"] = flood
            # An IOTLB miss while the front-end waits for a main-channel reply.
            expect(conn, F.GET_FEATURES)
            hazmat.send(chan, hazmat.request(B.IOTLB_MSG, m.IotlbMsg(0x1000, 0, 0, 1, m.IotlbMsg.MISS), need_reply=True))
            results["iotlb"] = chan.recv(Channel.BACKEND, timeout=10)[0].payload
            hazmat.send(conn, hazmat.reply(F.GET_FEATURES, int(PROTOCOL)))
            conn.recv(timeout=10)  # wait for the front-end to hang up

    handler = Recorder()
    r, w = os.pipe()
    handler.lookup_fd = r
    try:
        with fake_backend(sock_dir, script) as path, vu.Frontend.connect(path, timeout=10) as fe:
            client_negotiate(fe, int(proto))
            fe.set_backend_req_fd(handler)
            assert fe.backend_channel_running
            with caplog.at_level(logging.WARNING, logger="vhostuser_rs"):
                assert fe.get_features() == PROTOCOL  # the IOTLB miss is served meanwhile
    finally:
        hazmat.close_fds([r, w])
    assert results["config"] == 0
    assert results["unhandled"] != 0  # not supported (-ENOSYS)
    assert results["raises"] == 1
    assert results["lookup"] == (0, 1)
    assert results["malformed"] != 0
    assert results["flood"] == [0] * 500
    assert results["iotlb"] == 0
    assert ("iotlb_msg", m.IotlbMsg(0x1000, 0, 0, 1, 1)) in handler.calls
    assert sum(1 for c in handler.calls if c[0] == "config_change_msg") == 501
    assert any("handler bug" in r.getMessage() or (r.exc_info and "handler bug" in str(r.exc_info[1])) for r in caplog.records)
