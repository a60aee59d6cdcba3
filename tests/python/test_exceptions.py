from __future__ import annotations

import errno
from pathlib import Path

import pytest

import vhostuser_rs as vu
from vhostuser_rs import exceptions as ex


def test_hierarchy_keeps_generic_except_clauses_working() -> None:
    assert issubclass(ex.ConnectionClosedError, ConnectionError)
    assert issubclass(ex.VhostUserTimeoutError, TimeoutError)
    assert issubclass(ex.GuestMemoryError, ValueError)
    assert issubclass(ex.MalformedMessageError, ex.ProtocolError)
    assert issubclass(ex.FeatureNotNegotiatedError, ex.NegotiationError)
    for name in ex.__all__:
        assert issubclass(getattr(ex, name), ex.VhostUserError)


def test_missing_socket_is_file_not_found_with_errno(sock_dir: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        vu.Connection.connect(sock_dir / "absent", timeout=0)
    assert info.value.errno == errno.ENOENT


def test_refused_connection_after_retrying(sock_dir: Path) -> None:
    # A socket file nobody listens on: retried until the timeout, then ConnectionRefusedError.
    import socket

    path = sock_dir / "dead"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    with pytest.raises(ConnectionRefusedError) as info:
        vu.Connection.connect(path, timeout=0.05)
    assert info.value.errno == errno.ECONNREFUSED


def test_malformed_message_names_its_request() -> None:
    data = vu.hazmat.encode_raw(vu.FrontendRequest.SET_VRING_NUM, b"\0" * 4)
    with pytest.raises(vu.MalformedMessageError) as info:
        vu.hazmat.decode(data)
    assert info.value.request is vu.FrontendRequest.SET_VRING_NUM
    assert "SET_VRING_NUM" in str(info.value)


def test_bad_timeout_is_a_value_error() -> None:
    a, b = vu.Connection.pair()
    with a, b:
        with pytest.raises(ValueError):
            a.recv(timeout=-1)
