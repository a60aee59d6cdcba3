"""The front-end role: drive any vhost-user back-end from Python.

:class:`Frontend` has one method per front-end request of the spec, named after it in snake
case (``set_vring_addr`` sends SET_VRING_ADDR), plus compositions with verbs (:meth:`negotiate`,
:meth:`setup_queue`, :meth:`stop_queue`, :meth:`enable_logging`, :meth:`announce`). It remembers what was
negotiated: a request whose feature was not negotiated raises
:class:`~vhostuser_rs.FeatureNotNegotiatedError` before anything is sent (the ``hazmat`` layer
can still send it on purpose). With REPLY_ACK negotiated, every request without a reply of its
own asks for an ack (NEED_REPLY) and a non-zero ack raises
:class:`~vhostuser_rs.RequestRejectedError`. Every wait has a ``timeout`` in seconds, releases
the GIL and wakes for Ctrl-C.

Requests from the back-end (the back-end request channel, formerly "slave channel") are served
on a thread of their own by a :class:`BackendRequestHandler`, so an IOTLB miss that arrives while
a main-channel reply is awaited cannot deadlock. :class:`BuiltinHandler` answers every one of
them (an :class:`IommuTable` for IOTLB misses, config-change callbacks, a
:class:`SharedObjectTable`, :class:`SharedRegion` mappings for SHMEM, :class:`HostNotifier`
pages, in-band VRING_CALL / VRING_ERR).

Rings are split rings unless :meth:`Frontend.negotiate` is given ``packed=True``: then
VIRTIO_F_RING_PACKED is acknowledged (a back-end that does not offer it raises
NegotiationError) and :meth:`Frontend.setup_queue` sets up packed rings (virtio 1.2 §2.8), with
SET_VRING_ADDR carrying the descriptor ring and the driver and device event suppression areas,
and SET_VRING_BASE the packed encoding (positions and wrap counters of both sides).

``Frontend.connect(path, reconnect=SECONDS)`` replaces a back-end that hangs up with a new
session on the same path (:meth:`Frontend.reconnect_now`); :meth:`Frontend.close` releases
every fd at once from any state.

Each request method and composition is defined once, as the *steps* of its exchanges (a
generator yielding an :class:`Exchange` per message and receiving its reply, decorated with
:class:`exchange`): :class:`Frontend` runs the steps blocking, and
:class:`vhostuser_rs.aio.AsyncFrontend` runs the very same steps from an asyncio event loop.
Underneath, each exchange is a native state machine (send when the main channel is free, read
what has arrived of the reply, check it) that never blocks: the blocking runner waits on the
socket between steps, the event loop watches it with ``loop.add_reader``.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass, field
from types import EllipsisType
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from . import _native
from ._native import DirtyLog, DriverQueue, GuestMemory, SharedRegion
from .enums import BackendRequest, DeviceStatus, FrontendRequest, ProtocolFeature, VirtioFeature
from .exceptions import (
    ConnectionClosedError,
    NegotiationError,
    RequestRejectedError,
    VhostUserError,
    VhostUserTimeoutError,
)
from .messages import (
    CryptoSession,
    DeviceConfig,
    DeviceStateParams,
    InflightDesc,
    IotlbMsg,
    LogBase,
    MemoryRegion,
    MemoryTable,
    Message,
    MmapRequest,
    Payload,
    SharedObject,
    VringAddr,
    VringArea,
    VringFd,
    VringState,
)

if TYPE_CHECKING:
    from .aio import AsyncFrontend

P = ParamSpec("P")
R = TypeVar("R")

__all__ = [
    "BackendRequestHandler",
    "BuiltinHandler",
    "Exchange",
    "Frontend",
    "HostNotifier",
    "InflightBuffer",
    "IommuEntry",
    "IommuTable",
    "NegotiationResult",
    "SharedObjectTable",
    "SharedRegion",
    "Steps",
    "Virtqueue",
    "exchange",
]

log = logging.getLogger(__name__)

F = FrontendRequest

#: Protocol features this front-end knows how to use (what :meth:`Frontend.negotiate` acks by
#: default, intersected with the offer; of those served on the back-end request channel only
#: what the handler answers, plus SHMEM with a handler that maps it and INBAND_NOTIFICATIONS
#: when asked for).
SUPPORTED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.RARP
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.MTU
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.BACKEND_SEND_FD
    | ProtocolFeature.HOST_NOTIFIER
    | ProtocolFeature.INFLIGHT_SHMFD
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
    | ProtocolFeature.SHARED_OBJECT
    | ProtocolFeature.DEVICE_STATE
)

#: The transport feature bits (24..=40) are about the rings and the vhost layer, so the driver
#: side of this library must implement what it acknowledges. These are the ones it does: split
#: rings with EVENT_IDX and indirect tables (DriverQueue), VERSION_1, ANY_LAYOUT (a permission
#: for the driver, implied by VERSION_1), PROTOCOL_FEATURES. RING_PACKED only when the caller
#: asks for packed rings (``negotiate(packed=True)``); LOG_ALL is turned on by
#: :meth:`Frontend.enable_logging`; ACCESS_PLATFORM only when the caller asks for it (it then
#: serves IOTLB_MSG). Never IN_ORDER, NOTIFICATION_DATA, ORDER_PLATFORM, SR_IOV,
#: NOTIFY_ON_EMPTY, RING_RESET...: nothing here honours them.
DRIVER_TRANSPORT_FEATURES = (
    VirtioFeature.VERSION_1
    | VirtioFeature.ANY_LAYOUT
    | VirtioFeature.EVENT_IDX
    | VirtioFeature.INDIRECT_DESC
    | VirtioFeature.PROTOCOL_FEATURES
)
_TRANSPORT_BITS = ((1 << 41) - 1) & ~((1 << 24) - 1)  # bits 24..=40
#: One bit of the dirty log covers this many bytes of guest-physical memory (VHOST_LOG_PAGE).
LOG_PAGE_SIZE = 0x1000
_GUEST_ANNOUNCE = 1 << _native.VIRTIO_NET["VIRTIO_NET_F_GUEST_ANNOUNCE"]

#: Protocol features whose use needs someone serving the back-end request channel.
_CHANNEL_FEATURES = (
    ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.BACKEND_SEND_FD
    | ProtocolFeature.HOST_NOTIFIER
    | ProtocolFeature.SHARED_OBJECT
    | ProtocolFeature.SHMEM
    | ProtocolFeature.INBAND_NOTIFICATIONS
)

#: What ACCESS_PLATFORM needs on the protocol side.
_IOMMU_NEEDS = ProtocolFeature.BACKEND_REQ | ProtocolFeature.REPLY_ACK

#: Spec dependencies between protocol features (protocol.md §5.4): a bit is only acked with
#: the bits it needs.
_DEPENDENCIES = (
    (ProtocolFeature.INBAND_NOTIFICATIONS, ProtocolFeature.BACKEND_REQ | ProtocolFeature.REPLY_ACK),
    (ProtocolFeature.BACKEND_SEND_FD, ProtocolFeature.BACKEND_REQ),
    (ProtocolFeature.HOST_NOTIFIER, ProtocolFeature.BACKEND_REQ | ProtocolFeature.BACKEND_SEND_FD),
    (ProtocolFeature.SHARED_OBJECT, ProtocolFeature.BACKEND_REQ),
    (ProtocolFeature.SHMEM, ProtocolFeature.BACKEND_REQ | ProtocolFeature.BACKEND_SEND_FD),
    (ProtocolFeature.GET_VRING_BASE_INFLIGHT, ProtocolFeature.INFLIGHT_SHMFD),
    (ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN, ProtocolFeature.GET_VRING_BASE_INFLIGHT),
)


def _drop_unmet_dependencies(proto: ProtocolFeature) -> ProtocolFeature:
    changed = True
    while changed:
        changed = False
        for bit, needs in _DEPENDENCIES:
            if bit in proto and needs & ~proto:
                proto &= ~bit
                changed = True
    return proto


class BackendRequestHandler:
    """Answers requests the back-end sends on the back-end request channel.

    Override the methods named after the requests you handle (or start from
    :class:`BuiltinHandler`, which answers all of them). Each returns ``None`` or ``0`` for
    success, or a non-zero status; raising an exception answers with a failure and logs a
    warning; the default methods raise :class:`NotImplementedError`, answered as "not
    supported". File descriptors passed in are closed after the method returns (``os.dup`` one
    to keep it). :meth:`shared_object_lookup` returns ``(status, fd)``.

    The answer is sent as the ack when the back-end set NEED_REPLY (REPLY_ACK on the back-end
    request channel) and always for SHARED_OBJECT_LOOKUP, whose reply is mandatory.
    :meth:`Frontend.negotiate` acknowledges only the protocol features whose requests the
    handler answers (:meth:`protocol_features`).
    """

    def iotlb_msg(self, msg: IotlbMsg) -> int | None:
        """IOTLB miss or access failure; answer a miss by sending IOTLB_MSG UPDATE on the main
        channel, then return."""
        raise NotImplementedError

    def config_change_msg(self) -> int | None:
        """The device config space changed (re-read it with GET_CONFIG)."""
        raise NotImplementedError

    def vring_host_notifier_msg(self, area: VringArea, fd: int | None) -> int | None:
        """Map (or with NOFD unmap) a doorbell page for a ring."""
        raise NotImplementedError

    def vring_call(self, state: VringState) -> int | None:
        """In-band used-buffer notification for ring ``state.index``."""
        raise NotImplementedError

    def vring_err(self, state: VringState) -> int | None:
        """In-band error notification for ring ``state.index``."""
        raise NotImplementedError

    def shared_object_add(self, uuid: bytes) -> int | None:
        """The back-end exports a shared object."""
        raise NotImplementedError

    def shared_object_remove(self, uuid: bytes) -> int | None:
        """The back-end stops exporting a shared object."""
        raise NotImplementedError

    def shared_object_lookup(self, uuid: bytes) -> tuple[int, int | None]:
        """Look up a shared object: ``(0, dma_buf_fd)`` or ``(error, None)``. The fd stays
        yours (a duplicate is sent)."""
        raise NotImplementedError

    def shmem_map(self, request: MmapRequest, fd: int) -> int | None:
        """Map ``fd`` into a VIRTIO shared memory region."""
        raise NotImplementedError

    def shmem_unmap(self, request: MmapRequest) -> int | None:
        """Unmap part of a VIRTIO shared memory region."""
        raise NotImplementedError

    def shmem_config(self, sizes: Sequence[int]) -> None:
        """Called by :meth:`Frontend.negotiate` with GET_SHMEM_CONFIG's answer (size by shmid,
        0 = unused) when SHMEM was negotiated, before any SHMEM_MAP can arrive."""

    def attach(self, frontend: Frontend) -> None:
        """Called when `frontend` starts serving the channel with this handler (SET_BACKEND_REQ_FD,
        again after each reconnect: a new session starts from scratch)."""

    def detach(self, frontend: Frontend) -> None:
        """Called when `frontend` closes: release what the session's requests made you hold."""

    def protocol_features(self) -> ProtocolFeature:
        """The protocol features whose back-end requests this handler answers: BACKEND_REQ and
        CONFIG always, the others when the method(s) of their requests are overridden.
        INBAND_NOTIFICATIONS is acknowledged only when :meth:`Frontend.negotiate` is asked for it."""
        cls = type(self)
        base = BackendRequestHandler

        def has(*names: str) -> bool:
            return all(getattr(cls, n) is not getattr(base, n) for n in names)

        bits = ProtocolFeature.BACKEND_REQ | ProtocolFeature.CONFIG
        if has("vring_host_notifier_msg"):
            bits |= ProtocolFeature.HOST_NOTIFIER | ProtocolFeature.BACKEND_SEND_FD
        if has("shared_object_add", "shared_object_remove", "shared_object_lookup"):
            bits |= ProtocolFeature.SHARED_OBJECT
        if has("shmem_map", "shmem_unmap"):
            bits |= ProtocolFeature.SHMEM | ProtocolFeature.BACKEND_SEND_FD
        if has("vring_call", "vring_err"):
            bits |= ProtocolFeature.INBAND_NOTIFICATIONS
        return bits

    # Called by the Rust channel thread; returns (status, fd to send or None, hand the fd over).
    def _vhostuser_dispatch(self, message: Message, fds: list[int]) -> tuple[int, int | None, bool]:
        request = message.request
        name = request.name.lower() if isinstance(request, BackendRequest) else None
        method = getattr(self, name, None) if name else None
        if method is None:
            return _errno_status(errno.ENOSYS), None, False
        payload = message.payload
        try:
            if request is BackendRequest.SHARED_OBJECT_LOOKUP:
                assert isinstance(payload, SharedObject)
                status, fd = method(payload.uuid)
                if isinstance(fd, _HandOver):
                    return int(status), fd.fd, True
                return int(status), fd, False
            if request in (BackendRequest.SHARED_OBJECT_ADD, BackendRequest.SHARED_OBJECT_REMOVE):
                assert isinstance(payload, SharedObject)
                result = method(payload.uuid)
            elif request is BackendRequest.CONFIG_CHANGE_MSG:
                result = method()
            elif request is BackendRequest.VRING_HOST_NOTIFIER_MSG:
                result = method(payload, fds[0] if fds else None)
            elif request is BackendRequest.SHMEM_MAP:
                result = method(payload, fds[0])
            else:
                result = method(payload)
        except NotImplementedError:
            return _errno_status(errno.ENOSYS), None, False
        except Exception as e:
            # The traceback goes into the record as text: a record holding the traceback object
            # keeps the failing frames' locals (guest memory, mappings, fds) alive for as long as
            # a logging handler keeps the record.
            text = "".join(traceback.format_exception(e))
            log.warning("back-end request %s failed in %r:\n%s", getattr(request, "name", request), self, text)
            return 1, None, False
        return (0 if result is None else int(result)), None, False


