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
a main-channel reply is awaited cannot deadlock.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import EllipsisType
from typing import Any

from . import _native
from ._native import DirtyLog, DriverQueue, GuestMemory
from .enums import BackendRequest, DeviceStatus, FrontendRequest, ProtocolFeature, VirtioFeature
from .exceptions import NegotiationError, RequestRejectedError, VhostUserTimeoutError
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

__all__ = ["BackendRequestHandler", "Frontend", "NegotiationResult", "Virtqueue"]

log = logging.getLogger("vhostuser_rs.frontend")

F = FrontendRequest

#: Protocol features this front-end knows how to use (what :meth:`Frontend.negotiate` acks by
#: default, intersected with the offer).
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
#: for the driver, implied by VERSION_1), PROTOCOL_FEATURES. LOG_ALL is turned on by
#: :meth:`Frontend.enable_logging`; ACCESS_PLATFORM only when the caller asks for it (it then
#: serves IOTLB_MSG). Never RING_PACKED, IN_ORDER, NOTIFICATION_DATA, ORDER_PLATFORM, SR_IOV,
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


class BackendRequestHandler:
    """Answers requests the back-end sends on the back-end request channel.

    Override the methods named after the requests you handle. Each returns ``None`` or ``0`` for
    success, or a non-zero status; raising an exception answers with a failure and logs a
    warning; the default methods raise :class:`NotImplementedError`, answered as "not
    supported". File descriptors passed in are closed after the method returns (``os.dup`` one
    to keep it). :meth:`shared_object_lookup` returns ``(status, fd)``.
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
        """Look up a shared object: ``(0, dma_buf_fd)`` or ``(error, None)``."""
        raise NotImplementedError

    def shmem_map(self, request: MmapRequest, fd: int) -> int | None:
        """Map ``fd`` into a VIRTIO shared memory region."""
        raise NotImplementedError

    def shmem_unmap(self, request: MmapRequest) -> int | None:
        """Unmap part of a VIRTIO shared memory region."""
        raise NotImplementedError

    # Called by the Rust channel thread; returns (status, fd to send or None).
    def _vhostuser_dispatch(self, message: Message, fds: list[int]) -> tuple[int, int | None]:
        request = message.request
        name = request.name.lower() if isinstance(request, BackendRequest) else None
        method = getattr(self, name, None) if name else None
        if method is None:
            return _errno_status(errno.ENOSYS), None
        payload = message.payload
        try:
            if request is BackendRequest.SHARED_OBJECT_LOOKUP:
                assert isinstance(payload, SharedObject)
                status, fd = method(payload.uuid)
                return int(status), fd
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
            return _errno_status(errno.ENOSYS), None
        except Exception:
            log.warning("back-end request %s failed in %r", getattr(request, "name", request), self, exc_info=True)
            return 1, None
        return (0 if result is None else int(result)), None


def _errno_status(errno_value: int) -> int:
    return (-errno_value) & 0xFFFF_FFFF_FFFF_FFFF


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
    """A ring set up by :meth:`Frontend.setup_queue`: the driver side plus its eventfds."""

    index: int
    queue: DriverQueue
    kick_fd: int
    call_fd: int
    err_fd: int
    _closed: bool = field(default=False, repr=False)

    def kick(self) -> None:
        """Notify the device (write the kick eventfd)."""
        os.eventfd_write(self.kick_fd, 1)

    def kick_if_needed(self) -> bool:
        """Kick if the device asked for it (NO_NOTIFY / EVENT_IDX); returns whether it did."""
        if self.queue.kick_needed():
            self.kick()
            return True
        return False

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a call notification; ``False`` on timeout."""
        ready, _, _ = select.select([self.call_fd], [], [], timeout)
        if not ready:
            return False
        os.eventfd_read(self.call_fd)
        return True

    def close(self) -> None:
        """Close the eventfds (the ring memory belongs to the GuestMemory)."""
        if not self._closed:
            self._closed = True
            for fd in (self.kick_fd, self.call_fd, self.err_fd):
                os.close(fd)


@dataclass(frozen=True)
class NegotiationResult:
    """What :meth:`Frontend.negotiate` settled on."""

    features: VirtioFeature
    protocol_features: ProtocolFeature
    num_queues: int
    max_mem_slots: int | None
    config: bytes | None


