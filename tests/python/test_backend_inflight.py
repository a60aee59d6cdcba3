"""Inflight I/O tracking (INFLIGHT_SHMFD): a back-end that dies with requests in flight is
replaced by a new process, the front-end hands it the same inflight buffer and the same ring,
and the new back-end resubmits exactly the requests the old one had not completed."""

from __future__ import annotations

import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

import vhostuser_rs as vu
from peers import peer

DEVICE = Path(__file__).parent / "devices" / "crashing_echo.py"
QSIZE = 16


def device(sock: Path, *, crash: bool) -> AbstractContextManager[subprocess.Popen[bytes]]:
    sock.unlink(missing_ok=True)
    return peer([sys.executable, str(DEVICE), str(sock), *(["--crash"] if crash else [])], sock)


def submit(mem: vu.GuestMemory, vq: vu.Virtqueue, tag: bytes, command: bytes = b".") -> tuple[int, int]:
    out, back = mem.alloc(16), mem.alloc(16)
    mem.write(out, tag + command)
    head = vq.queue.add([(out, len(tag) + 1)], [(back, len(tag))])
    return head, back


def reap(vq: vu.Virtqueue, want: int) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    while len(got) < want:
        got += vq.queue.reap()
        if len(got) < want:
            assert vq.wait(5), f"only {len(got)} of {want} completions"
    return got


def test_new_backend_resubmits_what_the_dead_one_left_in_flight(sock_dir: Path) -> None:
    sock = sock_dir / "inflight.sock"
    mem = vu.GuestMemory.allocate(1 << 20)
    with device(sock, crash=True) as first:
        fe = vu.Frontend.connect(sock)
        fe.negotiate(memory=mem)
        assert vu.ProtocolFeature.INFLIGHT_SHMFD in fe.protocol_features
        buffer = fe.setup_inflight(1, QSIZE)
        assert buffer is not None and buffer.desc.mmap_size >= 16 + 16 * QSIZE
        vq = fe.setup_queue(0, QSIZE)
        head_a, back_a = submit(mem, vq, b"request1")
        vq.queue.publish()
        vq.kick()
        assert reap(vq, 1) == [(head_a, 8)] and mem.read(back_a, 8) == b"request1"
        # Two in one batch: the first kills the back-end before either completes.
        head_b, back_b = submit(mem, vq, b"request2", b"X")
        head_c, back_c = submit(mem, vq, b"request3")
        vq.queue.publish()
        vq.kick()
        assert first.wait(10) == 3
        ring = vq.queue
        fe.close()

    with device(sock, crash=False):
        with buffer, vu.Frontend.connect(sock) as fe2:
            fe2.negotiate(memory=mem)
            assert fe2.setup_inflight(1, QSIZE, buffer=buffer) is buffer
            assert ring.used_idx == 1 and ring.in_flight == 2
            # Base 3 (everything published) tells the back-end the avail ring holds nothing new:
            # B and C can only come back from the inflight record (without it this times out).
            vq2 = fe2.setup_queue(0, QSIZE, ring=ring, base=ring.avail_idx)
            assert ring.avail_idx == 3
            done = sorted(reap(vq2, 2))
            assert done == sorted([(head_b, 8), (head_c, 8)])
            assert mem.read(back_b, 8) == b"request2" and mem.read(back_c, 8) == b"request3"
            assert ring.in_flight == 0
            # The ring goes on from there, and nothing completes twice.
            head_d, back_d = submit(mem, vq2, b"request4")
            vq2.queue.publish()
            vq2.kick()
            assert reap(vq2, 1) == [(head_d, 8)] and mem.read(back_d, 8) == b"request4"
            assert vq2.queue.reap() == []


def test_without_inflight_buffer_nothing_is_resubmitted(sock_dir: Path) -> None:
    """The control: same crash, no SET_INFLIGHT_FD to the new back-end; it starts from the base
    (used.idx) and re-reads the avail ring instead, so both requests still complete, in avail
    order, through the ordinary path (what a back-end without INFLIGHT_SHMFD gives)."""
    sock = sock_dir / "plain.sock"
    mem = vu.GuestMemory.allocate(1 << 20)
    with device(sock, crash=True) as first:
        fe = vu.Frontend.connect(sock)
        fe.negotiate(memory=mem)
        vq = fe.setup_queue(0, QSIZE)
        head_b, _ = submit(mem, vq, b"request2", b"X")
        vq.queue.publish()
        vq.kick()
        assert first.wait(10) == 3
        ring = vq.queue
        fe.close()
    with device(sock, crash=False):
        with vu.Frontend.connect(sock) as fe2:
            fe2.negotiate(memory=mem)
            vq2 = fe2.setup_queue(0, QSIZE, ring=ring)
            vq2.kick()
            assert reap(vq2, 1) == [(head_b, 8)]


@pytest.mark.parametrize(
    "desc_fields, why",
    [
        ((1 << 20, 0, 1, QSIZE), "mmap_size beyond the file"),
        ((64, 0, 1, QSIZE), "mmap_size too small for the queue"),
        ((4096, 0, 9, QSIZE), "more queues than the device has (CVE-2021-3839)"),
        ((4096, 0, 1, 12), "queue size not a power of two"),
    ],
)
def test_hostile_set_inflight_fd_is_refused(sock_dir: Path, desc_fields: tuple[int, int, int, int], why: str) -> None:
    sock = sock_dir / "h.sock"
    with device(sock, crash=False) as proc:
        fd = vu.GuestMemory.allocate(4096).fds()[0]
        with vu.Frontend.connect(sock) as fe:
            fe.negotiate()
            with pytest.raises(vu.RequestRejectedError):
                fe.set_inflight_fd(vu.messages.InflightDesc(*desc_fields), fd)
            # The session goes on.
            assert fe.get_queue_num() == 1


def test_corrupt_inflight_region_refuses_the_ring_not_the_process(sock_dir: Path) -> None:
    sock = sock_dir / "c.sock"
    mem = vu.GuestMemory.allocate(1 << 20)
    with device(sock, crash=False) as proc:
        with vu.Frontend.connect(sock) as fe:
            fe.negotiate(memory=mem)
            buffer = fe.setup_inflight(1, QSIZE)
            assert buffer is not None
            with buffer:
                # Version 1, desc_num 16, last_batch_head out of range, used_idx far behind.
                import mmap

                with mmap.mmap(buffer.fd, buffer.desc.mmap_size) as m:
                    m[8:16] = (1).to_bytes(2, "little") + QSIZE.to_bytes(2, "little") + (999).to_bytes(2, "little") + (0).to_bytes(2, "little")
                ring = vu.DriverQueue(mem, QSIZE)
                # Pretend the device had published 3 completions the record does not know.
                used = ring.guest_addrs[2]
                mem.write(used + 2, (3).to_bytes(2, "little"))
                with pytest.raises(vu.RequestRejectedError):
                    fe.setup_queue(0, QSIZE, ring=ring)
            assert fe.get_queue_num() == 1
        assert proc.poll() is None
