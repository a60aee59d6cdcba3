"""asyncio front-end clients: many requests in flight from coroutines on one client, without a
thread per request.

Example::

    from vhostuser_rs.aio import AsyncBlockClient

    async with await AsyncBlockClient.connect("/run/qsd.sock") as disk:
        blocks = await asyncio.gather(*(disk.read(i * 4096, 4096) for i in range(32)))

Requests are submitted to the ring at once (the batch path of
:class:`~vhostuser_rs.blk.BlockClient`) and their completions are reaped when the ring's call
eventfd becomes readable (``loop.add_reader``): one reap serves every completion the device
published since the last one. When the ring (or the staging slots) is full a request waits for
a completion to make room. Cancelling an awaiting coroutine forgets the request, but its ring
entry and staging slot stay reserved until the device completes it (virtio: the buffers belong
to the device until it puts them in the used ring). A back-end that hangs up fails every
awaiting coroutine with :class:`~vhostuser_rs.exceptions.ConnectionClosedError`.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Iterable
from typing import Any

from . import _native
from .blk import _STATUS_NAMES, SECTOR, BlockClient, BlockError, Buffer, RequestType, _check_aligned
from .exceptions import ConnectionClosedError, VhostUserError
from .net import NetHeader
from .netclient import NetClient, TxFrame

__all__ = ["AsyncBlockClient", "AsyncNetClient"]

_IN = int(RequestType.IN)


class AsyncBlockClient:
    """A :class:`~vhostuser_rs.blk.BlockClient` driven from an asyncio event loop (ring
    `queue`). Use it from the loop's thread only."""

    def __init__(self, client: BlockClient, *, queue: int = 0) -> None:
        self.client = client
        self.queue = queue
        self._engine: _native.BlockRequests = client._batch_engine(queue)
        self._loop = asyncio.get_running_loop()
        self._futures: dict[int, asyncio.Future[tuple[int, bytes | None]]] = {}
        self._queued: list[tuple[tuple[Any, ...], asyncio.Future[tuple[int, bytes | None]]]] = []
        self._flush_scheduled = False
        self._token_of: dict[asyncio.Future[tuple[int, bytes | None]], int] = {}
        self._error: BaseException | None = None
        self._slot = int(self._engine.slot_bytes)
        self._call_fd = self._engine.call_fd()
        self._main_fd = self._engine.main_fd()
        self._loop.add_reader(self._call_fd, self._on_call)
        if self._main_fd is not None:
            self._loop.add_reader(self._main_fd, self._on_main)

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, queue: int = 0, **options: Any) -> AsyncBlockClient:
        """Connect and negotiate (in the loop's default executor: the exchange of requests is
        blocking) with :meth:`BlockClient.connect`'s keyword options; the I/O is then driven
        by the loop."""
        loop = asyncio.get_running_loop()
        client = await loop.run_in_executor(None, functools.partial(BlockClient.connect, path, **options))
        try:
            return cls(client, queue=queue)
        except BaseException:
            client.close()
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
        futures, self._futures = list(self._futures.values()), {}
        futures += [f for _, f in self._queued]
        self._queued = []
        self._token_of.clear()
        for fut in futures:
            if not fut.done():
                fut.set_exception(error)

    def _on_call(self) -> None:
        try:
            self._engine.poll()
            done = self._engine.reap(1 << 16, timeout=0)
        except VhostUserError as e:
            self._fail(e)
            return
        for token, status, data in done:
            fut = self._futures.pop(token, None)
            if fut is not None:
                self._token_of.pop(fut, None)
                if not fut.done():
                    fut.set_result((status, data))
        if done and self._queued:
            self._flush()

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
    async def _one(self, request: tuple[Any, ...]) -> tuple[int, bytes | None]:
        if self._error is not None:
            raise self._error
        fut: asyncio.Future[tuple[int, bytes | None]] = self._loop.create_future()
        self._queued.append((request, fut))
        if not self._flush_scheduled:
            # Every request made in this turn of the loop goes to the ring in one native call
            # (one publish, at most one kick).
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        try:
            return await fut
        except asyncio.CancelledError:
            token = self._token_of.pop(fut, None)
            if token is not None:
                self._futures.pop(token, None)
                # The slot comes back when the device completes the request, not before.
                self._engine.cancel(token)
            # (Still queued: _flush skips a future that is done.)
            raise

    def _flush(self) -> None:
        self._flush_scheduled = False
        queued = [(r, f) for r, f in self._queued if not f.done()]
        self._queued = []
        if not queued or self._error is not None:
            return
        try:
            tokens = self._engine.submit([r for r, _ in queued])
        except VhostUserError as e:
            for _, f in queued:
                if not f.done():
                    f.set_exception(e)
            return
        for token, (_, fut) in zip(tokens, queued):
            self._futures[token] = fut
            self._token_of[fut] = token
        # Back-pressure: what did not fit (ring or staging slots full) waits for completions.
        self._queued = queued[len(tokens) :]

    async def _checked(self, rtype: RequestType, request: tuple[Any, ...]) -> bytes | None:
        status, data = await self._one(request)
        if status != 0:
            name = _STATUS_NAMES.get(status, str(status))
            raise BlockError(f"virtio-blk request type {int(rtype)} failed: {name}", status=status)
        return data

    async def read(self, offset: int, length: int) -> bytes:
        """Read `length` bytes at byte `offset` (multiples of 512); longer than a staging slot:
        several requests in flight at once."""
        slot = self._slot
        if 0 < length <= slot and offset >= 0 and not (offset | length) % SECTOR:
            # The common case with the fewest Python steps (one coroutine level).
            status, data = await self._one((_IN, offset // SECTOR, length))
            if status:
                raise BlockError(f"virtio-blk read failed: {_STATUS_NAMES.get(status, status)}", status=status)
            return data or b""
        _check_aligned(offset, length)
        if length <= slot:
            if not length:
                return b""
            data = await self._checked(RequestType.IN, (RequestType.IN, offset // SECTOR, length))
            return data or b""
        parts = await asyncio.gather(*(self.read(offset + o, min(slot, length - o)) for o in range(0, length, slot)))
        return b"".join(parts)

    async def readinto(self, offset: int, buffer: Buffer) -> int:
        """Read ``len(buffer)`` bytes at byte `offset` into a writable buffer."""
        view = memoryview(buffer).cast("B")
        view[:] = await self.read(offset, view.nbytes)
        return view.nbytes

    async def write(self, offset: int, data: Buffer) -> None:
        """Write `data` at byte `offset` (multiples of 512)."""
        view = memoryview(data).cast("B")
        _check_aligned(offset, view.nbytes)
        slot = self._engine.slot_bytes
        if view.nbytes <= slot:
            if view.nbytes:
                await self._checked(RequestType.OUT, (RequestType.OUT, offset // SECTOR, data))
            return
        await asyncio.gather(
            *(self.write(offset + o, view[o : o + slot]) for o in range(0, view.nbytes, slot))
        )

    async def flush(self) -> None:
        """FLUSH."""
        await self._checked(RequestType.FLUSH, (RequestType.FLUSH, 0, 0))

    async def discard(self, offset: int, length: int) -> None:
        """DISCARD one range."""
        _check_aligned(offset, length)
        await self._checked(RequestType.DISCARD, (RequestType.DISCARD, offset // SECTOR, length // SECTOR))

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """WRITE_ZEROES one range."""
        _check_aligned(offset, length)
        request = (RequestType.WRITE_ZEROES, offset // SECTOR, length // SECTOR, unmap)
        await self._checked(RequestType.WRITE_ZEROES, request)

    async def get_id(self) -> bytes:
        """GET_ID: the device's serial."""
        data = await self._checked(RequestType.GET_ID, (RequestType.GET_ID, 0, 0))
        return (data or b"").split(b"\0", 1)[0]

    @property
    def in_flight(self) -> int:
        """Requests on the ring (including cancelled ones the device has not completed)."""
        return int(self._engine.in_flight)


class AsyncNetClient:
    """A :class:`~vhostuser_rs.netclient.NetClient` driven from an asyncio event loop (queue
    pair `queue_pair`): ``await recv()``, ``async for header, frame in client``, ``await
    send(frames)``. Received frames are reaped when the RX call eventfd becomes readable
    (``loop.add_reader``); a back-end that hangs up ends every wait with
    ConnectionClosedError. Use it from the loop's thread only."""

    def __init__(self, client: NetClient, *, queue_pair: int = 0) -> None:
        self.client = client
        self.queue_pair = queue_pair
        self._loop = asyncio.get_running_loop()
        self._rx_fd = client.fileno(queue_pair)
        self._main_fd = client.frontend.fileno()
        self._waiter: asyncio.Future[None] | None = None
        self._backlog: list[tuple[NetHeader, bytes]] = []
        self._error: BaseException | None = None
        self._loop.add_reader(self._rx_fd, self._wake)
        self._loop.add_reader(self._main_fd, self._on_main)

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, queue_pair: int = 0, **options: Any) -> AsyncNetClient:
        """Connect with :meth:`NetClient.connect`'s keyword options (the negotiation runs in the
        loop's default executor); the data path is then driven by the loop."""
        loop = asyncio.get_running_loop()
        client = await loop.run_in_executor(None, functools.partial(NetClient.connect, path, **options))
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
            self._fail(ConnectionClosedError("the back-end hung up"))
        else:
            # An unsolicited message: not ours to read. Look again later rather than spin.
            self._loop.remove_reader(self._main_fd)
            self._loop.call_later(
                0.1, lambda: self._error is None and self._loop.add_reader(self._main_fd, self._on_main)
            )

    async def recv(self, *, max_frames: int = 64) -> list[tuple[NetHeader, bytes]]:
        """Up to `max_frames` received frames with their headers; waits for the first without
        blocking the loop."""
        while True:
            if self._backlog:
                out, self._backlog = self._backlog[:max_frames], self._backlog[max_frames:]
                return out
            if self._error is not None:
                raise self._error
            frames = self.client.recv(max_frames=max_frames, timeout=0, queue_pair=self.queue_pair)
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
            n = self.client.send(pending, queue_pair=self.queue_pair)
            sent += n
            pending = pending[n:]
            if pending:
                await asyncio.sleep(poll)
        return sent
