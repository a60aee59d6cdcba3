"""Typed payloads and messages of the vhost-user protocol.

These are plain frozen dataclasses; the Rust core encodes and decodes them (see
:mod:`vhostuser_rs.hazmat`). Field names follow the spec's C structs. A payload that is a single
u64 (features, counts, status, acks) is a plain ``int``; no payload is ``None``; the bytes of an
unknown request are ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .enums import BackendRequest, Channel, FrontendRequest

__all__ = [
    "CryptoSession",
    "DeviceConfig",
    "DeviceStateParams",
    "Header",
    "InflightDesc",
    "IotlbMsg",
    "LogBase",
    "MemoryRegion",
    "MemoryTable",
    "Message",
    "MmapRequest",
    "Payload",
    "SharedObject",
    "ShmemConfig",
    "VringAddr",
    "VringArea",
    "VringFd",
    "VringState",
    "XenMmap",
]

FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8


@dataclass(frozen=True)
class Header:
    """The 12-byte header: request code, flags, payload size. Not validated."""

    code: int
    flags: int
    size: int


@dataclass(frozen=True)
class VringState:
    """``struct vhost_vring_state``: ring index and a number whose meaning depends on the request."""

    index: int
    num: int


@dataclass(frozen=True)
class VringAddr:
    """``struct vhost_vring_addr``. The ring addresses are front-end virtual addresses
    (IOVAs with ACCESS_PLATFORM, GPAs with GPA_ADDRESSES); flags bit 0 is VHOST_VRING_F_LOG."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int = 0


@dataclass(frozen=True)
class VringFd:
    """The u64 of SET_VRING_KICK/CALL/ERR: ring index (0-255) and NOFD (no fd attached)."""

    index: int
    nofd: bool = False


@dataclass(frozen=True)
class XenMmap:
    """Region fields present only with XEN_MMAP."""

    flags: int
    domid: int


@dataclass(frozen=True)
class MemoryRegion:
    """One guest memory region; also the payload of ADD_MEM_REG / REM_MEM_REG."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int = 0
    xen: XenMmap | None = None


@dataclass(frozen=True)
class MemoryTable:
    """SET_MEM_TABLE payload: 1 to 8 regions, one fd each, in the same order."""

    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True)
class LogBase:
    """SET_LOG_BASE payload: size and offset of the dirty bitmap in the passed fd."""

    mmap_size: int
    mmap_offset: int = 0


@dataclass(frozen=True)
class IotlbMsg:
    """``struct vhost_iotlb_msg``. ``type``: 1 MISS, 2 UPDATE, 3 INVALIDATE, 4 ACCESS_FAIL;
    ``perm``: 0 none, 1 RO, 2 WO, 3 RW."""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


@dataclass(frozen=True)
class DeviceConfig:
    """GET_CONFIG / SET_CONFIG payload: a window into the device config space.

    SET_CONFIG ``flags``: 0 = write by the driver, 1 = restore during migration."""

    offset: int
    data: bytes
    flags: int = 0


@dataclass(frozen=True)
class VringArea:
    """VRING_HOST_NOTIFIER_MSG payload: ring index, NOFD (unregister), mmap size and offset."""

    index: int
    size: int
    offset: int
    nofd: bool = False


@dataclass(frozen=True)
class InflightDesc:
    """GET/SET_INFLIGHT_FD payload (24 bytes on the wire)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True)
class SharedObject:
    """A shared-object UUID: 16 opaque bytes."""

    uuid: bytes


@dataclass(frozen=True)
class DeviceStateParams:
    """SET_DEVICE_STATE_FD parameters: direction 0 SAVE / 1 LOAD, phase 0 STOPPED."""

    direction: int
    phase: int = 0


@dataclass(frozen=True)
class MmapRequest:
    """SHMEM_MAP / SHMEM_UNMAP payload. ``flags`` bit 0 maps read-write."""

    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int = 0


@dataclass(frozen=True)
class ShmemConfig:
    """GET_SHMEM_CONFIG reply: ``memory_sizes[shmid]`` (256 entries, 0 = unused)."""

    memory_sizes: tuple[int, ...]


@dataclass(frozen=True)
class CryptoSession:
    """CREATE_CRYPTO_SESSION payload in QEMU's layout; the parameter union stays opaque."""

    op_code: int
    params: bytes
    session_id: int


Payload = Union[
    None,
    int,
    bytes,
    VringState,
    VringAddr,
    VringFd,
    MemoryRegion,
    MemoryTable,
    LogBase,
    IotlbMsg,
    DeviceConfig,
    VringArea,
    InflightDesc,
    SharedObject,
    DeviceStateParams,
    MmapRequest,
    ShmemConfig,
    CryptoSession,
]


@dataclass(frozen=True)
class Message:
    """One vhost-user message. File descriptors travel beside it, never inside.

    ``request`` is a :class:`FrontendRequest` on the main channel, a :class:`BackendRequest` on
    the back-end request channel, or a bare ``int`` for codes the spec does not define.
    """

    request: FrontendRequest | BackendRequest | int
    payload: Payload = None
    flags: int = FLAG_VERSION
    channel: Channel = field(default=Channel.MAIN)

    @property
    def is_reply(self) -> bool:
        """Whether the REPLY flag is set."""
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        """Whether the NEED_REPLY flag is set (an ack is requested, REPLY_ACK)."""
        return bool(self.flags & FLAG_NEED_REPLY)
