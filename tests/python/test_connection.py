"""Connections move whole messages with their fds; they never leak one and never hang."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

import vhostuser_rs as vu
from vhostuser_rs import FrontendRequest as F
from vhostuser_rs import hazmat
from vhostuser_rs import messages as m


def test_message_and_fd_cross_a_socketpair() -> None:
    a, b = vu.Connection.pair()
    with a, b:
        kick = os.eventfd(0, os.EFD_CLOEXEC)
        hazmat.send(a, hazmat.request(F.SET_VRING_KICK, m.VringFd(3)), [kick])
        msg, fds = b.recv(timeout=5)
        assert msg.payload == m.VringFd(3)
        assert len(fds) == 1
        # The same eventfd: a kick written on one end is read on the other.
        os.eventfd_write(kick, 7)
        assert os.eventfd_read(fds[0]) == 7
        assert fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        hazmat.close_fds([kick, *fds])


def test_surplus_fds_are_closed_and_the_message_rejected() -> None:
    a, b = vu.Connection.pair()
    with a, b:
        r, w = os.pipe()
        hazmat.send(a, hazmat.request(F.GET_FEATURES), [r, w, r])
        with pytest.raises(vu.MalformedMessageError, match="file descriptors") as info:
            b.recv(timeout=5)
        assert info.value.request is F.GET_FEATURES
        # The stream stays in step: the next message is read normally.
        hazmat.send(a, hazmat.request(F.SET_OWNER))
        assert b.recv(timeout=5)[0].request is F.SET_OWNER
        hazmat.close_fds([r, w])


def test_more_fds_than_any_message_may_carry_are_refused() -> None:
    a, b = vu.Connection.pair()
    with a, b:
        r, w = os.pipe()
        with pytest.raises(vu.MalformedMessageError):
            a.send(hazmat.encode(hazmat.request(F.GET_FEATURES)), [r] * 9)
        # A raw socket can send 20; the receiver closes all of them.
        raw = socket.socket(fileno=os.dup(a.fileno()))
        raw.sendmsg([hazmat.encode(hazmat.request(F.GET_FEATURES))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("20i", *([w] * 20)))])
        raw.close()
        with pytest.raises(vu.MalformedMessageError, match="at most 8"):
            b.recv_raw(timeout=5)
        hazmat.close_fds([r, w])


def test_partial_writes_are_reassembled() -> None:
    a, b = vu.Connection.pair()
    with a, b:
        data = hazmat.encode(hazmat.request(F.SET_FEATURES, 0x1234))
        a.send(data[:3])

        def rest() -> None:
            time.sleep(0.05)
            a.send(data[3:15])
            time.sleep(0.05)
            a.send(data[15:])

        t = threading.Thread(target=rest)
        t.start()
        msg, _ = b.recv(timeout=5)
        t.join()
        assert msg.payload == 0x1234


def test_timeout_and_closed_peer() -> None:
    a, b = vu.Connection.pair()
    with b:
        start = time.monotonic()
        with pytest.raises(vu.VhostUserTimeoutError):
            b.recv(timeout=0.1)
        assert time.monotonic() - start < 3
        assert b.poll(0) is False
        a.close()
        assert b.poll(1) is True
        with pytest.raises(vu.ConnectionClosedError):
            b.recv(timeout=5)
        with pytest.raises(ConnectionError):
            b.send(hazmat.encode(hazmat.request(F.GET_FEATURES)))


def test_close_from_another_thread_wakes_a_blocked_recv() -> None:
    a, b = vu.Connection.pair()
    with a:
        errors: list[BaseException] = []

        def wait() -> None:
            try:
                b.recv(timeout=30)
            except BaseException as e:  # noqa: BLE001 - recorded for the assertion
                errors.append(e)

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.1)
        b.close()
        b.close()  # idempotent
        t.join(5)
        assert not t.is_alive()
        assert isinstance(errors[0], vu.ConnectionClosedError)
        assert b.closed
        with pytest.raises(vu.ConnectionClosedError):
            b.fileno()


def test_listen_accept_and_late_backend(sock_dir: Path) -> None:
    path = sock_dir / "be.sock"
    accepted: list[vu.Connection] = []

    def serve() -> None:
        time.sleep(0.1)  # the back-end starts after the front-end tries to connect
        with vu.Listener.bind(path) as listener:
            accepted.append(listener.accept(timeout=5))

    t = threading.Thread(target=serve)
    t.start()
    with vu.Connection.connect(path, timeout=5) as fe:
        t.join()
        with accepted[0] as be:
            hazmat.send(fe, hazmat.request(F.GET_FEATURES))
            msg, _ = be.recv(timeout=5)
            assert msg.request is F.GET_FEATURES
            hazmat.send(be, hazmat.reply(F.GET_FEATURES, 1 << 32))
            assert fe.recv(timeout=5)[0].payload == 1 << 32
    assert not path.exists()


def test_listener_replaces_only_stale_sockets(sock_dir: Path) -> None:
    path = sock_dir / "s"
    with vu.Listener.bind(path):
        with pytest.raises(OSError):
            vu.Listener.bind(path, replace_existing=True)  # somebody answers: keep it
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    with pytest.raises(OSError):
        vu.Listener.bind(path)
    with vu.Listener.bind(path, replace_existing=True) as listener:
        assert listener.path == path
        with pytest.raises(vu.VhostUserTimeoutError):
            listener.accept(timeout=0.05)


def test_adopt_a_python_socket() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right, vu.Connection.from_socket(left) as conn:
        assert conn.fileno() != left.fileno()
        right.sendall(hazmat.encode(hazmat.request(F.SET_OWNER)))
        assert conn.recv(timeout=5)[0].request is F.SET_OWNER
    with open("/proc/self/stat", "rb") as f, pytest.raises(OSError):
        vu.Connection.from_fd(f.fileno())
    udp = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with udp, pytest.raises(OSError):
        vu.Connection.from_socket(udp)


def test_recv_raw_returns_invalid_messages_untouched() -> None:
    a, b = vu.Connection.pair()
    with a, b:
        bad = hazmat.encode_raw(F.GET_FEATURES, b"xy", flags=0x7)
        a.send(bad)
        data, fds = b.recv_raw(timeout=5)
        assert data == bad and fds == []
        a.send(hazmat.encode_raw(F.GET_FEATURES, b"", flags=1, size=100000))
        with pytest.raises(vu.MalformedMessageError, match="exceeds the limit"):
            b.recv_raw(timeout=5)
