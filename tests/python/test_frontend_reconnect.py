"""Reconnect (QEMU's ``reconnect=``): a back-end killed mid-I/O is replaced by a new process on
the same socket path; the front-end negotiates again, hands over the rings and the inflight
buffer, and the caller sees its request complete — exactly once — or a timeout, never a lost
request. Against our serve-blk, qemu-storage-daemon, and a Python device that dies with
requests taken from the ring (so only the inflight record can bring them back)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

import vhostuser_rs as vu
from vhostuser_rs.blk import SECTOR, BlockClient

from peers import freeze, in_thread, qemu_storage_daemon, serve_blk

CRASHING = Path(__file__).parent / "devices" / "crashing_echo.py"
QSIZE = 16

Peer = Callable[..., AbstractContextManager[subprocess.Popen[bytes]]]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    return img


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def blk_peers() -> list[tuple[str, Peer]]:
    def ours(image: Path, sock: Path) -> AbstractContextManager[subprocess.Popen[bytes]]:
        return serve_blk(image, sock, num_queues=1)

    def qsd(image: Path, sock: Path) -> AbstractContextManager[subprocess.Popen[bytes]]:
        return qemu_storage_daemon(image, sock, num_queues=1)

    return [("serve-blk", ours), ("qemu-storage-daemon", qsd)]


@pytest.mark.parametrize("name, start", blk_peers(), ids=[n for n, _ in blk_peers()])
def test_block_client_request_completes_through_the_new_backend(sock_dir: Path, image: Path, name: str, start: Peer) -> None:
    """The back-end is frozen, a write is submitted, the back-end is killed and a new one starts
    on the same path a little later: the write completes (through the new back-end) and its
    data is on the disk; the client goes on."""
    sock = sock_dir / "blk.sock"
    first_cm = start(image, sock)
    first = first_cm.__enter__()
    try:
        with BlockClient.connect(sock, reconnect=10, timeout=20) as disk:
            disk.write(0, b"before".ljust(SECTOR, b"."))
            freeze(first)
            with in_thread(lambda: disk.write(SECTOR, b"during".ljust(SECTOR, b"."))) as result:
                time.sleep(0.3)
                assert result == []  # waiting: the back-end is frozen
                kill(first)
                time.sleep(0.5)  # nobody listens for a while: the client keeps trying
                sock.unlink(missing_ok=True)
                with start(image, sock):
                    deadline = time.monotonic() + 20
                    while not result and time.monotonic() < deadline:
                        time.sleep(0.05)
                    assert result == [None], result
                    assert disk.frontend.sessions == 2
                    assert disk.read(0, 2 * SECTOR) == b"before".ljust(SECTOR, b".") + b"during".ljust(SECTOR, b".")
                    disk.write(2 * SECTOR, b"after".ljust(SECTOR, b"."))
                    disk.flush()
        assert image.read_bytes()[: 3 * SECTOR] == b"".join(w.ljust(SECTOR, b".") for w in (b"before", b"during", b"after"))
    finally:
        first_cm.__exit__(None, None, None)


def test_block_client_times_out_when_no_backend_comes_back(sock_dir: Path, image: Path) -> None:
    """No back-end within the request's timeout: VhostUserTimeoutError, in time. The request
    is not lost for all that: when a back-end comes back it completes, and the next request
    waits for it (their staging area is shared) instead of overwriting it."""
    sock = sock_dir / "blk.sock"
    with serve_blk(image, sock, num_queues=1) as proc:
        with BlockClient.connect(sock, reconnect=10, timeout=1.5) as disk:
            freeze(proc)
            kill(proc)
            t0 = time.monotonic()
            with pytest.raises(vu.VhostUserTimeoutError):
                disk.write(0, b"x" * SECTOR)
            assert time.monotonic() - t0 < 4
            assert disk.frontend.sessions == 1
            sock.unlink(missing_ok=True)
            with serve_blk(image, sock, num_queues=1):
                assert disk.read(SECTOR, SECTOR) == bytes(SECTOR)
                assert disk.frontend.sessions == 2
                assert disk.read(0, SECTOR) == b"x" * SECTOR  # the timed-out write landed


def test_without_reconnect_a_hangup_is_an_error_not_a_hang(sock_dir: Path, image: Path) -> None:
    sock = sock_dir / "blk.sock"
    with serve_blk(image, sock, num_queues=1) as proc:
        with BlockClient.connect(sock, timeout=30) as disk:
            freeze(proc)
            with in_thread(lambda: disk.write(0, b"x" * SECTOR)) as result:
                time.sleep(0.2)
                kill(proc)
            assert len(result) == 1 and isinstance(result[0], vu.ConnectionClosedError), result


def crashing(sock: Path, *, crash: bool) -> AbstractContextManager[subprocess.Popen[bytes]]:
    from peers import peer

    sock.unlink(missing_ok=True)
    return peer([sys.executable, str(CRASHING), str(sock), *(["--crash"] if crash else [])], sock)


def inflight_flags(buffer: vu.InflightBuffer | None, *heads: int) -> tuple[int, ...]:
    """The `inflight` byte of each head's DescStateSplit in queue 0's region (16-byte header,
    then 16 bytes per descriptor)."""
    assert buffer is not None
    return tuple(os.pread(buffer.fd, 1, 16 + 16 * head)[0] for head in heads)


def test_frontend_reconnects_and_the_inflight_record_resubmits(sock_dir: Path) -> None:
    """The back-end takes two requests from the ring and dies before completing either; a new
    one starts later. Waiting on the ring reconnects, hands the inflight buffer over, and both
    requests complete exactly once."""
    sock = sock_dir / "inflight.sock"
    mem = vu.GuestMemory.allocate(1 << 20)

    def submit(vq: vu.Virtqueue, tag: bytes, command: bytes = b".") -> tuple[int, int]:
        out, back = mem.alloc(16), mem.alloc(16)
        mem.write(out, tag + command)
        return vq.queue.add([(out, len(tag) + 1)], [(back, len(tag))]), back

    def reap(vq: vu.Virtqueue, want: int, timeout: float = 20) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            got += vq.queue.reap()
            if len(got) < want:
                vq.wait(0.1)
        return got

    first_cm = crashing(sock, crash=True)
    first = first_cm.__enter__()
    try:
        with vu.Frontend.connect(sock, reconnect=10) as fe:
            fe.negotiate(memory=mem)
            assert fe.setup_inflight(1, QSIZE) is fe.inflight is not None
            vq = fe.setup_queue(0, QSIZE)
            head_a, back_a = submit(vq, b"request1")
            vq.queue.publish()
            vq.kick()
            assert reap(vq, 1) == [(head_a, 8)]
            head_b, back_b = submit(vq, b"request2", b"X")  # kills the back-end
            head_c, back_c = submit(vq, b"request3")
            vq.queue.publish()
            vq.kick()
            assert first.wait(10) == 3
            # The dead back-end's record (spec: inflight I/O tracking): B and C taken, not done.
            assert inflight_flags(fe.inflight, head_b, head_c) == (1, 1)
            vq.wait(0)  # (consume request1's call if it is still pending)
            assert not vq.wait(0.2)  # the hang-up is seen; nobody to reconnect to yet
            assert fe.sessions == 1
            with crashing(sock, crash=False):
                done = reap(vq, 2)
                assert sorted(done) == sorted([(head_b, 8), (head_c, 8)])
                assert fe.sessions == 2 and vq.queue.in_flight == 0
                # The new back-end got the same buffer (SET_INFLIGHT_FD) and completed them there.
                assert inflight_flags(fe.inflight, head_b, head_c) == (0, 0)
                assert mem.read(back_b, 8) == b"request2" and mem.read(back_c, 8) == b"request3"
                head_d, back_d = submit(vq, b"request4")
                vq.queue.publish()
                vq.kick()
                assert reap(vq, 1) == [(head_d, 8)] and mem.read(back_d, 8) == b"request4"
                assert vq.queue.reap() == []  # nothing completed twice
    finally:
        first_cm.__exit__(None, None, None)


def test_reconnect_survives_backends_that_hang_up_during_negotiation(sock_dir: Path, image: Path) -> None:
    """After the crash, whatever answers on the path first hangs up on each new connection (or
    says nothing); the client keeps trying and the request completes once a real back-end is
    there."""
    sock = sock_dir / "blk.sock"
    first_cm = serve_blk(image, sock, num_queues=1)
    first = first_cm.__enter__()
    try:
        with BlockClient.connect(sock, reconnect=10, timeout=30) as disk:
            freeze(first)
            with in_thread(lambda: disk.write(0, b"late".ljust(SECTOR, b"."))) as result:
                time.sleep(0.2)
                kill(first)
                sock.unlink(missing_ok=True)
                rude = vu.Listener.bind(sock)
                served = 0
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    try:
                        conn = rude.accept(timeout=0.2)
                    except vu.VhostUserTimeoutError:
                        continue
                    served += 1
                    if served % 2:
                        conn.close()  # hang up at once
                    else:
                        conn.recv(timeout=2)  # read GET_FEATURES, answer nothing, hang up
                        conn.close()
                rude.close()
                sock.unlink(missing_ok=True)
                assert served >= 2 and result == []
                with serve_blk(image, sock, num_queues=1):
                    deadline = time.monotonic() + 20
                    while not result and time.monotonic() < deadline:
                        time.sleep(0.05)
                    assert result == [None], result
                    assert disk.read(0, SECTOR) == b"late".ljust(SECTOR, b".")
    finally:
        first_cm.__exit__(None, None, None)
