"""Message-level control: build, parse, send and receive any vhost-user message.

This is the layer for testing peers byte by byte. Nothing here checks what was negotiated or
whether a message makes sense in the session; :func:`encode_raw` even builds headers that break
the spec (wrong version, reserved flags, a ``size`` that lies). Parsing, on the other hand,
applies every rule of the spec (:func:`decode`), so a hostile peer's message raises
:class:`~vhostuser_rs.MalformedMessageError` naming the request.

File descriptors received through :meth:`Connection.recv` / :meth:`Connection.recv_raw` are
plain ints owned by the caller: close them with :func:`os.close` (or :func:`close_fds`).

Example — send GET_FEATURES and read the reply::

    from vhostuser_rs import hazmat, FrontendRequest, Connection

    with Connection.connect("/run/qsd.sock", timeout=5.0) as conn:
        hazmat.send(conn, hazmat.request(FrontendRequest.GET_FEATURES))
        reply, fds = conn.recv(timeout=5.0)
        print(hex(reply.payload))
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from . import _native
from ._native import HEADER_SIZE, MAX_FDS, MAX_PAYLOAD_SIZE, Connection, Listener
from .enums import BackendRequest, Channel, FrontendRequest
from .messages import FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION, Header, Message, Payload

__all__ = [
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "FLAG_VERSION",
    "HEADER_SIZE",
    "MAX_FDS",
    "MAX_PAYLOAD_SIZE",
    "Connection",
    "Listener",
    "close_fds",
    "decode",
    "decode_header",
    "encode",
    "encode_raw",
    "reply",
    "request",
    "send",
    "validate_header",
]


def _channel_of(request: FrontendRequest | BackendRequest | int, channel: Channel | None) -> Channel:
    if channel is not None:
        return channel
    return Channel.BACKEND if isinstance(request, BackendRequest) else Channel.MAIN


def request(
    request: FrontendRequest | BackendRequest | int,
    payload: Payload = None,
    *,
    need_reply: bool = False,
    channel: Channel | None = None,
) -> Message:
    """A request message (flags: version 1, plus NEED_REPLY if asked)."""
    flags = FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return Message(request, payload, flags, _channel_of(request, channel))


def reply(
    request: FrontendRequest | BackendRequest | int,
    payload: Payload = None,
    *,
    channel: Channel | None = None,
) -> Message:
    """A reply message with flags exactly 0x5 (version 1 + REPLY), as QEMU requires."""
    return Message(request, payload, FLAG_VERSION | FLAG_REPLY, _channel_of(request, channel))


def encode(message: Message) -> bytes:
    """Header + payload bytes of `message`. The header's size is the payload's true size."""
    return _native.encode_message(message)


def encode_raw(code: int, payload: bytes = b"", *, flags: int = FLAG_VERSION, size: int | None = None) -> bytes:
    """Any header followed by `payload`, even one that breaks the spec: pass `size` to make the
    header claim a different payload size, or any `flags` (version, reserved bits)."""
    return _native.encode_raw(code, payload, flags, size)


def decode(data: bytes, *, channel: Channel = Channel.MAIN, num_fds: int = 0) -> Message:
    """Decode one whole message that arrived on `channel` with `num_fds` descriptors, applying
    the spec's rules (header, exact payload size, fd count, field values).

    Raises :class:`~vhostuser_rs.MalformedMessageError` naming the request on any violation.
    Request codes the spec does not define decode with ``request`` as a bare int and the
    payload as ``bytes``, so a back-end can answer them as the spec says.
    """
    return _native.decode_message(data, int(channel), num_fds)


def decode_header(data: bytes) -> Header:
    """The first 12 bytes of `data` as a :class:`Header`, without validation."""
    return Header(*_native.decode_header(data))


def validate_header(header: Header, *, channel: Channel = Channel.MAIN) -> None:
    """Apply the header rules a receiver enforces: version 1, no reserved bits, no NEED_REPLY on
    a reply, payload size within :data:`MAX_PAYLOAD_SIZE`."""
    _native.validate_header(header.code, header.flags, header.size, int(channel))


def send(conn: Connection, message: Message | bytes, fds: Sequence[int] = (), *, timeout: float | None = None) -> None:
    """Send a message (or raw bytes) with `fds` attached. The fds stay owned by the caller."""
    data = message if isinstance(message, bytes) else encode(message)
    conn.send(data, list(fds), timeout=timeout)


def close_fds(fds: Iterable[int]) -> None:
    """Close every descriptor in `fds` (those returned by ``recv``)."""
    for fd in fds:
        os.close(fd)
