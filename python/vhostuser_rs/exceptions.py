"""The exception hierarchy of vhostuser_rs.

Defined in Python (and raised from Rust) so that docstrings, attributes and multiple
inheritance live in ordinary Python. Generic code keeps working: a closed connection is also a
:class:`ConnectionError`, a timeout also a :class:`TimeoutError`, a bad guest address also a
:class:`ValueError`. Plain operating-system failures are raised as the builtin :class:`OSError`
subclass for their errno (``FileNotFoundError`` for a missing socket path, ...).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConnectionClosedError",
    "FeatureNotNegotiatedError",
    "GuestMemoryError",
    "InvalidStateError",
    "MalformedMessageError",
    "NegotiationError",
    "ProtocolError",
    "RequestRejectedError",
    "UnexpectedReplyError",
    "VhostUserError",
    "VhostUserTimeoutError",
    "VirtqueueError",
]


class VhostUserError(Exception):
    """Root of every error this library raises on purpose.

    ``request`` is the request the error is about: a :class:`~vhostuser_rs.FrontendRequest`,
    a :class:`~vhostuser_rs.BackendRequest`, a bare ``int`` for codes the spec does not define,
    or ``None``.
    """

    request: Any

    def __init__(self, message: str = "", *, request: Any = None, **attrs: Any) -> None:
        super().__init__(message)
        self.request = request
        for name, value in attrs.items():
            setattr(self, name, value)


class ProtocolError(VhostUserError):
    """The peer sent something the spec forbids."""


class MalformedMessageError(ProtocolError):
    """Size, flags, payload or file-descriptor count of a message break the spec."""


class UnexpectedReplyError(ProtocolError):
    """A reply that does not answer the request waiting for it, or one nobody asked for."""


class NegotiationError(VhostUserError):
    """A feature or state rule was broken, by us or by the peer."""


class FeatureNotNegotiatedError(NegotiationError):
    """The request needs a feature that was not negotiated. ``feature`` names it."""

    feature: Any = None


class InvalidStateError(NegotiationError):
    """The request is not allowed in the current state. ``state`` names it."""

    state: Any = None


class RequestRejectedError(VhostUserError):
    """The peer answered with a non-zero status (REPLY_ACK). ``status`` holds it."""

    status: int = 0


class GuestMemoryError(VhostUserError, ValueError):
    """An access outside mapped guest memory. ``address`` and ``length`` say where."""

    address: int | None = None
    length: int | None = None


class VirtqueueError(VhostUserError):
    """A malformed ring or descriptor chain. ``queue_index`` and ``head`` say where."""

    queue_index: int | None = None
    head: int | None = None


class ConnectionClosedError(VhostUserError, ConnectionError):
    """The peer closed the connection (EOF, ECONNRESET or EPIPE)."""


class VhostUserTimeoutError(VhostUserError, TimeoutError):
    """A wait ran out of its ``timeout``."""
