"""Every front-end request against our back-end, sent message by message (hazmat): each gets the
spec's answer, the session goes on where the spec allows it, and block I/O keeps working on the
same session. Also the behaviour behind the answers: a broken ring signals its error fd, the
status byte drives the device, RESET_DEVICE / RESET_OWNER with I/O before and after, and in-band
notifications (VRING_KICK, back-end VRING_CALL / VRING_ERR)."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

import vhostuser_rs as vu
from peers import serve_blk
from vhostuser_rs import FrontendRequest as F
from vhostuser_rs import ProtocolFeature as P
from vhostuser_rs import VirtioFeature as V
from vhostuser_rs import hazmat
from vhostuser_rs import messages as m
from vhostuser_rs.backend import BatchQueue, coverage

MIB = 1 << 20
FAILED_ACK = (-22) & (2**64 - 1)  # -EINVAL, as the back-end answers
# virtio device status bits (virtio 1.x §2.1)
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128
RUNNING = ACK | DRIVER | FEATURES_OK | DRIVER_OK


@pytest.fixture
def blk(sock_dir: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    image = sock_dir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(4 * MIB)
    sock = sock_dir / "blk.sock"
    with serve_blk(image, sock, num_queues=2) as proc:
        yield sock, proc


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def fired(fd: int, timeout: float) -> bool:
    """Whether the eventfd `fd` is signalled within `timeout` (and drain it)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if ready:
        os.eventfd_read(fd)
    return bool(ready)


@dataclass
class Ring:
    index: int
    queue: vu.DriverQueue
    kick: int | None
    call: int | None
    err: int | None

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            if fd is not None:
                os.close(fd)


