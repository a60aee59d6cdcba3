"""Request codes and feature bits of the vhost-user protocol, with the spec's names.

The Rust core holds the same tables; ``tests/python/test_enums.py`` checks they agree.
"""

from __future__ import annotations

import enum

__all__ = [
    "BackendRequest",
    "Channel",
    "DeviceStatus",
    "FrontendRequest",
    "ProtocolFeature",
    "VirtioFeature",
]


class Channel(enum.IntEnum):
    """Which socket a message travels on, which decides the family of its request code."""

    MAIN = 0
    """The vhost-user socket: the front-end sends requests, the back-end replies."""
    BACKEND = 1
    """The back-end request channel of SET_BACKEND_REQ_FD (formerly "slave channel")."""


class FrontendRequest(enum.IntEnum):
    """Requests the front-end sends on the main channel (``VHOST_USER_*``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44
    GET_VRING_BASE_SKIP_DRAIN = 45


class BackendRequest(enum.IntEnum):
    """Requests the back-end sends on the back-end request channel (``VHOST_USER_BACKEND_*``)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class ProtocolFeature(enum.IntFlag, boundary=enum.KEEP):
    """``VHOST_USER_PROTOCOL_F_*`` bits (GET/SET_PROTOCOL_FEATURES).

    Bits this library does not name are kept (``IntFlag`` with ``KEEP`` boundary), so a value
    read from a newer peer round-trips unchanged.
    """

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    """QEMU and DPDK call it NET_MTU."""
    BACKEND_REQ = 1 << 5
    """Formerly SLAVE_REQ."""
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    """Formerly SLAVE_SEND_FD."""
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    GET_VRING_BASE_INFLIGHT = 1 << 20
    GPA_ADDRESSES = 1 << 21
    SHMEM = 1 << 22
    GET_VRING_BASE_SKIP_DRAIN = 1 << 23


class VirtioFeature(enum.IntFlag, boundary=enum.KEEP):
    """Virtio and vhost feature bits the vhost-user protocol depends on (GET/SET_FEATURES).

    Device-specific bits (0-23) are not named here except NET_MTU; unknown bits are kept.
    """

    NET_MTU = 1 << 3
    NOTIFY_ON_EMPTY = 1 << 24
    LOG_ALL = 1 << 26
    """vhost-only: dirty logging of device writes (live migration)."""
    ANY_LAYOUT = 1 << 27
    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30
    """``VHOST_USER_F_PROTOCOL_FEATURES``: gates protocol features; rings start disabled."""
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    NOTIF_CONFIG_DATA = 1 << 39
    RING_RESET = 1 << 40
    ADMIN_VQ = 1 << 41
    SUSPEND = 1 << 43


class DeviceStatus(enum.IntFlag, boundary=enum.KEEP):
    """The virtio device status byte (SET_STATUS / GET_STATUS)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    SUSPEND = 16
    DEVICE_NEEDS_RESET = 64
    FAILED = 128
