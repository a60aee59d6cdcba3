"""The native request path of BlockClient (one call per request; the batch submit/reap API)
against qemu-storage-daemon and `vhostuser-rs serve-blk`, data checked end to end; and, with
the daemon stopped (SIGSTOP) so the test plays the device on the shared rings, completions out
of order, cancellation, hostile used entries and a back-end dying with requests in flight."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vhostuser_rs as vu
from peers import freeze, qemu_storage_daemon, serve_blk
from vhostuser_rs.blk import BlockClient, BlockError, RequestType

MIB = 1 << 20
IMAGE_SIZE = 8 * MIB


@pytest.fixture
def image(sock_dir: Path) -> Path:
    path = sock_dir / "disk.img"
    path.write_bytes(random.Random(7).randbytes(IMAGE_SIZE))
    return path


@pytest.fixture(params=["qemu-storage-daemon", "serve-blk"])
def blk_backend(request: pytest.FixtureRequest, image: Path, sock_dir: Path) -> Iterator[Path]:
    sock = sock_dir / "blk.sock"
    if request.param == "qemu-storage-daemon":
        with qemu_storage_daemon(image, sock, num_queues=1):
            yield sock
    else:
        with serve_blk(image, sock, num_queues=1, io_engine="uring"):
            yield sock


def test_one_call_requests_end_to_end(blk_backend: Path, image: Path) -> None:
    """read / readinto / write / flush / discard / write_zeroes / get_id on the native path,
    with requests longer than a staging slot split (and all in flight at once)."""
    original = image.read_bytes()
    shadow = bytearray(original)
    rng = random.Random(1)
    with BlockClient.connect(blk_backend, queue_size=32, slot_size=8192) as disk:
        assert disk.slot_size == 8192
        for _ in range(100):
            off = rng.randrange(IMAGE_SIZE // 512 - 200) * 512
            n = rng.choice([512, 4096, 8192, 12288, 65536])
            data = rng.randbytes(n)
            disk.write(off, data if rng.random() < 0.5 else bytearray(data))
            shadow[off : off + n] = data
            assert disk.read(off, n) == data
            buf = bytearray(n + 1024)
            assert disk.readinto(off, memoryview(buf)[512 : 512 + n]) == n
            assert buf[512 : 512 + n] == data and buf[:512] == bytes(512)
        # Whole image back through the native path, in 64 KiB reads.
        for off in range(0, IMAGE_SIZE, 65536):
            assert disk.read(off, 65536) == shadow[off : off + 65536], off
        disk.flush()
        disk.write_zeroes(MIB, 8192)
        shadow[MIB : MIB + 8192] = bytes(8192)
        assert disk.read(MIB, 8192) == bytes(8192)
        disk.discard(2 * MIB, 4096)
        assert disk.get_id() in (b"vhost_user_blk", b"vhostuser_rs-blk")
        assert disk.read(0, 0) == b"" and disk.readinto(0, bytearray()) == 0
        with pytest.raises(ValueError):
            disk.read(1, 512)
        with pytest.raises(BufferError):
            disk.readinto(0, b"x" * 512)
    on_disk = image.read_bytes()
    assert on_disk[: 2 * MIB] == shadow[: 2 * MIB]
    assert on_disk[2 * MIB + 4096 :] == shadow[2 * MIB + 4096 :]


def test_batch_submit_reap_with_a_full_ring(blk_backend: Path, image: Path) -> None:
    """More requests than the ring holds: submit returns a prefix, reap makes room; every read
    returns the image's bytes and every write lands, whatever order they complete in."""
    data = bytearray(image.read_bytes())
    rng = random.Random(2)
    with BlockClient.connect(blk_backend, queue_size=16) as disk:
        pending: list[tuple[object, ...]] = []
        for i in range(400):
            off = rng.randrange(IMAGE_SIZE // 4096) * 4096
            if i % 4 == 3:
                payload = rng.randbytes(4096)
                pending.append((RequestType.OUT, off, payload))
            else:
                pending.append((RequestType.IN, off, 4096))
        # Writes go to a region of their own so reads of the original bytes stay predictable.
        pending = [(t, (4 * MIB + o % (2 * MIB)) if t == RequestType.OUT else o % (4 * MIB), a) for t, o, a in pending]
        issued: dict[int, tuple[object, ...]] = {}
        short = 0
        done = 0
        while pending or issued:
            tokens = disk.submit(pending)
            assert len(tokens) <= 5  # 16 descriptors, 3 per request
            if len(tokens) < len(pending):
                short += 1
            for t, req in zip(tokens, pending):
                issued[t] = req
            pending = pending[len(tokens) :]
            for token, status, got in disk.reap(64, timeout=5.0):
                rtype, off, arg = issued.pop(token)
                assert status == 0
                if rtype == RequestType.IN:
                    assert got == bytes(data[off : off + 4096])
                else:
                    assert got is None
                    data[off : off + 4096] = arg  # type: ignore[assignment]
                done += 1
        assert short > 0 and done == 400 and disk.in_flight() == 0
        assert disk.reap(timeout=0) == []
        for off in range(4 * MIB, 6 * MIB, 65536):
            assert disk.read(off, 65536) == bytes(data[off : off + 65536])


@pytest.mark.parametrize(
    "bad",
    [
        (RequestType.IN, 100, 4096),  # offset not a multiple of 512
        (RequestType.IN, -512, 4096),  # negative offset
        (RequestType.IN, 0, 1000),  # length not a multiple of 512
        (RequestType.DISCARD, 0, -512),  # negative length
        (99, 0, 512),  # not a request type
        (RequestType.IN,),  # too short
    ],
)
def test_a_bad_request_in_a_batch_submits_nothing(blk_backend: Path, bad: tuple[object, ...]) -> None:
    """The whole batch is checked before anything reaches the ring: a ValueError, nothing in
    flight, and the client goes on."""
    with BlockClient.connect(blk_backend) as disk:
        with pytest.raises(ValueError):
            disk.submit([(RequestType.IN, 0, 4096), bad])
        assert disk.in_flight() == 0
        # Lists work as well as tuples, and the FLUSH/GET_ID forms need no length.
        tokens = disk.submit([[RequestType.IN, 512, 512], (RequestType.FLUSH, 0)])  # type: ignore[list-item]
        got = disk.reap(8, timeout=5.0)
        while len(got) < 2:
            got += disk.reap(8, timeout=5.0)
        got.sort()
        assert [t for t, _, _ in got] == sorted(tokens) and all(status == 0 for _, status, _ in got)


def test_sync_requests_from_several_threads(blk_backend: Path, image: Path) -> None:
    data = image.read_bytes()
    errors: list[BaseException] = []
    with BlockClient.connect(blk_backend, queue_size=64) as disk:

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(300):
                    off = rng.randrange(IMAGE_SIZE // 4096) * 4096
                    assert disk.read(off, 4096) == data[off : off + 4096]
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors, errors


def test_error_status_raises_block_error(sock_dir: Path, image: Path) -> None:
    """A read-only export answers writes with IOERR: BlockError on the one-call path, the
    status in the completion on the batch path."""
    sock = sock_dir / "ro.sock"
    with qemu_storage_daemon(image, sock, num_queues=1, writable=False):
        with BlockClient.connect(sock) as disk:
            with pytest.raises(BlockError) as e:
                disk.write(0, bytes(512))
            assert e.value.status != 0
            [token] = disk.submit([(RequestType.OUT, 0, bytes(512))])
            [(got, status, data)] = disk.reap(timeout=5)
            assert got == token and status != 0 and data is None
            assert disk.read(0, 512) == image.read_bytes()[:512]


# -- the test plays the device ------------------------------------------------------------------
class Device:
    """The rings of a client whose back-end is stopped: the test reads the avail ring and the
    chains and writes used entries itself."""

    def __init__(self, disk: BlockClient) -> None:
        self.disk = disk
        dq = disk.queues[0].queue
        self.desc, self.avail, self.used = dq.guest_addrs
        self.size = dq.size
        self.seen = 0
        self.used_idx = 0

    @property
    def mem(self) -> vu.GuestMemory:
        # Through the client, so that closing it lets the memory go.
        return self.disk.memory

    def take(self) -> list[int]:
        """Heads made available since the last call."""
        idx = struct.unpack("<H", self.mem.read(self.avail + 2, 2))[0]
        heads = []
        while self.seen != idx:
            slot = self.seen % self.size
            heads.append(struct.unpack("<H", self.mem.read(self.avail + 4 + 2 * slot, 2))[0])
            self.seen = (self.seen + 1) & 0xFFFF
        return heads

    def chain(self, head: int) -> list[tuple[int, int, int]]:
        out = []
        d = head
        while True:
            addr, length, flags, nxt = struct.unpack("<QIHH", self.mem.read(self.desc + 16 * d, 16))
            out.append((addr, length, flags))
            if not flags & 1:
                return out
            d = nxt

    def complete(self, head: int, *, data: bytes = b"", status: int = 0, length: int | None = None) -> None:
        chain = self.chain(head)
        if data:
            self.mem.write(chain[1][0], data)
        if chain[-1][1] == 1:
            self.mem.write(chain[-1][0], bytes([status]))
        self.publish(head, len(data) + 1 if length is None else length)

    def publish(self, id_: int, length: int) -> None:
        slot = self.used_idx % self.size
        self.mem.write(self.used + 4 + 8 * slot, struct.pack("<II", id_, length))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.mem.write(self.used + 2, struct.pack("<H", self.used_idx))
        os.eventfd_write(self.disk.queues[0].call_fd, 1)  # the device's call


@pytest.fixture
def stopped(image: Path, sock_dir: Path) -> Iterator[tuple[BlockClient, Device, subprocess.Popen[bytes]]]:
    sock = sock_dir / "qsd.sock"
    with qemu_storage_daemon(image, sock, num_queues=1) as proc:
        with BlockClient.connect(sock, queue_size=16, timeout=5.0, poll=0.0) as disk:
            disk.read(0, 512)  # the daemon is up and has the ring
            freeze(proc)
            try:
                dev = Device(disk)
                dev.seen = dev.used_idx = 1
                yield disk, dev, proc
            finally:
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()


def test_out_of_order_completions(stopped: tuple[BlockClient, Device, subprocess.Popen[bytes]]) -> None:
    disk, dev, _ = stopped
    tokens = disk.submit([(RequestType.IN, 512 * i, 512) for i in range(5)])
    heads = dev.take()
    assert len(tokens) == len(heads) == 5
    for i in reversed(range(5)):
        dev.complete(heads[i], data=bytes([i]) * 512)
    got = disk.reap(64, timeout=5)
    assert [t for t, _, _ in got] == list(reversed(tokens))
    assert {t: d for t, _, d in got} == {tokens[i]: bytes([i]) * 512 for i in range(5)}
    # One completion collected by token, ahead of an older one.
    t1, t2 = disk.submit([(RequestType.IN, 0, 512), (RequestType.IN, 512, 512)])
    h1, h2 = dev.take()
    dev.complete(h2, data=b"b" * 512)
    assert disk.collect(t1) is None
    disk.reap(0, timeout=5)  # reaps the used ring, collects nothing
    assert disk.collect(t2) == (0, b"b" * 512)
    dev.complete(h1, data=b"a" * 512, status=1)
    assert disk.reap(timeout=5) == [(t1, 1, b"a" * 512)]


def test_cancelled_request_keeps_its_slot_until_the_device_completes_it(
    stopped: tuple[BlockClient, Device, subprocess.Popen[bytes]],
) -> None:
    disk, dev, _ = stopped
    [victim] = disk.submit([(RequestType.IN, 0, 4096)])
    [vhead] = dev.take()
    victim_buf = dev.chain(vhead)[1][0]
    disk.cancel(victim)
    assert disk.in_flight() == 1
    # Fill the ring: no new request may get the cancelled one's buffer.
    tokens = disk.submit([(RequestType.IN, 4096 * i, 4096) for i in range(10)])
    heads = dev.take()
    assert len(tokens) == 4  # 5 chains fit, one is still the cancelled request's
    assert victim_buf not in {dev.chain(h)[1][0] for h in heads}
    dev.complete(vhead, data=b"v" * 4096)
    for h in heads:
        dev.complete(h, data=b"n" * 4096)
    got = disk.reap(64, timeout=5)
    assert sorted(t for t, _, _ in got) == sorted(tokens)  # nothing for the cancelled token
    assert disk.in_flight() == 0
    with pytest.raises(ValueError):
        disk.collect(victim)
    # Its slot is free again: a ring's worth of requests fits.
    assert len(disk.submit([(RequestType.FLUSH, 0, 0)] * 8)) == 8


def test_timed_out_request_is_reclaimed_late(stopped: tuple[BlockClient, Device, subprocess.Popen[bytes]]) -> None:
    disk, dev, _ = stopped
    disk.timeout = 0.3
    with pytest.raises(vu.VhostUserTimeoutError):
        disk.read(0, 512)
    [head] = dev.take()
    assert disk.in_flight() == 1
    dev.complete(head, data=b"x" * 512)
    assert disk.reap(timeout=0.5) == []  # cancelled by the timeout: not reported
    assert disk.in_flight() == 0


@pytest.mark.parametrize("hostile", ["id never submitted", "length beyond the buffer"])
def test_hostile_used_entries(stopped: tuple[BlockClient, Device, subprocess.Popen[bytes]], hostile: str) -> None:
    disk, dev, _ = stopped
    [token] = disk.submit([(RequestType.IN, 0, 512)])
    [head] = dev.take()
    if hostile == "id never submitted":
        dev.publish((head + 7) % dev.size, 1)
    else:
        dev.publish(head, 4096)
    with pytest.raises(vu.VirtqueueError):
        disk.reap(timeout=5)
    # The ring is broken for good: every later request says so instead of hanging.
    with pytest.raises(vu.VirtqueueError):
        disk.read(0, 512)
    with pytest.raises(vu.VirtqueueError):
        disk.submit([(RequestType.IN, 0, 512)])


def test_backend_dying_with_requests_in_flight(
    stopped: tuple[BlockClient, Device, subprocess.Popen[bytes]],
) -> None:
    disk, dev, proc = stopped
    disk.timeout = 30.0
    disk.submit([(RequestType.IN, 0, 512)] * 2)
    outcomes: list[BaseException | None] = []

    def sync_read() -> None:
        try:
            disk.read(4096, 512)
            outcomes.append(None)
        except BaseException as e:  # noqa: BLE001
            outcomes.append(e)

    def reaper() -> None:
        try:
            disk.reap(timeout=None)
            outcomes.append(None)
        except BaseException as e:  # noqa: BLE001
            outcomes.append(e)

    threads = [threading.Thread(target=sync_read), threading.Thread(target=sync_read), threading.Thread(target=reaper)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    start = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    assert time.monotonic() - start < 3
    assert len(outcomes) == 3 and all(isinstance(o, vu.ConnectionClosedError) for o in outcomes), outcomes


def test_close_wakes_waiters(stopped: tuple[BlockClient, Device, subprocess.Popen[bytes]]) -> None:
    disk, _, _ = stopped
    disk.timeout = 30.0
    outcome: list[BaseException] = []

    def sync_read() -> None:
        try:
            disk.read(0, 512)
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)

    t = threading.Thread(target=sync_read)
    t.start()
    time.sleep(0.2)
    disk.close()
    t.join(5)
    assert not t.is_alive() and isinstance(outcome[0], vu.ConnectionClosedError)


def test_python_path_keeps_the_same_api(sock_dir: Path, image: Path) -> None:
    """native=False (as iommu= and reconnect= do) takes the Python request path: the same
    results for read / readinto / write, and no batch API."""
    sock = sock_dir / "qsd.sock"
    with qemu_storage_daemon(image, sock, num_queues=1):
        with BlockClient.connect(sock, native=False) as disk:
            data = random.Random(5).randbytes(8192)
            disk.write(MIB, memoryview(data))
            assert disk.read(MIB, 8192) == data
            buf = bytearray(8192)
            assert disk.readinto(MIB, buf) == 8192 and buf == data
            with pytest.raises(vu.NegotiationError):
                disk.submit([(RequestType.IN, 0, 512)])
