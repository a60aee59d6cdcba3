"""Hostile front-ends (test peers on hazmat) against the built-in back-end in another process:
each gets an error answer or loses its own connection; the back-end keeps serving the next
front-end, never crashes and never leaks descriptors."""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import vhostuser_rs as vu
from peers import serve_blk
from vhostuser_rs import FrontendRequest as F
from vhostuser_rs import hazmat
from vhostuser_rs import messages as m
from vhostuser_rs.blk import BlockClient

MIB = 1 << 20


@pytest.fixture
def backend(sock_dir: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    image = sock_dir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(4 * MIB)
    sock = sock_dir / "be.sock"
    with serve_blk(image, sock, num_queues=2) as proc:
        yield sock, proc


def fd_count(proc: subprocess.Popen[bytes], expect: int | None = None) -> int:
    """The back-end's open fds; with `expect`, waits (up to 3 s) for the count to settle there,
    since the back-end notices a closed session within its 200 ms poll slice."""
    import time

    deadline = time.monotonic() + 3
    while True:
        n = len(os.listdir(f"/proc/{proc.pid}/fd"))
        if expect is None or n == expect or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def still_serves(sock: Path) -> None:
    with BlockClient.connect(sock) as disk:
        disk.write(0, b"k" * 512)
        assert disk.read(0, 512) == b"k" * 512


def session(sock: Path) -> vu.Connection:
    conn = vu.Connection.connect(sock, timeout=5)
    hazmat.send(conn, hazmat.request(F.GET_FEATURES))
    conn.recv(timeout=5)
    hazmat.send(conn, hazmat.request(F.GET_PROTOCOL_FEATURES))
    conn.recv(timeout=5)
    hazmat.send(conn, hazmat.request(F.SET_PROTOCOL_FEATURES, int(vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.CONFIGURE_MEM_SLOTS)))
    return conn


def ack(conn: vu.Connection, request: F, payload: m.Payload = None, fds: list[int] | None = None) -> int:
    hazmat.send(conn, hazmat.request(request, payload, need_reply=True), fds or [])
    msg, got = conn.recv(timeout=5)
    hazmat.close_fds(got)
    assert msg.request is request and msg.is_reply
    return int(msg.payload)  # type: ignore[arg-type]


def test_invalid_requests_are_refused_and_the_session_goes_on(backend: tuple[Path, subprocess.Popen[bytes]]) -> None:
    sock, proc = backend
    before = fd_count(proc)
    with session(sock) as conn:
        # CVE-2020-10723: a ring index that truncates to a valid one.
        assert ack(conn, F.SET_VRING_NUM, m.VringState(0x10001, 8)) != 0
        assert ack(conn, F.SET_VRING_NUM, m.VringState(0, 3)) != 0  # not a power of two
        assert ack(conn, F.SET_VRING_NUM, m.VringState(0, 65536 // 2)) != 0  # above the maximum
        # CVE-2019-14818: repeated SET_VRING_NUM does not leak.
        for _ in range(200):
            assert ack(conn, F.SET_VRING_NUM, m.VringState(1, 64)) == 0
        # Acknowledging features that were not offered.
        assert ack(conn, F.SET_FEATURES, 1 << 63) != 0
        # REM_MEM_REG of an unknown region; ADD_MEM_REG of a file too short for the region.
        assert ack(conn, F.REM_MEM_REG, m.MemoryRegion(0, 4096, 0)) != 0
        small = os.memfd_create("small")
        os.ftruncate(small, 4096)
        assert ack(conn, F.ADD_MEM_REG, m.MemoryRegion(0, MIB, 0x10000), [small]) != 0
        # Unsupported requests (not offered) with NEED_REPLY: a failure ack, not a hang.
        assert ack(conn, F.SET_VRING_ENDIAN, m.VringState(0, 0)) != 0
        # Unknown request code with NEED_REPLY: a failure ack, fds closed.
        hazmat.send(conn, hazmat.encode_raw(99, b"junk", flags=0x9), [small, small, small])
        msg, _ = conn.recv(timeout=5)
        assert msg.request == 99 and msg.payload != 0
        # CVE-2022-0669 / CVE-2019-14818(a): surplus fds on a request are closed.
        for _ in range(50):
            hazmat.send(conn, hazmat.request(F.SET_OWNER, need_reply=True), [small] * 3)
            with pytest.raises(vu.ConnectionClosedError):
                # The malformed message (fds on SET_OWNER) ends this session...
                conn.recv(timeout=5)
            break
        os.close(small)
    still_serves(sock)
    assert fd_count(proc, before) == before


@pytest.mark.parametrize(
    "raw",
    [
        hazmat.encode_raw(F.SET_MEM_TABLE, struct.pack("=II", 9, 0) + bytes(32 * 9)),  # too many regions
        hazmat.encode_raw(F.SET_LOG_BASE, struct.pack("=QQ", 2**64 - 1, 4096)),  # CVE-2020-10722
        hazmat.encode_raw(F.GET_FEATURES, flags=0x2),  # wrong version
        hazmat.encode_raw(F.SET_VRING_ADDR, bytes(39)),  # wrong size
        hazmat.encode_raw(F.GET_FEATURES, b"", size=1 << 20),  # absurd size
        b"\x01\x00\x00",  # truncated header, then EOF
    ],
)
def test_malformed_messages_end_only_that_session(backend: tuple[Path, subprocess.Popen[bytes]], raw: bytes) -> None:
    sock, proc = backend
    before = fd_count(proc)
    with vu.Connection.connect(sock, timeout=5) as conn:
        memfds = [os.memfd_create("r") for _ in range(2)]
        conn.send(raw, memfds)
        hazmat.close_fds(memfds)
        with pytest.raises((vu.ConnectionClosedError, vu.VhostUserTimeoutError)):
            conn.recv(timeout=2)
    still_serves(sock)
    assert proc.poll() is None
    assert fd_count(proc, before) == before


def test_malformed_ring_breaks_only_that_queue(backend: tuple[Path, subprocess.Popen[bytes]]) -> None:
    sock, proc = backend
    with BlockClient.connect(sock, num_queues=2, timeout=2) as disk:
        # Queue 1 gets a chain whose descriptor loops back to itself.
        q1 = disk.queues[1]
        desc, avail, _ = q1.queue.guest_addrs
        disk.memory.write(desc, struct.pack("<QIHH", disk._scratch, 16, 1, 0))  # NEXT -> itself
        disk.memory.write(avail + 4, struct.pack("<H", 0))
        disk.memory.write(avail + 2, struct.pack("<H", 1))
        q1.kick()
        # Queue 0 keeps working.
        disk.write(0, b"q" * 512, queue=0)
        assert disk.read(0, 512, queue=0) == b"q" * 512
    still_serves(sock)
    assert proc.poll() is None


def test_front_end_vanishing_mid_io(backend: tuple[Path, subprocess.Popen[bytes]]) -> None:
    sock, proc = backend
    before = fd_count(proc)
    for _ in range(3):
        disk = BlockClient.connect(sock)
        vq = disk.queues[0]
        for i in range(8):  # requests in flight, then the front-end is gone
            hdr = disk.memory.alloc(16)
            data = disk.memory.alloc(4096, 4096)
            status = disk.memory.alloc(1)
            disk.memory.write(hdr, struct.pack("<IIQ", 0, 0, i * 8))
            vq.queue.add([(hdr, 16)], [(data, 4096), (status, 1)])
        vq.queue.publish()
        vq.kick()
        disk.close()
    still_serves(sock)
    assert fd_count(proc, before) == before


def test_inflight_requests_do_not_leak(backend: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """CVE-2020-10726: GET_INFLIGHT_FD in a loop keeps the back-end's fds and mappings flat;
    CVE-2022-0669: fds on GET/SET_INFLIGHT_FD beyond the one allowed end that session, closed."""
    sock, proc = backend

    def maps() -> int:
        return len(Path(f"/proc/{proc.pid}/maps").read_text().splitlines())

    fds_before = fd_count(proc)
    with session(sock) as conn:
        hazmat.send(conn, hazmat.request(F.SET_PROTOCOL_FEATURES, int(vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.INFLIGHT_SHMFD)))
        assert ack(conn, F.SET_FEATURES, int(vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.PROTOCOL_FEATURES)) == 0
        mappings = None
        for i in range(300):
            hazmat.send(conn, hazmat.request(F.GET_INFLIGHT_FD, m.InflightDesc(0, 0, 2, 128)))
            reply, got = conn.recv(timeout=5)
            assert isinstance(reply.payload, m.InflightDesc) and reply.payload.mmap_size >= 2 * 2112 and len(got) == 1
            hazmat.close_fds(got)
            if i == 10:
                mappings = maps()
        assert mappings is not None and maps() <= mappings + 2
        assert fd_count(proc) <= fds_before + 2  # this session and at most one live buffer
        extra = os.memfd_create("extra")
        os.ftruncate(extra, 8192)
        hazmat.send(conn, hazmat.request(F.SET_INFLIGHT_FD, m.InflightDesc(8192, 0, 1, 128), need_reply=True), [extra] * 3)
        with pytest.raises(vu.ConnectionClosedError):
            conn.recv(timeout=5)
        os.close(extra)
    still_serves(sock)
    assert fd_count(proc, fds_before) == fds_before