class Frontend:
    """A session with a vhost-user back-end, as its front-end (context manager)."""

    def __init__(self, core: _native.FrontendCore, *, timeout: float | None = 5.0) -> None:
        self._core = core
        self.timeout = timeout
        self.memory: GuestMemory | None = None
        self.handler: BackendRequestHandler | None = None
        self._queues: dict[int, Virtqueue] = {}
        #: The dirty log handed to the back-end while logging is on (:meth:`enable_logging`).
        self.dirty_log: DirtyLog | None = None
        self._closed = False

    # -- connection ----------------------------------------------------------------------------
    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, timeout: float | None = 5.0) -> Frontend:
        """Connect to the back-end listening on `path` (retried while it starts, up to `timeout`)."""
        return cls(_native.FrontendCore.connect(path, timeout=timeout), timeout=timeout)

    @classmethod
    def from_socket(cls, sock: socket.socket, *, timeout: float | None = 5.0) -> Frontend:
        """Use a connected Unix stream socket (a duplicate of its fd; `sock` stays yours)."""
        return cls(_native.FrontendCore.from_fd(sock.fileno()), timeout=timeout)

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the session and every eventfd of the queues set up. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._core.close()
        for q in self._queues.values():
            q.close()
        self._queues.clear()

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

    def request(
        self,
        request: FrontendRequest,
        payload: Payload = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
        timeout: float | None | EllipsisType = ...,
        check_gate: bool = True,
    ) -> tuple[Message | None, list[int]]:
        """Send any request; returns ``(reply, fds)``. The building block of every method."""
        t = self.timeout if isinstance(timeout, EllipsisType) else timeout
        return self._core.request(int(request), payload, list(fds), need_reply=need_reply, timeout=t, check_gate=check_gate)

    def _call(self, request: FrontendRequest, payload: Payload = None, fds: Sequence[int] = (), **kw: Any) -> Any:
        reply, got = self.request(request, payload, fds, **kw)
        for fd in got:  # none of the simple requests returns fds
            os.close(fd)
        return None if reply is None else reply.payload

    # -- one method per request ------------------------------------------------------------------
    def get_features(self) -> VirtioFeature:
        """GET_FEATURES: the virtio and vhost feature bits the back-end offers."""
        return VirtioFeature(self._call(F.GET_FEATURES))

    def set_features(self, features: int, *, need_reply: bool | None = None) -> None:
        """SET_FEATURES: acknowledge a subset of the offered bits (keep PROTOCOL_FEATURES set if
        it was offered; without it the back-end enables all rings at once)."""
        self._call(F.SET_FEATURES, int(features), need_reply=need_reply)

    def set_owner(self) -> None:
        """SET_OWNER: start the session."""
        self._call(F.SET_OWNER)

    def reset_owner(self) -> None:
        """RESET_OWNER (deprecated; back-ends treat it as "disable all rings")."""
        self._call(F.RESET_OWNER)

    def set_mem_table(self, memory: GuestMemory) -> None:
        """SET_MEM_TABLE: share all regions of `memory` (at most 8), one fd each."""
        regions = memory.regions
        self._call(F.SET_MEM_TABLE, MemoryTable(tuple(regions)), memory.fds())
        self.memory = memory

    def set_log_base(self, log: DirtyLog, *, mmap_offset: int = 0) -> None:
        """SET_LOG_BASE: hand the dirty log to the back-end (needs LOG_SHMFD for the fd form)."""
        fd = log.fileno()
        self._call(F.SET_LOG_BASE, LogBase(log.size, mmap_offset), [] if fd is None else [fd])

    def set_log_fd(self, fd: int) -> None:
        """SET_LOG_FD: an eventfd the back-end may signal after log updates."""
        self._call(F.SET_LOG_FD, None, [fd])

    def set_vring_num(self, index: int, num: int) -> None:
        """SET_VRING_NUM: ring size."""
        self._call(F.SET_VRING_NUM, VringState(index, num))

    def set_vring_addr(
        self, index: int, desc: int, used: int, avail: int, *, log_guest_addr: int = 0, log: bool = False
    ) -> None:
        """SET_VRING_ADDR: ring addresses (this process's addresses, as QEMU sends them)."""
        self._call(F.SET_VRING_ADDR, VringAddr(index, 1 if log else 0, desc, used, avail, log_guest_addr))

    def set_vring_base(self, index: int, base: int) -> None:
        """SET_VRING_BASE: the next available index the device will read. The ring must be stopped."""
        self._call(F.SET_VRING_BASE, VringState(index, base))

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stop the ring and return its next available index."""
        state = self._call(F.GET_VRING_BASE, VringState(index, 0))
        return int(state.num)

    def get_vring_base_skip_drain(self, index: int) -> int:
        """GET_VRING_BASE_SKIP_DRAIN: stop the ring without draining in-flight requests."""
        state = self._call(F.GET_VRING_BASE_SKIP_DRAIN, VringState(index, 0))
        return int(state.num)

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """SET_VRING_KICK: the kick eventfd (``None``: NOFD, the back-end polls)."""
        self._call(F.SET_VRING_KICK, VringFd(index, fd is None), [] if fd is None else [fd])

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """SET_VRING_CALL: the call eventfd (``None``: NOFD, no notifications)."""
        self._call(F.SET_VRING_CALL, VringFd(index, fd is None), [] if fd is None else [fd])

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """SET_VRING_ERR: the error eventfd (``None``: NOFD)."""
        self._call(F.SET_VRING_ERR, VringFd(index, fd is None), [] if fd is None else [fd])

    def get_protocol_features(self) -> ProtocolFeature:
        """GET_PROTOCOL_FEATURES (needs PROTOCOL_FEATURES offered by GET_FEATURES)."""
        return ProtocolFeature(self._call(F.GET_PROTOCOL_FEATURES))

    def set_protocol_features(self, features: int) -> None:
        """SET_PROTOCOL_FEATURES: a subset of the offer, with its dependencies (spec §5.4)."""
        self._call(F.SET_PROTOCOL_FEATURES, int(features))

    def get_queue_num(self) -> int:
        """GET_QUEUE_NUM: the most queues the back-end supports (queue pairs for net)."""
        return int(self._call(F.GET_QUEUE_NUM))

    def set_vring_enable(self, index: int, enabled: bool = True) -> None:
        """SET_VRING_ENABLE (needs PROTOCOL_FEATURES acknowledged)."""
        self._call(F.SET_VRING_ENABLE, VringState(index, 1 if enabled else 0))

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: broadcast a RARP for a migrated guest's MAC (6 bytes)."""
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        self._call(F.SEND_RARP, int.from_bytes(mac, "little"))

    def net_set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (needs MTU protocol feature and VIRTIO_NET_F_MTU)."""
        self._call(F.NET_SET_MTU, mtu)

    def set_backend_req_fd(self, handler: BackendRequestHandler) -> None:
        """SET_BACKEND_REQ_FD: open the back-end request channel, served by `handler` on its
        own thread (replacing any previous channel)."""
        fd = self._core.start_backend_channel(handler)
        try:
            self._call(F.SET_BACKEND_REQ_FD, None, [fd])
        finally:
            os.close(fd)
        self.handler = handler

    @property
    def backend_channel_running(self) -> bool:
        """Whether the back-end request channel is being served."""
        return bool(self._core.backend_channel_running)

    def iotlb_msg(self, msg: IotlbMsg) -> None:
        """IOTLB_MSG update or invalidation (needs ACCESS_PLATFORM); the ack is checked."""
        status = self._call(F.IOTLB_MSG, msg)
        if status:
            raise RequestRejectedError(f"IOTLB_MSG rejected with status {status:#x}", request=F.IOTLB_MSG, status=status)

    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        """SET_VRING_ENDIAN (legacy cross-endian devices, CROSS_ENDIAN)."""
        self._call(F.SET_VRING_ENDIAN, VringState(index, 1 if big_endian else 0))

    def get_config(self, offset: int = 0, size: int = 256) -> bytes:
        """GET_CONFIG: `size` bytes of device config space from `offset` (CONFIG). An empty or
        short reply is the back-end's way of failing and raises RequestRejectedError."""
        cfg = self._call(F.GET_CONFIG, DeviceConfig(offset, bytes(size)))
        if not isinstance(cfg, DeviceConfig) or len(cfg.data) != size or cfg.offset != offset:
            raise RequestRejectedError("GET_CONFIG failed (empty or mismatched reply)", request=F.GET_CONFIG, status=1)
        return cfg.data

    def set_config(self, offset: int, data: bytes, *, migration: bool = False) -> None:
        """SET_CONFIG: write config space (flags 1 = restore during migration)."""
        self._call(F.SET_CONFIG, DeviceConfig(offset, bytes(data), 1 if migration else 0))

    def create_crypto_session(self, session: CryptoSession) -> CryptoSession:
        """CREATE_CRYPTO_SESSION (virtio-crypto)."""
        result: CryptoSession = self._call(F.CREATE_CRYPTO_SESSION, session)
        return result

    def close_crypto_session(self, session_id: int) -> None:
        """CLOSE_CRYPTO_SESSION."""
        self._call(F.CLOSE_CRYPTO_SESSION, session_id)

    def postcopy_advise(self) -> int:
        """POSTCOPY_ADVISE: returns the back-end's userfaultfd (yours to close)."""
        _, fds = self.request(F.POSTCOPY_ADVISE)
        return fds[0]

    def postcopy_listen(self) -> None:
        """POSTCOPY_LISTEN."""
        self._call(F.POSTCOPY_LISTEN)

    def postcopy_end(self) -> None:
        """POSTCOPY_END."""
        self._call(F.POSTCOPY_END)

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[InflightDesc, int | None]:
        """GET_INFLIGHT_FD: the back-end's inflight buffer description and fd (yours to close)."""
        reply, fds = self.request(F.GET_INFLIGHT_FD, InflightDesc(0, 0, num_queues, queue_size))
        assert reply is not None and isinstance(reply.payload, InflightDesc)
        return reply.payload, (fds[0] if fds else None)

    def set_inflight_fd(self, desc: InflightDesc, fd: int) -> None:
        """SET_INFLIGHT_FD: hand an inflight buffer (back) to the back-end."""
        self._call(F.SET_INFLIGHT_FD, desc, [fd])

    def setup_inflight(
        self, num_queues: int, queue_size: int, *, buffer: InflightBuffer | None = None
    ) -> InflightBuffer | None:
        """What QEMU does before starting the rings of a device that tracks inflight I/O:
        GET_INFLIGHT_FD for a new buffer (unless `buffer`, kept from an earlier back-end, is
        passed), then SET_INFLIGHT_FD. Returns the buffer to keep (yours to close), or None when
        the back-end declines (mmap_size 0). Needs INFLIGHT_SHMFD; split rings only."""
        if buffer is None:
            desc, fd = self.get_inflight_fd(num_queues, queue_size)
            if fd is None or desc.mmap_size == 0:
                if fd is not None:
                    os.close(fd)
                return None
            buffer = InflightBuffer(InflightDesc(desc.mmap_size, desc.mmap_offset, num_queues, queue_size), fd)
        self.set_inflight_fd(buffer.desc, buffer.fd)
        return buffer

    def gpu_set_socket(self, fd: int) -> None:
        """GPU_SET_SOCKET (vhost-user-gpu's side protocol)."""
        self._call(F.GPU_SET_SOCKET, None, [fd])

    def reset_device(self) -> None:
        """RESET_DEVICE: disable all rings and reset device state; the session stays."""
        self._call(F.RESET_DEVICE)

    def vring_kick(self, index: int) -> None:
        """VRING_KICK: in-band kick (INBAND_NOTIFICATIONS)."""
        self._call(F.VRING_KICK, VringState(index, 0))

    def get_max_mem_slots(self) -> int:
        """GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS)."""
        return int(self._call(F.GET_MAX_MEM_SLOTS))

    def add_mem_reg(self, region: MemoryRegion, fd: int) -> None:
        """ADD_MEM_REG: add one region with its fd."""
        self._call(F.ADD_MEM_REG, region, [fd])

    def rem_mem_reg(self, region: MemoryRegion) -> None:
        """REM_MEM_REG: remove the region with the same guest address, user address and size."""
        self._call(F.REM_MEM_REG, region)

    def set_status(self, status: int) -> None:
        """SET_STATUS: the virtio device status byte (STATUS)."""
        self._call(F.SET_STATUS, int(status))

    def get_status(self) -> DeviceStatus:
        """GET_STATUS (STATUS)."""
        return DeviceStatus(self._call(F.GET_STATUS))

    def get_shared_object(self, uuid: bytes) -> int | None:
        """GET_SHARED_OBJECT: the exported dma-buf fd (yours to close), or None."""
        _, fds = self.request(F.GET_SHARED_OBJECT, SharedObject(bytes(uuid)))
        return fds[0] if fds else None

    def set_device_state_fd(self, direction: int, fd: int) -> int | None:
        """SET_DEVICE_STATE_FD: start a state transfer over `fd`; returns the back-end's own fd
        to use instead (yours to close), or None."""
        reply, fds = self.request(F.SET_DEVICE_STATE_FD, DeviceStateParams(direction, 0), [fd])
        assert reply is not None
        status = int(reply.payload) if isinstance(reply.payload, int) else 1
        if status & 0xFF:
            for f in fds:
                os.close(f)
            raise RequestRejectedError(f"SET_DEVICE_STATE_FD failed: {status:#x}", request=F.SET_DEVICE_STATE_FD, status=status)
        return fds[0] if fds else None

    def check_device_state(self) -> None:
        """CHECK_DEVICE_STATE: raise if the back-end did not process the transferred state."""
        status = self._call(F.CHECK_DEVICE_STATE)
        if status:
            raise RequestRejectedError(f"device state check failed: {status:#x}", request=F.CHECK_DEVICE_STATE, status=status)

    def get_shmem_config(self) -> tuple[int, ...]:
        """GET_SHMEM_CONFIG: the size of each VIRTIO shared memory region by id (0 = unused)."""
        return tuple(self._call(F.GET_SHMEM_CONFIG).memory_sizes)

    # -- compositions --------------------------------------------------------------------------
    def negotiate(
        self,
        *,
        features: int | None = None,
        protocol_features: int | None = None,
        memory: GuestMemory | None = None,
        num_queues: int | None = None,
        handler: BackendRequestHandler | None = None,
        config_size: int | None = None,
    ) -> NegotiationResult:
        """The sequence QEMU uses: GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
        GET_MAX_MEM_SLOTS, SET_BACKEND_REQ_FD (with `handler`), SET_OWNER, SET_FEATURES, memory
        (SET_MEM_TABLE, or ADD_MEM_REG per region with CONFIGURE_MEM_SLOTS) and GET_CONFIG.

        `features` (default: everything offered) is intersected with the offer, and VERSION_1
        and PROTOCOL_FEATURES are kept when offered; of the transport bits (24..=40) only
        :data:`DRIVER_TRANSPORT_FEATURES` are acknowledged (plus ACCESS_PLATFORM when `features`
        asks for it; never LOG_ALL, which :meth:`enable_logging` turns on); `protocol_features` defaults to what this
        library supports. Raises NegotiationError if the back-end has fewer queues than asked.
        """
        offered = self.get_features()
        proto = ProtocolFeature(0)
        if VirtioFeature.PROTOCOL_FEATURES in offered:
            offered_proto = self.get_protocol_features()
            wanted = SUPPORTED_PROTOCOL_FEATURES if protocol_features is None else ProtocolFeature(protocol_features)
            proto = ProtocolFeature(int(offered_proto) & int(wanted))
            if handler is None:
                # Without a handler there is nobody to serve the channel and what needs it.
                proto = ProtocolFeature(
                    int(proto)
                    & ~int(
                        ProtocolFeature.BACKEND_REQ
                        | ProtocolFeature.BACKEND_SEND_FD
                        | ProtocolFeature.HOST_NOTIFIER
                        | ProtocolFeature.SHARED_OBJECT
                    )
                )
            self.set_protocol_features(proto)
        queues = 1
        if ProtocolFeature.MQ in proto:
            queues = self.get_queue_num()
            if num_queues is not None and num_queues > queues:
                raise NegotiationError(f"the back-end supports {queues} queues, {num_queues} requested")
        slots = self.get_max_mem_slots() if ProtocolFeature.CONFIGURE_MEM_SLOTS in proto else None
        if handler is not None and ProtocolFeature.BACKEND_REQ in proto:
            self.set_backend_req_fd(handler)
        self.set_owner()
        acked = int(offered) if features is None else int(offered) & int(features)
        acked |= int(offered) & int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)
        # Transport bits: only what the driver side implements (device bits stay as asked).
        transport = int(DRIVER_TRANSPORT_FEATURES)
        if features is not None and int(features) & int(VirtioFeature.ACCESS_PLATFORM):
            # Only on request: with it every ring and buffer address is an IOVA the front-end
            # must serve through IOTLB_MSG.
            transport |= int(VirtioFeature.ACCESS_PLATFORM)
        acked &= ~_TRANSPORT_BITS | transport
        self.set_features(acked)
        if memory is not None:
            self.add_memory(memory)
        config = None
        if config_size and ProtocolFeature.CONFIG in proto:
            config = self.get_config(0, config_size)
        return NegotiationResult(VirtioFeature(acked), proto, queues, slots, config)

    def add_memory(self, memory: GuestMemory) -> None:
        """Share `memory`: ADD_MEM_REG per region when CONFIGURE_MEM_SLOTS was negotiated,
        otherwise SET_MEM_TABLE."""
        if ProtocolFeature.CONFIGURE_MEM_SLOTS in self.protocol_features:
            for region, fd in zip(memory.regions, memory.fds()):
                self.add_mem_reg(region, fd)
            self.memory = memory
        else:
            self.set_mem_table(memory)

    def setup_queue(
        self,
        index: int,
        size: int,
        memory: GuestMemory | None = None,
        *,
        base: int | None = None,
        indirect_max: int = 0,
        enable: bool = True,
        ring: DriverQueue | None = None,
    ) -> Virtqueue:
        """Allocate a ring in `memory` and start it: SET_VRING_NUM, SET_VRING_BASE,
        SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR and, with
        PROTOCOL_FEATURES, SET_VRING_ENABLE. EVENT_IDX follows what SET_FEATURES acknowledged.

        `ring` hands an existing driver ring (with its requests in flight) to this back-end
        instead, as QEMU does when a back-end restarts: the base defaults to the ring's used
        index, and with an inflight buffer (`setup_inflight`) the back-end resubmits what the
        previous one had not completed.
        """
        mem = memory or self.memory
        if mem is None:
            raise NegotiationError("no guest memory: pass memory= or negotiate(memory=...) first")
        event_idx = VirtioFeature.EVENT_IDX in self.features
        if ring is not None:
            if ring.size != size:
                raise ValueError(f"the ring has {ring.size} descriptors, not {size}")
            dq = ring
            base = ring.used_idx if base is None else base
        else:
            dq = DriverQueue(mem, size, event_idx=event_idx, indirect_max=indirect_max, index=index)
            base = base or 0
            if base:
                dq.reset_to(base)
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vq = Virtqueue(index, dq, kick, call, err)
        try:
            self.set_vring_num(index, size)
            self.set_vring_base(index, base)
            desc, avail, used = dq.user_addrs
            self.set_vring_addr(index, desc, used, avail, log_guest_addr=dq.guest_addrs[2])
            self.set_vring_kick(index, kick)
            self.set_vring_call(index, call)
            self.set_vring_err(index, err)
            if enable and VirtioFeature.PROTOCOL_FEATURES in self.features:
                self.set_vring_enable(index, True)
        except BaseException:
            vq.close()
            raise
        old = self._queues.pop(index, None)
        if old is not None:
            old.close()
        self._queues[index] = vq
        return vq

    def stop_queue(self, index: int) -> int:
        """Disable (with PROTOCOL_FEATURES) and stop a ring with GET_VRING_BASE; returns the base
        to restart from with ``setup_queue(index, size, base=...)``."""
        if VirtioFeature.PROTOCOL_FEATURES in self.features:
            self.set_vring_enable(index, False)
        base = self.get_vring_base(index)
        vq = self._queues.pop(index, None)
        if vq is not None:
            vq.close()
        return base

    def enable_logging(self, memory: GuestMemory | None = None) -> DirtyLog:
        """Start dirty logging for migration, in QEMU's order (spec §6.7): allocate a log
        covering `memory` (default: the memory shared), SET_LOG_BASE with its fd (LOG_SHMFD),
        SET_FEATURES with LOG_ALL, and SET_VRING_ADDR with VHOST_VRING_F_LOG for each ring set
        up. Without REPLY_ACK each step is followed by a GET_FEATURES barrier, so the back-end
        logs from the moment this returns. Read the pages with :meth:`DirtyLog.take_dirty`
        (read and clear); :attr:`dirty_log` keeps the log in use."""
        mem = memory or self.memory
        if mem is None:
            raise NegotiationError("no guest memory to log")
        dirty = DirtyLog.allocate(mem.guest_end)
        self.set_log_base(dirty)
        self.dirty_log = dirty
        self.set_features(int(self.features) | int(VirtioFeature.LOG_ALL))
        self._barrier()
        self._set_ring_logging(True)
        return dirty

    def resize_logging(self, memory: GuestMemory | int) -> DirtyLog:
        """Memory grew while logging: hand the back-end a new log covering `memory` (or guest
        addresses up to the int given) with SET_LOG_BASE, as QEMU does on a memory change. The
        pages still marked in the old log are carried over to the new one, which is returned
        (and kept as :attr:`dirty_log`). A log already large enough is kept."""
        old = self.dirty_log
        if old is None:
            raise NegotiationError("logging is not enabled")
        guest_end = memory if isinstance(memory, int) else memory.guest_end
        if guest_end <= old.size * 8 * LOG_PAGE_SIZE:
            return old
        new = DirtyLog.allocate(guest_end)
        self.set_log_base(new)  # replied to (LOG_SHMFD): the back-end no longer writes the old one
        self.dirty_log = new
        for page in old.take_dirty():
            new.mark(page * LOG_PAGE_SIZE, LOG_PAGE_SIZE)
        return new

    def disable_logging(self) -> DirtyLog | None:
        """Stop dirty logging: SET_FEATURES without LOG_ALL, then SET_VRING_ADDR without the log
        flag for each ring (each awaited, with a GET_FEATURES barrier without REPLY_ACK).
        Returns the log, whose marks are still there to read, or None if logging was off."""
        dirty, self.dirty_log = self.dirty_log, None
        self.set_features(int(self.features) & ~int(VirtioFeature.LOG_ALL))
        self._barrier()
        self._set_ring_logging(False)
        return dirty

    def announce(self, mac: bytes) -> bool:
        """After a switch-over (the destination's rings are running): SEND_RARP for the
        guest's `mac` when the guest cannot announce itself, i.e. VIRTIO_NET_F_GUEST_ANNOUNCE
        was not negotiated and the back-end has the RARP protocol feature (what QEMU's
        vhost_net does). Returns whether it was sent."""
        if self.features & _GUEST_ANNOUNCE or ProtocolFeature.RARP not in self.protocol_features:
            return False
        self.send_rarp(mac)
        return True

    def _set_ring_logging(self, on: bool) -> None:
        for index, vq in self._queues.items():
            desc, avail, used = vq.queue.user_addrs
            self.set_vring_addr(index, desc, used, avail, log_guest_addr=vq.queue.guest_addrs[2], log=on)
        if self._queues:
            self._barrier()

    def _barrier(self) -> None:
        """Without REPLY_ACK, a GET_FEATURES whose reply says every earlier request was handled
        (spec §5.4: what QEMU does after SET_FEATURES with LOG_ALL, SET_VRING_ADDR with the log
        flag and SET_VRING_ENABLE). With REPLY_ACK those requests were acked already."""
        if ProtocolFeature.REPLY_ACK not in self.protocol_features:
            self.get_features()

    def queue(self, index: int) -> Virtqueue:
        """The ring set up at `index`."""
        return self._queues[index]

    def wait_readable(self, timeout: float | None) -> None:
        """Wait until the main channel has data (e.g. an unsolicited message) or raise a timeout."""
        ready, _, _ = select.select([self.fileno()], [], [], timeout)
        if not ready:
            raise VhostUserTimeoutError("nothing arrived")
