"""A man-in-the-middle tracer between a vhost-user front-end and back-end.

:class:`Proxy` listens where the front-end expects the back-end and, for each front-end that
connects, connects to the real back-end and relays every message both ways with its file
descriptors — on the back-end request channel too: it replaces the fd of SET_BACKEND_REQ_FD by
one end of its own socket pair and relays between the two channels, replies included. What it
relays is byte for byte what it received, with the same fds, unless an inject rule says
otherwise. Every message is decoded and reported as a :class:`ProxyRecord`.

Inject rules (``inject=[...]``, the CLI's ``--inject``), for fault testing::

    ACTION:MESSAGE[:ARG][@N]

    drop:GET_FEATURES                  never relay GET_FEATURES (the front-end times out)
    drop:GET_FEATURES.reply@1          drop the reply to the first GET_FEATURES only
    delay:SET_MEM_TABLE:200ms          relay it 200 ms late (the ones behind it wait too)
    corrupt:SET_VRING_ADDR             set reserved header flag bit 4 (a receiver that checks
                                       the header refuses it; libvhost-user does not check)
    corrupt:SET_VRING_ADDR:size        payload one byte short (header size to match)
    corrupt:SET_VRING_KICK:fds         close the fds instead of passing them on
    corrupt:SET_VRING_ADDR:byte=0      invert payload byte 0
    drop:BACKEND_CONFIG_CHANGE_MSG     back-end requests take the spec's BACKEND_ prefix

``N`` counts that message over the proxy's lifetime (all sessions), from 1. Names are the
spec's, with or without ``VHOST_USER_``, in any case.

Example::

    import vhostuser_rs as vu

    with vu.Proxy(listen="/tmp/proxy.sock", connect="/run/qsd.sock") as proxy:
        with vu.blk.BlockClient.connect("/tmp/proxy.sock") as disk:
            disk.read(0, 4096)
        for record in proxy.messages():
            print(record.text)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from . import _native
from .enums import BackendRequest, Channel, FrontendRequest
from .exceptions import VhostUserTimeoutError
from .messages import Payload

log = logging.getLogger("vhostuser_rs.proxy")

__all__ = ["Proxy", "ProxyRecord"]


@dataclass(frozen=True)
class ProxyRecord:
    """One line of the proxy's trace.

    ``event`` is ``"connected"`` (a front-end connected and the back-end was reached),
    ``"message"``, ``"note"`` (e.g. the back-end request channel closed) or ``"closed"`` (the
    session ended; ``clean`` unless it ended on an error). ``text`` and ``json`` are the line
    the CLI prints without and with ``--json``.

    For messages: ``direction`` is ``"F>B"`` (front-end to back-end) or ``"B>F"``; ``request``
    the request the header names (a reply names the request it answers; an int for codes the
    spec does not define); ``payload`` the decoded payload (see :mod:`vhostuser_rs.messages`)
    or, when the message breaks the spec, ``None`` with ``error`` saying why (it is relayed all
    the same); ``raw`` the payload bytes as received; ``dropped`` and ``injected`` what the
    inject rules did; ``substituted`` marks the SET_BACKEND_REQ_FD whose fd the proxy replaced.
    """

    time: float
    elapsed: float
    session: int
    event: Literal["connected", "message", "note", "closed"]
    text: str
    json: str
    channel: Channel | None = None
    direction: Literal["F>B", "B>F"] | None = None
    request: FrontendRequest | BackendRequest | int | None = None
    is_reply: bool = False
    flags: int = 0
    size: int = 0
    num_fds: int = 0
    payload: Payload = None
    raw: bytes = b""
    error: str | None = None
    dropped: bool = False
    injected: tuple[str, ...] = ()
    substituted: bool = False
    reason: str | None = None
    clean: bool = True

    @property
    def name(self) -> str:
        """The request's spec name (``BACKEND_`` prefixed on the back-end request channel),
        with `` reply`` for a reply; empty for events that are not messages."""
        if self.event != "message":
            return ""
        if isinstance(self.request, BackendRequest):
            base = f"BACKEND_{self.request.name}"
        elif isinstance(self.request, FrontendRequest):
            base = self.request.name
        else:
            base = f"UNKNOWN_{self.request}"
        return f"{base} reply" if self.is_reply else base


class Proxy:
    """Relays front-ends connecting to `listen` to the back-end at `connect`, in the background.

    Each front-end gets its own session (and its own connection to the back-end), relayed by a
    Rust thread; a peer hanging up ends that session (the proxy closes the other side) and the
    proxy goes on accepting — with ``once=True`` it finishes after the first session instead.
    Records are appended to :attr:`records` by a background thread, which also calls
    `callback` with each one (exceptions from it are logged, not raised). A proxy that runs for
    long with a callback should pass ``keep_records=False``: :attr:`records` then stays empty
    (and :meth:`wait_for` / :meth:`messages` see nothing), so memory does not grow.

    `connect_timeout`: seconds to keep trying to reach the back-end when a front-end connects.
    `io_timeout`: seconds one message may take to arrive whole or to be written; a peer stuck
    longer ends its session. `inject`: fault-injection rules (see the module documentation);
    a rule that does not parse raises ``ValueError``.
    """

    def __init__(
        self,
        *,
        listen: str | os.PathLike[str],
        connect: str | os.PathLike[str],
        inject: Iterable[str] = (),
        connect_timeout: float = 5.0,
        io_timeout: float = 5.0,
        once: bool = False,
        callback: Callable[[ProxyRecord], object] | None = None,
        keep_records: bool = True,
    ) -> None:
        self._core = _native.ProxyCore(
            os.fspath(listen), os.fspath(connect), inject=list(inject), connect_timeout=connect_timeout,
            io_timeout=io_timeout, once=once,
        )
        self.listen = os.fspath(listen)
        self.connect = os.fspath(connect)
        #: Every record so far, in order.
        self.records: list[ProxyRecord] = []
        self._callback = callback
        self._keep = keep_records
        self._cond = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._pump, name="vhostuser-rs-proxy", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            batch = self._core.next_records(256, timeout=0.2)
            if batch:
                if self._keep:
                    with self._cond:
                        self.records.extend(batch)
                        self._cond.notify_all()
                for record in batch:
                    if self._callback is not None:
                        try:
                            self._callback(record)
                        except Exception:
                            log.exception("proxy record callback failed")
            elif self._core.finished:
                break
        with self._cond:
            self._done = True
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        """Whether the proxy has finished (closed, or its session ended with ``once``) and every
        record has been delivered."""
        with self._cond:
            return self._done

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds for the proxy to finish; whether it did."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done, timeout)

    def wait_for(
        self, predicate: Callable[[ProxyRecord], bool], *, timeout: float | None = 5.0
    ) -> ProxyRecord:
        """The first record (from the start) for which `predicate` is true, waiting up to
        `timeout` seconds for it; raises VhostUserTimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for record in self.records[seen:]:
                    if predicate(record):
                        return record
                seen = len(self.records)
                if self._done:
                    raise VhostUserTimeoutError("the proxy finished without such a record")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise VhostUserTimeoutError(f"no such proxy record within {timeout} s")
                self._cond.wait(left)

    def messages(self, *, session: int | None = None) -> list[ProxyRecord]:
        """The message records so far (of one session, if given)."""
        with self._cond:
            return [
                r for r in self.records if r.event == "message" and (session is None or r.session == session)
            ]

    def close(self) -> None:
        """Stop accepting, end every session (both peers see a hang-up), wait for the proxy's
        threads and deliver the last records. Idempotent."""
        self._core.close()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
