"""A virtio-blk client over the vhost-user front-end: read and write any vhost-user-blk
back-end (qemu-storage-daemon, SPDK, ``vhostuser-rs serve-blk``...) from Python.

Example::

    from vhostuser_rs.blk import BlockClient

    with BlockClient.connect("/run/qsd.sock", num_queues=1, queue_size=128) as disk:
        print(disk.config.capacity * 512, "bytes")
        disk.write(0, b"x" * 4096)
        assert disk.read(0, 4096) == b"x" * 4096
        disk.flush()
"""

from __future__ import annotations

import enum
import os
import struct
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

from . import _native
from ._native import GuestMemory
from .enums import ProtocolFeature, VirtioFeature
from .exceptions import ConnectionClosedError, NegotiationError, VhostUserError, VhostUserTimeoutError
from .frontend import BuiltinHandler, Frontend, IommuTable, Steps, Virtqueue

__all__ = ["BlockClient", "BlockConfig", "BlockError", "BlockFeature", "Completion", "Request", "RequestType"]

#: Anything with the buffer protocol (bytes, bytearray, memoryview, mmap...).
Buffer = bytes | bytearray | memoryview
#: A request for :meth:`BlockClient.submit`: ``(RequestType, offset, length or data[, unmap])``.
Request = tuple[Any, ...]
#: A completion from :meth:`BlockClient.reap`: ``(token, status, data or None)``.
Completion = tuple[int, int, bytes | None]

# The values are defined once, in Rust (src/virtio/blk.rs), under the spec's names.
_BLK = _native.VIRTIO_BLK

SECTOR = _BLK["SECTOR_SIZE"]
CONFIG_SIZE = _BLK["CONFIG_SIZE"]  # up to and including unused1: what qemu-storage-daemon answers
_HEADER_SIZE = _BLK["REQUEST_HEADER_SIZE"]
_ID_BYTES = _BLK["VIRTIO_BLK_ID_BYTES"]
_UNMAP = _BLK["VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP"]
_S_OK = _BLK["VIRTIO_BLK_S_OK"]
_STATUS_NAMES = {v: k.removeprefix("VIRTIO_BLK_S_") for k, v in _BLK.items() if k.startswith("VIRTIO_BLK_S_")}


def _feature(name: str) -> int:
    return 1 << _BLK[f"VIRTIO_BLK_F_{name}"]


def _request_type(name: str) -> int:
    return _BLK[f"VIRTIO_BLK_T_{name}"]


class BlockFeature(enum.IntFlag, boundary=enum.KEEP):
    """virtio-blk feature bits (device-specific range)."""

    SIZE_MAX = _feature("SIZE_MAX")
    SEG_MAX = _feature("SEG_MAX")
    GEOMETRY = _feature("GEOMETRY")
    RO = _feature("RO")
    BLK_SIZE = _feature("BLK_SIZE")
    FLUSH = _feature("FLUSH")
    TOPOLOGY = _feature("TOPOLOGY")
    CONFIG_WCE = _feature("CONFIG_WCE")
    MQ = _feature("MQ")
    DISCARD = _feature("DISCARD")
    WRITE_ZEROES = _feature("WRITE_ZEROES")
    LIFETIME = _feature("LIFETIME")
    SECURE_ERASE = _feature("SECURE_ERASE")


class RequestType(enum.IntEnum):
    """virtio-blk request types."""

    IN = _request_type("IN")
    OUT = _request_type("OUT")
    FLUSH = _request_type("FLUSH")
    GET_ID = _request_type("GET_ID")
    DISCARD = _request_type("DISCARD")
    WRITE_ZEROES = _request_type("WRITE_ZEROES")


class BlockError(VhostUserError, OSError):
    """The device answered a request with IOERR (1) or UNSUPP (2); ``status`` holds it."""

    status: int = 1


