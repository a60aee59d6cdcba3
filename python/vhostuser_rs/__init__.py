"""vhost-user for Python, with a Rust core.

vhost-user lets a virtio device live in another process: a front-end (a VMM such as QEMU, or a
test tool) and a back-end (the device) talk over a Unix socket, pass file descriptors, and move
I/O through virtqueues in shared memory. This package speaks the protocol in both roles.

Layers available today:

- :mod:`vhostuser_rs.enums`: request codes and feature bits (``FrontendRequest``,
  ``BackendRequest``, ``ProtocolFeature``, ``VirtioFeature``);
- :mod:`vhostuser_rs.messages`: typed payloads and messages;
- :mod:`vhostuser_rs.hazmat`: build, parse, send and receive any message, valid or not;
- :class:`Connection` / :class:`Listener`: Unix sockets carrying messages with their fds;
- :class:`GuestMemory`, :class:`DirtyLog`: shared guest memory and the migration dirty log;
- :class:`DriverQueue` (front-end side) and :class:`DeviceQueue` / :class:`DescriptorChain`
  (back-end side), split or ``packed=True``: virtqueues with zero-copy buffer views;
- :mod:`vhostuser_rs.exceptions`: the exception hierarchy;
- :class:`Proxy`: a man-in-the-middle tracer (and fault injector) between two peers.
"""

from __future__ import annotations

import logging as _logging
import os as _os
import sys as _sys

from . import aio, backend, blk, devices, enums, exceptions, frontend, hazmat, messages, net, netclient, proxy
from ._native import (
    Connection,
    DescriptorChain,
    DeviceQueue,
    DirtyLog,
    DriverQueue,
    GuestBuffer,
    GuestMemory,
    Listener,
    __version__,
    refresh_logging,
)
from .enums import BackendRequest, Channel, DeviceStatus, FrontendRequest, ProtocolFeature, VirtioFeature
from .exceptions import (
    ConnectionClosedError,
    FeatureNotNegotiatedError,
    GuestMemoryError,
    InvalidStateError,
    MalformedMessageError,
    NegotiationError,
    ProtocolError,
    RequestRejectedError,
    UnexpectedReplyError,
    VhostUserError,
    VhostUserTimeoutError,
    VirtqueueError,
)
from .backend import Backend, Device
from .frontend import (
    BackendRequestHandler,
    BuiltinHandler,
    Frontend,
    HostNotifier,
    InflightBuffer,
    IommuTable,
    SharedObjectTable,
    SharedRegion,
    Virtqueue,
)
from .messages import Message
from .net import NetClient, NetDevice
from .proxy import Proxy, ProxyRecord

__all__ = [
    "refresh_logging",
    "Backend",
    "BackendRequest",
    "BackendRequestHandler",
    "BuiltinHandler",
    "Channel",
    "Connection",
    "ConnectionClosedError",
    "DescriptorChain",
    "Device",
    "DeviceQueue",
    "DirtyLog",
    "DriverQueue",
    "GuestBuffer",
    "GuestMemory",
    "DeviceStatus",
    "FeatureNotNegotiatedError",
    "Frontend",
    "HostNotifier",
    "InflightBuffer",
    "IommuTable",
    "FrontendRequest",
    "GuestMemoryError",
    "InvalidStateError",
    "Listener",
    "MalformedMessageError",
    "Message",
    "NegotiationError",
    "NetClient",
    "NetDevice",
    "ProtocolError",
    "ProtocolFeature",
    "Proxy",
    "ProxyRecord",
    "RequestRejectedError",
    "SharedObjectTable",
    "SharedRegion",
    "UnexpectedReplyError",
    "VhostUserError",
    "VhostUserTimeoutError",
    "VirtioFeature",
    "Virtqueue",
    "VirtqueueError",
    "__version__",
    "backend",
    "blk",
    "devices",
    "enums",
    "exceptions",
    "frontend",
    "hazmat",
    "messages",
    "net",
    "netclient",
    "proxy",
]


class _TraceFormatter(_logging.Formatter):
    """``vhost-user back-end: ...`` / ``vhost-user front-end: ...``: which role traced it."""

    def format(self, record: _logging.LogRecord) -> str:
        role = "front-end" if record.name.startswith("vhostuser_rs.trace.frontend") else "back-end"
        return f"vhost-user {role}: {record.getMessage()}"


def _trace_from_environment() -> None:
    # VHOSTUSER_RS_TRACE=1: every request and ring event on stderr, without touching logging
    # configuration in code. The records go to the logger ``vhostuser_rs.trace`` (the front-end's
    # to its child ``vhostuser_rs.trace.frontend``) either way: enabling that logger at DEBUG with
    # ``logging`` gives the same trace.
    if _os.environ.get("VHOSTUSER_RS_TRACE", "") in ("", "0"):
        return
    trace = _logging.getLogger("vhostuser_rs.trace")
    trace.setLevel(_logging.DEBUG)
    if not trace.handlers:
        handler = _logging.StreamHandler(_sys.stderr)
        handler.setFormatter(_TraceFormatter())
        trace.addHandler(handler)
    refresh_logging()


_trace_from_environment()