def _errno_status(errno_value: int) -> int:
    return (-errno_value) & 0xFFFF_FFFF_FFFF_FFFF


class _HandOver(int):
    """An fd returned by :meth:`BackendRequestHandler.shared_object_lookup` that was opened for
    the reply: the channel closes it once sent."""

    @property
    def fd(self) -> int:
        return int(self)


_KEEP = 4096


def _keep(records: list[IotlbMsg], msg: IotlbMsg) -> None:
    """Append, dropping the older half once more than _KEEP are held."""
    records.append(msg)
    if len(records) > _KEEP:
        del records[: _KEEP // 2]


@dataclass(frozen=True)
class IommuEntry:
    """One mapping of an :class:`IommuTable`: `size` bytes from `iova` to guest-physical `addr`
    with permission `perm` (1 read-only, 2 write-only, 3 read-write: the device's access)."""

    iova: int
    size: int
    addr: int
    perm: int


class IommuTable:
    """The front-end's IOMMU for back-ends driven with ACCESS_PLATFORM (spec: "IOMMU support";
    protocol.md §6.6): every ring and buffer address the driver hands out is an IOVA, and the
    back-end asks for each translation it lacks with an IOTLB MISS on the back-end request
    channel. The table answers each MISS by sending IOTLB_MSG UPDATE on the main channel (the
    entry covering the IOVA, clipped to the guest-memory region it falls in, with the entry's
    permission) before acking the MISS, as the spec requires; a MISS nothing covers (or with a
    permission the entry does not grant) is answered with a failure (-EFAULT). :meth:`unmap`
    sends IOTLB_MSG INVALIDATE to every session using the table. ACCESS_FAIL reports are kept
    in :attr:`access_failures`.

    Three lines drive an ACCESS_PLATFORM back-end::

        iommu = vu.IommuTable()
        iommu.map(IOVA, mem.size, 0)        # the whole guest memory at IOVA, read-write
        fe.negotiate(memory=mem, features=wanted | vu.VirtioFeature.ACCESS_PLATFORM,
                     handler=vu.BuiltinHandler(iommu=iommu))
    """

    RO = 1
    WO = 2
    RW = 3

    def __init__(self) -> None:
        self._entries: list[IommuEntry] = []  # sorted by iova, never overlapping
        self._lock = threading.Lock()
        # Weakly: a table outlives the sessions it serves (and a session dropped without
        # close() must not be kept alive by it).
        self._sessions: weakref.WeakSet[Frontend] = weakref.WeakSet()
        #: The latest IOTLB MISS requests answered (with an UPDATE or a failure), oldest first;
        #: at most :data:`_KEEP` are kept, so a back-end flooding misses cannot grow memory.
        self.misses: list[IotlbMsg] = []
        #: The latest IOTLB ACCESS_FAIL reports received (as bounded as :attr:`misses`).
        self.access_failures: list[IotlbMsg] = []

    @property
    def entries(self) -> list[IommuEntry]:
        """The mappings, by IOVA."""
        with self._lock:
            return list(self._entries)

    def map(self, iova: int, size: int, addr: int, perm: int = RW) -> None:
        """Map `size` bytes at `iova` to guest-physical `addr` with `perm` (RO, WO or RW). The
        range may not overlap an existing mapping (unmap it first)."""
        if size <= 0 or iova < 0 or addr < 0 or iova + size > 1 << 64 or addr + size > 1 << 64:
            raise ValueError(f"bad IOMMU range {iova:#x}+{size:#x} -> {addr:#x}")
        if perm not in (self.RO, self.WO, self.RW):
            raise ValueError(f"IOMMU permission must be RO (1), WO (2) or RW (3), not {perm}")
        with self._lock:
            for e in self._entries:
                if e.iova < iova + size and iova < e.iova + e.size:
                    raise ValueError(f"IOVA range {iova:#x}+{size:#x} overlaps {e}")
            self._entries.append(IommuEntry(iova, size, addr, perm))
            self._entries.sort(key=lambda e: e.iova)

    def unmap(self, iova: int, size: int) -> None:
        """Remove the IOVA range (splitting mappings that straddle its ends) and invalidate it
        in every back-end using the table (IOTLB_MSG INVALIDATE, acked)."""
        if size <= 0 or iova < 0 or iova + size > 1 << 64:
            raise ValueError(f"bad IOMMU range {iova:#x}+{size:#x}")
        end = iova + size
        with self._lock:
            kept: list[IommuEntry] = []
            for e in self._entries:
                e_end = e.iova + e.size
                if e_end <= iova or e.iova >= end:
                    kept.append(e)
                    continue
                if e.iova < iova:
                    kept.append(IommuEntry(e.iova, iova - e.iova, e.addr, e.perm))
                if e_end > end:
                    kept.append(IommuEntry(end, e_end - end, e.addr + (end - e.iova), e.perm))
            self._entries = kept
            sessions = list(self._sessions)
        for fe in sessions:
            if VirtioFeature.ACCESS_PLATFORM in fe.features and not fe.closed:
                fe.iotlb_msg(IotlbMsg(iova, size, 0, 0, IotlbMsg.INVALIDATE))

    def translate(self, iova: int, perm: int = RO) -> int | None:
        """The guest-physical address of `iova` if a mapping grants `perm`, else None."""
        e = self._find(iova, perm)
        return None if e is None else e.addr + (iova - e.iova)

    def iova_of(self, addr: int, size: int = 1) -> int | None:
        """An IOVA at which guest-physical [addr, addr+size) is mapped in one entry, or None
        (what a driver puts in descriptors and ring addresses under ACCESS_PLATFORM)."""
        with self._lock:
            for e in self._entries:
                if e.addr <= addr and addr + size <= e.addr + e.size:
                    return e.iova + (addr - e.addr)
        return None

    def _find(self, iova: int, perm: int) -> IommuEntry | None:
        with self._lock:
            for e in self._entries:
                if e.iova <= iova < e.iova + e.size:
                    return e if perm & ~e.perm == 0 else None
        return None

    def _attach(self, fe: Frontend) -> None:
        with self._lock:
            self._sessions.add(fe)

    def _detach(self, fe: Frontend) -> None:
        with self._lock:
            self._sessions.discard(fe)

    def _miss(self, fe: Frontend, msg: IotlbMsg) -> int:
        with self._lock:
            _keep(self.misses, msg)
        entry = self._find(msg.iova, msg.perm)
        memory = fe.memory
        if entry is None or memory is None:
            return _errno_status(errno.EFAULT)
        gpa = entry.addr + (msg.iova - entry.iova)
        # The UPDATE must name one contiguous range of front-end addresses: clip the entry to
        # the guest-memory region the missed address is in.
        for r in memory.regions:
            if r.guest_addr <= gpa < r.guest_addr + r.size:
                lo = max(entry.addr, r.guest_addr)
                hi = min(entry.addr + entry.size, r.guest_addr + r.size)
                iova = entry.iova + (lo - entry.addr)
                fe.iotlb_msg(IotlbMsg(iova, hi - lo, r.user_addr + (lo - r.guest_addr), entry.perm, IotlbMsg.UPDATE))
                return 0
        return _errno_status(errno.EFAULT)


class SharedObjectTable:
    """The front-end's UUID → exporter table for SHARED_OBJECT (spec: "Shared objects";
    protocol.md §6.15). Back-ends export objects with SHARED_OBJECT_ADD and withdraw them with
    SHARED_OBJECT_REMOVE (only the exporter may); SHARED_OBJECT_LOOKUP is answered with the
    object's dma-buf fd, fetched from the exporting back-end with GET_SHARED_OBJECT on its
    main channel, or with an fd the application exported itself (:meth:`add`). Share one
    table between the :class:`BuiltinHandler` of several sessions to let their back-ends
    exchange objects, as QEMU's global table does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[bytes, Frontend | int] = {}

    def add(self, uuid: bytes, fd: int) -> None:
        """Export an object of the application's own: LOOKUP answers with a duplicate of `fd`
        (which stays yours; keep it open while exported)."""
        with self._lock:
            if bytes(uuid) in self._objects:
                raise KeyError(f"shared object {uuid.hex()} is already exported")
            self._objects[bytes(uuid)] = fd

    def remove(self, uuid: bytes) -> None:
        """Withdraw an object (any exporter's)."""
        with self._lock:
            del self._objects[bytes(uuid)]

    def exporter(self, uuid: bytes) -> Frontend | int | None:
        """The session that exported `uuid` (or the application's fd), or None."""
        with self._lock:
            return self._objects.get(bytes(uuid))

    def __contains__(self, uuid: object) -> bool:
        with self._lock:
            return isinstance(uuid, bytes) and uuid in self._objects

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)

    #: Most objects a table holds: a back-end exporting more is refused (-ENOSPC) rather than
    #: growing the front-end's memory without bound.
    MAX_OBJECTS = 1 << 16

    def _add(self, fe: Frontend, uuid: bytes) -> int:
        with self._lock:
            if uuid in self._objects:
                return _errno_status(errno.EEXIST)
            if len(self._objects) >= self.MAX_OBJECTS:
                return _errno_status(errno.ENOSPC)
            self._objects[uuid] = fe
        return 0

    def _remove(self, fe: Frontend, uuid: bytes) -> int:
        with self._lock:
            owner = self._objects.get(uuid)
            if owner is None:
                return _errno_status(errno.ENOENT)
            if owner is not fe:
                return _errno_status(errno.EPERM)  # only the exporter may remove (spec)
            del self._objects[uuid]
        return 0

    def _lookup(self, uuid: bytes) -> tuple[int, int | None]:
        owner = self.exporter(uuid)
        if owner is None:
            return _errno_status(errno.ENOENT), None
        if isinstance(owner, int):
            return 0, owner
        fd = owner.get_shared_object(uuid)
        if fd is None:
            return _errno_status(errno.ENOENT), None
        return 0, _HandOver(fd)

    def _forget(self, fe: Frontend) -> None:
        with self._lock:
            for uuid in [u for u, o in self._objects.items() if o is fe]:
                del self._objects[uuid]


class HostNotifier:
    """A ring's doorbell page mapped from the fd the back-end sent with
    VRING_HOST_NOTIFIER_MSG (HOST_NOTIFIER). While it is mapped, :meth:`Virtqueue.kick`
    writes the ring index there (a virtio-pci queue notification, 16 bits) instead of the
    kick eventfd, as a guest driver does through the notify region QEMU exposes."""

    def __init__(self, index: int, fd: int, size: int, offset: int) -> None:
        self.index = index
        self.size = size
        self.offset = offset
        self._map: mmap.mmap | None = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)

    def notify(self) -> None:
        """Write the ring index to the doorbell."""
        page = self._map
        if page is None:
            raise ValueError("the host notifier was unmapped")
        page[0:2] = struct.pack("<H", self.index)  # ValueError if unmapped meanwhile

    def read(self, offset: int = 0, size: int = 2) -> bytes:
        """Bytes of the page (for tests and debugging)."""
        page = self._map
        if page is None:
            raise ValueError("the host notifier was unmapped")
        return bytes(page[offset : offset + size])

    @property
    def closed(self) -> bool:
        """Whether the page was unmapped."""
        return self._map is None

    def close(self) -> None:
        """Unmap the page (idempotent)."""
        if self._map is not None:
            self._map.close()
            self._map = None