@dataclass(frozen=True)
class BlockConfig:
    """``struct virtio_blk_config`` (the first 60 bytes)."""

    capacity: int
    size_max: int
    seg_max: int
    cylinders: int
    heads: int
    sectors: int
    blk_size: int
    physical_block_exp: int
    alignment_offset: int
    min_io_size: int
    opt_io_size: int
    writeback: int
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: int

    @classmethod
    def parse(cls, data: bytes) -> BlockConfig:
        """Decode the little-endian config bytes (at least 60)."""
        if len(data) < CONFIG_SIZE:
            raise ValueError(f"virtio-blk config needs {CONFIG_SIZE} bytes, got {len(data)}")
        view = memoryview(data)
        values: dict[str, int] = {}
        for field in fields(cls):
            offset, size = _native.VIRTIO_BLK_CONFIG[field.name]
            values[field.name] = int.from_bytes(view[offset : offset + size], "little")
        return cls(**values)

    @property
    def size_bytes(self) -> int:
        """Capacity in bytes."""
        return self.capacity * SECTOR


#: Features this client acknowledges when the device offers them.
CLIENT_FEATURES = (
    BlockFeature.SIZE_MAX
    | BlockFeature.SEG_MAX
    | BlockFeature.GEOMETRY
    | BlockFeature.RO
    | BlockFeature.BLK_SIZE
    | BlockFeature.FLUSH
    | BlockFeature.TOPOLOGY
    | BlockFeature.MQ
    | BlockFeature.DISCARD
    | BlockFeature.WRITE_ZEROES
)