class Raw:
    """A front-end written message by message, with every ack asked for (REPLY_ACK)."""

    def __init__(self, sock: Path, *, memory: vu.GuestMemory | None = None) -> None:
        self.conn = vu.Connection.connect(sock, timeout=5)
        self.memory = memory or vu.GuestMemory.allocate(8 * MIB)
        #: GPA_ADDRESSES: guest-physical addresses in every "user address" field.
        self.gpa = False
        self.rings: dict[int, Ring] = {}
        self.features = 0
        self.scratch = self.memory.alloc(64 * 1024, 4096)

    def close(self) -> None:
        for ring in self.rings.values():
            ring.close()
        self.conn.close()

    def send(self, request: F | int, payload: m.Payload = None, fds: Sequence[int] = (), *, need_reply: bool = True) -> None:
        hazmat.send(self.conn, hazmat.request(request, payload, need_reply=need_reply), fds)

    def recv(self, request: F | int) -> tuple[m.Payload, list[int]]:
        msg, fds = self.conn.recv(timeout=5)
        assert msg.request == request and msg.is_reply, msg
        return msg.payload, fds

    def ask(self, request: F, payload: m.Payload = None, fds: Sequence[int] = ()) -> m.Payload:
        """Send with NEED_REPLY and return the answer (fds in it are closed)."""
        self.send(request, payload, fds)
        answer, got = self.recv(request)
        hazmat.close_fds(got)
        return answer

    def ack(self, request: F, payload: m.Payload = None, fds: Sequence[int] = ()) -> int:
        answer = self.ask(request, payload, fds)
        assert isinstance(answer, int)
        return answer

    def negotiate(self, protocol: int) -> int:
        """GET/SET_PROTOCOL_FEATURES (offered & `protocol`, REPLY_ACK always), SET_FEATURES,
        SET_MEM_TABLE. Returns the protocol features acked."""
        offered = int(self.ask(F.GET_FEATURES))  # type: ignore[arg-type]
        proto = int(self.ask(F.GET_PROTOCOL_FEATURES)) & (protocol | P.REPLY_ACK)  # type: ignore[arg-type]
        assert self.ack(F.SET_PROTOCOL_FEATURES, proto) == 0
        assert self.ack(F.SET_OWNER) == 0
        self.features = offered & int(V.VERSION_1 | V.PROTOCOL_FEATURES)
        assert self.ack(F.SET_FEATURES, self.features) == 0
        self.gpa = bool(proto & P.GPA_ADDRESSES)
        regions = [m.MemoryRegion(r.guest_addr, r.size, r.guest_addr if self.gpa else r.user_addr, r.mmap_offset)
                   for r in self.memory.regions]
        assert self.ack(F.SET_MEM_TABLE, m.MemoryTable(tuple(regions)), self.memory.fds()) == 0
        return proto

    def ring(self, index: int, *, size: int = 64, queue: vu.DriverQueue | None = None, kick: bool = True,
             call: bool = True, err: bool = True, enable: bool = True) -> Ring:
        """NUM, BASE, ADDR, KICK, CALL, ERR, ENABLE (fds optional: NOFD), each acked 0."""
        dq = queue or vu.DriverQueue(self.memory, size, index=index)
        ring = Ring(index, dq, eventfd() if kick else None, eventfd() if call else None, eventfd() if err else None)
        old = self.rings.pop(index, None)
        if old is not None:
            old.close()
        self.rings[index] = ring
        assert self.ack(F.SET_VRING_NUM, m.VringState(index, dq.size)) == 0
        assert self.ack(F.SET_VRING_BASE, m.VringState(index, dq.used_idx)) == 0
        desc, avail, used = dq.guest_addrs if self.gpa else dq.user_addrs
        assert self.ack(F.SET_VRING_ADDR, m.VringAddr(index, 0, desc, used, avail, dq.guest_addrs[2])) == 0
        for request, fd in ((F.SET_VRING_KICK, ring.kick), (F.SET_VRING_CALL, ring.call), (F.SET_VRING_ERR, ring.err)):
            assert self.ack(request, m.VringFd(index, fd is None), [] if fd is None else [fd]) == 0
        if enable:
            assert self.ack(F.SET_VRING_ENABLE, m.VringState(index, 1)) == 0
        return ring

    def submit(self, ring: Ring, rtype: int, sector: int, data: bytes = b"", in_len: int = 0) -> tuple[int, int]:
        """Queue one virtio-blk request and kick (by eventfd, or VRING_KICK without one);
        returns (head, status address)."""
        hdr = self.scratch
        buf = hdr + 16
        status = buf + max(len(data), in_len)
        self.memory.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        self.memory.write(status, b"\xff")
        readable = [(hdr, 16)] + ([(buf, len(data))] if data else [])
        writable = ([(buf, in_len)] if in_len else []) + [(status, 1)]
        if data:
            self.memory.write(buf, data)
        head = ring.queue.add(readable, writable)
        ring.queue.publish()
        if ring.kick is not None:
            os.eventfd_write(ring.kick, 1)
        else:
            assert self.ack(F.VRING_KICK, m.VringState(ring.index, 0)) == 0
        return head, status

    def complete(self, ring: Ring, head: int, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(done == head for done, _ in ring.queue.reap()):
                return True
            if ring.call is not None:
                fired(ring.call, 0.05)
            else:
                time.sleep(0.01)
        return False

    def io(self, ring: Ring, sector: int, data: bytes, timeout: float = 5.0) -> bool:
        """Write `data` at `sector` and read it back: True if both completed and match."""
        head, status = self.submit(ring, 1, sector, data)
        if not self.complete(ring, head, timeout):
            return False
        assert self.memory.read(status, 1) == b"\x00"
        head, status = self.submit(ring, 0, sector, in_len=len(data))
        assert self.complete(ring, head, timeout)
        assert self.memory.read(status, 1) == b"\x00"
        return self.memory.read(self.scratch + 16, len(data)) == data

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


OFFERED = int(P.MQ | P.LOG_SHMFD | P.REPLY_ACK | P.BACKEND_REQ | P.CONFIG | P.RESET_DEVICE
              | P.CONFIGURE_MEM_SLOTS | P.STATUS | P.INFLIGHT_SHMFD | P.GPA_ADDRESSES)


def test_every_request_then_io_on_the_same_session(blk: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """All 45 front-end requests, well formed, with NEED_REPLY: each is answered as the coverage
    table says (refusals in the spec's shape), and block I/O works before, between and after."""
    sock, proc = blk
    table = {row.request: row for row in coverage()}
    seen: set[F] = set()
    with Raw(sock) as s:
        plain = OFFERED & ~P.GPA_ADDRESSES  # front-end addresses here (GPAs: test_gpa_addresses)
        assert s.negotiate(plain) == plain
        ring0 = s.ring(0)
        assert s.io(ring0, 0, b"a" * 512)
        q1 = vu.DriverQueue(s.memory, 64, index=1)
        desc1, avail1, used1 = q1.user_addrs
        channel, their_end = socket.socketpair()
        gpu, gpu_peer = socket.socketpair()
        log = vu.DirtyLog.allocate(s.memory.guest_end)
        log_fd = eventfd()
        region = s.memory.regions[0]

        def accepted(request: F, payload: m.Payload = None, fds: Sequence[int] = ()) -> None:
            seen.add(request)
            assert table[request].handling != "spec refusal"
            assert s.ack(request, payload, fds) == 0, request

        def refused(request: F, payload: m.Payload = None, fds: Sequence[int] = ()) -> None:
            seen.add(request)
            assert table[request].refusal.startswith("failure ack")
            assert s.ack(request, payload, fds) != 0, request

        def replied(request: F, payload: m.Payload = None, fds: Sequence[int] = ()) -> m.Payload:
            seen.add(request)
            return s.ask(request, payload, fds)

        # Session requests, each answered with success.
        assert int(replied(F.GET_FEATURES)) & V.PROTOCOL_FEATURES  # type: ignore[arg-type]
        accepted(F.SET_FEATURES, s.features)
        accepted(F.SET_OWNER)
        accepted(F.SET_MEM_TABLE, m.MemoryTable(tuple(s.memory.regions)), s.memory.fds())
        log_memfd = log.fileno()
        assert log_memfd is not None
        assert replied(F.SET_LOG_BASE, m.LogBase(log.size, 0), [log_memfd]) == 0  # LOG_SHMFD: always replied
        accepted(F.SET_LOG_FD, None, [log_fd])
        accepted(F.SET_VRING_NUM, m.VringState(1, 64))
        accepted(F.SET_VRING_ADDR, m.VringAddr(1, 0, desc1, used1, avail1, q1.guest_addrs[2]))
        accepted(F.SET_VRING_BASE, m.VringState(1, 0))
        k1, c1, e1 = eventfd(), eventfd(), eventfd()
        accepted(F.SET_VRING_KICK, m.VringFd(1), [k1])
        accepted(F.SET_VRING_CALL, m.VringFd(1), [c1])
        accepted(F.SET_VRING_ERR, m.VringFd(1), [e1])
        accepted(F.SET_VRING_ENABLE, m.VringState(1, 1))
        # Exactly what is offered by default, and DEVICE_STATE, which the built-in blk device declares.
        assert replied(F.GET_PROTOCOL_FEATURES) == OFFERED | P.MQ | P.DEVICE_STATE
        accepted(F.SET_PROTOCOL_FEATURES, plain)
        assert replied(F.GET_QUEUE_NUM) == 2
        accepted(F.SET_BACKEND_REQ_FD, None, [their_end.fileno()])
        config = replied(F.GET_CONFIG, m.DeviceConfig(0, bytes(60)))
        assert isinstance(config, m.DeviceConfig) and len(config.data) == 60
        assert int.from_bytes(config.data[:8], "little") == 4 * MIB // 512
        inflight = s.ask  # GET_INFLIGHT_FD carries an fd: handled below by hand
        seen.add(F.GET_INFLIGHT_FD)
        s.send(F.GET_INFLIGHT_FD, m.InflightDesc(0, 0, 2, 64))
        desc, fds = s.recv(F.GET_INFLIGHT_FD)
        assert isinstance(desc, m.InflightDesc) and desc.mmap_size > 0 and len(fds) == 1
        accepted(F.SET_INFLIGHT_FD, desc, fds)
        hazmat.close_fds(fds)
        del inflight
        assert replied(F.GET_MAX_MEM_SLOTS) >= 8  # type: ignore[operator]
        accepted(F.ADD_MEM_REG, region, [s.memory.fds()[0]])  # the same region again: counted
        accepted(F.REM_MEM_REG, region)  # ...and its repeat removed: still mapped
        accepted(F.SET_STATUS, RUNNING)
        assert replied(F.GET_STATUS) == RUNNING
        state = replied(F.GET_VRING_BASE, m.VringState(1, 0))
        assert state == m.VringState(1, 0)
        state = replied(F.GET_VRING_BASE_SKIP_DRAIN, m.VringState(1, 0))
        assert state == m.VringState(1, 0)
        assert s.io(ring0, 8, b"b" * 1024)  # memory table replaced, repeats counted: still fine

        # Requests whose feature was not negotiated or is never offered: the spec's refusal.
        refused(F.SEND_RARP, 0x563412005452)
        refused(F.NET_SET_MTU, 1500)
        assert replied(F.IOTLB_MSG, m.IotlbMsg(0, 4096, region.user_addr, 3, 2)) != 0
        refused(F.SET_VRING_ENDIAN, m.VringState(0, 1))
        refused(F.SET_CONFIG, m.DeviceConfig(0, bytes(8)))  # capacity is read-only
        session = replied(F.CREATE_CRYPTO_SESSION, m.CryptoSession(1, bytes(16), 0))
        assert isinstance(session, m.CryptoSession) and session.session_id < 0  # "negative for failure"
        refused(F.CLOSE_CRYPTO_SESSION, 1)
        # POSTCOPY_ADVISE: an empty reply without the userfaultfd (read raw: our decoder wants
        # the fd a successful reply carries).
        seen.add(F.POSTCOPY_ADVISE)
        s.send(F.POSTCOPY_ADVISE)
        raw, fds = s.conn.recv_raw(timeout=5)
        assert hazmat.decode_header(raw) == m.Header(F.POSTCOPY_ADVISE, 0x5, 0) and fds == []
        assert replied(F.POSTCOPY_LISTEN) != 0
        assert replied(F.POSTCOPY_END) != 0
        refused(F.GPU_SET_SOCKET, None, [gpu.fileno()])
        refused(F.VRING_KICK, m.VringState(0, 0))
        assert replied(F.GET_SHARED_OBJECT, m.SharedObject(bytes(16))) != 0
        r, w = os.pipe()
        assert replied(F.SET_DEVICE_STATE_FD, m.DeviceStateParams(0, 0), [w]) == 1 | 1 << 8
        os.close(r)
        os.close(w)
        assert replied(F.CHECK_DEVICE_STATE) != 0
        shmem = replied(F.GET_SHMEM_CONFIG)
        assert isinstance(shmem, m.ShmemConfig) and not any(shmem.memory_sizes)
        # NOFD kick without INBAND_NOTIFICATIONS: polling is not offered.
        assert s.ack(F.SET_VRING_KICK, m.VringFd(1, True)) != 0
        assert s.io(ring0, 16, b"c" * 512)

        # Resets last: RESET_OWNER disables and stops the rings...
        accepted(F.RESET_OWNER)
        head, _ = s.submit(ring0, 1, 24, b"x" * 512)
        assert not s.complete(ring0, head, 0.3)
        ring0 = s.ring(0, queue=ring0.queue)
        assert s.complete(ring0, head)  # the request queued meanwhile
        assert s.io(ring0, 24, b"d" * 512)
        # ...RESET_DEVICE also forgets the features; the front-end sets the device up again.
        accepted(F.RESET_DEVICE)
        assert s.ask(F.GET_STATUS) == 0
        assert s.ack(F.SET_FEATURES, s.features) == 0
        ring0 = s.ring(0, queue=ring0.queue)
        assert s.io(ring0, 32, b"e" * 4096)
        for sock_ in (channel, their_end, gpu, gpu_peer):
            sock_.close()
        for fd in (k1, c1, e1, log_fd):
            os.close(fd)
    assert seen == set(F), sorted(set(F) - seen)
    assert proc.poll() is None


@pytest.mark.parametrize(
    ("request_", "protocol"),
    [(F.GET_QUEUE_NUM, 0), (F.GET_STATUS, 0), (F.GET_MAX_MEM_SLOTS, 0)],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_a_reply_without_failure_form_ends_only_that_session(
    blk: tuple[Path, subprocess.Popen[bytes]], request_: F, protocol: int
) -> None:
    """GET_QUEUE_NUM without MQ, GET_STATUS without STATUS...: the spec defines no failure reply
    and a made-up value would mislead, so the back-end closes the connection (spec: "If back-end
    detects some error such as incompatible features, it may also close the connection"). The
    next front-end is served."""
    sock, proc = blk
    with Raw(sock) as s:
        assert s.ack(F.SET_PROTOCOL_FEATURES, int(P.REPLY_ACK) | protocol) == 0
        s.send(request_)
        with pytest.raises(vu.ConnectionClosedError):
            s.conn.recv(timeout=5)
    with Raw(sock) as s:
        s.negotiate(OFFERED)
        assert s.io(s.ring(0), 0, b"n" * 512)
    assert proc.poll() is None


def test_inband_without_its_dependencies_closes_the_connection(sock_dir: Path) -> None:
    """Spec (In-band notifications): "the back-end should close the connection as a response to
    a SET_PROTOCOL_FEATURES message that sets the in-band notifications feature flag without
    the other two" (BACKEND_REQ, REPLY_ACK)."""
    with served(sock_dir, EchoDevice()) as sock, Raw(sock) as s:
        assert int(s.ask(F.GET_PROTOCOL_FEATURES)) & P.INBAND_NOTIFICATIONS  # type: ignore[arg-type]
        s.send(F.SET_PROTOCOL_FEATURES, int(P.INBAND_NOTIFICATIONS | P.REPLY_ACK))
        with pytest.raises(vu.ConnectionClosedError):
            s.conn.recv(timeout=5)


def loop_chain(s: Raw, ring: Ring) -> None:
    """Publish a chain whose only descriptor points NEXT to itself (malformed: a loop)."""
    desc, avail, _ = ring.queue.guest_addrs
    s.memory.write(desc, struct.pack("<QIHH", s.scratch, 16, 1, 0))
    idx = ring.queue.avail_idx
    s.memory.write(avail + 4 + 2 * (idx % ring.queue.size), struct.pack("<H", 0))
    s.memory.write(avail + 2, struct.pack("<H", (idx + 1) & 0xFFFF))


def test_a_broken_ring_signals_its_error_fd_not_its_call_fd(blk: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """SET_VRING_ERR: a malformed chain breaks the ring; its error fd is signalled, its call fd
    is not; DEVICE_NEEDS_RESET shows in GET_STATUS and, with DRIVER_OK, CONFIG_CHANGE_MSG goes to
    the front-end (virtio 1.x §2.1.1); the other ring keeps working."""
    sock, _ = blk
    with Raw(sock) as s:
        s.negotiate(OFFERED)
        channel, their_end = socket.socketpair()
        with channel, their_end:
            assert s.ack(F.SET_BACKEND_REQ_FD, None, [their_end.fileno()]) == 0
            ring0, ring1 = s.ring(0), s.ring(1)
            assert s.ack(F.SET_STATUS, RUNNING) == 0
            assert s.io(ring1, 0, b"1" * 512)
            assert ring1.call is not None and ring1.err is not None
            while fired(ring1.call, 0):
                pass
            loop_chain(s, ring1)
            assert ring1.kick is not None
            os.eventfd_write(ring1.kick, 1)
            assert fired(ring1.err, 5), "the error fd was not signalled"
            assert not fired(ring1.call, 0.2), "the call fd was signalled for a broken ring"
            assert s.ask(F.GET_STATUS) == RUNNING | NEEDS_RESET
            conn = vu.Connection.from_socket(channel)
            with conn:
                msg, _ = conn.recv(channel_value=int(vu.Channel.BACKEND), timeout=5)
                assert msg.request is vu.BackendRequest.CONFIG_CHANGE_MSG
            assert s.io(ring0, 8, b"0" * 512)
            # DEVICE_NEEDS_RESET stays until the device is reset.
            assert s.ack(F.SET_STATUS, RUNNING) == 0
            assert s.ask(F.GET_STATUS) == RUNNING | NEEDS_RESET
            assert s.ack(F.SET_STATUS, 0) == 0
            assert s.ask(F.GET_STATUS) == 0


def test_the_status_byte_drives_the_device(blk: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """Once the front-end writes a status, rings run only with DRIVER_OK (virtio 1.x §2.1.2: no
    buffers consumed before it) and stop with FAILED; writing 0 resets the device."""
    sock, _ = blk
    with Raw(sock) as s:
        s.negotiate(OFFERED)
        assert s.ack(F.SET_STATUS, ACK | DRIVER | FEATURES_OK) == 0
        ring = s.ring(0)
        head, _ = s.submit(ring, 1, 0, b"s" * 512)
        assert not s.complete(ring, head, 0.3), "processed before DRIVER_OK"
        assert s.ack(F.SET_STATUS, RUNNING) == 0
        assert s.complete(ring, head)
        assert s.io(ring, 0, b"t" * 512)
        assert s.ack(F.SET_STATUS, RUNNING | FAILED) == 0
        head, _ = s.submit(ring, 1, 8, b"u" * 512)
        assert not s.complete(ring, head, 0.3), "processed after FAILED"
        # Writing 0 resets: rings stopped, features forgotten; set up again, the queued request
        # is served.
        assert s.ack(F.SET_STATUS, 0) == 0
        assert s.ask(F.GET_STATUS) == 0
        assert not s.complete(ring, head, 0.3)
        assert s.ack(F.SET_FEATURES, s.features) == 0
        ring = s.ring(0, queue=ring.queue)
        assert s.complete(ring, head)
        assert s.io(ring, 16, b"v" * 512)


def test_status_zero_before_get_vring_base_keeps_the_base(blk: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """QEMU 7.2 stops a device with SET_STATUS(0) *before* GET_VRING_BASE and restarts (or
    migrates) the rings from the base that answers: the reset must not lose it."""
    sock, _ = blk
    with Raw(sock) as s:
        s.negotiate(OFFERED)
        ring = s.ring(0)
        assert s.ack(F.SET_STATUS, RUNNING) == 0
        for i in range(5):
            assert s.io(ring, i, bytes([i]) * 512)  # 10 requests
        assert s.ack(F.SET_STATUS, 0) == 0
        assert s.ack(F.SET_VRING_ENABLE, m.VringState(0, 0)) == 0
        assert s.ask(F.GET_VRING_BASE, m.VringState(0, 0)) == m.VringState(0, 10)
        # The restart from that base serves only new requests.
        assert s.ack(F.SET_FEATURES, s.features) == 0
        ring = s.ring(0, queue=ring.queue)
        assert s.ack(F.SET_STATUS, RUNNING) == 0
        assert s.io(ring, 9, b"w" * 512)


def test_reset_device_and_reset_owner_with_io_before_and_after(blk: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """With our own block client (Frontend.negotiate + setup_queue): I/O, RESET_DEVICE, set up
    again, I/O; I/O, RESET_OWNER, set up again, I/O — data written before is read after."""
    from vhostuser_rs.blk import BlockClient

    sock, _ = blk
    with BlockClient.connect(sock, num_queues=1) as disk:
        fe = disk.frontend
        assert P.RESET_DEVICE in fe.protocol_features
        disk.write(0, b"r" * 4096)
        fe.reset_device()
        fe.set_features(int(disk.features))
        disk.queues[0] = fe.setup_queue(0, 128, disk.memory, ring=disk.queues[0].queue)
        assert disk.read(0, 4096) == b"r" * 4096
        disk.write(4096, b"o" * 4096)
        fe.reset_owner()
        disk.queues[0] = fe.setup_queue(0, 128, disk.memory, ring=disk.queues[0].queue)
        assert disk.read(4096, 4096) == b"o" * 4096
        disk.write(8192, b"z" * 512)
        assert disk.read(8192, 512) == b"z" * 512


# -- in-band notifications (a Python device that declares INBAND_NOTIFICATIONS) ---------------


class EchoDevice(vu.Device):
    """Completes every chain with as many bytes as it can write (a zero-filled answer)."""

    num_queues = 1
    protocol_features = int(P.INBAND_NOTIFICATIONS)

    def process(self, queue: BatchQueue, chains: list[vu.DescriptorChain]) -> None:
        for chain in chains:
            queue.complete(chain, chain.writable_len)


class served:
    """A Python device served in this process (stopped at exit)."""

    def __init__(self, sock_dir: Path, device: vu.Device) -> None:
        self.path = sock_dir / "inband.sock"
        self.backend = vu.Backend.listen(self.path, device)

    def __enter__(self) -> Path:
        self.backend.start()
        return self.path

    def __exit__(self, *_exc: object) -> None:
        self.backend.close()
        assert self.backend.error is None


class Recorder(vu.BackendRequestHandler):
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.errors: list[int] = []
        self.event = threading.Event()

    def vring_call(self, state: m.VringState) -> int | None:
        self.calls.append(state.index)
        self.event.set()
        return 0

    def vring_err(self, state: m.VringState) -> int | None:
        self.errors.append(state.index)
        self.event.set()
        return 0


def test_inband_notifications(sock_dir: Path) -> None:
    """INBAND_NOTIFICATIONS with a ring that has no kick, call or error fd (NOFD): VRING_KICK
    messages start and wake it, used buffers come back as VRING_CALL on the back-end request
    channel (acked, REPLY_ACK), a malformed chain as VRING_ERR."""
    handler = Recorder()
    device = EchoDevice()
    with served(sock_dir, device) as sock, vu.Frontend.connect(sock, timeout=5) as fe:
        mem = vu.GuestMemory.allocate(4 * MIB)
        wanted = P.INBAND_NOTIFICATIONS | P.BACKEND_REQ | P.REPLY_ACK | P.MQ
        result = fe.negotiate(protocol_features=wanted, memory=mem, handler=handler, inband_notifications=True)
        assert result.protocol_features == wanted
        q = vu.DriverQueue(mem, 32, event_idx=V.EVENT_IDX in fe.features)
        fe.set_vring_num(0, 32)
        fe.set_vring_base(0, 0)
        desc, avail, used = q.user_addrs
        fe.set_vring_addr(0, desc, used, avail)
        fe.set_vring_kick(0, None)
        fe.set_vring_call(0, None)
        fe.set_vring_err(0, None)
        fe.set_vring_enable(0, True)
        buf = mem.alloc(64)
        for round_ in range(3):
            handler.event.clear()
            head = q.add([], [(buf, 64)])
            q.publish()
            fe.vring_kick(0)
            assert handler.event.wait(5), f"no VRING_CALL in round {round_}"
            assert q.reap() == [(head, 64)]
        assert set(handler.calls) == {0} and handler.errors == []
        # A malformed chain: VRING_ERR in-band (no error fd).
        handler.event.clear()
        d, a, _ = q.guest_addrs
        slot = q.avail_idx % q.size
        mem.write(d, struct.pack("<QIHH", buf, 16, 1, 0))  # NEXT -> itself
        mem.write(a + 4 + 2 * slot, struct.pack("<H", 0))
        mem.write(a + 2, struct.pack("<H", (q.avail_idx + 1) & 0xFFFF))
        fe.vring_kick(0)
        deadline = time.monotonic() + 5
        while not handler.errors and time.monotonic() < deadline:
            handler.event.wait(0.1)
        assert handler.errors == [0]


def test_inband_vring_kick_starts_a_ring_without_set_vring_kick(sock_dir: Path) -> None:
    """Spec (Ring states): the back-end starts a ring "upon receiving ... the in-band message
    VHOST_USER_VRING_KICK if negotiated" — no SET_VRING_KICK at all."""
    handler = Recorder()
    with served(sock_dir, EchoDevice()) as sock, vu.Frontend.connect(sock, timeout=5) as fe:
        mem = vu.GuestMemory.allocate(4 * MIB)
        fe.negotiate(protocol_features=P.INBAND_NOTIFICATIONS | P.BACKEND_REQ | P.REPLY_ACK, memory=mem, handler=handler,
                    inband_notifications=True)
        q = vu.DriverQueue(mem, 16, event_idx=V.EVENT_IDX in fe.features)
        fe.set_vring_num(0, 16)
        desc, avail, used = q.user_addrs
        fe.set_vring_addr(0, desc, used, avail)
        call = eventfd()
        try:
            fe.set_vring_call(0, call)  # an fd is preferred over VRING_CALL
            fe.set_vring_enable(0, True)
            buf = mem.alloc(8)
            head = q.add([], [(buf, 8)])
            q.publish()
            fe.vring_kick(0)
            assert fired(call, 5)
            assert q.reap() == [(head, 8)]
            assert handler.calls == []
        finally:
            os.close(call)


def test_cli_requests_shows_what_the_back_end_does() -> None:
    import json
    import sys

    out = subprocess.run([sys.executable, "-m", "vhostuser_rs", "requests", "--json"], capture_output=True, text=True, check=True)
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert len(rows) == len(F)
    assert rows["SET_VRING_ENDIAN"]["backend"] == "spec refusal"
    assert rows["POSTCOPY_ADVISE"]["refusal"] == "empty reply without fd"
    assert rows["VRING_KICK"]["offer"] == "if the device declares it"
    assert rows["GET_QUEUE_NUM"]["backend"] == "handled"
    text = subprocess.run([sys.executable, "-m", "vhostuser_rs", "requests"], capture_output=True, text=True, check=True).stdout
    assert "spec refusal" in text and "device hook" in text


def test_coverage_lists_every_request_once() -> None:
    rows = coverage()
    assert [r.request for r in rows] == list(F)
    assert {r.handling for r in rows} <= {"handled", "device hook", "spec refusal"}
    refused = {r.request for r in rows if r.handling == "spec refusal"}
    assert {F.SET_VRING_ENDIAN, F.POSTCOPY_ADVISE, F.POSTCOPY_LISTEN, F.POSTCOPY_END} <= refused
    assert all(r.offer == "never offered" for r in rows if r.handling == "spec refusal")


# -- IOTLB failure breaks the ring: error fd ----------------------------------------------------

IOVA_BASE = 0x7_0000_0000
PAGE = 4096


class RingOnlyIommu(vu.BackendRequestHandler):
    """Maps the ring's pages on MISS and refuses every other page (status 1, no UPDATE)."""

    def __init__(self, mem: vu.GuestMemory, ring_pages: set[int]) -> None:
        self.mem = mem
        self.ring_pages = ring_pages
        self.fe: vu.Frontend | None = None
        self.refused: list[int] = []

    def iotlb_msg(self, msg: m.IotlbMsg) -> int | None:
        assert self.fe is not None
        page = msg.iova & ~(PAGE - 1)
        if page not in self.ring_pages:
            self.refused.append(msg.iova)
            return 1
        self.fe.iotlb_msg(m.IotlbMsg(page, PAGE, self.mem.user_addr(page - IOVA_BASE), 3, m.IotlbMsg.UPDATE))
        return 0


class ReverseEcho(vu.Device):
    num_queues = 1
    features = int(V.VERSION_1)

    def process_request(self, queue_index: int, chain: vu.DescriptorChain) -> int | None:
        return chain.write(chain.read()[::-1])


def test_an_iotlb_failure_signals_the_error_fd(sock_dir: Path) -> None:
    """ACCESS_PLATFORM: the front-end refuses the translation of a buffer (its IOMMU has no
    entry): the ring is broken, its error fd is signalled, its call fd is not, and the session
    goes on. The back-end's MISS does not ask for REPLY_ACK (waiting for it could deadlock
    against the front-end's main-channel requests), so it learns of the refusal by the missing
    UPDATE: after its repeated MISSes go unanswered (about 5 s)."""
    sock = sock_dir / "iotlb.sock"
    with vu.Backend.listen(sock, ReverseEcho()) as backend:
        backend.start()
        mem = vu.GuestMemory.allocate(1 << 20)
        ring = vu.DriverQueue(mem, 16)
        pages = {(a + IOVA_BASE) & ~(PAGE - 1) for a in ring.guest_addrs}
        iommu = RingOnlyIommu(mem, pages | {p + PAGE for p in pages})
        kick, call, err = eventfd(), eventfd(), eventfd()
        try:
            with vu.Frontend.connect(sock, timeout=5) as fe:
                iommu.fe = fe
                fe.negotiate(memory=mem, handler=iommu, features=int(V.VERSION_1 | V.ACCESS_PLATFORM))
                desc, avail, used = (a + IOVA_BASE for a in ring.guest_addrs)
                fe.set_vring_num(0, 16)
                fe.set_vring_base(0, 0)
                fe.set_vring_addr(0, desc, used, avail)
                fe.set_vring_call(0, call)
                fe.set_vring_err(0, err)
                fe.set_vring_kick(0, kick)
                fe.set_vring_enable(0, True)
                out, back = mem.alloc(64, PAGE * 4), mem.alloc(64, PAGE * 4)
                ring.add([(out + IOVA_BASE, 8)], [(back + IOVA_BASE, 8)])
                ring.publish()
                os.eventfd_write(kick, 1)
                assert fired(err, 15), "the error fd was not signalled"
                assert len(iommu.refused) >= 2  # asked again before giving up
                assert not fired(call, 0.2)
                assert ring.reap() == []
                assert fe.get_queue_num() == 1  # the session goes on
        finally:
            for fd in (kick, call, err):
                os.close(fd)
    assert backend.error is None


# -- device hooks: crypto sessions and the GPU socket ---------------------------------------------


class CryptoGpu(vu.Device):
    """Declares CRYPTO_SESSION; keeps sessions in a dict; takes the GPU socket and says hello."""

    num_queues = 1
    protocol_features = int(P.CRYPTO_SESSION)

    def __init__(self) -> None:
        self.sessions: dict[int, tuple[int, bytes]] = {}

    def create_crypto_session(self, op_code: int, params: bytes) -> int:
        if op_code == 99:
            return -1
        sid = len(self.sessions) + 7
        self.sessions[sid] = (op_code, params)
        return sid

    def close_crypto_session(self, session_id: int) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def gpu_set_socket(self, fd: int) -> bool:
        os.write(fd, b"vhost-user-gpu hello")
        return True

    def process(self, queue: BatchQueue, chains: list[vu.DescriptorChain]) -> None:
        for chain in chains:
            queue.complete(chain, 0)


def test_crypto_sessions_and_the_gpu_socket_reach_a_device_that_implements_them(sock_dir: Path) -> None:
    device = CryptoGpu()
    with served(sock_dir, device) as sock, vu.Frontend.connect(sock, timeout=5) as fe:
        result = fe.negotiate(protocol_features=P.CRYPTO_SESSION | P.REPLY_ACK | P.MQ)
        assert P.CRYPTO_SESSION in result.protocol_features
        created = fe.create_crypto_session(m.CryptoSession(3, bytes(range(16)), 0))
        assert created.session_id == 7 and device.sessions[7] == (3, bytes(range(16)))
        # "negative for failure": the device's refusal, answered as the spec says.
        assert fe.create_crypto_session(m.CryptoSession(99, bytes(16), 0)).session_id < 0
        fe.close_crypto_session(7)
        assert device.sessions == {}
        with pytest.raises(vu.RequestRejectedError):
            fe.close_crypto_session(7)  # no such session
        ours, theirs = socket.socketpair()
        with ours, theirs:
            fe.gpu_set_socket(theirs.fileno())
            ours.settimeout(5)
            assert ours.recv(64) == b"vhost-user-gpu hello"
        assert fe.get_queue_num() == 1


def test_device_hooks_that_are_not_implemented_are_refused(sock_dir: Path) -> None:
    """A Python device without the hooks: GPU_SET_SOCKET is refused (socket closed) and the
    session goes on."""
    with served(sock_dir, EchoDevice()) as sock, vu.Frontend.connect(sock, timeout=5) as fe:
        fe.negotiate(protocol_features=P.REPLY_ACK | P.MQ)
        ours, theirs = socket.socketpair()
        with ours, theirs:
            with pytest.raises(vu.RequestRejectedError):
                fe.gpu_set_socket(theirs.fileno())
            theirs.close()
            ours.settimeout(5)
            assert ours.recv(64) == b""  # the back-end closed its copy
        assert fe.get_queue_num() == 1


def test_gpa_addresses(blk: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """GPA_ADDRESSES: the front-end puts guest-physical addresses in the regions' and the rings'
    "user address" fields (two regions far apart, the second one holding the rings); block I/O
    works, and so does a memory table re-sent, ADD/REM_MEM_REG and the dirty log."""
    sock, _ = blk
    memory = vu.GuestMemory.allocate(regions=[(0, 4 * MIB), (0x1_0000_0000, 4 * MIB)])
    with Raw(sock, memory=memory) as s:
        assert s.negotiate(OFFERED) & P.GPA_ADDRESSES
        memory.alloc(4 * MIB - 64 * 1024)  # the rings land in the second region
        ring = s.ring(0)
        assert min(ring.queue.guest_addrs) >= 0x1_0000_0000
        assert s.io(ring, 0, b"g" * 4096)
        second = m.MemoryRegion(0x1_0000_0000, 4 * MIB, 0x1_0000_0000, 0)
        assert s.ack(F.ADD_MEM_REG, second, [memory.fds()[1]]) == 0  # a repeat: counted
        assert s.ack(F.REM_MEM_REG, second) == 0
        assert s.io(ring, 8, b"h" * 512)