class BuiltinHandler(BackendRequestHandler):
    """Ready-made answers to every back-end request of the spec; pass it to
    :meth:`Frontend.negotiate` (``handler=``) instead of writing a handler, or subclass it to
    change one answer and keep the others.

    - IOTLB_MSG: MISS answered from :attr:`iommu` (:class:`IommuTable`); ACCESS_FAIL recorded.
    - CONFIG_CHANGE_MSG: counted in :attr:`config_changes`, then each callback of
      :attr:`config_callbacks` is called with the frontend (e.g. to re-read GET_CONFIG).
    - VRING_HOST_NOTIFIER_MSG: the page is mapped (:attr:`host_notifiers`, a
      :class:`HostNotifier` per ring) after QEMU's checks: ring set up or below the queue
      count, size equal to the page size, offset page-aligned, an fd; NOFD unmaps it.
    - VRING_CALL / VRING_ERR (INBAND_NOTIFICATIONS, see ``negotiate(inband_notifications=)``):
      signal the ring's local call / err eventfd, so :meth:`Virtqueue.wait` works the same;
      errors are counted in :attr:`vring_errors`.
    - SHARED_OBJECT_ADD / REMOVE / LOOKUP: :attr:`shared_objects` (:class:`SharedObjectTable`).
    - SHMEM_MAP / SHMEM_UNMAP: into :attr:`shared_regions` (a :class:`SharedRegion` per shmid
      GET_SHMEM_CONFIG announced), with the spec's range, overlap and exact-unmap checks.

    A handler serves one :class:`Frontend` (across its reconnects); the IOMMU and shared-object
    tables may be shared.
    """

    def __init__(
        self,
        *,
        iommu: IommuTable | None = None,
        shared_objects: SharedObjectTable | None = None,
        on_config_change: Callable[[Frontend], object] | None = None,
    ) -> None:
        self.iommu = iommu if iommu is not None else IommuTable()
        self.shared_objects = shared_objects if shared_objects is not None else SharedObjectTable()
        self.config_callbacks: list[Callable[[Frontend], object]] = [] if on_config_change is None else [on_config_change]
        self.config_changes = 0
        self.host_notifiers: dict[int, HostNotifier] = {}
        self.shared_regions: dict[int, SharedRegion] = {}
        self.vring_errors: dict[int, int] = {}
        self.frontend: Frontend | None = None
        self._lock = threading.Lock()

    def protocol_features(self) -> ProtocolFeature:
        """Everything: BACKEND_REQ, BACKEND_SEND_FD, CONFIG, HOST_NOTIFIER, SHARED_OBJECT, SHMEM
        and INBAND_NOTIFICATIONS (acked only when asked for)."""
        return (
            ProtocolFeature.BACKEND_REQ
            | ProtocolFeature.BACKEND_SEND_FD
            | ProtocolFeature.CONFIG
            | ProtocolFeature.HOST_NOTIFIER
            | ProtocolFeature.SHARED_OBJECT
            | ProtocolFeature.SHMEM
            | ProtocolFeature.INBAND_NOTIFICATIONS
        )

    def attach(self, frontend: Frontend) -> None:
        if self.frontend is not None and self.frontend is not frontend:
            raise ValueError("a BuiltinHandler serves one Frontend")
        self._end_session()
        self.frontend = frontend
        self.iommu._attach(frontend)

    def detach(self, frontend: Frontend) -> None:
        if frontend is not self.frontend:
            return
        self._end_session()
        self.iommu._detach(frontend)
        self.frontend = None

    def _end_session(self) -> None:
        """What the back-end made us hold goes with its session (a new one starts from scratch)."""
        with self._lock:
            notifiers, self.host_notifiers = self.host_notifiers, {}
            regions, self.shared_regions = self.shared_regions, {}
        for n in notifiers.values():
            n.close()
        for r in regions.values():
            r.unmap_all()
        if self.frontend is not None:
            self.shared_objects._forget(self.frontend)

    def _fe(self) -> Frontend:
        if self.frontend is None:
            raise NegotiationError("the handler serves no front-end session")
        return self.frontend

    def iotlb_msg(self, msg: IotlbMsg) -> int | None:
        if msg.type == IotlbMsg.MISS:
            return self.iommu._miss(self._fe(), msg)
        if msg.type == IotlbMsg.ACCESS_FAIL:
            _keep(self.iommu.access_failures, msg)
            log.warning("the back-end reports an IOTLB access failure at IOVA %#x (perm %d)", msg.iova, msg.perm)
            return 0
        return _errno_status(errno.EINVAL)  # UPDATE / INVALIDATE are front-end requests

    def config_change_msg(self) -> int | None:
        self.config_changes += 1
        fe = self._fe()
        for callback in list(self.config_callbacks):
            callback(fe)
        return 0

    def vring_host_notifier_msg(self, area: VringArea, fd: int | None) -> int | None:
        fe = self._fe()
        if not fe._knows_queue(area.index):
            return _errno_status(errno.EINVAL)
        self._drop_host_notifier(area.index)
        if area.nofd or fd is None:
            return 0
        if area.size != mmap.PAGESIZE or area.offset % mmap.PAGESIZE:
            return _errno_status(errno.EINVAL)
        try:
            notifier = HostNotifier(area.index, fd, area.size, area.offset)
        except (OSError, ValueError, OverflowError):
            return _errno_status(errno.EINVAL)
        with self._lock:
            self.host_notifiers[area.index] = notifier
        return 0

    def _reset_mappings(self) -> None:
        with self._lock:
            notifiers, self.host_notifiers = self.host_notifiers, {}
            regions = list(self.shared_regions.values())
        for n in notifiers.values():
            n.close()
        for r in regions:
            r.unmap_all()

    def _drop_host_notifier(self, index: int) -> None:
        with self._lock:
            notifier = self.host_notifiers.pop(index, None)
        if notifier is not None:
            notifier.close()

    def host_notifier(self, index: int) -> HostNotifier | None:
        """The doorbell page mapped for ring `index`, if any."""
        with self._lock:
            return self.host_notifiers.get(index)

    def vring_call(self, state: VringState) -> int | None:
        vq = self._fe()._queues.get(state.index)
        if vq is None or vq._closed:
            return _errno_status(errno.EINVAL)
        os.eventfd_write(vq.call_fd, 1)
        return 0

    def vring_err(self, state: VringState) -> int | None:
        vq = self._fe()._queues.get(state.index)
        if vq is None or vq._closed:
            return _errno_status(errno.EINVAL)
        self.vring_errors[state.index] = self.vring_errors.get(state.index, 0) + 1
        os.eventfd_write(vq.err_fd, 1)
        return 0

    def shared_object_add(self, uuid: bytes) -> int | None:
        return self.shared_objects._add(self._fe(), uuid)

    def shared_object_remove(self, uuid: bytes) -> int | None:
        return self.shared_objects._remove(self._fe(), uuid)

    def shared_object_lookup(self, uuid: bytes) -> tuple[int, int | None]:
        return self.shared_objects._lookup(uuid)

    def shmem_config(self, sizes: Sequence[int]) -> None:
        regions = {shmid: SharedRegion(shmid, size) for shmid, size in enumerate(sizes) if size}
        with self._lock:
            old, self.shared_regions = self.shared_regions, regions
        for r in old.values():
            r.unmap_all()

    def shmem_map(self, request: MmapRequest, fd: int) -> int | None:
        region = self.shared_regions.get(request.shmid)
        if region is None or request.flags & ~1:
            return _errno_status(errno.EINVAL)
        try:
            region.map(fd, request.fd_offset, request.shm_offset, request.len, writable=bool(request.flags & 1))
        except VhostUserError:
            return _errno_status(errno.EINVAL)
        except OSError as e:
            return _errno_status(e.errno or errno.EINVAL)
        return 0

    def shmem_unmap(self, request: MmapRequest) -> int | None:
        region = self.shared_regions.get(request.shmid)
        if region is None:
            return _errno_status(errno.EINVAL)
        try:
            region.unmap(request.shm_offset, request.len)
        except VhostUserError:
            return _errno_status(errno.EINVAL)
        return 0