class BlockClient:
    """A virtio-blk driver on a vhost-user front-end.

    Each request is one native call (stage the header and data in the ring entry's own staging
    slot, add the chain, publish, kick when the device asks, poll then wait with the GIL
    released, check the status, copy the data out); :meth:`submit` / :meth:`reap` keep many in
    flight, and :mod:`vhostuser_rs.aio` drives them from an event loop. This native path may be
    used from several threads at once. With ``iommu=``, ``reconnect=`` or ``native=False``
    requests take the Python path instead (one thread per client; no batch API).

    With ``reconnect=SECONDS`` (:meth:`connect`) a back-end that dies or restarts is replaced
    by a new session on the same socket path while a request waits (QEMU's ``reconnect=``):
    the front-end negotiates again, hands over the rings and the inflight buffer
    (INFLIGHT_SHMFD, set up at connect when offered), and the new back-end resubmits what the
    old one had not completed. A request either completes or raises VhostUserTimeoutError after
    `timeout`; none is lost. Without it a hang-up raises ConnectionClosedError.

    With ``packed=True`` the rings are packed (VIRTIO_F_RING_PACKED): asked for and not offered
    is a NegotiationError. On a packed ring ``reconnect=`` sets up no inflight buffer: the
    requests in flight are written into the ring again for the new back-end
    (:meth:`DriverQueue.hand_over`), so one the old back-end had executed without completing
    may run twice (as on a split ring without INFLIGHT_SHMFD).
    """

    def __init__(
        self,
        frontend: Frontend,
        *,
        num_queues: int = 1,
        queue_size: int = 128,
        memory_size: int = 64 << 20,
        indirect: bool = False,
        event_idx: bool | None = None,
        timeout: float | None = 5.0,
        iommu: IommuTable | None = None,
        slot_size: int = 128 << 10,
        poll: float = 50e-6,
        native: bool = True,
        packed: bool = False,
    ) -> None:
        steps = self._setup(
            frontend, num_queues=num_queues, queue_size=queue_size, memory_size=memory_size, indirect=indirect,
            event_idx=event_idx, timeout=timeout, iommu=iommu, slot_size=slot_size, poll=poll, native=native,
            packed=packed,
        )
        frontend._run(steps)

    def _setup(
        self,
        frontend: Frontend,
        *,
        num_queues: int = 1,
        queue_size: int = 128,
        memory_size: int = 64 << 20,
        indirect: bool = False,
        event_idx: bool | None = None,
        timeout: float | None = 5.0,
        iommu: IommuTable | None = None,
        slot_size: int = 128 << 10,
        poll: float = 50e-6,
        native: bool = True,
        packed: bool = False,
    ) -> Steps[None]:
        """The set-up as steps (run blocking by the constructor, by the loop in
        :meth:`AsyncBlockClient.connect <vhostuser_rs.aio.AsyncBlockClient.connect>`)."""
        self.frontend = frontend
        self.timeout = timeout
        if iommu is not None and indirect:
            raise ValueError("indirect descriptor tables are not translated through the IOMMU")
        self.iommu = iommu
        #: Called with the client after the device said its config changed (CONFIG_CHANGE_MSG)
        #: and :attr:`config` was re-read, e.g. after a resize.
        self.config_callbacks: list[Callable[[BlockClient], object]] = []
        # Weakly: the handler lives in the session's native core, out of the garbage
        # collector's sight, so a strong reference back to the client would keep a client
        # dropped without close() (and its fds) alive for good.
        config_changed = weakref.WeakMethod(self._config_changed)

        def on_config_change(fe: Frontend) -> None:
            method = config_changed()
            if method is not None:
                method(fe)

        handler = BuiltinHandler(iommu=iommu, on_config_change=on_config_change)
        self._memory: GuestMemory | None = GuestMemory.allocate(memory_size)
        offered = yield from frontend.get_features.steps()
        wanted = int(CLIENT_FEATURES) | int(VirtioFeature.VERSION_1)
        if indirect:
            wanted |= int(VirtioFeature.INDIRECT_DESC)
        if event_idx is None or event_idx:
            wanted |= int(VirtioFeature.EVENT_IDX)
        if event_idx and VirtioFeature.EVENT_IDX not in offered:
            raise NegotiationError("the device does not offer EVENT_IDX")
        if indirect and VirtioFeature.INDIRECT_DESC not in offered:
            raise NegotiationError("the device does not offer INDIRECT_DESC")
        if VirtioFeature.VERSION_1 not in offered:
            raise NegotiationError("the device does not offer VERSION_1")
        if iommu is not None:
            wanted |= int(VirtioFeature.ACCESS_PLATFORM)
            if VirtioFeature.ACCESS_PLATFORM not in offered:
                raise NegotiationError("the device does not offer ACCESS_PLATFORM")
        result = yield from frontend.negotiate.steps(
            features=wanted, memory=self.memory, num_queues=num_queues, config_size=CONFIG_SIZE, handler=handler,
            packed=packed,
        )
        self.features = result.features
        self.config = BlockConfig.parse(result.config) if result.config is not None else None
        if self.config is not None and int(self.features) & BlockFeature.MQ and num_queues > self.config.num_queues:
            raise NegotiationError(f"the device has {self.config.num_queues} queues, {num_queues} requested")
        self.indirect = indirect
        #: Whether the rings are packed (VIRTIO_F_RING_PACKED negotiated).
        self.packed = VirtioFeature.RING_PACKED in result.features
        if (
            frontend.reconnect is not None
            and ProtocolFeature.INFLIGHT_SHMFD in result.protocol_features
            and not self.packed
        ):
            # Kept by the front-end for the next back-end (vhost-user-blk does this in QEMU).
            yield from frontend.setup_inflight.steps(num_queues, queue_size)
        self.queues: list[Virtqueue] = []
        for i in range(num_queues):
            vq = yield from frontend.setup_queue.steps(i, queue_size, self.memory, indirect_max=8 if indirect else 0)
            self.queues.append(vq)
        # The native request path (one call per request, a staging slot per ring entry): used
        # unless the client translates through an IOMMU table, reconnects (the ring is handed
        # over between sessions by frontend.py) or kicks in-band.
        self._slot_size = slot_size
        self._poll = poll
        self._native = native
        self._engines: list[_native.BlockRequests | None] = [self._make_engine(vq) for vq in self.queues]
        self._engine_rings: list[Virtqueue] = list(self.queues)
        self._scratch = 0
        self._scratch_size = 0
        if not all(self._engines) or iommu is not None or frontend.reconnect is not None:
            # The Python path stages every request in one area.
            self._scratch = self.memory.alloc(1 << 20, 4096)
            self._scratch_size = 1 << 20
        # Requests that timed out but are still in a ring, by queue: their descriptors point
        # into the staging area, so no new request may use it until they complete.
        self._abandoned: dict[int, set[int]] = {}

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        num_queues: int = 1,
        queue_size: int = 128,
        memory_size: int = 64 << 20,
        indirect: bool = False,
        event_idx: bool | None = None,
        timeout: float | None = 5.0,
        reconnect: float | None = None,
        iommu: IommuTable | None = None,
        slot_size: int = 128 << 10,
        poll: float = 50e-6,
        native: bool = True,
        packed: bool = False,
    ) -> BlockClient:
        """Connect to a vhost-user-blk back-end and set up `num_queues` rings. `reconnect`:
        seconds to keep trying to reach a restarted back-end after it hangs up (see the class).
        `iommu`: drive the device with ACCESS_PLATFORM: every ring and buffer address is the
        IOVA the table maps the client's guest memory at (guest-physical 0 up to
        `memory_size`), and the back-end's IOTLB misses are answered from the table.

        `slot_size`: the staging area of each ring entry (requests are staged there; longer
        reads and writes are split into several requests of at most this size, all in flight
        at once). `poll`: seconds a request polls the used ring (yielding the CPU) before
        sleeping on the call eventfd — a back-end that polls its rings (``serve-blk
        --poll-us``) usually answers within it, which saves both sides a wake-up. `native`:
        False keeps every request on the Python path (one staging area, the ring driven
        through :class:`DriverQueue` calls), as ``iommu=`` and ``reconnect=`` always do.
        `packed`: drive packed rings (VIRTIO_F_RING_PACKED, virtio 1.2 §2.8) instead of split
        ones; a back-end that does not offer RING_PACKED raises NegotiationError (there is no
        silent fall-back). Every path (native, batch, ``run_io``, aio, ``reconnect=``) works on
        either."""
        fe = Frontend.connect(path, timeout=timeout, reconnect=reconnect)
        try:
            return cls(
                fe,
                num_queues=num_queues,
                queue_size=queue_size,
                memory_size=memory_size,
                indirect=indirect,
                event_idx=event_idx,
                timeout=timeout,
                iommu=iommu,
                slot_size=slot_size,
                poll=poll,
                native=native,
                packed=packed,
            )
        except BaseException:
            fe.close()
            raise

    def __enter__(self) -> BlockClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the session and release every fd at once, from any state (also after the
        back-end died): the socket, the back-end request channel, the rings' eventfds, the
        inflight buffer, and the client's guest memory (its memfd goes when nothing else refers
        to it: views and rings taken from this client keep it). Requests waiting on other
        threads fail with ConnectionClosedError. Idempotent."""
        for engine in self._engines:
            if engine is not None:
                engine.close()
        self._engines = []
        self._engine_rings = []
        self.frontend.close()
        self.queues = []
        # The rings and the staging area live in the memory: let it go now.
        self._memory = None

    @property
    def memory(self) -> GuestMemory:
        """The guest memory shared with the back-end (rings, staging area)."""
        if self._memory is None:
            raise ConnectionClosedError("the BlockClient is closed")
        return self._memory

    def _config_changed(self, frontend: Frontend) -> None:
        # CONFIG_CHANGE_MSG (spec): the device config space changed; re-read it as a driver
        # does on a configuration change interrupt. Runs on the back-end request channel's
        # thread, before the back-end gets its ack.
        self.config = BlockConfig.parse(frontend.get_config(0, CONFIG_SIZE))
        for callback in list(self.config_callbacks):
            callback(self)

    def _dma(self, addr: int, size: int) -> int:
        """The address the device sees for guest-physical [addr, addr+size)."""
        if self.iommu is None:
            return addr
        iova = self.iommu.iova_of(addr, size)
        if iova is None:
            raise VhostUserError(f"guest address {addr:#x}+{size:#x} is not mapped in the IOMMU table")
        return iova

    @property
    def capacity(self) -> int:
        """Size in bytes."""
        return self.config.size_bytes if self.config else 0

    # -- requests --------------------------------------------------------------------------------
    def _submit(self, rtype: int, sector: int, out: bytes = b"", in_len: int = 0, *, queue: int = 0) -> bytes:
        """One request: header (+ out data) readable, (in data +) status writable; waits for it."""
        if _HEADER_SIZE + len(out) + in_len + 1 > self._scratch_size:
            raise ValueError("request larger than the 1 MiB staging area")
        if any(self._abandoned.values()):
            self._settle_abandoned()
        vq = self.queues[queue]
        hdr = self._scratch
        data = hdr + _HEADER_SIZE
        mem = self.memory
        mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        readable = [(self._dma(hdr, _HEADER_SIZE), _HEADER_SIZE)]
        writable = []
        if out:
            mem.write(data, out)
            readable.append((self._dma(data, len(out)), len(out)))
        status_addr = data + len(out) + in_len
        if in_len:
            writable.append((self._dma(data, in_len), in_len))
        writable.append((self._dma(status_addr, 1), 1))
        mem.write(status_addr, b"\xff")
        head = vq.queue.add(readable, writable, indirect=self.indirect)
        vq.queue.publish()
        vq.kick_if_needed()
        self._wait(vq, head)
        status = mem.read(status_addr, 1)[0]
        if status != _S_OK:
            name = _STATUS_NAMES.get(status, str(status))
            raise BlockError(f"virtio-blk request type {rtype} failed: {name}", status=status)
        return mem.read(data, in_len) if in_len else b""

    def _wait(self, vq: Virtqueue, head: int) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        abandoned = self._abandoned.setdefault(vq.index, set())
        while True:
            for done, _ in vq.queue.reap():
                if done == head:
                    return
                abandoned.discard(done)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                # Still in the ring: it may complete later (e.g. after a reconnect); until then
                # its buffers stay reserved.
                abandoned.add(head)
                raise VhostUserTimeoutError("virtio-blk request timed out")
            if not vq.wait(min(left, 0.1) if left is not None else 0.1):
                fe = self.frontend
                if fe.reconnect is None and fe.peer_closed:
                    abandoned.add(head)
                    raise ConnectionClosedError("the back-end hung up with the request in flight")

    def _settle_abandoned(self) -> None:
        """Wait (up to `timeout`) for requests that timed out earlier to complete: they still
        own the staging area."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        for index, heads in self._abandoned.items():
            vq = self.queues[index]
            while heads:
                for done, _ in vq.queue.reap():
                    heads.discard(done)
                if not heads:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise VhostUserTimeoutError(
                        f"{len(heads)} earlier request(s) on queue {index} timed out and are still in flight"
                    )
                if not vq.wait(min(left, 0.1) if left is not None else 0.1):
                    fe = self.frontend
                    if fe.reconnect is None and fe.peer_closed:
                        raise ConnectionClosedError("the back-end hung up with earlier requests in flight")

    def _make_engine(self, vq: Virtqueue) -> _native.BlockRequests | None:
        if not self._native or self.iommu is not None or self.frontend.reconnect is not None or vq.inband:
            return None
        return _native.BlockRequests(
            vq.queue, self.memory, vq.kick_fd, vq.call_fd, self.frontend._main_fd(),
            index=vq.index, indirect=self.indirect, slot_bytes=self._slot_size, poll=self._poll,
        )

    def _engine(self, queue: int) -> _native.BlockRequests | None:
        if self._memory is None:
            raise ConnectionClosedError("the BlockClient is closed")
        vq = self.queues[queue]
        if not self._engines:
            raise ConnectionClosedError("the BlockClient is closed")
        if self._engine_rings[queue] is not vq:
            # The ring was replaced (stop_queue + setup_queue): drive the new one.
            old = self._engines[queue]
            if old is not None:
                old.close()
            self._engines[queue] = self._make_engine(vq)
            self._engine_rings[queue] = vq
        return self._engines[queue]

    def read(self, offset: int, length: int, *, queue: int = 0) -> bytes:
        """Read `length` bytes at byte `offset` (both multiples of 512): one native call that
        stages the request, adds, publishes and kicks (when the device asks), waits with the
        GIL released and checks the status."""
        # The common case with the fewest Python steps: the native call checks the arguments.
        try:
            engine = self._engines[queue]
            if engine is not None and self._engine_rings[queue] is self.queues[queue]:
                return engine.read(offset, length, self.timeout)
        except IndexError:
            pass
        _check_aligned(offset, length)
        engine = self._engine(queue)
        if engine is None:
            return self._submit(RequestType.IN, offset // SECTOR, in_len=length, queue=queue)
        return engine.read(offset, length, self.timeout)

    def readinto(self, offset: int, buffer: Buffer, *, queue: int = 0) -> int:
        """Read ``len(buffer)`` bytes at byte `offset` into a writable buffer (bytearray,
        memoryview, mmap, numpy array...: C-contiguous); returns the byte count. The data is
        copied once, from the staging slot into `buffer`."""
        # The native call checks the offset and the buffer (writable, contiguous, its length).
        try:
            engine = self._engines[queue]
            if engine is not None and self._engine_rings[queue] is self.queues[queue]:
                return engine.readinto(offset, buffer, self.timeout)
        except IndexError:
            pass
        view = memoryview(buffer)
        length = view.nbytes
        _check_aligned(offset, length)
        engine = self._engine(queue)
        if engine is None:
            view.cast("B")[:] = self._submit(RequestType.IN, offset // SECTOR, in_len=length, queue=queue)
            return length
        return engine.readinto(offset, view, self.timeout)

    def write(self, offset: int, data: Buffer, *, queue: int = 0) -> None:
        """Write `data` (any bytes-like object) at byte `offset` (both multiples of 512)."""
        try:
            engine = self._engines[queue]
            if engine is not None and self._engine_rings[queue] is self.queues[queue]:
                return engine.write(offset, data, self.timeout)
        except IndexError:
            pass
        length = memoryview(data).nbytes
        _check_aligned(offset, length)
        engine = self._engine(queue)
        if engine is None:
            self._submit(RequestType.OUT, offset // SECTOR, out=bytes(data), queue=queue)
        elif length:
            engine.write(offset, data, self.timeout)

    def flush(self, *, queue: int = 0) -> None:
        """FLUSH: make completed writes durable."""
        engine = self._engine(queue)
        if engine is None:
            self._submit(RequestType.FLUSH, 0, queue=queue)
        else:
            engine.request(RequestType.FLUSH, timeout=self.timeout)

    def discard(self, offset: int, length: int, *, queue: int = 0) -> None:
        """DISCARD one range (needs the DISCARD feature)."""
        _check_aligned(offset, length)
        engine = self._engine(queue)
        if engine is None:
            seg = struct.pack("<QII", offset // SECTOR, length // SECTOR, 0)
            self._submit(RequestType.DISCARD, 0, out=seg, queue=queue)
        else:
            engine.request(RequestType.DISCARD, offset // SECTOR, length // SECTOR, timeout=self.timeout)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False, queue: int = 0) -> None:
        """WRITE_ZEROES one range (needs the WRITE_ZEROES feature)."""
        _check_aligned(offset, length)
        engine = self._engine(queue)
        if engine is None:
            seg = struct.pack("<QII", offset // SECTOR, length // SECTOR, _UNMAP if unmap else 0)
            self._submit(RequestType.WRITE_ZEROES, 0, out=seg, queue=queue)
        else:
            engine.request(
                RequestType.WRITE_ZEROES, offset // SECTOR, length // SECTOR, unmap=unmap, timeout=self.timeout
            )

    def get_id(self, *, queue: int = 0) -> bytes:
        """GET_ID: the device's serial (up to 20 bytes, NUL padding removed)."""
        engine = self._engine(queue)
        if engine is None:
            self.memory.write(self._scratch + _HEADER_SIZE, bytes(_ID_BYTES))
            data = self._submit(RequestType.GET_ID, 0, in_len=_ID_BYTES, queue=queue)
        else:
            data = engine.request(RequestType.GET_ID, timeout=self.timeout)
        return data.split(b"\0", 1)[0]

    # -- many requests in flight -----------------------------------------------------------------
    def _batch_engine(self, queue: int) -> _native.BlockRequests:
        engine = self._engine(queue)
        if engine is None:
            raise NegotiationError("the batch API needs the native request path (not with iommu= or reconnect=)")
        return engine

    def submit(self, requests: Iterable[Request], *, queue: int = 0) -> list[int]:
        """Submit a batch of requests without waiting, with one native call (one publish and
        at most one kick for the whole batch). Each request is a tuple:
        ``(RequestType.IN, offset, length)``, ``(RequestType.OUT, offset, data)``,
        ``(RequestType.FLUSH, 0, 0)``, ``(RequestType.DISCARD, offset, length)``,
        ``(RequestType.WRITE_ZEROES, offset, length[, unmap])`` or ``(RequestType.GET_ID, 0, 0)``
        — offsets and lengths in bytes, multiples of 512, a data length of at most
        :attr:`slot_size`.

        Returns one token per request submitted: a prefix of `requests`, shorter when the ring
        (or the staging slots, one per ring entry) is full — :meth:`reap` and submit the rest.
        Safe to call from several threads."""
        return self._batch_engine(queue).submit_bytes(requests)

    def reap(self, max: int = 64, *, timeout: float | None = 0.0, queue: int = 0) -> list[Completion]:
        """Collect up to `max` completions, oldest first: ``(token, status, data)`` tuples with
        the device's status byte (0 is VIRTIO_BLK_S_OK; others are reported here, not raised)
        and the bytes a read or GET_ID returned (None for other requests). Waits up to
        `timeout` seconds for the first one (0: only look; None: until one completes), with
        the GIL released; the back-end hanging up raises ConnectionClosedError."""
        return self._batch_engine(queue).reap(max, timeout=timeout)

    def collect(self, token: int, *, queue: int = 0) -> tuple[int, bytes | None] | None:
        """Collect one request's completion without waiting: ``(status, data)``, or None while
        it is in flight (call :meth:`reap` with ``max=0`` or wait on :meth:`call_fd` first)."""
        return self._batch_engine(queue).collect(token)

    def cancel(self, token: int, *, queue: int = 0) -> None:
        """Forget a submitted request. Its staging slot and ring entry stay reserved until the
        device completes it (virtio: the buffers are the device's until then)."""
        self._batch_engine(queue).cancel(token)

    def in_flight(self, *, queue: int = 0) -> int:
        """Requests submitted on ring `queue` and not completed yet."""
        return int(self._batch_engine(queue).in_flight)

    @property
    def slot_size(self) -> int:
        """The largest data length of one ring request (the staging slot of each ring entry)."""
        engine = self._engines[0] if self._engines else None
        return int(engine.slot_bytes) if engine is not None else self._scratch_size - _HEADER_SIZE - 1

    # -- batch I/O -------------------------------------------------------------------------------
    def run_io(
        self,
        *,
        rw: str = "randread",
        bs: int = 4096,
        iodepth: int = 32,
        duration: float = 10.0,
        queue: int = 0,
        verify: bool = False,
        poll: float | None = None,
        seed: int = 1,
        progress: bool = False,
        status: Callable[[int, int, float], object] | None = None,
        status_interval: float = 1.0,
    ) -> dict[str, Any]:
        """The batch interface: keep `iodepth` requests of `bs` bytes in flight on ring `queue`
        for `duration` seconds, resubmitting each completion at once, with the whole I/O loop in
        Rust (submit many, reap many; the GIL is released; Ctrl-C ends it early). `rw` is
        fio's randread, randwrite, read, write or rw. With `verify` writes stamp every sector
        with its number and reads check the stamps (stamp the device first for reads). `poll`:
        hybrid polling window in seconds — yield and re-check the used ring before sleeping on
        the call eventfd (None: 50 µs at iodepth ≤ 4; deeper, polling or sleeping by measurement —
        whichever gives the smaller product of this thread's CPU and wall time per I/O).

        `status` is called about every `status_interval` seconds during the run, on this
        thread, with the reads and writes completed so far and the seconds elapsed (an
        exception from it ends the run and is raised).

        Returns ios, bytes, elapsed (s), errors (non-OK status), verify_failures, p50_ns,
        p99_ns, p999_ns, max_ns (over all requests), per_second and per_second_writes
        (completions, and of them writes, in each whole second), and ``read`` and ``write``:
        the latency statistics of each direction (from just before submission to completion)
        — ios, min_ns, max_ns, mean_ns, stddev_ns, ``percentiles`` (fio's default list, as
        (percent, ns) nearest-rank values) and ``bins``: the non-empty buckets of fio's
        log-linear histogram as (fio's bucket value, low, high, count), ns.
        """
        engine = self._engines[queue] if self._engines else None
        if engine is not None and engine.in_flight:
            raise VhostUserError("run_io needs a ring with nothing in flight (reap what was submitted first)")
        if self.iommu is not None:
            raise NegotiationError("run_io does not translate through an IOMMU table (ACCESS_PLATFORM)")
        vq = self.queues[queue]
        return _native.block_io(
            vq.queue, self.memory, vq.kick_fd, vq.call_fd, rw=rw, bs=bs, iodepth=iodepth, duration=duration,
            capacity=self.capacity, verify=verify, seed=seed, progress=progress, poll=poll, status=status,
            status_interval=status_interval,
        )


def _check_aligned(offset: int, length: int) -> None:
    if offset % SECTOR or length % SECTOR or offset < 0 or length < 0:
        raise ValueError("offset and length must be non-negative multiples of 512")
