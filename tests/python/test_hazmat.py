"""Message building and parsing from Python: every request, every rule, golden bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vhostuser_rs as vu
from vhostuser_rs import BackendRequest as B
from vhostuser_rs import Channel
from vhostuser_rs import FrontendRequest as F
from vhostuser_rs import hazmat
from vhostuser_rs import messages as m

REGION = m.MemoryRegion(guest_addr=0, size=1 << 20, user_addr=0x7F0000000000, mmap_offset=0)

# A valid request payload and fd count for every front-end request.
FRONTEND_REQUESTS: dict[F, tuple[m.Payload, int]] = {
    F.GET_FEATURES: (None, 0),
    F.SET_FEATURES: (0x175007E46, 0),
    F.SET_OWNER: (None, 0),
    F.RESET_OWNER: (None, 0),
    F.SET_MEM_TABLE: (m.MemoryTable((REGION, m.MemoryRegion(1 << 32, 1 << 20, 0x7F1000000000, 4096))), 2),
    F.SET_LOG_BASE: (m.LogBase(4096, 0), 1),
    F.SET_LOG_FD: (None, 1),
    F.SET_VRING_NUM: (m.VringState(0, 256), 0),
    F.SET_VRING_ADDR: (m.VringAddr(0, 1, 0x1000, 0x3000, 0x2000, 0x3000), 0),
    F.SET_VRING_BASE: (m.VringState(0, 5), 0),
    F.GET_VRING_BASE: (m.VringState(1, 0), 0),
    F.SET_VRING_KICK: (m.VringFd(0), 1),
    F.SET_VRING_CALL: (m.VringFd(1, nofd=True), 0),
    F.SET_VRING_ERR: (m.VringFd(2), 1),
    F.GET_PROTOCOL_FEATURES: (None, 0),
    F.SET_PROTOCOL_FEATURES: (0x8F2B, 0),
    F.GET_QUEUE_NUM: (None, 0),
    F.SET_VRING_ENABLE: (m.VringState(0, 1), 0),
    F.SEND_RARP: (0x525400123456, 0),
    F.NET_SET_MTU: (1500, 0),
    F.SET_BACKEND_REQ_FD: (None, 1),
    F.IOTLB_MSG: (m.IotlbMsg(0x1000, 0x1000, 0x7F00000000, 3, m.IotlbMsg.UPDATE), 0),
    F.SET_VRING_ENDIAN: (m.VringState(0, 0), 0),
    F.GET_CONFIG: (m.DeviceConfig(0, bytes(60)), 0),
    F.SET_CONFIG: (m.DeviceConfig(8, b"\x01\x02", flags=0), 0),
    F.CREATE_CRYPTO_SESSION: (m.CryptoSession(1, bytes(1056), -1), 0),
    F.CLOSE_CRYPTO_SESSION: (3, 0),
    F.POSTCOPY_ADVISE: (None, 0),
    F.POSTCOPY_LISTEN: (None, 0),
    F.POSTCOPY_END: (None, 0),
    F.GET_INFLIGHT_FD: (m.InflightDesc(0, 0, 2, 128), 0),
    F.SET_INFLIGHT_FD: (m.InflightDesc(8192, 0, 2, 128), 1),
    F.GPU_SET_SOCKET: (None, 1),
    F.RESET_DEVICE: (None, 0),
    F.VRING_KICK: (m.VringState(0, 0), 0),
    F.GET_MAX_MEM_SLOTS: (None, 0),
    F.ADD_MEM_REG: (REGION, 1),
    F.REM_MEM_REG: (REGION, 0),
    F.SET_STATUS: (0x0F, 0),
    F.GET_STATUS: (None, 0),
    F.GET_SHARED_OBJECT: (m.SharedObject(bytes(range(16))), 0),
    F.SET_DEVICE_STATE_FD: (m.DeviceStateParams(1, 0), 1),
    F.CHECK_DEVICE_STATE: (None, 0),
    F.GET_SHMEM_CONFIG: (None, 0),
    F.GET_VRING_BASE_SKIP_DRAIN: (m.VringState(0, 0), 0),
}

BACKEND_REQUESTS: dict[B, tuple[m.Payload, int]] = {
    B.IOTLB_MSG: (m.IotlbMsg(0x1000, 0, 0, 1, m.IotlbMsg.MISS), 0),
    B.CONFIG_CHANGE_MSG: (None, 0),
    B.VRING_HOST_NOTIFIER_MSG: (m.VringArea(0, 4096, 0), 1),
    B.VRING_CALL: (m.VringState(0, 0), 0),
    B.VRING_ERR: (m.VringState(0, 0), 0),
    B.SHARED_OBJECT_ADD: (m.SharedObject(b"u" * 16), 0),
    B.SHARED_OBJECT_REMOVE: (m.SharedObject(b"u" * 16), 0),
    B.SHARED_OBJECT_LOOKUP: (m.SharedObject(b"u" * 16), 0),
    B.SHMEM_MAP: (m.MmapRequest(0, 0, 0, 4096, 1), 1),
    B.SHMEM_UNMAP: (m.MmapRequest(0, 0, 0, 4096), 0),
}

FRONTEND_REPLIES: dict[F, tuple[m.Payload, int]] = {
    F.GET_FEATURES: (0x175007E46, 0),
    F.GET_PROTOCOL_FEATURES: (0x8F2B, 0),
    F.GET_VRING_BASE: (m.VringState(1, 300), 0),
    F.GET_QUEUE_NUM: (2, 0),
    F.IOTLB_MSG: (0, 0),
    F.GET_CONFIG: (m.DeviceConfig(0, bytes(60)), 0),
    F.CREATE_CRYPTO_SESSION: (m.CryptoSession(1, bytes(1056), 4), 0),
    F.POSTCOPY_ADVISE: (None, 1),
    F.GET_INFLIGHT_FD: (m.InflightDesc(4096, 0, 2, 128), 1),
    F.GET_MAX_MEM_SLOTS: (509, 0),
    F.GET_STATUS: (0x0F, 0),
    F.GET_SHARED_OBJECT: (None, 1),
    F.SET_DEVICE_STATE_FD: (0x100, 0),
    F.CHECK_DEVICE_STATE: (0, 0),
    F.GET_SHMEM_CONFIG: (m.ShmemConfig((1 << 30,) + (0,) * 255), 0),
    F.GET_VRING_BASE_SKIP_DRAIN: (m.VringState(0, 7), 0),
}


def test_every_request_is_covered() -> None:
    assert set(FRONTEND_REQUESTS) == set(F)
    assert set(BACKEND_REQUESTS) == set(B)


@pytest.mark.parametrize("request_", list(F), ids=lambda r: r.name)
def test_frontend_request_and_reply_round_trip(request_: F) -> None:
    payload, fds = FRONTEND_REQUESTS[request_]
    for msg in (hazmat.request(request_, payload), hazmat.request(request_, payload, need_reply=True)):
        data = hazmat.encode(msg)
        assert hazmat.decode(data, num_fds=fds) == msg
        assert hazmat.decode_header(data) == m.Header(request_, msg.flags, len(data) - 12)
    reply_payload, reply_fds = FRONTEND_REPLIES.get(request_, (0, 0))  # ack for the rest
    reply = hazmat.reply(request_, reply_payload)
    assert reply.flags == 0x5 and reply.is_reply and not reply.need_reply
    assert hazmat.decode(hazmat.encode(reply), num_fds=reply_fds) == reply


@pytest.mark.parametrize("request_", list(B), ids=lambda r: r.name)
def test_backend_request_and_reply_round_trip(request_: B) -> None:
    payload, fds = BACKEND_REQUESTS[request_]
    msg = hazmat.request(request_, payload, need_reply=True)
    assert msg.channel is Channel.BACKEND
    assert hazmat.decode(hazmat.encode(msg), channel=Channel.BACKEND, num_fds=fds) == msg
    ack = hazmat.reply(request_, 0)
    assert hazmat.decode(hazmat.encode(ack), channel=Channel.BACKEND) == ack


def test_unknown_request_decodes_with_its_bytes() -> None:
    data = hazmat.encode_raw(77, b"abc", flags=0x9)
    msg = hazmat.decode(data, num_fds=3)
    assert msg.request == 77 and not isinstance(msg.request, F)
    assert msg.payload == b"abc" and msg.need_reply


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [(0x0, "version"), (0x2, "version"), (0x11, "reserved"), (0x1 | 0x4 | 0x8, "NEED_REPLY"), (0x80000001, "reserved")],
)
def test_header_flag_rules(flags: int, fragment: str) -> None:
    with pytest.raises(vu.MalformedMessageError, match=fragment) as info:
        hazmat.decode(hazmat.encode_raw(F.GET_FEATURES, flags=flags))
    assert info.value.request is F.GET_FEATURES
    with pytest.raises(vu.MalformedMessageError):
        hazmat.validate_header(m.Header(F.GET_FEATURES, flags, 0))


def test_size_rules() -> None:
    with pytest.raises(vu.MalformedMessageError, match="exceeds the limit"):
        hazmat.validate_header(m.Header(F.SET_CONFIG, 1, 4097))
    # The header claims 8 bytes, 4 follow.
    with pytest.raises(vu.MalformedMessageError, match="payload is 4 bytes"):
        hazmat.decode(hazmat.encode_raw(F.SET_FEATURES, b"\0" * 4, size=8))
    with pytest.raises(vu.MalformedMessageError, match="truncated"):
        hazmat.decode(b"\x01\x00")
    # SET_MEM_TABLE: a count of 2 with one region's bytes.
    table = struct.pack("=II4Q", 2, 0, 0, 4096, 0, 0)
    with pytest.raises(vu.MalformedMessageError, match="SET_MEM_TABLE"):
        hazmat.decode(hazmat.encode_raw(F.SET_MEM_TABLE, table), num_fds=2)


@pytest.mark.parametrize(
    ("request_", "payload", "fds"),
    [
        (F.GET_FEATURES, None, 1),
        (F.SET_VRING_KICK, m.VringFd(0), 0),
        (F.SET_VRING_KICK, m.VringFd(0, nofd=True), 1),
        (F.SET_MEM_TABLE, m.MemoryTable((REGION,)), 2),
        (F.ADD_MEM_REG, REGION, 0),
        (F.SET_INFLIGHT_FD, m.InflightDesc(4096, 0, 1, 8), 2),
    ],
)
def test_fd_count_rules(request_: F, payload: m.Payload, fds: int) -> None:
    with pytest.raises(vu.MalformedMessageError, match="file descriptors") as info:
        hazmat.decode(hazmat.encode(hazmat.request(request_, payload)), num_fds=fds)
    assert info.value.request is request_


@pytest.mark.parametrize(
    ("request_", "payload", "fragment"),
    [
        (F.SET_VRING_NUM, m.VringState(0, 0), "queue size"),
        (F.SET_VRING_NUM, m.VringState(0, 65536), "queue size"),
        (F.SET_VRING_ENABLE, m.VringState(0, 7), "enable"),
        (F.SET_VRING_ADDR, m.VringAddr(0, 0, 0x1001, 0, 0), "aligned"),
        (F.SET_VRING_ADDR, m.VringAddr(0, 4, 0x1000, 0, 0), "VHOST_VRING_F_LOG"),
        (F.SET_MEM_TABLE, m.MemoryTable((m.MemoryRegion(2**64 - 4096, 8192, 0),)), "overflows"),
        (F.ADD_MEM_REG, m.MemoryRegion(0, 0, 0), "empty"),
        (F.SET_LOG_BASE, m.LogBase(2**64 - 1, 2), "overflows"),
        (F.SET_STATUS, 0x1FF, "one byte"),
        (F.IOTLB_MSG, m.IotlbMsg(0, 1, 0, 3, m.IotlbMsg.MISS), "UPDATE or INVALIDATE"),
        (F.SET_DEVICE_STATE_FD, m.DeviceStateParams(2), "direction"),
        (F.GET_CONFIG, m.DeviceConfig(4095, b"\0\0"), "config space"),
    ],
)
def test_field_rules(request_: F, payload: m.Payload, fragment: str) -> None:
    fds = FRONTEND_REQUESTS[request_][1] if request_ is not F.SET_MEM_TABLE else 1
    with pytest.raises(vu.MalformedMessageError, match=fragment):
        hazmat.decode(hazmat.encode(hazmat.request(request_, payload)), num_fds=fds)


def test_golden_qemu_storage_daemon_replies() -> None:
    features = bytes.fromhex("010000000500000008000000467e007501000000")
    msg = hazmat.decode(features)
    assert msg == hazmat.reply(F.GET_FEATURES, 0x175007E46)
    assert vu.VirtioFeature.VERSION_1 in vu.VirtioFeature(msg.payload)
    proto = hazmat.decode(bytes.fromhex("0f00000005000000080000002b8f000000000000"))
    assert proto.payload == 0x8F2B
    config = bytes.fromhex(
        "0080000000000000000000007e0000000000000000020000000001000100000000000200008000000100000001000000008000000100000000000000"
    )
    wire = struct.pack("=IIIIII", F.GET_CONFIG, 0x5, 72, 0, 60, 0) + config
    msg = hazmat.decode(wire)
    assert msg.payload == m.DeviceConfig(0, config, 0)
    assert hazmat.encode(msg) == wire
    capacity, _, seg_max = struct.unpack_from("=QII", config)
    assert capacity == 0x8000 and seg_max == 0x7E


def test_encode_rejects_non_payloads() -> None:
    with pytest.raises(TypeError, match="not a vhost-user payload"):
        hazmat.encode(hazmat.request(F.SET_FEATURES, 1.5))  # type: ignore[arg-type]
    with pytest.raises((ValueError, OverflowError)):
        hazmat.encode(hazmat.request(F.SET_VRING_KICK, m.VringFd(300)))


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300), fds=st.integers(0, 12), backend=st.booleans())
def test_random_bytes_never_crash(data: bytes, fds: int, backend: bool) -> None:
    channel = Channel.BACKEND if backend else Channel.MAIN
    try:
        msg = hazmat.decode(data, channel=channel, num_fds=fds)
    except vu.MalformedMessageError:
        return
    # Whatever decodes re-encodes to the same bytes (no information is invented or lost),
    # except the padding fields the decoder ignores.
    again = hazmat.decode(hazmat.encode(msg), channel=channel, num_fds=fds)
    assert again == msg


@settings(max_examples=300, deadline=None)
@given(code=st.integers(0, 50), flags=st.sampled_from([1, 5, 9]), body=st.binary(max_size=64), fds=st.integers(0, 10))
def test_random_messages_with_random_fds_over_a_socket(code: int, flags: int, body: bytes, fds: int) -> None:
    """Sends a random message with `fds` descriptors; the receiver either decodes it and owns
    exactly those fds, or rejects it and closes them all. The autouse fixture checks no leak."""
    import os

    a, b = vu.Connection.pair()
    with a, b:
        r, w = os.pipe()
        try:
            a.send(hazmat.encode_raw(code, body, flags=flags), [w] * fds)
        except vu.MalformedMessageError:
            assert fds > vu.hazmat.MAX_FDS
            os.close(r)
            os.close(w)
            return
        os.close(w)
        try:
            msg, got = b.recv(timeout=5)
        except vu.MalformedMessageError:
            got = []
        else:
            assert msg.request == code
            assert len(got) == fds
        hazmat.close_fds(got)
        os.close(r)
