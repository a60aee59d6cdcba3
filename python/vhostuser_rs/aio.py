"""asyncio front-ends: the message exchange of a session and many requests in flight from
coroutines on one client, without a thread per request and without blocking the event loop.

Example::

    from vhostuser_rs.aio import AsyncBlockClient, AsyncFrontend

    async with await AsyncBlockClient.connect("/run/qsd.sock") as disk:
        blocks = await asyncio.gather(*(disk.read(i * 4096, 4096) for i in range(32)))

    async with await AsyncFrontend.connect("/run/qsd.sock", timeout=5.0) as fe:
        offered = await fe.get_features()
        result = await fe.negotiate(memory=vu.GuestMemory.allocate(64 << 20))

:class:`AsyncFrontend` has every request method and composition of
:class:`~vhostuser_rs.Frontend` (the same definitions, run by the loop): each request is sent
when the main channel is free and its reply read when the socket becomes readable
(``loop.add_reader``), a non-blocking native step each time.

:class:`AsyncBlockClient`'s requests return :class:`asyncio.Future` objects (no coroutine per
request). Those made in one turn of the loop go to the ring together, one native call (the
batch path of :class:`~vhostuser_rs.blk.BlockClient`: one publish, at most one kick), and
their completions are collected when the ring's call eventfd becomes readable
(``loop.add_reader``): one native call reaps every completion the device published since the
last one and resolves the futures, the data read straight from the staging slots into new
bytes objects (or into the caller's bytearray, ``readinto``). When the ring (or the staging
slots) is full a request waits for a completion to make room. Cancelling a request forgets it:
one not submitted yet never is, one on the ring keeps its ring entry and staging slot until the
device completes it (virtio: the buffers belong to the device until it puts them in the used
ring). A back-end that hangs up fails every awaiting coroutine with
:class:`~vhostuser_rs.exceptions.ConnectionClosedError`.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Awaitable, Iterable
from typing import Any

from . import _native
from ._loop import readable
from .enums import ProtocolFeature, VirtioFeature
from .frontend import Exchange, Frontend, R, Steps, Virtqueue, _Requests
from .blk import _STATUS_NAMES, SECTOR, BlockClient, BlockError, Buffer, RequestType, _check_aligned
from .exceptions import ConnectionClosedError, VhostUserError
from .messages import Message
from .net import NetHeader
from .netclient import NetClient, TxFrame

__all__ = ["AsyncBlockClient", "AsyncFrontend", "AsyncNetClient"]

_IN = int(RequestType.IN)


class AsyncFrontend(_Requests):
    """A :class:`~vhostuser_rs.Frontend` session driven from an asyncio event loop: ``await
    fe.get_features()``, ``await fe.negotiate(...)``, ``await fe.setup_queue(...)`` — every
    request method and composition of :class:`~vhostuser_rs.Frontend`, from the same
    definitions. Nothing blocks the loop: a request is sent when the main channel is free and
    its reply (or ack, with REPLY_ACK) read when the socket is readable, each step a
    non-blocking native call. Coroutines of one loop take turns on the channel (the protocol
    has no request tags); requests from other threads (a back-end request handler answering
    an IOTLB miss on :attr:`frontend`) wait for the turn too.

    Timeouts (`timeout`, seconds, per request): a reply that does not arrive in time raises
    :class:`~vhostuser_rs.VhostUserTimeoutError` and leaves the connection out of step (a late
    reply could be taken for the next request's): later requests raise InvalidStateError.

    Cancellation: a request cancelled before it was sent is never sent; one cancelled while its
    reply is awaited leaves that reply to the next request, which reads and discards it first
    (recording what it says about the negotiated state) — the connection stays usable and in
    step. A composition (``negotiate``, ``setup_queue``) cancelled half-way has sent what it
    sent: the session is then half set up, as after an exception.

    A back-end that hangs up mid-exchange raises :class:`~vhostuser_rs.ConnectionClosedError`.
    :meth:`close` releases every fd at once. The back-end request channel is served on its own
    thread as for :class:`~vhostuser_rs.Frontend`; its handler sees :attr:`frontend`, the
    blocking view of the same session."""

    def __init__(self, frontend: Frontend) -> None:
        #: The same session as a blocking :class:`~vhostuser_rs.Frontend` (negotiated state,
        #: rings, memory, handler): for other threads and for what does not exchange messages.
        self.frontend = frontend
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, timeout: float | None = 5.0) -> AsyncFrontend:
        """Connect to the back-end listening on `path`, retrying (without blocking the loop)
        while it starts, up to `timeout` seconds; the same `timeout` bounds each request."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        pause = 0.001
        while True:
            try:
                core = _native.FrontendCore.connect(path, timeout=0)
                break
            except (FileNotFoundError, ConnectionRefusedError, BlockingIOError):
                # Not listening yet (or a full backlog): a back-end that is still starting.
                if deadline is not None and loop.time() >= deadline:
                    raise
                left = pause if deadline is None else min(pause, max(0.0, deadline - loop.time()))
                await asyncio.sleep(left)
                pause = min(pause * 2, 0.05)
        return cls(Frontend(core, timeout=timeout, path=path))

    async def __aenter__(self) -> AsyncFrontend:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the session and release every fd it holds (see :meth:`Frontend.close`); a
        request awaiting its reply fails with ConnectionClosedError. Idempotent."""
        self.frontend.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self.frontend.closed

    @property
    def timeout(self) -> float | None:
        """Seconds each request may take (None: no limit)."""
        return self.frontend.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self.frontend.timeout = value

    @property
    def features(self) -> VirtioFeature:
        """The acknowledged virtio features (empty before SET_FEATURES)."""
        return self.frontend.features

    @property
    def protocol_features(self) -> ProtocolFeature:
        """The acknowledged protocol features."""
        return self.frontend.protocol_features

    @property
    def negotiated(self) -> dict[str, Any]:
        """What was offered and acknowledged so far (raw ints)."""
        return self.frontend.negotiated

    @property
    def peer_closed(self) -> bool:
        """Whether the back-end hung up (looked at without waiting; nothing is read)."""
        return self.frontend.peer_closed

    def fileno(self) -> int:
        """The main channel's fd."""
        return self.frontend.fileno()

    def queue(self, index: int) -> Virtqueue:
        """The ring set up at `index`."""
        return self.frontend.queue(index)

    async def _run(self, steps: Steps[R]) -> R:
        """Runs the steps of a request or composition, each exchange driven by the loop."""
        try:
            ex = next(steps)
            while True:
                try:
                    result = await self._exchange(ex)
                except BaseException as e:  # CancelledError too: the steps clean up, then it goes on
                    ex = steps.throw(e)
                else:
                    ex = steps.send(result)
        except StopIteration as stop:
            value: R = stop.value
            return value

    async def _exchange(self, ex: Exchange) -> tuple[Message | None, list[int]]:
        async with self._lock:
            fe = self.frontend
            if fe.closed:
                raise ConnectionClosedError("the session is closed")
            pending = fe._core.begin(
                ex.request, ex.payload, ex.fds, need_reply=ex.need_reply, timeout=ex.timeout,
                check_gate=ex.check_gate,
            )
            try:
                while True:
                    done = pending.poll()
                    if done is not None:
                        return done
                    if pending.waits_for_reply:
                        await readable(fe._core.fileno(), pending.remaining)
                    else:
                        # Another thread's request holds the channel: look again shortly.
                        await asyncio.sleep(0.001)
            except BaseException:
                pending.cancel()
                raise


class AsyncBlockClient:
    """A :class:`~vhostuser_rs.blk.BlockClient` driven from an asyncio event loop (ring
    `queue`). Use it from the loop's thread only.

    :meth:`read`, :meth:`readinto`, :meth:`write` and the other requests are plain methods
    that return an awaitable (an :class:`asyncio.Future` for a request that fits one staging
    slot): ``await disk.read(offset, 4096)`` and ``asyncio.gather(*(disk.read(...) ...))``
    work as with coroutine methods, but there is no coroutine frame per request, and invalid
    arguments raise at the call rather than at the ``await``. Cancelling the future (or the
    task awaiting it) forgets the request: one not submitted yet is never submitted, one on the
    ring keeps its ring entry and staging slot until the device completes it."""

    def __init__(self, client: BlockClient, *, queue: int = 0) -> None:
        self.client = client
        self.queue = queue
        self._engine: _native.BlockRequests = client._batch_engine(queue)
        self._loop = asyncio.get_running_loop()
        # The futures of submitted requests are held by the engine (resolved there, in the
        # call eventfd's reader callback); requests waiting for the next flush are two parallel
        # lists (the requests go to the engine as they are).
        self._queued: list[tuple[Any, ...]] = []
        self._queued_futures: list[asyncio.Future[Any]] = []
        self._flush_scheduled = False
        self._error: BaseException | None = None
        self._slot = int(self._engine.slot_bytes)
        self._call_fd = self._engine.call_fd()
        self._main_fd = self._engine.main_fd()
        # The loop's futures: created by the C type directly when the loop's create_future is
        # asyncio's own (that one is a Python method: one frame less per request), else by it.
        create = self._loop.create_future
        if getattr(type(self._loop), "create_future", None) is asyncio.BaseEventLoop.create_future:
            create = functools.partial(asyncio.Future, loop=self._loop)
        self._create_future = create
        self._loop.add_reader(self._call_fd, self._on_call)
        if self._main_fd is not None:
            self._loop.add_reader(self._main_fd, self._on_main)

    @classmethod
    async def connect(
        cls, path: str | os.PathLike[str], *, queue: int = 0, timeout: float | None = 5.0, **options: Any
    ) -> AsyncBlockClient:
        """Connect and set up the client with :meth:`BlockClient.connect`'s keyword options
        (except ``reconnect``), the handshake run by the loop through an :class:`AsyncFrontend`
        (nothing blocks the loop); the I/O is then driven by the loop too."""
        if options.get("reconnect") is not None:
            raise ValueError("AsyncBlockClient does not reconnect (reconnect= is for the blocking BlockClient)")
        options.pop("reconnect", None)
        afe = await AsyncFrontend.connect(path, timeout=timeout)
        try:
            client = BlockClient.__new__(BlockClient)
            await afe._run(client._setup(afe.frontend, timeout=timeout, **options))
            return cls(client, queue=queue)
        except BaseException:
            afe.close()
            raise

    async def __aenter__(self) -> AsyncBlockClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()

    @property
    def capacity(self) -> int:
        """Size in bytes."""
        return self.client.capacity

    def close(self) -> None:
        """Stop watching the ring, fail every awaiting request with ConnectionClosedError and
        close the client. Idempotent."""
        if self._error is None:
            self._fail(ConnectionClosedError("the AsyncBlockClient is closed"))
        self.client.close()

    # -- the loop's side -----------------------------------------------------------------------
    def _unwatch(self) -> None:
        self._loop.remove_reader(self._call_fd)
        if self._main_fd is not None:
            self._loop.remove_reader(self._main_fd)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._unwatch()
        futures: list[asyncio.Future[Any]] = self._engine.take_futures()
        futures += self._queued_futures
        self._queued, self._queued_futures = [], []
        for fut in futures:
            if not fut.done():
                fut.set_exception(error)

    def _on_call(self) -> None:
        # One native call: clear the eventfd, reap, collect, resolve the futures of the
        # requests that succeeded (their data read straight into new bytes objects).
        try:
            left = self._engine.complete_futures()
        except Exception as e:  # the ring broke (VirtqueueError), the session ended, no memory
            self._fail(e)
            return
        for _token, fut, rtype, status, _data in left:
            if fut is not None and rtype is not None:
                self._failed(fut, rtype, status)
        if self._queued:
            self._flush()  # what waited for room
        if not self._flush_scheduled:
            # After the wake-ups set_result just scheduled: the requests the woken coroutines
            # make next go to the ring in this same turn of the loop, not one turn later (one
            # epoll_wait and one loop iteration less per batch).
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _failed(self, fut: asyncio.Future[Any], rtype: int, status: int) -> None:
        if not fut.done():
            name = _STATUS_NAMES.get(status, str(status))
            fut.set_exception(BlockError(f"virtio-blk request type {rtype} failed: {name}", status=status))

    def _on_main(self) -> None:
        if self._engine.hung_up:
            self._on_call()  # what completed before the hang-up still counts
            self._fail(ConnectionClosedError("the back-end hung up with requests in flight"))
        elif self._main_fd is not None:
            # An unsolicited message: not ours to read. Look again later rather than spin.
            self._loop.remove_reader(self._main_fd)
            fd = self._main_fd
            self._loop.call_later(0.1, lambda: self._error is None and self._loop.add_reader(fd, self._on_main))

    # -- requests ------------------------------------------------------------------------------
    def _enqueue(self, request: tuple[Any, ...]) -> asyncio.Future[Any]:
        """A future for `request` (engine form: type, sector, arg), resolved with the data the
        device returned (None for requests without any) or failed with BlockError."""
        if self._error is not None:
            raise self._error
        fut: asyncio.Future[Any] = self._create_future()
        self._queued.append(request)
        self._queued_futures.append(fut)
        if not self._flush_scheduled:
            # Every request made in this turn of the loop goes to the ring in one native call
            # (one publish, at most one kick).
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        requests, futures = self._queued, self._queued_futures
        if not requests or self._error is not None:
            return
        if any(map(_done, futures)):
            # Cancelled before it was submitted: never submitted.
            kept = [i for i, f in enumerate(futures) if not f.done()]
            requests, futures = [requests[i] for i in kept], [futures[i] for i in kept]
        try:
            n = self._engine.submit_futures(requests, futures)
        except Exception as e:  # the session ended, the ring broke, a buffer resized meanwhile
            self._queued, self._queued_futures = [], []
            for f in futures:
                if not f.done():
                    f.set_exception(e)
            return
        # Back-pressure: what did not fit (ring or staging slots full) waits for completions.
        self._queued, self._queued_futures = requests[n:], futures[n:]

    def read(self, offset: int, length: int) -> Awaitable[bytes]:
        """Read `length` bytes at byte `offset` (multiples of 512; ValueError at the call
        otherwise); longer than a staging slot: several requests in flight at once."""
        if 0 < length <= self._slot and offset >= 0 and not (offset | length) % SECTOR and self._error is None:
            # The common case: one request, its future returned as it is (_enqueue inlined:
            # a Python frame less per request).
            fut: asyncio.Future[bytes] = self._create_future()
            self._queued.append((_IN, offset // SECTOR, length))
            self._queued_futures.append(fut)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
            return fut
        return self._read_other(offset, length)

    def _read_other(self, offset: int, length: int) -> Awaitable[bytes]:
        # Apart from read(): its comprehension would make read() build cells for the variables
        # it uses on every call (CPython 3.11), four per request.
        _check_aligned(offset, length)
        if not length:
            return _resolved(self._loop, b"")
        slot = self._slot
        parts = [
            self._enqueue((_IN, (offset + o) // SECTOR, min(slot, length - o))) for o in range(0, length, slot)
        ]
        return self._joined(parts)

    async def _joined(self, parts: list[asyncio.Future[Any]]) -> bytes:
        return b"".join(await asyncio.gather(*parts))

    def readinto(self, offset: int, buffer: Buffer) -> Awaitable[int]:
        """Read ``len(buffer)`` bytes at byte `offset` into a writable buffer; returns the
        byte count. A bytearray that fits a staging slot is read into straight from the slot
        at completion (no bytes object in between); it must not be resized until then (it is
        exported: BufferError), and a cancelled read leaves it untouched."""
        if type(buffer) is bytearray and self._error is None:
            n = len(buffer)
            if 0 < n <= self._slot and offset >= 0 and not (offset | n) % SECTOR:
                fut: asyncio.Future[int] = self._create_future()
                self._queued.append((_IN, offset // SECTOR, buffer))
                self._queued_futures.append(fut)
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    self._loop.call_soon(self._flush)
                return fut
        return self._readinto(offset, buffer)

    async def _readinto(self, offset: int, buffer: Buffer) -> int:
        view = memoryview(buffer).cast("B")
        view[:] = await self.read(offset, view.nbytes)
        return view.nbytes

    def write(self, offset: int, data: Buffer) -> Awaitable[None]:
        """Write `data` at byte `offset` (multiples of 512; ValueError at the call otherwise)."""
        view = memoryview(data).cast("B")
        _check_aligned(offset, view.nbytes)
        if not view.nbytes:
            return _resolved(self._loop, None)
        if view.nbytes <= self._slot:
            return self._enqueue((RequestType.OUT, offset // SECTOR, data))
        return self._write_split(offset, view)

    def _write_split(self, offset: int, view: memoryview) -> Awaitable[None]:
        # Apart from write() for the reason given in _read_other.
        slot = self._slot
        parts = [
            self._enqueue((RequestType.OUT, (offset + o) // SECTOR, view[o : o + slot]))
            for o in range(0, view.nbytes, slot)
        ]
        return self._all(parts)

    async def _all(self, parts: list[asyncio.Future[Any]]) -> None:
        await asyncio.gather(*parts)

    def flush(self) -> Awaitable[None]:
        """FLUSH."""
        return self._enqueue((RequestType.FLUSH, 0, 0))

    def discard(self, offset: int, length: int) -> Awaitable[None]:
        """DISCARD one range."""
        _check_aligned(offset, length)
        return self._enqueue((RequestType.DISCARD, offset // SECTOR, length // SECTOR))

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> Awaitable[None]:
        """WRITE_ZEROES one range."""
        _check_aligned(offset, length)
        return self._enqueue((RequestType.WRITE_ZEROES, offset // SECTOR, length // SECTOR, unmap))

    async def get_id(self) -> bytes:
        """GET_ID: the device's serial."""
        data = await self._enqueue((RequestType.GET_ID, 0, 0))
        return (data or b"").split(b"\0", 1)[0]

    @property
    def in_flight(self) -> int:
        """Requests on the ring (including cancelled ones the device has not completed)."""
        return int(self._engine.in_flight)


_done = asyncio.Future.done


def _resolved(loop: asyncio.AbstractEventLoop, value: Any) -> asyncio.Future[Any]:
    fut = loop.create_future()
    fut.set_result(value)
    return fut


class AsyncNetClient:
    """A :class:`~vhostuser_rs.netclient.NetClient` driven from an asyncio event loop (queue
    pair `queue_pair`): ``await recv()``, ``async for header, frame in client``, ``await
    send(frames)``. Received frames are reaped when the RX call eventfd becomes readable
    (``loop.add_reader``); a back-end that hangs up ends every wait with
    ConnectionClosedError. Use it from the loop's thread only.

    With ``reconnect=SECONDS`` (:meth:`connect`, :meth:`NetClient.connect
    <vhostuser_rs.netclient.NetClient.connect>`) a hang-up starts a reconnect on a worker
    thread (the loop goes on); waits go on on the new session, or end with the reconnect's
    error (VhostUserTimeoutError when no back-end came back in time, NegotiationError), which
    every later call raises too."""

    def __init__(self, client: NetClient, *, queue_pair: int = 0) -> None:
        self.client = client
        self.queue_pair = queue_pair
        self._loop = asyncio.get_running_loop()
        self._rx_fd = client.fileno(queue_pair)
        self._main_fd = client.frontend.fileno()
        self._waiter: asyncio.Future[None] | None = None
        self._backlog: list[tuple[NetHeader, bytes]] = []
        self._error: BaseException | None = None
        self._reconnecting: asyncio.Future[None] | None = None
        self._loop.add_reader(self._rx_fd, self._wake)
        self._loop.add_reader(self._main_fd, self._on_main)

    @classmethod
    async def connect(
        cls, path: str | os.PathLike[str], *, queue_pair: int = 0, timeout: float | None = 5.0, **options: Any
    ) -> AsyncNetClient:
        """Connect with :meth:`NetClient.connect`'s keyword options, the handshake run by the
        loop through an :class:`AsyncFrontend` (nothing blocks the loop, except the
        control-queue commands of ``control_queue=True`` with several pairs or a MAC to set,
        which wait on their ring); the data path is then driven by the loop."""
        afe = await AsyncFrontend.connect(path, timeout=timeout)
        client = NetClient.__new__(NetClient)
        try:
            await afe._run(client._setup(afe.frontend, timeout=timeout, **options))
        except BaseException:
            afe.close()  # the rings' core, if it exists, closed itself in _setup
            raise
        try:
            return cls(client, queue_pair=queue_pair)
        except BaseException:
            client.close()
            raise

    async def __aenter__(self) -> AsyncNetClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop watching the rings, end every wait with ConnectionClosedError, close the client.
        Idempotent."""
        if self._error is None:
            self._fail(ConnectionClosedError("the AsyncNetClient is closed"))
        self.client.close()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._loop.remove_reader(self._rx_fd)
        self._loop.remove_reader(self._main_fd)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _on_main(self) -> None:
        if self.client.frontend.peer_closed:
            if self.client.reconnect is None:
                self._fail(ConnectionClosedError("the back-end hung up"))
            else:
                self._start_reconnect()
        else:
            # An unsolicited message: not ours to read. Look again later rather than spin.
            self._loop.remove_reader(self._main_fd)
            self._loop.call_later(
                0.1, lambda: self._error is None and self._loop.add_reader(self._main_fd, self._on_main)
            )

    def _start_reconnect(self) -> asyncio.Future[None]:
        """The reconnect under way, started if none is (NetClient._recover, blocking, on the
        loop's default executor; the RX call eventfd stays the same, the main channel's
        changes)."""
        if self._reconnecting is None:
            self._loop.remove_reader(self._main_fd)
            self._reconnecting = asyncio.ensure_future(self._reconnect(self.client._session))
        return self._reconnecting

    async def _reconnect(self, seen: int) -> None:
        try:
            await self._loop.run_in_executor(None, self.client._recover, seen)
        except BaseException as e:  # noqa: BLE001 - every wait gets it
            if self._error is None:
                self._fail(e)
            return
        finally:
            self._reconnecting = None
        if self._error is None:
            self._main_fd = self.client.frontend.fileno()
            self._loop.add_reader(self._main_fd, self._on_main)
            self._wake()

    async def _reconnected(self, error: ConnectionClosedError) -> None:
        """After the native path met a hang-up: wait for the reconnect, or re-raise."""
        if self.client.reconnect is None or self.client._closed:
            raise error
        await asyncio.shield(self._start_reconnect())

    async def recv(self, *, max_frames: int = 64) -> list[tuple[NetHeader, bytes]]:
        """Up to `max_frames` received frames with their headers; waits for the first without
        blocking the loop."""
        while True:
            if self._backlog:
                out, self._backlog = self._backlog[:max_frames], self._backlog[max_frames:]
                return out
            if self._error is not None:
                raise self._error
            if self._reconnecting is not None:
                await asyncio.shield(self._reconnecting)
                continue
            try:
                frames = self.client.core.recv(self.queue_pair, max_frames, 0)
            except ConnectionClosedError as e:
                await self._reconnected(e)
                continue
            if frames:
                return frames
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def __aiter__(self) -> AsyncNetClient:
        return self

    async def __anext__(self) -> tuple[NetHeader, bytes]:
        """The next received frame; ends (StopAsyncIteration) when the client is closed, raises
        ConnectionClosedError when the back-end hung up."""
        if not self._backlog:
            try:
                self._backlog = await self.recv(max_frames=256)
            except ConnectionClosedError:
                if self.client._closed:
                    raise StopAsyncIteration from None
                raise
        return self._backlog.pop(0)

    async def send(self, frames: Iterable[TxFrame], *, poll: float = 50e-6) -> int:
        """Queue every frame for transmission; while the TX ring is full, yield to the loop and
        try again every `poll` seconds (the driver reclaims TX buffers as it sends). Returns
        the number sent."""
        pending = list(frames)
        sent = 0
        while pending:
            if self._error is not None:
                raise self._error
            if self._reconnecting is not None:
                await asyncio.shield(self._reconnecting)
                continue
            try:
                n = self.client.core.send(self.queue_pair, pending)
            except ConnectionClosedError as e:
                await self._reconnected(e)
                continue
            sent += n
            pending = pending[n:]
            if pending:
                await asyncio.sleep(poll)
        return sent