@dataclass
class InflightBuffer:
    """An inflight buffer (INFLIGHT_SHMFD): where the back-end records the requests it has taken
    from the rings and not completed. The front-end keeps it and hands it to the next back-end
    after a crash (:meth:`Frontend.setup_inflight` with ``buffer=``), which then resubmits those
    requests. Owns `fd`; a context manager."""

    desc: InflightDesc
    fd: int
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        """Close the fd (idempotent)."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> InflightBuffer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass
class Virtqueue:
    """A ring set up by :meth:`Frontend.setup_queue`: the driver side plus its eventfds.

    With INBAND_NOTIFICATIONS negotiated the back-end got no kick or call fd: :meth:`kick`
    sends VRING_KICK and the back-end's VRING_CALL / VRING_ERR messages signal the local
    `call_fd` / `err_fd` (:class:`BuiltinHandler`), so :meth:`wait` is unchanged. With a host
    notifier page mapped for the ring (HOST_NOTIFIER), :meth:`kick` writes the doorbell.

    `keep_fds`: a reconnect (:meth:`Frontend.reconnect_now`) hands the new back-end the same
    kick, call and error eventfds instead of new ones, as QEMU does (its notifiers belong to the
    device, not to the session) — for drivers whose data path, or whose caller's event loop,
    holds them (:class:`~vhostuser_rs.netclient.NetClient`). Otherwise each reconnect makes new
    ones, so a back-end that went away without dying cannot signal or consume them."""

    index: int
    queue: DriverQueue
    kick_fd: int
    call_fd: int
    err_fd: int
    _closed: bool = field(default=False, repr=False)
    frontend: Frontend | None = field(default=None, repr=False, compare=False)
    inband: bool = False
    keep_fds: bool = False

    def kick(self) -> None:
        """Notify the device: the host-notifier page if the back-end mapped one, VRING_KICK
        with INBAND_NOTIFICATIONS, else the kick eventfd."""
        fe = self.frontend
        handler = fe.handler if fe is not None else None
        if isinstance(handler, BuiltinHandler):
            notifier = handler.host_notifier(self.index)
            if notifier is not None:
                try:
                    notifier.notify()
                    return
                except ValueError:
                    pass  # unmapped meanwhile (NOFD, a new session): the eventfd again
        if self.inband and fe is not None:
            fe.vring_kick(self.index)
            return
        os.eventfd_write(self.kick_fd, 1)

    def kick_if_needed(self) -> bool:
        """Kick if the device asked for it (NO_NOTIFY / EVENT_IDX); returns whether it did."""
        if self.queue.kick_needed():
            self.kick()
            return True
        return False

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a call notification; ``False`` on timeout. On a front-end made with
        ``reconnect=``, a back-end hang-up seen meanwhile re-establishes the session
        (:meth:`Frontend.reconnect_now`, bounded by `timeout`) and returns ``False``: reap again."""
        fe = self.frontend
        if self._closed:
            raise ConnectionClosedError("the ring is closed")
        watch = [self.call_fd]
        if fe is not None and fe.reconnect is not None:
            main = fe._main_fd()
            if main is None:  # the session is already lost: try again now
                fe._reconnect_within(timeout)
                return False
            watch.append(main)
        try:
            ready, _, _ = select.select(watch, [], [], timeout)
            if self.call_fd in ready:
                try:
                    os.eventfd_read(self.call_fd)
                except BlockingIOError:
                    pass
                return True
        except (OSError, ValueError):
            if self._closed or (fe is not None and fe.closed):
                raise ConnectionClosedError("the ring was closed while waiting") from None
            raise
        if ready and fe is not None:
            if fe.peer_closed:
                fe._reconnect_within(timeout)
            else:
                # An unsolicited message on the main channel: not ours to read; wait for a call.
                ready, _, _ = select.select([self.call_fd], [], [], timeout)
                if ready:
                    os.eventfd_read(self.call_fd)
                    return True
        return False

    def close(self) -> None:
        """Close the eventfds (the ring memory belongs to the GuestMemory)."""
        if not self._closed:
            self._closed = True
            for fd in (self.kick_fd, self.call_fd, self.err_fd):
                os.close(fd)

    def __del__(self) -> None:
        # A ring dropped without close() (its client collected): its eventfds go with it. The
        # native objects that used them were part of the same garbage (they borrow the fds).
        try:
            self.close()
        except (OSError, TypeError):  # already closed elsewhere; interpreter shutdown
            pass


