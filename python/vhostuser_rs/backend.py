"""The back-end role: serve a virtio device written in Python.

Subclass :class:`Device`, then serve it::

    class NullBlock(vu.Device):
        num_queues = 1
        features = vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.EVENT_IDX

        def config(self) -> bytes:
            return (1 << 20).to_bytes(8, "little") + bytes(52)      # capacity in sectors

        def process(self, queue, chains):
            for chain in chains:                                     # one call per batch
                chain.writable[-1][-1] = 0                           # status OK
                queue.complete(chain, chain.writable_len)

    vu.Backend.listen("/run/null.sock", NullBlock()).serve_forever()

Each started ring runs on a Rust worker thread which takes the GIL once per batch to call
:meth:`Device.process`; Rust writes the used ring and signals the driver once per batch. An
exception in a device method is logged at WARNING and answered per the spec (an empty
GET_CONFIG reply, a refused SET_CONFIG); chains a ``process`` call did not complete are returned
with 0 bytes written; the device keeps serving.

Live migration: while QEMU logs dirty pages (LOG_ALL), completing a chain — however many bytes
``written`` says, and also when an exception returns it with 0 — marks every page of its
writable buffers in the log, since a device may write anywhere in its writable views (the
virtio-blk status byte is the last one). A device must not write into a chain after completing it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from . import _native
from ._loop import readable
from ._native import BatchQueue, DescriptorChain, RingQueue
from .enums import BackendRequest, FrontendRequest, VirtioFeature
from .messages import SharedObject
from .exceptions import RequestRejectedError, VhostUserError, VhostUserTimeoutError

if TYPE_CHECKING:
    from .net import NetDevice

log = logging.getLogger("vhostuser_rs.backend")

__all__ = ["Backend", "BatchQueue", "Device", "RequestCoverage", "RingQueue", "coverage"]


class RequestCoverage(NamedTuple):
    """What the back-end role does with one front-end request (generated from the Rust code)."""

    #: The request.
    request: FrontendRequest
    #: ``"handled"`` (by the session), ``"device hook"`` (routed to the device, refused with
    #: the spec's answer if the device does not implement it) or ``"spec refusal"``.
    handling: str
    #: Whether the feature that gates it is offered: ``"offered"``, ``"if the device declares
    #: it"`` or ``"never offered"``.
    offer: str
    #: The answer when it is refused (not negotiated, invalid, or refused by the device).
    refusal: str
    #: What the back-end does, in a few words.
    note: str


def coverage() -> list[RequestCoverage]:
    """The back-end's coverage of every front-end request, in code order (what
    ``vhostuser-rs requests`` prints). Rust tests check each row against what a session answers."""
    return [
        RequestCoverage(FrontendRequest(code), handling, offer, refusal, note)
        for code, handling, offer, refusal, note in _native.backend_coverage()
    ]


class Device:
    """Base class of Python virtio devices (override what your device needs)."""

    #: The device type as the vhost-user back-end program conventions name it (vhost-user.json's
    #: ``VHostUserBackendType``: ``"block"``, ``"net"``, ``"fs"``, ``"gpu"``, ``"input"``,
    #: ``"scsi"``, ``"vsock"``...): the ``type`` that ``vhostuser-rs serve MODULE:CLASS
    #: --print-capabilities`` reports. Not sent on the wire (the front-end knows the type).
    device_type: str | None = None
    #: Number of queues (GET_QUEUE_NUM).
    num_queues: int = 1
    #: Largest ring size accepted (SET_VRING_NUM).
    max_queue_size: int = 1024
    #: Chains handed to one :meth:`process` call at most (1..1024). Each batch's completions
    #: are published, and the driver notified if it asked, before the next batch is taken, so
    #: a driver asleep until notified refills the ring while the device works on the rest
    #: (a null block device in Python at iodepth 32, driver on another CPU: 16 gives ~5x the
    #: IOPS of 64). Larger batches mean fewer Python calls where that matters more.
    drain_batch: int = 16
    #: Virtio feature bits offered (device bits, VERSION_1, EVENT_IDX, INDIRECT_DESC...).
    #: RING_PACKED is offered by default: the device sees the same chains and queue methods on
    #: split and packed rings (the front-end decides; QEMU acks it with ``packed=on``).
    features: int = int(
        VirtioFeature.VERSION_1 | VirtioFeature.EVENT_IDX | VirtioFeature.INDIRECT_DESC | VirtioFeature.RING_PACKED
    )

    #: Protocol features this device implements itself (e.g. ``ProtocolFeature.RARP`` or
    #: ``MTU`` for a net device), offered on top of what the session implements. The requests
    #: they gate reach :meth:`device_request`. ``ProtocolFeature.INBAND_NOTIFICATIONS`` asks the
    #: session to offer in-band notifications (VRING_KICK messages; VRING_CALL / VRING_ERR on the
    #: back-end request channel for rings without call / error fds), which the spec advises
    #: only for simulation. ``HOST_NOTIFIER | BACKEND_SEND_FD`` sends each running ring's doorbell
    #: page to the front-end (its driver kicks by writing it: no eventfd, no VM exit for a guest)
    #: and makes the ring's worker poll the avail ring (a CPU kept busy while the ring runs).
    #: Features nothing here implements (PAGEFAULT, CROSS_ENDIAN...) are never offered.
    protocol_features: int = 0

    def config(self) -> bytes:
        """The device config space (GET_CONFIG reads a window of it)."""
        return b""

    def device_request(self, request: FrontendRequest, value: int) -> bool:
        """A front-end request that belongs to the device: SEND_RARP (`value`'s low 6 bytes are
        the MAC, little-endian order of the wire) or NET_SET_MTU (`value` is the MTU). Its
        protocol feature was negotiated (offer it in :attr:`protocol_features`). Return True to
        accept; False refuses it (a failure ack under REPLY_ACK)."""
        return False

    def set_config(self, offset: int, data: bytes) -> bool:
        """A driver write to the config space; return True to accept it."""
        return False

    def create_crypto_session(self, op_code: int, params: bytes) -> int:
        """CREATE_CRYPTO_SESSION (virtio-crypto; declare ``ProtocolFeature.CRYPTO_SESSION`` in
        :attr:`protocol_features`): `params` are the session parameters as QEMU lays them out.
        Return the new session id (>= 0); a negative id or an exception refuses it (the spec's
        answer: a negative session id)."""
        raise NotImplementedError

    def close_crypto_session(self, session_id: int) -> bool:
        """CLOSE_CRYPTO_SESSION: return True once the session is closed; False refuses it."""
        raise NotImplementedError

    def gpu_set_socket(self, fd: int) -> bool:
        """GPU_SET_SOCKET (vhost-user-gpu devices): the socket of the separate vhost-user-gpu
        protocol. It is closed when this returns: ``os.dup`` it to keep it. Return True to
        accept; False or an exception refuses it (a failure ack under REPLY_ACK)."""
        raise NotImplementedError

    #: The :class:`Backend` serving this device (set by its constructor): use it to send
    #: back-end requests, e.g. ``self.backend.config_changed()``.
    backend: Backend | None = None

    def process(self, queue: BatchQueue, chains: list[DescriptorChain]) -> None:
        """Handle a batch of chains; call ``queue.complete(chain, written)`` for each."""
        raise NotImplementedError

    def process_request(self, queue_index: int, chain: DescriptorChain) -> int | None:
        """Per-request mode, for devices that override this instead of :meth:`process`: handle
        one chain and return how many bytes were written into its writable buffers (None = 0);
        Rust completes it. An exception completes it with 0 bytes and is logged."""
        raise NotImplementedError

    def event_fds(self, index: int) -> Sequence[int]:
        """Fds of this device to watch on the worker of ring `index`, next to its kicks (an
        eventfd your I/O threads signal, a socket, a timerfd); :meth:`on_event` runs when one is
        readable. Asked when the ring starts; keep them open while it runs. Overriding this also
        lets :meth:`process` defer chains (``queue.defer(chain)``)."""
        return ()

    def on_event(self, queue: RingQueue, fd: int) -> bool:
        """`fd` (one of :meth:`event_fds` of ring ``queue.index``) is readable (level-triggered:
        read it). Complete chains deferred by earlier batches with ``queue.complete(chain,
        written)``; the used ring is published and the driver notified once per wake-up. Return
        False to stop watching the ring's fds until the driver kicks it again."""
        return True

    def queue_started(self, index: int) -> None:
        """Ring `index` started (SET_VRING_KICK with size, addresses and memory known); it is
        processed once enabled."""

    def queue_stopped(self, index: int) -> None:
        """Ring `index` stopped: GET_VRING_BASE, a memory-table change (it starts again at
        once), or the end of the session."""

    def reset(self) -> None:
        """The front-end went away or reset the device."""

    # -- device state transfer (DEVICE_STATE), shared objects, shared memory -----------------
    #: VIRTIO Shared Memory Region sizes by shmid (index; 0 = unused id; at most 256 entries,
    #: multiples of the page size), the answer to GET_SHMEM_CONFIG. Fixed for the life of a
    #: connection (read when the device is served). A non-zero entry makes the back-end offer
    #: SHMEM (and BACKEND_SEND_FD, which SHMEM_MAP needs); map fds into the regions with
    #: :meth:`Backend.shmem_map`.
    shmem_regions: Sequence[int] = ()

    def save_state(self, stream: BinaryIO) -> None:
        """DEVICE_STATE, source side: write this device's internal state to `stream` (an
        in-memory binary stream; the format is yours) for :meth:`load_state` on the
        destination. Called with every ring stopped (the spec's STOPPED phase). Overriding both
        this and :meth:`load_state` makes the back-end offer DEVICE_STATE. An exception refuses
        the save: the front-end sees an error in SET_DEVICE_STATE_FD's reply and in
        CHECK_DEVICE_STATE, and the session goes on."""
        raise NotImplementedError

    def load_state(self, stream: BinaryIO) -> None:
        """DEVICE_STATE, destination side: restore what :meth:`save_state` wrote (all of it is
        in `stream`), so that the driver goes on without re-initialising the device. Called
        with every ring stopped, on a thread of the back-end. An exception fails
        CHECK_DEVICE_STATE."""
        raise NotImplementedError

    def get_shared_object(self, uuid: bytes) -> int | None:
        """SHARED_OBJECT: the front-end asks (GET_SHARED_OBJECT) for the dma-buf fd this device
        exported under `uuid` with :meth:`Backend.shared_object_add`; return it (the back-end
        sends a copy; you keep yours) or None if nothing is exported under it. Overriding this
        makes the back-end offer SHARED_OBJECT. QEMU sends this request without its UUID: it
        arrives as 16 zero bytes."""
        return None


