"""Every front-end request has its method, and each method sends exactly that request with the
right payload and fds (checked by a scripted back-end that records the wire and answers)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import vhostuser_rs as vu
from vhostuser_rs import FrontendRequest as F
from vhostuser_rs import hazmat
from vhostuser_rs import messages as m

ALL_PROTOCOL = (1 << 24) - 1
OFFER = int(vu.VirtioFeature.PROTOCOL_FEATURES | vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.ACCESS_PLATFORM | vu.VirtioFeature.NET_MTU)


def test_every_request_has_a_method() -> None:
    for request in F:
        assert callable(getattr(vu.Frontend, request.name.lower(), None)), request.name


def answer(msg: m.Message) -> tuple[m.Payload, list[int]]:
    """A plausible reply for each request that has one (or an ack)."""
    r = msg.request
    if r is F.GET_FEATURES:
        return OFFER, []
    if r is F.GET_PROTOCOL_FEATURES:
        return ALL_PROTOCOL, []
    if r in (F.GET_QUEUE_NUM, F.GET_MAX_MEM_SLOTS):
        return 4, []
    if r is F.GET_STATUS:
        return 0x0F, []
    if r in (F.GET_VRING_BASE, F.GET_VRING_BASE_SKIP_DRAIN):
        return m.VringState(msg.payload.index, 42), []  # type: ignore[union-attr]
    if r is F.GET_CONFIG:
        return m.DeviceConfig(msg.payload.offset, bytes(range(len(msg.payload.data))), 0), []  # type: ignore[union-attr]
    if r is F.CREATE_CRYPTO_SESSION:
        return m.CryptoSession(msg.payload.op_code, msg.payload.params, 9), []  # type: ignore[union-attr]
    if r in (F.POSTCOPY_ADVISE, F.GET_SHARED_OBJECT):
        return None, [os.eventfd(0)]
    if r is F.GET_INFLIGHT_FD:
        return m.InflightDesc(4096, 0, 1, 8), [os.memfd_create("inflight")]
    if r is F.SET_DEVICE_STATE_FD:
        return 0x100, []
    if r is F.GET_SHMEM_CONFIG:
        return m.ShmemConfig((4096,) + (0,) * 255), []
    return 0, []  # ack


def test_each_method_sends_its_request(sock_dir: Path) -> None:
    path = sock_dir / "rec.sock"
    listener = vu.Listener.bind(path)
    seen: list[tuple[m.Message, int]] = []

    def serve() -> None:
        with listener, listener.accept(timeout=10) as conn:
            while True:
                try:
                    msg, fds = conn.recv(timeout=10)
                except vu.ConnectionClosedError:
                    return
                seen.append((msg, len(fds)))
                hazmat.close_fds(fds)
                has_reply = msg.need_reply or msg.request in REPLIED
                if has_reply:
                    payload, out = answer(msg)
                    hazmat.send(conn, hazmat.reply(msg.request, payload), out)
                    hazmat.close_fds(out)

    t = threading.Thread(target=serve)
    t.start()
    mem = vu.GuestMemory.allocate(1 << 20)
    region = mem.regions[0]
    ev = os.eventfd(0)
    calls: list[tuple[F, Any]] = []
    try:
        with vu.Frontend.connect(path) as fe:
            def do(request: F, fn: Any) -> None:
                calls.append((request, fn()))

            do(F.GET_FEATURES, fe.get_features)
            do(F.GET_PROTOCOL_FEATURES, fe.get_protocol_features)
            do(F.SET_PROTOCOL_FEATURES, lambda: fe.set_protocol_features(ALL_PROTOCOL))
            do(F.SET_FEATURES, lambda: fe.set_features(OFFER))
            do(F.SET_OWNER, fe.set_owner)
            do(F.RESET_OWNER, fe.reset_owner)
            do(F.SET_MEM_TABLE, lambda: fe.set_mem_table(mem))
            log = vu.DirtyLog.allocate(1 << 20)
            do(F.SET_LOG_BASE, lambda: fe.set_log_base(log))
            do(F.SET_LOG_FD, lambda: fe.set_log_fd(ev))
            do(F.SET_VRING_NUM, lambda: fe.set_vring_num(1, 64))
            do(F.SET_VRING_ADDR, lambda: fe.set_vring_addr(1, 0x1000, 0x3000, 0x2000))
            do(F.SET_VRING_BASE, lambda: fe.set_vring_base(1, 5))
            do(F.GET_VRING_BASE, lambda: fe.get_vring_base(1))
            do(F.SET_VRING_KICK, lambda: fe.set_vring_kick(1, ev))
            do(F.SET_VRING_CALL, lambda: fe.set_vring_call(1, None))
            do(F.SET_VRING_ERR, lambda: fe.set_vring_err(1, ev))
            do(F.GET_QUEUE_NUM, fe.get_queue_num)
            do(F.SET_VRING_ENABLE, lambda: fe.set_vring_enable(1, True))
            do(F.SEND_RARP, lambda: fe.send_rarp(b"\x52\x54\x00\x12\x34\x56"))
            do(F.NET_SET_MTU, lambda: fe.net_set_mtu(9000))
            do(F.SET_BACKEND_REQ_FD, lambda: fe.set_backend_req_fd(vu.BackendRequestHandler()))
            do(F.IOTLB_MSG, lambda: fe.iotlb_msg(m.IotlbMsg(0x1000, 0x1000, 0x7F0000001000, 3, m.IotlbMsg.UPDATE)))
            do(F.SET_VRING_ENDIAN, lambda: fe.set_vring_endian(1, False))
            do(F.GET_CONFIG, lambda: fe.get_config(0, 16))
            do(F.SET_CONFIG, lambda: fe.set_config(32, b"\x01"))
            do(F.CREATE_CRYPTO_SESSION, lambda: fe.create_crypto_session(m.CryptoSession(1, bytes(1056), -1)))
            do(F.CLOSE_CRYPTO_SESSION, lambda: fe.close_crypto_session(9))
            do(F.POSTCOPY_ADVISE, lambda: os.close(fe.postcopy_advise()))
            do(F.POSTCOPY_LISTEN, fe.postcopy_listen)
            do(F.POSTCOPY_END, fe.postcopy_end)
            inflight: list[Any] = []
            do(F.GET_INFLIGHT_FD, lambda: inflight.extend(fe.get_inflight_fd(1, 8)))
            do(F.SET_INFLIGHT_FD, lambda: fe.set_inflight_fd(inflight[0], inflight[1]))
            os.close(inflight[1])
            do(F.GPU_SET_SOCKET, lambda: fe.gpu_set_socket(ev))
            do(F.RESET_DEVICE, fe.reset_device)
            do(F.VRING_KICK, lambda: fe.vring_kick(1))
            do(F.GET_MAX_MEM_SLOTS, fe.get_max_mem_slots)
            do(F.ADD_MEM_REG, lambda: fe.add_mem_reg(region, mem.fds()[0]))
            do(F.REM_MEM_REG, lambda: fe.rem_mem_reg(region))
            do(F.SET_STATUS, lambda: fe.set_status(vu.DeviceStatus.DRIVER_OK))
            do(F.GET_STATUS, fe.get_status)
            do(F.GET_SHARED_OBJECT, lambda: os.close(fe.get_shared_object(b"u" * 16) or -1))
            r, w = os.pipe()
            do(F.SET_DEVICE_STATE_FD, lambda: fe.set_device_state_fd(0, w))
            hazmat.close_fds([r, w])
            do(F.CHECK_DEVICE_STATE, fe.check_device_state)
            do(F.GET_SHMEM_CONFIG, fe.get_shmem_config)
            do(F.GET_VRING_BASE_SKIP_DRAIN, lambda: fe.get_vring_base_skip_drain(1))
    finally:
        os.close(ev)
        t.join(10)
    assert [c[0] for c in calls] == [msg.request for msg, _ in seen]
    assert {msg.request for msg, _ in seen} == set(F)
    results = dict(calls)
    assert results[F.GET_VRING_BASE] == 42 and results[F.GET_QUEUE_NUM] == 4
    assert results[F.GET_CONFIG] == bytes(range(16))
    assert results[F.GET_SHMEM_CONFIG][0] == 4096
    fds = {msg.request: n for msg, n in seen}
    assert fds[F.SET_MEM_TABLE] == 1 and fds[F.SET_VRING_KICK] == 1 and fds[F.SET_VRING_CALL] == 0
    assert fds[F.SET_LOG_BASE] == 1 and fds[F.SET_BACKEND_REQ_FD] == 1 and fds[F.ADD_MEM_REG] == 1
    payloads = {msg.request: msg.payload for msg, _ in seen}
    assert payloads[F.SEND_RARP] == int.from_bytes(b"\x52\x54\x00\x12\x34\x56", "little")
    assert payloads[F.SET_VRING_ADDR] == m.VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0)
    assert payloads[F.GET_SHARED_OBJECT] == m.SharedObject(b"u" * 16), "our front-end sends the UUID (QEMU does not)"
    needs = {msg.request: msg.need_reply for msg, _ in seen}
    assert needs[F.SET_OWNER] and needs[F.SET_VRING_NUM], "REPLY_ACK negotiated: acks are asked for"
    assert needs[F.IOTLB_MSG]


REPLIED = {
    F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.GET_VRING_BASE, F.GET_QUEUE_NUM, F.IOTLB_MSG, F.GET_CONFIG,
    F.CREATE_CRYPTO_SESSION, F.POSTCOPY_ADVISE, F.POSTCOPY_LISTEN, F.POSTCOPY_END, F.GET_INFLIGHT_FD,
    F.GET_MAX_MEM_SLOTS, F.GET_STATUS, F.GET_SHARED_OBJECT, F.SET_DEVICE_STATE_FD, F.CHECK_DEVICE_STATE,
    F.GET_SHMEM_CONFIG, F.GET_VRING_BASE_SKIP_DRAIN, F.SET_LOG_BASE,
}