@dataclass(frozen=True)
class NegotiationResult:
    """What :meth:`Frontend.negotiate` settled on."""

    features: VirtioFeature
    protocol_features: ProtocolFeature
    num_queues: int
    max_mem_slots: int | None
    config: bytes | None


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request as the steps of a session yield it: what :meth:`Frontend.request` sends.
    The runner sends it back the ``(reply, fds)`` or throws in what the request failed with."""

    request: int
    payload: Payload
    fds: list[int]
    need_reply: bool | None
    timeout: float | None
    check_gate: bool


#: The steps of one request or composition: a generator that yields each :class:`Exchange`,
#: receives its ``(reply, fds)`` and returns the result. :class:`Frontend` runs it blocking,
#: :class:`~vhostuser_rs.aio.AsyncFrontend` from an event loop: one definition for both.
Steps = Generator[Exchange, tuple[Message | None, list[int]], R]


class _SyncCall(Generic[P, R]):
    """A request method bound to a :class:`Frontend`: calling it runs the exchanges blocking."""

    __slots__ = ("_fe", "_fn")

    def __init__(self, fe: Frontend, fn: Callable[Concatenate[Frontend, P], Steps[R]]) -> None:
        self._fe = fe
        self._fn = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._fe._run(self._fn(self._fe, *args, **kwargs))

    def steps(self, *args: P.args, **kwargs: P.kwargs) -> Steps[R]:
        """The steps of this call, to compose into other steps (``yield from``)."""
        return self._fn(self._fe, *args, **kwargs)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self._fn.__doc__


class _AsyncCall(Generic[P, R]):
    """A request method bound to an :class:`~vhostuser_rs.aio.AsyncFrontend`: calling it
    returns a coroutine that runs the exchanges without blocking the event loop."""

    __slots__ = ("_afe", "_fn")

    def __init__(self, afe: AsyncFrontend, fn: Callable[Concatenate[Frontend, P], Steps[R]]) -> None:
        self._afe = afe
        self._fn = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        run: Coroutine[Any, Any, R] = self._afe._run(self._fn(self._afe.frontend, *args, **kwargs))
        return run

    def steps(self, *args: P.args, **kwargs: P.kwargs) -> Steps[R]:
        """The steps of this call, to compose into other steps (``yield from``)."""
        return self._fn(self._afe.frontend, *args, **kwargs)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self._fn.__doc__


class exchange(Generic[P, R]):  # noqa: N801 - used as a decorator
    """Defines a request method once, as the steps of its exchanges: on a :class:`Frontend` it
    is a blocking method, on an :class:`~vhostuser_rs.aio.AsyncFrontend` a coroutine method.
    The steps always run against the session's :class:`Frontend` (its negotiated state, rings,
    handler)."""

    def __init__(self, fn: Callable[Concatenate[Frontend, P], Steps[R]]) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def __call__(self, fe: Frontend, *args: P.args, **kwargs: P.kwargs) -> R:
        """Called on the class (``Frontend.get_features(fe)``): the blocking form."""
        return fe._run(self.fn(fe, *args, **kwargs))

    @overload
    def __get__(self, obj: None, owner: type) -> exchange[P, R]: ...
    @overload
    def __get__(self, obj: Frontend, owner: type) -> _SyncCall[P, R]: ...
    @overload
    def __get__(self, obj: AsyncFrontend, owner: type) -> _AsyncCall[P, R]: ...
    def __get__(self, obj: object, owner: type) -> Any:
        if obj is None:
            return self
        if isinstance(obj, Frontend):
            return _SyncCall(obj, self.fn)
        return _AsyncCall(obj, self.fn)  # type: ignore[arg-type]


class _Requests:
    """The requests and compositions of a front-end session, each defined once as the steps
    of its exchanges (:class:`exchange`): :class:`Frontend` runs them blocking,
    :class:`~vhostuser_rs.aio.AsyncFrontend` from an event loop."""

    @exchange
    @staticmethod
    def request(
        fe: Frontend,
        request: FrontendRequest,
        payload: Payload = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
        timeout: float | None | EllipsisType = ...,
        check_gate: bool = True,
    ) -> Steps[tuple[Message | None, list[int]]]:
        """Send any request; returns ``(reply, fds)``. The building block of every method."""
        t = fe.timeout if isinstance(timeout, EllipsisType) else timeout
        return (yield Exchange(int(request), payload, list(fds), need_reply, t, check_gate))

    # -- one method per request ------------------------------------------------------------------
    @exchange
    @staticmethod
    def get_features(fe: Frontend) -> Steps[VirtioFeature]:
        """GET_FEATURES: the virtio and vhost feature bits the back-end offers."""
        return VirtioFeature((yield from fe._call(F.GET_FEATURES)))

    @exchange
    @staticmethod
    def set_features(fe: Frontend, features: int, *, need_reply: bool | None = None) -> Steps[None]:
        """SET_FEATURES: acknowledge a subset of the offered bits (keep PROTOCOL_FEATURES set if
        it was offered; without it the back-end enables all rings at once)."""
        yield from fe._call(F.SET_FEATURES, int(features), need_reply=need_reply)

    @exchange
    @staticmethod
    def set_owner(fe: Frontend) -> Steps[None]:
        """SET_OWNER: start the session."""
        yield from fe._call(F.SET_OWNER)

    @exchange
    @staticmethod
    def reset_owner(fe: Frontend) -> Steps[None]:
        """RESET_OWNER (deprecated; back-ends treat it as "disable all rings")."""
        yield from fe._call(F.RESET_OWNER)

    @exchange
    @staticmethod
    def set_mem_table(fe: Frontend, memory: GuestMemory) -> Steps[None]:
        """SET_MEM_TABLE: share all regions of `memory` (at most 8), one fd each."""
        regions = memory.regions
        yield from fe._call(F.SET_MEM_TABLE, MemoryTable(tuple(regions)), memory.fds())
        fe.memory = memory

    @exchange
    @staticmethod
    def set_log_base(fe: Frontend, log: DirtyLog, *, mmap_offset: int = 0) -> Steps[None]:
        """SET_LOG_BASE: hand the dirty log to the back-end (needs LOG_SHMFD for the fd form)."""
        fd = log.fileno()
        yield from fe._call(F.SET_LOG_BASE, LogBase(log.size, mmap_offset), [] if fd is None else [fd])

    @exchange
    @staticmethod
    def set_log_fd(fe: Frontend, fd: int) -> Steps[None]:
        """SET_LOG_FD: an eventfd the back-end may signal after log updates."""
        yield from fe._call(F.SET_LOG_FD, None, [fd])

    @exchange
    @staticmethod
    def set_vring_num(fe: Frontend, index: int, num: int) -> Steps[None]:
        """SET_VRING_NUM: ring size."""
        yield from fe._call(F.SET_VRING_NUM, VringState(index, num))

    @exchange
    @staticmethod
    def set_vring_addr(
        fe: Frontend, index: int, desc: int, used: int, avail: int, *, log_guest_addr: int = 0, log: bool = False
    ) -> Steps[None]:
        """SET_VRING_ADDR: ring addresses (this process's addresses, as QEMU sends them)."""
        yield from fe._call(F.SET_VRING_ADDR, VringAddr(index, 1 if log else 0, desc, used, avail, log_guest_addr))

    @exchange
    @staticmethod
    def set_vring_base(fe: Frontend, index: int, base: int) -> Steps[None]:
        """SET_VRING_BASE: where the device resumes. The ring must be stopped. Split rings: the
        next available index the device will read. Packed rings (RING_PACKED): bits 0-14 the
        next available slot, bit 15 the driver's wrap counter, bits 16-30 the next used slot,
        bit 31 the device's wrap counter (:attr:`DriverQueue.vring_base` computes it)."""
        yield from fe._call(F.SET_VRING_BASE, VringState(index, base))

    @exchange
    @staticmethod
    def get_vring_base(fe: Frontend, index: int) -> Steps[int]:
        """GET_VRING_BASE: stop the ring and return its base (split: the next available index;
        packed: the encoding of :meth:`set_vring_base`, of which some back-ends, DPDK's, fill
        only the low half)."""
        state = (yield from fe._call(F.GET_VRING_BASE, VringState(index, 0)))
        return int(state.num)

    @exchange
    @staticmethod
    def get_vring_base_skip_drain(fe: Frontend, index: int) -> Steps[int]:
        """GET_VRING_BASE_SKIP_DRAIN: stop the ring without draining in-flight requests."""
        state = (yield from fe._call(F.GET_VRING_BASE_SKIP_DRAIN, VringState(index, 0)))
        return int(state.num)

    @exchange
    @staticmethod
    def set_vring_kick(fe: Frontend, index: int, fd: int | None) -> Steps[None]:
        """SET_VRING_KICK: the kick eventfd (``None``: NOFD, the back-end polls)."""
        yield from fe._call(F.SET_VRING_KICK, VringFd(index, fd is None), [] if fd is None else [fd])

    @exchange
    @staticmethod
    def set_vring_call(fe: Frontend, index: int, fd: int | None) -> Steps[None]:
        """SET_VRING_CALL: the call eventfd (``None``: NOFD, no notifications)."""
        yield from fe._call(F.SET_VRING_CALL, VringFd(index, fd is None), [] if fd is None else [fd])

    @exchange
    @staticmethod
    def set_vring_err(fe: Frontend, index: int, fd: int | None) -> Steps[None]:
        """SET_VRING_ERR: the error eventfd (``None``: NOFD)."""
        yield from fe._call(F.SET_VRING_ERR, VringFd(index, fd is None), [] if fd is None else [fd])

    @exchange
    @staticmethod
    def get_protocol_features(fe: Frontend) -> Steps[ProtocolFeature]:
        """GET_PROTOCOL_FEATURES (needs PROTOCOL_FEATURES offered by GET_FEATURES)."""
        return ProtocolFeature((yield from fe._call(F.GET_PROTOCOL_FEATURES)))

    @exchange
    @staticmethod
    def set_protocol_features(fe: Frontend, features: int) -> Steps[None]:
        """SET_PROTOCOL_FEATURES: a subset of the offer, with its dependencies (spec §5.4)."""
        yield from fe._call(F.SET_PROTOCOL_FEATURES, int(features))

    @exchange
    @staticmethod
    def get_queue_num(fe: Frontend) -> Steps[int]:
        """GET_QUEUE_NUM: the most queues the back-end supports (queue pairs for net)."""
        return int((yield from fe._call(F.GET_QUEUE_NUM)))

    @exchange
    @staticmethod
    def set_vring_enable(fe: Frontend, index: int, enabled: bool = True) -> Steps[None]:
        """SET_VRING_ENABLE (needs PROTOCOL_FEATURES acknowledged)."""
        yield from fe._call(F.SET_VRING_ENABLE, VringState(index, 1 if enabled else 0))

    @exchange
    @staticmethod
    def send_rarp(fe: Frontend, mac: bytes) -> Steps[None]:
        """SEND_RARP: broadcast a RARP for a migrated guest's MAC (6 bytes)."""
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        yield from fe._call(F.SEND_RARP, int.from_bytes(mac, "little"))

    @exchange
    @staticmethod
    def net_set_mtu(fe: Frontend, mtu: int) -> Steps[None]:
        """NET_SET_MTU (needs MTU protocol feature and VIRTIO_NET_F_MTU)."""
        yield from fe._call(F.NET_SET_MTU, mtu)

    @exchange
    @staticmethod
    def set_backend_req_fd(fe: Frontend, handler: BackendRequestHandler) -> Steps[None]:
        """SET_BACKEND_REQ_FD: open the back-end request channel, served by `handler` on its
        own thread (replacing any previous channel)."""
        old = fe.handler
        if old is not None and old is not handler:
            old.detach(fe)
        handler.attach(fe)
        fe.handler = handler
        fd = fe._core.start_backend_channel(handler)
        try:
            yield from fe._call(F.SET_BACKEND_REQ_FD, None, [fd])
        finally:
            os.close(fd)

    @exchange
    @staticmethod
    def iotlb_msg(fe: Frontend, msg: IotlbMsg) -> Steps[None]:
        """IOTLB_MSG update or invalidation (needs ACCESS_PLATFORM); the ack is checked."""
        status = (yield from fe._call(F.IOTLB_MSG, msg))
        if status:
            raise RequestRejectedError(f"IOTLB_MSG rejected with status {status:#x}", request=F.IOTLB_MSG, status=status)

    @exchange
    @staticmethod
    def set_vring_endian(fe: Frontend, index: int, big_endian: bool) -> Steps[None]:
        """SET_VRING_ENDIAN (legacy cross-endian devices, CROSS_ENDIAN)."""
        yield from fe._call(F.SET_VRING_ENDIAN, VringState(index, 1 if big_endian else 0))

    @exchange
    @staticmethod
    def get_config(fe: Frontend, offset: int = 0, size: int = 256) -> Steps[bytes]:
        """GET_CONFIG: `size` bytes of device config space from `offset` (CONFIG). An empty or
        short reply is the back-end's way of failing and raises RequestRejectedError."""
        cfg = (yield from fe._call(F.GET_CONFIG, DeviceConfig(offset, bytes(size))))
        if not isinstance(cfg, DeviceConfig) or len(cfg.data) != size or cfg.offset != offset:
            raise RequestRejectedError("GET_CONFIG failed (empty or mismatched reply)", request=F.GET_CONFIG, status=1)
        return cfg.data

    @exchange
    @staticmethod
    def set_config(fe: Frontend, offset: int, data: bytes, *, migration: bool = False) -> Steps[None]:
        """SET_CONFIG: write config space (flags 1 = restore during migration)."""
        yield from fe._call(F.SET_CONFIG, DeviceConfig(offset, bytes(data), 1 if migration else 0))

    @exchange
    @staticmethod
    def create_crypto_session(fe: Frontend, session: CryptoSession) -> Steps[CryptoSession]:
        """CREATE_CRYPTO_SESSION (virtio-crypto)."""
        result: CryptoSession = (yield from fe._call(F.CREATE_CRYPTO_SESSION, session))
        return result

    @exchange
    @staticmethod
    def close_crypto_session(fe: Frontend, session_id: int) -> Steps[None]:
        """CLOSE_CRYPTO_SESSION."""
        yield from fe._call(F.CLOSE_CRYPTO_SESSION, session_id)

    @exchange
    @staticmethod
    def postcopy_advise(fe: Frontend) -> Steps[int]:
        """POSTCOPY_ADVISE: returns the back-end's userfaultfd (yours to close)."""
        _, fds = (yield from fe.request.steps(F.POSTCOPY_ADVISE))
        return fds[0]

    @exchange
    @staticmethod
    def postcopy_listen(fe: Frontend) -> Steps[None]:
        """POSTCOPY_LISTEN."""
        yield from fe._call(F.POSTCOPY_LISTEN)

    @exchange
    @staticmethod
    def postcopy_end(fe: Frontend) -> Steps[None]:
        """POSTCOPY_END."""
        yield from fe._call(F.POSTCOPY_END)

    @exchange
    @staticmethod
    def get_inflight_fd(fe: Frontend, num_queues: int, queue_size: int) -> Steps[tuple[InflightDesc, int | None]]:
        """GET_INFLIGHT_FD: the back-end's inflight buffer description and fd (yours to close)."""
        reply, fds = (yield from fe.request.steps(F.GET_INFLIGHT_FD, InflightDesc(0, 0, num_queues, queue_size)))
        assert reply is not None and isinstance(reply.payload, InflightDesc)
        return reply.payload, (fds[0] if fds else None)

    @exchange
    @staticmethod
    def set_inflight_fd(fe: Frontend, desc: InflightDesc, fd: int) -> Steps[None]:
        """SET_INFLIGHT_FD: hand an inflight buffer (back) to the back-end."""
        yield from fe._call(F.SET_INFLIGHT_FD, desc, [fd])

    @exchange
    @staticmethod
    def setup_inflight(
        fe: Frontend, num_queues: int, queue_size: int, *, buffer: InflightBuffer | None = None
    ) -> Steps[InflightBuffer | None]:
        """What QEMU does before starting the rings of a device that tracks inflight I/O:
        GET_INFLIGHT_FD for a new buffer (unless `buffer`, kept from an earlier back-end, is
        passed), then SET_INFLIGHT_FD. Returns the buffer to keep (yours to close), or None when
        the back-end declines (mmap_size 0). Needs INFLIGHT_SHMFD; split rings only (raises
        NegotiationError with RING_PACKED: a packed ring handed to a new back-end gets its
        requests in flight written into the ring again, which a back-end resubmitting from an
        inflight buffer would execute twice). On a
        ``reconnect=`` front-end the buffer is also kept as :attr:`inflight` and handed to each
        new back-end; the front-end then owns it (closed by :meth:`close`)."""
        if VirtioFeature.RING_PACKED in fe.features:
            raise NegotiationError("inflight tracking is set up for split rings only (RING_PACKED was negotiated)")
        if buffer is None:
            desc, fd = (yield from fe.get_inflight_fd.steps(num_queues, queue_size))
            if fd is None or desc.mmap_size == 0:
                if fd is not None:
                    os.close(fd)
                return None
            buffer = InflightBuffer(InflightDesc(desc.mmap_size, desc.mmap_offset, num_queues, queue_size), fd)
        yield from fe.set_inflight_fd.steps(buffer.desc, buffer.fd)
        if fe.reconnect is not None:
            fe.inflight = buffer
        return buffer

    @exchange
    @staticmethod
    def gpu_set_socket(fe: Frontend, fd: int) -> Steps[None]:
        """GPU_SET_SOCKET (vhost-user-gpu's side protocol)."""
        yield from fe._call(F.GPU_SET_SOCKET, None, [fd])

    @exchange
    @staticmethod
    def reset_device(fe: Frontend) -> Steps[None]:
        """RESET_DEVICE: disable all rings and reset device state; the session stays. The
        built-in handler's SHMEM mappings and host-notifier pages go with the device state
        (the front-end drops them on reset, spec: "SHMEM_MAP")."""
        yield from fe._call(F.RESET_DEVICE)
        if isinstance(fe.handler, BuiltinHandler):
            fe.handler._reset_mappings()

    @exchange
    @staticmethod
    def vring_kick(fe: Frontend, index: int) -> Steps[None]:
        """VRING_KICK: in-band kick (INBAND_NOTIFICATIONS)."""
        yield from fe._call(F.VRING_KICK, VringState(index, 0))

    @exchange
    @staticmethod
    def get_max_mem_slots(fe: Frontend) -> Steps[int]:
        """GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS)."""
        return int((yield from fe._call(F.GET_MAX_MEM_SLOTS)))

    @exchange
    @staticmethod
    def add_mem_reg(fe: Frontend, region: MemoryRegion, fd: int) -> Steps[None]:
        """ADD_MEM_REG: add one region with its fd."""
        yield from fe._call(F.ADD_MEM_REG, region, [fd])

    @exchange
    @staticmethod
    def rem_mem_reg(fe: Frontend, region: MemoryRegion) -> Steps[None]:
        """REM_MEM_REG: remove the region with the same guest address, user address and size."""
        yield from fe._call(F.REM_MEM_REG, region)

    @exchange
    @staticmethod
    def set_status(fe: Frontend, status: int) -> Steps[None]:
        """SET_STATUS: the virtio device status byte (STATUS)."""
        yield from fe._call(F.SET_STATUS, int(status))

    @exchange
    @staticmethod
    def get_status(fe: Frontend) -> Steps[DeviceStatus]:
        """GET_STATUS (STATUS)."""
        return DeviceStatus((yield from fe._call(F.GET_STATUS)))

    @exchange
    @staticmethod
    def get_shared_object(fe: Frontend, uuid: bytes) -> Steps[int | None]:
        """GET_SHARED_OBJECT: the exported dma-buf fd (yours to close), or None."""
        _, fds = (yield from fe.request.steps(F.GET_SHARED_OBJECT, SharedObject(bytes(uuid))))
        return fds[0] if fds else None

    @exchange
    @staticmethod
    def set_device_state_fd(fe: Frontend, direction: int, fd: int) -> Steps[int | None]:
        """SET_DEVICE_STATE_FD: start a state transfer over `fd`; returns the back-end's own fd
        to use instead (yours to close), or None."""
        reply, fds = (yield from fe.request.steps(F.SET_DEVICE_STATE_FD, DeviceStateParams(direction, 0), [fd]))
        assert reply is not None
        status = int(reply.payload) if isinstance(reply.payload, int) else 1
        if status & 0xFF:
            for f in fds:
                os.close(f)
            raise RequestRejectedError(f"SET_DEVICE_STATE_FD failed: {status:#x}", request=F.SET_DEVICE_STATE_FD, status=status)
        return fds[0] if fds else None

    @exchange
    @staticmethod
    def check_device_state(fe: Frontend) -> Steps[None]:
        """CHECK_DEVICE_STATE: raise if the back-end did not process the transferred state."""
        status = (yield from fe._call(F.CHECK_DEVICE_STATE))
        if status:
            raise RequestRejectedError(f"device state check failed: {status:#x}", request=F.CHECK_DEVICE_STATE, status=status)

    @exchange
    @staticmethod
    def get_shmem_config(fe: Frontend) -> Steps[tuple[int, ...]]:
        """GET_SHMEM_CONFIG: the size of each VIRTIO shared memory region by id (0 = unused)."""
        return tuple((yield from fe._call(F.GET_SHMEM_CONFIG)).memory_sizes)

    # -- compositions --------------------------------------------------------------------------
    @exchange
    @staticmethod
    def negotiate(
        fe: Frontend,
        *,
        features: int | None = None,
        protocol_features: int | None = None,
        memory: GuestMemory | None = None,
        num_queues: int | None = None,
        handler: BackendRequestHandler | None = None,
        config_size: int | None = None,
        inband_notifications: bool = False,
        packed: bool = False,
    ) -> Steps[NegotiationResult]:
        """The sequence QEMU uses: GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
        GET_MAX_MEM_SLOTS, SET_BACKEND_REQ_FD (with `handler`), SET_OWNER, SET_FEATURES,
        GET_SHMEM_CONFIG (SHMEM), memory (SET_MEM_TABLE, or ADD_MEM_REG per region with
        CONFIGURE_MEM_SLOTS) and GET_CONFIG.

        `features` (default: everything offered) is intersected with the offer, and VERSION_1
        and PROTOCOL_FEATURES are kept when offered; of the transport bits (24..=40) only
        :data:`DRIVER_TRANSPORT_FEATURES` are acknowledged (plus ACCESS_PLATFORM when `features`
        asks for it; never LOG_ALL, which :meth:`enable_logging` turns on). `protocol_features`
        defaults to what this library supports; of the features that need the back-end request
        channel only those `handler` answers are acknowledged (none without a handler; see
        :meth:`BackendRequestHandler.protocol_features`), and a feature whose dependencies
        (spec: protocol.md §5.4) are not acknowledged is dropped. INBAND_NOTIFICATIONS is
        acknowledged only with `inband_notifications` (rings then get no kick/call/err fds:
        :class:`Virtqueue`). With `packed`, VIRTIO_F_RING_PACKED is acknowledged and every ring
        :meth:`setup_queue` sets up is a packed ring; a back-end that does not offer it raises
        NegotiationError (never a silent fall-back to split rings). Without `packed` it is never
        acknowledged. Raises NegotiationError if the back-end has fewer queues than asked.
        On a ``reconnect=`` front-end the same arguments are replayed for each new back-end.
        """
        fe._negotiation = dict(
            features=features, protocol_features=protocol_features, memory=memory, num_queues=num_queues,
            handler=handler, config_size=config_size, inband_notifications=inband_notifications,
            packed=packed,
        )
        offered = (yield from fe.get_features.steps())
        if packed and VirtioFeature.RING_PACKED not in offered:
            raise NegotiationError(
                "packed rings were asked for but the back-end does not offer VIRTIO_F_RING_PACKED "
                f"(it offers {int(offered):#x}: {offered!r})"
            )
        proto = ProtocolFeature(0)
        if VirtioFeature.PROTOCOL_FEATURES in offered:
            offered_proto = (yield from fe.get_protocol_features.steps())
            if protocol_features is None:
                wanted = SUPPORTED_PROTOCOL_FEATURES | ProtocolFeature.SHMEM
                if inband_notifications:
                    wanted |= ProtocolFeature.INBAND_NOTIFICATIONS
            else:
                wanted = ProtocolFeature(protocol_features)
            served = handler.protocol_features() if handler is not None else ProtocolFeature(0)
            if not inband_notifications:
                served &= ~ProtocolFeature.INBAND_NOTIFICATIONS
            proto = ProtocolFeature(int(offered_proto) & int(wanted) & (~int(_CHANNEL_FEATURES) | int(served)))
            proto = _drop_unmet_dependencies(proto)
        iommu = features is not None and bool(int(features) & int(offered) & int(VirtioFeature.ACCESS_PLATFORM))
        if iommu and (handler is None or _IOMMU_NEEDS & ~proto):
            # IOTLB misses come on the back-end request channel and must be acked (spec:
            # protocol.md §5.4; QEMU refuses ACCESS_PLATFORM otherwise).
            raise NegotiationError(
                "ACCESS_PLATFORM needs a handler answering IOTLB misses and the BACKEND_REQ and REPLY_ACK "
                "protocol features"
            )
        if VirtioFeature.PROTOCOL_FEATURES in offered:
            yield from fe.set_protocol_features.steps(proto)
        queues = 1
        if ProtocolFeature.MQ in proto:
            queues = (yield from fe.get_queue_num.steps())
            if num_queues is not None and num_queues > queues:
                raise NegotiationError(f"the back-end supports {queues} queues, {num_queues} requested")
        fe._num_queues = queues if ProtocolFeature.MQ in proto else None
        slots = (yield from fe.get_max_mem_slots.steps()) if ProtocolFeature.CONFIGURE_MEM_SLOTS in proto else None
        if handler is not None and ProtocolFeature.BACKEND_REQ in proto:
            yield from fe.set_backend_req_fd.steps(handler)
        yield from fe.set_owner.steps()
        acked = int(offered) if features is None else int(offered) & int(features)
        acked |= int(offered) & int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)
        # Transport bits: only what the driver side implements (device bits stay as asked).
        transport = int(DRIVER_TRANSPORT_FEATURES)
        if iommu:
            # Only on request: with it every ring and buffer address is an IOVA the front-end
            # must serve through IOTLB_MSG.
            transport |= int(VirtioFeature.ACCESS_PLATFORM)
        if packed:
            transport |= int(VirtioFeature.RING_PACKED)
            acked |= int(VirtioFeature.RING_PACKED)
        acked &= ~_TRANSPORT_BITS | transport
        yield from fe.set_features.steps(acked)
        if ProtocolFeature.SHMEM in proto and handler is not None:
            handler.shmem_config((yield from fe.get_shmem_config.steps()))
        if memory is not None:
            yield from fe.add_memory.steps(memory)
        config = None
        if config_size and ProtocolFeature.CONFIG in proto:
            config = (yield from fe.get_config.steps(0, config_size))
        return NegotiationResult(VirtioFeature(acked), proto, queues, slots, config)

    @exchange
    @staticmethod
    def add_memory(fe: Frontend, memory: GuestMemory) -> Steps[None]:
        """Share `memory`: ADD_MEM_REG per region when CONFIGURE_MEM_SLOTS was negotiated,
        otherwise SET_MEM_TABLE."""
        if ProtocolFeature.CONFIGURE_MEM_SLOTS in fe.protocol_features:
            for region, fd in zip(memory.regions, memory.fds()):
                yield from fe.add_mem_reg.steps(region, fd)
            fe.memory = memory
        else:
            yield from fe.set_mem_table.steps(memory)

    @exchange
    @staticmethod
    def setup_queue(
        fe: Frontend,
        index: int,
        size: int,
        memory: GuestMemory | None = None,
        *,
        base: int | None = None,
        indirect_max: int = 0,
        enable: bool = True,
        ring: DriverQueue | None = None,
    ) -> Steps[Virtqueue]:
        """Allocate a ring in `memory` and start it: SET_VRING_NUM, SET_VRING_BASE,
        SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR and, with
        PROTOCOL_FEATURES, SET_VRING_ENABLE. EVENT_IDX follows what SET_FEATURES acknowledged,
        and so does the format: a packed ring when RING_PACKED was acknowledged
        (``negotiate(packed=True)``), whose SET_VRING_ADDR carries the descriptor ring, the
        driver event suppression area (as ``avail``) and the device event suppression area (as
        ``used``). `base`: what :meth:`stop_queue` returned, to restart where the ring stopped.

        `ring` hands an existing driver ring (with its requests in flight) to this back-end
        instead, as QEMU does when a back-end restarts: the base defaults to
        :meth:`DriverQueue.hand_over` (split: the ring's used index, and with an inflight buffer
        (`setup_inflight`) the back-end resubmits what the previous one had not completed;
        packed: the requests in flight are written into the ring again for the new back-end).
        """
        mem = memory or fe.memory
        if mem is None:
            raise NegotiationError("no guest memory: pass memory= or negotiate(memory=...) first")
        event_idx = VirtioFeature.EVENT_IDX in fe.features
        packed = VirtioFeature.RING_PACKED in fe.features
        if ring is not None:
            if ring.size != size:
                raise ValueError(f"the ring has {ring.size} descriptors, not {size}")
            if ring.packed != packed:
                raise ValueError(f"the ring is {'packed' if ring.packed else 'split'}, the session is not")
            dq = ring
            base = ring.hand_over() if base is None else base
        else:
            dq = DriverQueue(mem, size, event_idx=event_idx, indirect_max=indirect_max, index=index, packed=packed)
            if base is not None:
                dq.reset_to(base)
            base = dq.vring_base
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vq = Virtqueue(index, dq, kick, call, err, frontend=fe)
        try:
            yield from fe._start_ring.steps(vq, base, enable=enable)
        except BaseException:
            vq.close()
            raise
        old = fe._queues.pop(index, None)
        if old is not None:
            old.close()
        fe._queues[index] = vq
        return vq

    @exchange
    @staticmethod
    def _start_ring(fe: Frontend, vq: Virtqueue, base: int, *, enable: bool) -> Steps[None]:
        index, dq = vq.index, vq.queue
        # INBAND_NOTIFICATIONS: no fds; kicks travel as VRING_KICK, calls and errors come back
        # as VRING_CALL / VRING_ERR (spec: "In-band notifications").
        vq.inband = ProtocolFeature.INBAND_NOTIFICATIONS in fe.protocol_features
        yield from fe.set_vring_num.steps(index, dq.size)
        yield from fe.set_vring_base.steps(index, base)
        # Packed rings: desc = descriptor ring, avail = driver event suppression area, used =
        # device event suppression area (spec: "Ring addresses").
        desc, avail, used = dq.user_addrs
        log_addr = dq.log_guest_addr
        if VirtioFeature.ACCESS_PLATFORM in fe.features:
            # Ring addresses are IOVAs (spec: "IOMMU support"), and so is log_guest_addr.
            desc, avail, used = fe._ring_iovas(dq)
            log_addr = desc if dq.packed else used
        yield from fe.set_vring_addr.steps(index, desc, used, avail, log_guest_addr=log_addr)
        yield from fe.set_vring_kick.steps(index, None if vq.inband else vq.kick_fd)
        yield from fe.set_vring_call.steps(index, None if vq.inband else vq.call_fd)
        yield from fe.set_vring_err.steps(index, None if vq.inband else vq.err_fd)
        if enable and VirtioFeature.PROTOCOL_FEATURES in fe.features:
            yield from fe.set_vring_enable.steps(index, True)

    @exchange
    @staticmethod
    def stop_queue(fe: Frontend, index: int) -> Steps[int]:
        """Disable (with PROTOCOL_FEATURES) and stop a ring with GET_VRING_BASE; returns the base
        to restart from with ``setup_queue(index, size, base=...)``. A host-notifier page of the
        ring is unmapped first, as QEMU does before GET_VRING_BASE."""
        if isinstance(fe.handler, BuiltinHandler):
            fe.handler._drop_host_notifier(index)
        if VirtioFeature.PROTOCOL_FEATURES in fe.features:
            yield from fe.set_vring_enable.steps(index, False)
        base = (yield from fe.get_vring_base.steps(index))
        vq = fe._queues.pop(index, None)
        if vq is not None:
            vq.close()
        return base

    @exchange
    @staticmethod
    def enable_logging(fe: Frontend, memory: GuestMemory | None = None) -> Steps[DirtyLog]:
        """Start dirty logging for migration, in QEMU's order (spec §6.7): allocate a log
        covering `memory` (default: the memory shared), SET_LOG_BASE with its fd (LOG_SHMFD),
        SET_FEATURES with LOG_ALL, and SET_VRING_ADDR with VHOST_VRING_F_LOG for each ring set
        up. Without REPLY_ACK each step is followed by a GET_FEATURES barrier, so the back-end
        logs from the moment this returns. Read the pages with :meth:`DirtyLog.take_dirty`
        (read and clear); :attr:`dirty_log` keeps the log in use."""
        mem = memory or fe.memory
        if mem is None:
            raise NegotiationError("no guest memory to log")
        dirty = DirtyLog.allocate(mem.guest_end)
        yield from fe.set_log_base.steps(dirty)
        fe.dirty_log = dirty
        yield from fe.set_features.steps(int(fe.features) | int(VirtioFeature.LOG_ALL))
        yield from fe._barrier.steps()
        yield from fe._set_ring_logging.steps(True)
        return dirty

    @exchange
    @staticmethod
    def resize_logging(fe: Frontend, memory: GuestMemory | int) -> Steps[DirtyLog]:
        """Memory grew while logging: hand the back-end a new log covering `memory` (or guest
        addresses up to the int given) with SET_LOG_BASE, as QEMU does on a memory change. The
        pages still marked in the old log are carried over to the new one, which is returned
        (and kept as :attr:`dirty_log`). A log already large enough is kept."""
        old = fe.dirty_log
        if old is None:
            raise NegotiationError("logging is not enabled")
        guest_end = memory if isinstance(memory, int) else memory.guest_end
        if guest_end <= old.size * 8 * LOG_PAGE_SIZE:
            return old
        new = DirtyLog.allocate(guest_end)
        yield from fe.set_log_base.steps(new)  # replied to (LOG_SHMFD): the back-end no longer writes the old one
        fe.dirty_log = new
        for page in old.take_dirty():
            new.mark(page * LOG_PAGE_SIZE, LOG_PAGE_SIZE)
        return new

    @exchange
    @staticmethod
    def disable_logging(fe: Frontend) -> Steps[DirtyLog | None]:
        """Stop dirty logging: SET_FEATURES without LOG_ALL, then SET_VRING_ADDR without the log
        flag for each ring (each awaited, with a GET_FEATURES barrier without REPLY_ACK).
        Returns the log, whose marks are still there to read, or None if logging was off."""
        dirty, fe.dirty_log = fe.dirty_log, None
        yield from fe.set_features.steps(int(fe.features) & ~int(VirtioFeature.LOG_ALL))
        yield from fe._barrier.steps()
        yield from fe._set_ring_logging.steps(False)
        return dirty

    @exchange
    @staticmethod
    def announce(fe: Frontend, mac: bytes) -> Steps[bool]:
        """After a switch-over (the destination's rings are running): SEND_RARP for the
        guest's `mac` when the guest cannot announce itself, i.e. VIRTIO_NET_F_GUEST_ANNOUNCE
        was not negotiated and the back-end has the RARP protocol feature (what QEMU's
        vhost_net does). Returns whether it was sent."""
        if fe.features & _GUEST_ANNOUNCE or ProtocolFeature.RARP not in fe.protocol_features:
            return False
        yield from fe.send_rarp.steps(mac)
        return True

    @exchange
    @staticmethod
    def _set_ring_logging(fe: Frontend, on: bool) -> Steps[None]:
        for index, vq in fe._queues.items():
            desc, avail, used = vq.queue.user_addrs
            yield from fe.set_vring_addr.steps(index, desc, used, avail, log_guest_addr=vq.queue.log_guest_addr, log=on)
        if fe._queues:
            yield from fe._barrier.steps()

    @exchange
    @staticmethod
    def _barrier(fe: Frontend) -> Steps[None]:
        """Without REPLY_ACK, a GET_FEATURES whose reply says every earlier request was handled
        (spec §5.4: what QEMU does after SET_FEATURES with LOG_ALL, SET_VRING_ADDR with the log
        flag and SET_VRING_ENABLE). With REPLY_ACK those requests were acked already."""
        if ProtocolFeature.REPLY_ACK not in fe.protocol_features:
            yield from fe.get_features.steps()