class Backend:
    """Serves one :class:`Device` to one front-end at a time."""

    def __init__(
        self,
        device: Device | NetDevice,
        *,
        socket_path: str | None = None,
        fd: int | None = None,
        connect: str | None = None,
        workers: int | None = None,
        cpus: Sequence[int] | None = None,
        poll: float | None = 0.0,
    ) -> None:
        """Prefer :meth:`listen`, :meth:`from_fd` or :meth:`connect`. `workers`: threads shared
        by the rings (ring i on thread i % workers; default: one thread per ring); `cpus`: pin
        worker thread t to ``cpus[t % len(cpus)]``; `poll`: after a ring had work, keep checking
        the rings for this many seconds (yielding the CPU) before sleeping on the kick eventfds
        (0: eventfd mode; None: an adaptive window of up to 50 µs)."""
        batch = getattr(device, "drain_batch", 16)
        if not isinstance(batch, int) or not 1 <= batch <= 1024:
            raise ValueError(f"drain_batch must be 1..1024, not {batch!r}")
        self.device = device
        self.workers = workers
        self.cpus = None if cpus is None else list(cpus)
        self.poll = poll
        device.backend = self
        #: The back-end request channel of the current session.
        self.requests = _native.BackendRequests()
        self.socket_path = socket_path
        self.fd = fd
        self.connect_path = connect
        # Bound now, so that the socket exists and fileno() works before serving starts.
        self._listener = (
            _native.Listener.bind(socket_path, replace_existing=True) if socket_path is not None else None
        )
        self._stop = _native.StopFlag()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @classmethod
    def listen(cls, path: str | os.PathLike[str], device: Device | NetDevice, **options: Any) -> Backend:
        """Serve on a listening socket at `path` (a stale socket file is replaced). `options`:
        ``workers``, ``cpus``, ``poll`` (see the constructor)."""
        return cls(device, socket_path=os.fspath(path), **options)

    @classmethod
    def from_fd(cls, fd: int, device: Device | NetDevice, **options: Any) -> Backend:
        """Serve the socket `fd` (the spec's ``--fd`` convention): a connected socket serves that
        one front-end; a listening one (bound by the management layer) is served like
        :meth:`listen`, one front-end at a time. `fd` stays the caller's (it is duplicated)."""
        return cls(device, fd=fd, **options)

    @classmethod
    def connect(cls, path: str | os.PathLike[str], device: Device | NetDevice, **options: Any) -> Backend:
        """Client mode: connect out to a front-end listening at `path` and serve that session."""
        return cls(device, connect=os.fspath(path), **options)

    def serve_forever(self, *, max_connections: int | None = None) -> None:
        """Serve until Ctrl-C (KeyboardInterrupt), :meth:`stop`, or until `max_connections`
        sessions ended."""
        _native.serve_device(
            self.device,
            listener=self._listener,
            fd=self.fd,
            connect=self.connect_path,
            max_connections=max_connections,
            stop=self._stop,
            requests=self.requests,
            workers=self.workers,
            cpus=self.cpus,
            poll=self.poll,
        )

    async def serve_async(self, *, max_connections: int | None = None) -> None:
        """:meth:`serve_forever` driven by the running asyncio loop, with no serving thread: the
        listening socket and the session's socket are watched with ``loop.add_reader``, and
        each readable event is handled by a non-blocking native step (the GIL released; the
        device's Python hooks take it on the ring workers as always). The data path stays on
        the Rust worker threads. One front-end at a time; ends after `max_connections`
        sessions, on :meth:`stop`, or when the socket of :meth:`from_fd` / :meth:`connect`
        hangs up. Cancelling it ends the session (rings stopped, device reset) and stops
        serving; the listening socket stays until :meth:`close`.

        A message is handled within the loop's turn; the handling is bounded but not always
        instant: GET_VRING_BASE waits for the ring's worker to finish its current batch,
        CHECK_DEVICE_STATE waits at most 5 s for a state transfer."""
        loop = asyncio.get_running_loop()
        server = _native.DeviceServer(
            self.device, requests=self.requests, workers=self.workers, cpus=self.cpus, poll=self.poll
        )
        served = 0
        while (max_connections is None or served < max_connections) and not self._stop.is_set:
            conn = await self._next_connection(loop, first=served == 0)
            if conn is None:
                return
            served += 1
            with conn:
                session = server.session(conn)
                try:
                    await self._serve_session(session)
                except (VhostUserError, OSError) as e:
                    if self._listener is None:
                        raise
                    # A broken or hostile front-end ends its own session only.
                    log.warning("front-end session ended: %s", str(e))
                finally:
                    session.close()
            if self._listener is None:
                return

    async def _next_connection(self, loop: asyncio.AbstractEventLoop, *, first: bool) -> _native.Connection | None:
        if self._listener is not None:
            listener = self._listener
            while not self._stop.is_set:
                if await readable(listener.fileno(), 0.2):
                    try:
                        # Readable: a connection is waiting (the timeout is never reached).
                        return listener.accept(timeout=1.0)
                    except VhostUserTimeoutError:
                        continue
            return None
        if not first:
            return None
        if self.fd is not None:
            return _native.Connection.from_fd(self.fd)
        assert self.connect_path is not None
        deadline = loop.time() + 5.0
        while True:
            try:
                return _native.Connection.connect(self.connect_path, timeout=0)
            except (FileNotFoundError, ConnectionRefusedError, BlockingIOError):
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.01)

    async def _serve_session(self, session: _native.BackendSession) -> None:
        fd = session.fileno()
        while not self._stop.is_set:
            if not await readable(fd, 0.2):
                continue
            if not session.handle_ready():
                return

    def fileno(self) -> int:
        """The listening socket (readable when a front-end connects), or the connected socket of
        :meth:`from_fd`. Client mode (:meth:`connect`) has none until it connects."""
        if self._listener is not None:
            return self._listener.fileno()
        if self.fd is not None:
            return self.fd
        raise ValueError("a client-mode back-end has no socket before it connects")

    def close(self) -> None:
        """Stop serving and stop listening (the socket file is removed). Idempotent."""
        self.stop()
        if self._listener is not None:
            self._listener.close()

    def backend_request(
        self,
        request: BackendRequest,
        payload: object = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
        timeout: float | None = 5.0,
    ) -> int | None:
        """Send a back-end request to the current front-end (needs BACKEND_REQ and
        SET_BACKEND_REQ_FD; `need_reply` needs REPLY_ACK). Returns the front-end's status when
        `need_reply` (0 = success), else None. Raises InvalidStateError without a channel and
        FeatureNotNegotiatedError when the request's protocol feature was not negotiated."""
        return self.requests.send(int(request), payload, list(fds), need_reply=need_reply, timeout=timeout)

    def config_changed(self, *, need_reply: bool = False, timeout: float | None = 5.0) -> None:
        """CONFIG_CHANGE_MSG: tell the driver to re-read the config space (needs CONFIG)."""
        status = self.backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=need_reply, timeout=timeout)
        if status:
            raise RequestRejectedError(
                f"the front-end failed CONFIG_CHANGE_MSG: {status:#x}",
                request=BackendRequest.CONFIG_CHANGE_MSG, status=status,
            )

    def shared_object_add(self, uuid: bytes, *, need_reply: bool = False, timeout: float | None = 5.0) -> None:
        """SHARED_OBJECT_ADD: export the object `uuid` (16 bytes); the front-end then asks this
        back-end for its fd with GET_SHARED_OBJECT (:meth:`Device.get_shared_object`). Needs
        SHARED_OBJECT negotiated; raises RequestRejectedError if the front-end refuses."""
        self._status(BackendRequest.SHARED_OBJECT_ADD, SharedObject(bytes(uuid)), (), need_reply, timeout)

    def shared_object_remove(self, uuid: bytes, *, need_reply: bool = False, timeout: float | None = 5.0) -> None:
        """SHARED_OBJECT_REMOVE: stop exporting `uuid` (only its exporter may remove it)."""
        self._status(BackendRequest.SHARED_OBJECT_REMOVE, SharedObject(bytes(uuid)), (), need_reply, timeout)

    def shared_object_lookup(self, uuid: bytes, *, timeout: float | None = 5.0) -> int:
        """SHARED_OBJECT_LOOKUP: the dma-buf fd exported under `uuid` by any back-end of the
        front-end (yours to close). The front-end always replies; a non-zero status raises
        RequestRejectedError."""
        status, fd = self.requests.shared_object_lookup(bytes(uuid), timeout=timeout)
        if status or fd is None:
            if fd is not None:
                os.close(fd)
            raise RequestRejectedError(
                f"the front-end found no shared object {bytes(uuid).hex()}: {status:#x}",
                request=BackendRequest.SHARED_OBJECT_LOOKUP, status=status or 1,
            )
        return fd

    def shmem_map(
        self, shmid: int, fd: int, *, shm_offset: int, length: int, fd_offset: int = 0, writable: bool = True,
        need_reply: bool = False, timeout: float | None = 5.0,
    ) -> None:
        """SHMEM_MAP: ask the front-end to map `length` bytes of `fd` (from `fd_offset`) at
        `shm_offset` of shared memory region `shmid` (one of :attr:`Device.shmem_regions`),
        read-write unless `writable` is False. The range must be page-aligned and inside the
        region, else InvalidStateError before anything is sent. Needs SHMEM and
        BACKEND_SEND_FD; RequestRejectedError if the front-end refuses."""
        status = self.requests.shmem_map(
            list(getattr(self.device, "shmem_regions", ())), shmid, fd, fd_offset=fd_offset,
            shm_offset=shm_offset, length=length, writable=writable, need_reply=need_reply, timeout=timeout,
        )
        self._check(BackendRequest.SHMEM_MAP, status)

    def shmem_unmap(
        self, shmid: int, *, shm_offset: int, length: int, need_reply: bool = False, timeout: float | None = 5.0,
    ) -> None:
        """SHMEM_UNMAP: ask the front-end to drop the mapping at `shm_offset` (exactly `length`
        bytes, as mapped) of region `shmid`."""
        status = self.requests.shmem_unmap(
            list(getattr(self.device, "shmem_regions", ())), shmid, shm_offset=shm_offset, length=length,
            need_reply=need_reply, timeout=timeout,
        )
        self._check(BackendRequest.SHMEM_UNMAP, status)

    def _status(
        self, request: BackendRequest, payload: object, fds: Sequence[int], need_reply: bool, timeout: float | None,
    ) -> None:
        self._check(request, self.backend_request(request, payload, fds, need_reply=need_reply, timeout=timeout))

    @staticmethod
    def _check(request: BackendRequest, status: int | None) -> None:
        if status:
            raise RequestRejectedError(
                f"the front-end failed {request.name}: {status:#x}", request=request, status=status
            )

    def start(self, *, max_connections: int | None = None) -> None:
        """Serve on a background thread (see :meth:`stop`); errors land in :attr:`error`."""
        if self._thread is not None:
            raise RuntimeError("already started")

        def run() -> None:
            try:
                self.serve_forever(max_connections=max_connections)
            except BaseException as e:  # noqa: BLE001 - kept for the caller
                self.error = e

        self._thread = threading.Thread(target=run, name="vhostuser_rs backend", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """End serving (the current session ends within about 200 ms) and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