class Frontend(_Requests):
    """A session with a vhost-user back-end, as its front-end (context manager)."""

    def __init__(
        self,
        core: _native.FrontendCore,
        *,
        timeout: float | None = 5.0,
        path: str | os.PathLike[str] | None = None,
        reconnect: float | None = None,
    ) -> None:
        if reconnect is not None and path is None:
            raise ValueError("reconnect= needs the socket path (use Frontend.connect)")
        self._core = core
        self.timeout = timeout
        #: Seconds to keep trying to reach a restarted back-end after a hang-up (None: no
        #: reconnecting). See :meth:`reconnect_now`.
        self.reconnect = reconnect
        self.path = None if path is None else os.fspath(path)
        self.memory: GuestMemory | None = None
        self.handler: BackendRequestHandler | None = None
        self._queues: dict[int, Virtqueue] = {}
        #: The dirty log handed to the back-end while logging is on (:meth:`enable_logging`).
        self.dirty_log: DirtyLog | None = None
        #: The inflight buffer kept for the next back-end (``reconnect=`` sessions only).
        self.inflight: InflightBuffer | None = None
        #: Sessions established so far (1 + reconnects).
        self.sessions = 1
        self._negotiation: dict[str, Any] | None = None
        self._num_queues: int | None = None
        self._required_features = 0
        self._lost = False
        self._closed = False

    # -- connection ----------------------------------------------------------------------------
    @classmethod
    def connect(
        cls, path: str | os.PathLike[str], *, timeout: float | None = 5.0, reconnect: float | None = None
    ) -> Frontend:
        """Connect to the back-end listening on `path` (retried while it starts, up to `timeout`).

        With `reconnect` (seconds), a back-end that hangs up (crash, restart) is replaced by a
        new session on the same path, as QEMU's ``reconnect=`` does: see :meth:`reconnect_now`."""
        return cls(_native.FrontendCore.connect(path, timeout=timeout), timeout=timeout, path=path, reconnect=reconnect)

    @classmethod
    def from_socket(cls, sock: socket.socket, *, timeout: float | None = 5.0) -> Frontend:
        """Use a connected Unix stream socket (a duplicate of its fd; `sock` stays yours)."""
        return cls(_native.FrontendCore.from_fd(sock.fileno()), timeout=timeout)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def peer_closed(self) -> bool:
        """Whether the back-end hung up (looked at without waiting; nothing is read)."""
        if self._closed:
            return True
        if self._lost:
            return True
        try:
            return bool(self._core.peer_closed)
        except ConnectionClosedError:
            return True

    def _main_fd(self) -> int | None:
        if self._closed:
            raise ConnectionClosedError("the session is closed")
        if self._lost:
            return None
        return self._core.fileno()

    def _knows_queue(self, index: int) -> bool:
        return index in self._queues or (self._num_queues is not None and 0 <= index < self._num_queues)

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the session and release every fd it holds, at once and from any state (also
        after the back-end died or broke the protocol): the main channel, the back-end request
        channel and its thread, the eventfds of the rings set up, the dirty log, and what the
        built-in handlers hold (host-notifier pages, shared-memory mappings). Guest memory passed
        in stays the caller's: only this object's reference to it is dropped. A request blocked
        on another thread fails with ConnectionClosedError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._core.close()
        for q in self._queues.values():
            q.close()
        self._queues.clear()
        self.memory = None
        self.dirty_log = None
        self._negotiation = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        handler, self.handler = self.handler, None
        if isinstance(handler, BackendRequestHandler):
            handler.detach(self)

    def fileno(self) -> int:
        """The main channel's fd."""
        return self._core.fileno()

    @property
    def negotiated(self) -> dict[str, Any]:
        """What was offered and acknowledged so far (raw ints)."""
        return dict(self._core.negotiated())

    @property
    def protocol_features(self) -> ProtocolFeature:
        """The acknowledged protocol features."""
        return ProtocolFeature(self._core.negotiated()["acked_protocol_features"] or 0)

    @property
    def features(self) -> VirtioFeature:
        """The acknowledged virtio features (empty before SET_FEATURES)."""
        return VirtioFeature(self._core.negotiated()["acked_features"] or 0)

    def _call(self, request: FrontendRequest, payload: Payload = None, fds: Sequence[int] = (), **kw: Any) -> Steps[Any]:
        reply, got = yield from self.request.steps(request, payload, fds, **kw)
        for fd in got:  # none of the simple requests returns fds
            os.close(fd)
        return None if reply is None else reply.payload

    def _run(self, steps: Steps[R]) -> R:
        """Runs the steps of a request or composition, each exchange blocking (with the GIL
        released, bounded by its timeout, woken by Ctrl-C)."""
        try:
            ex = next(steps)
            while True:
                try:
                    result = self._core.request(
                        ex.request, ex.payload, ex.fds, need_reply=ex.need_reply, timeout=ex.timeout,
                        check_gate=ex.check_gate,
                    )
                except BaseException as e:
                    ex = steps.throw(e)
                else:
                    ex = steps.send(result)
        except StopIteration as stop:
            value: R = stop.value
            return value

    @property
    def backend_channel_running(self) -> bool:
        """Whether the back-end request channel is being served."""
        return bool(self._core.backend_channel_running)

    def _ring_iovas(self, dq: DriverQueue) -> tuple[int, int, int]:
        iommu = getattr(self.handler, "iommu", None)
        if not isinstance(iommu, IommuTable):
            raise NegotiationError(
                "ACCESS_PLATFORM: ring addresses are IOVAs; negotiate with BuiltinHandler(iommu=...) "
                "or set the ring up message by message"
            )
        n = dq.size
        if dq.packed:
            sizes = (16 * n, 4, 4)  # descriptor ring, driver and device event suppression areas
        else:
            sizes = (16 * n, 6 + 2 * n, 6 + 8 * n)  # descriptor table, avail ring, used ring
        out = []
        for gpa, size in zip(dq.guest_addrs, sizes):
            iova = iommu.iova_of(gpa, size)
            if iova is None:
                raise NegotiationError(f"ring {dq.index}: guest address {gpa:#x} is not mapped in the IOMMU table")
            out.append(iova)
        return out[0], out[1], out[2]

    def reconnect_now(self, timeout: float | None | EllipsisType = ...) -> None:
        """Replace a back-end that hung up with a new session on the same socket path, as QEMU
        does with ``reconnect=`` (spec: protocol.md §6.16): connect (retrying until
        `timeout` seconds, by default :attr:`reconnect`; None: until a back-end answers), redo :meth:`negotiate` with the same
        arguments (the handler is attached again and starts from scratch), hand over the
        inflight buffer (:attr:`inflight`, SET_INFLIGHT_FD) so the new back-end resubmits what
        the old one had taken and not completed, then hand over every ring with its requests
        in flight (split: SET_VRING_BASE = the used index; with the inflight record the back-end
        resumes after what it resubmits; packed: the requests in flight are written into the
        ring again after the completions not reaped yet, :meth:`DriverQueue.hand_over`) and kick
        each. The :class:`Virtqueue` objects stay the
        same (new eventfds inside, unless :attr:`Virtqueue.keep_fds`). Raises
        VhostUserTimeoutError if no back-end answered in time, NegotiationError if the new
        back-end does not offer every virtio feature the previous session acknowledged (no ring
        is started), ConnectionClosedError if :meth:`close` ran meanwhile; the session then
        stays lost (call again)."""
        if self._closed:
            raise ConnectionClosedError("the session is closed")
        if self.path is None:
            raise NegotiationError("reconnecting needs the socket path (Frontend.connect)")
        if isinstance(timeout, EllipsisType):
            timeout = self.reconnect
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._lost:
            # What the last working session acknowledged: the new back-end must offer it all
            # (checked in _resume, before any ring starts).
            try:
                acked = int(self._core.negotiated()["acked_features"] or 0)
                self._required_features = acked & ~int(VirtioFeature.LOG_ALL)
            except VhostUserError:
                pass
        self._lost = True
        self._core.close()
        while True:
            if self._closed:
                raise ConnectionClosedError("the session was closed while reconnecting")
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                core = _native.FrontendCore.connect(self.path, timeout=left)
            except (OSError, VhostUserError) as e:
                raise VhostUserTimeoutError(f"no back-end at {self.path} to reconnect to: {e}") from e
            self._core = core
            if self._closed:
                # close() ran on another thread meanwhile: the new session is not kept.
                core.close()
                raise ConnectionClosedError("the session was closed while reconnecting")
            self._lost = False
            try:
                self._resume(deadline)
                break
            except ConnectionClosedError:
                # The new back-end went away during set-up: start over while time is left.
                self._lost = True
                core.close()
                if deadline is not None and time.monotonic() >= deadline:
                    raise VhostUserTimeoutError(f"the back-end at {self.path} kept hanging up") from None
            except BaseException:
                # A half set-up session is no session: the next wait tries again.
                self._lost = True
                core.close()
                raise
        self.sessions += 1
        log.info("reconnected to %s (session %d)", self.path, self.sessions)

    def _reconnect_within(self, timeout: float | None) -> None:
        limit = self.reconnect
        if timeout is not None and (limit is None or timeout < limit):
            limit = timeout
        try:
            self.reconnect_now(limit)
        except VhostUserTimeoutError:
            pass  # the caller's own deadline decides what happens next

    def _resume(self, deadline: float | None) -> None:
        args = dict(self._negotiation or {})
        memory = args.get("memory") or self.memory
        args["memory"] = memory
        # A memory table the caller shared by hand after negotiate() is shared again.
        self.memory = None
        self.negotiate(**args)
        lost = self._required_features & ~int(self.features)
        if lost:
            # A driver cannot lose a feature it acknowledged (ring layout, header format and
            # what is in flight depend on it): the session is not started.
            raise NegotiationError(
                f"the back-end at {self.path} no longer offers {VirtioFeature(lost)!r} ({lost:#x}), which "
                "the previous session acknowledged"
            )
        if memory is not None and self.memory is None:
            self.add_memory(memory)
        if self.inflight is not None:
            if ProtocolFeature.INFLIGHT_SHMFD in self.protocol_features:
                self.set_inflight_fd(self.inflight.desc, self.inflight.fd)
            else:
                log.warning("the new back-end has no INFLIGHT_SHMFD: requests it had taken are re-read from the rings")
        for vq in list(self._queues.values()):
            if not vq.keep_fds:
                fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(3)]
                old = (vq.kick_fd, vq.call_fd, vq.err_fd)
                # New fds in place before the old ones close: the channel thread may signal them.
                vq.kick_fd, vq.call_fd, vq.err_fd = fds
                for fd in old:
                    os.close(fd)
            self._start_ring(vq, vq.queue.hand_over(), enable=True)
        for vq in self._queues.values():
            vq.kick()

    def queue(self, index: int) -> Virtqueue:
        """The ring set up at `index`."""
        return self._queues[index]

    def wait_readable(self, timeout: float | None) -> None:
        """Wait until the main channel has data (e.g. an unsolicited message) or raise a timeout."""
        ready, _, _ = select.select([self.fileno()], [], [], timeout)
        if not ready:
            raise VhostUserTimeoutError("nothing arrived")
