"""The front-end against real back-ends: qemu-storage-daemon (Debian's qemu-system-common) and,
with the same block tests unchanged, our own `vhostuser-rs serve-blk` in another process."""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import vhostuser_rs as vu
from peers import qemu_storage_daemon, serve_blk
from vhostuser_rs.blk import BlockClient, BlockConfig, BlockFeature

MIB = 1 << 20
IMAGE_SIZE = 16 * MIB

QSD_FEATURES = 0x175007E46
QSD_PROTOCOL_FEATURES = 0x8F2B


@pytest.fixture
def image(sock_dir: Path) -> Path:
    path = sock_dir / "disk.img"
    # A recognisable pattern: every 512-byte sector starts with its number.
    with open(path, "wb") as f:
        for sector in range(IMAGE_SIZE // 512):
            f.write(struct.pack("<Q", sector) + bytes(504))
    return path


@pytest.fixture
def qsd(image: Path, sock_dir: Path) -> Iterator[Path]:
    """qemu-storage-daemon only (for what is specific to it)."""
    sock = sock_dir / "qsd.sock"
    with qemu_storage_daemon(image, sock, num_queues=2):
        yield sock


@pytest.fixture(params=["qemu-storage-daemon", "serve-blk", "serve-blk --io-engine sync",
                        "serve-blk --direct"])
def blk_backend(request: pytest.FixtureRequest, image: Path, sock_dir: Path) -> Iterator[Path]:
    """Each vhost-user-blk back-end the block tests run against, unchanged: serve-blk with
    io_uring (insisted on: a silent fallback would test the other engine twice), with
    preadv/pwritev, and with O_DIRECT (transfers whose buffers it refuses take the buffered fd)."""
    sock = sock_dir / "blk.sock"
    if request.param == "qemu-storage-daemon":
        with qemu_storage_daemon(image, sock, num_queues=2):
            yield sock
        return
    engine = "sync" if "sync" in request.param else "uring"
    with serve_blk(image, sock, num_queues=2, io_engine=engine, direct="--direct" in request.param):
        yield sock


def sector_bytes(n: int) -> bytes:
    return struct.pack("<Q", n) + bytes(504)


def test_what_the_daemon_offers(qsd: Path) -> None:
    with vu.Frontend.connect(qsd) as fe:
        features = fe.get_features()
        assert int(features) == QSD_FEATURES
        assert vu.VirtioFeature.VERSION_1 in features and vu.VirtioFeature.PROTOCOL_FEATURES in features
        proto = fe.get_protocol_features()
        assert int(proto) == QSD_PROTOCOL_FEATURES
        fe.set_protocol_features(proto & (vu.ProtocolFeature.MQ | vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.CONFIG | vu.ProtocolFeature.CONFIGURE_MEM_SLOTS))
        assert fe.get_queue_num() == 2
        assert fe.get_max_mem_slots() >= 8
        cfg = BlockConfig.parse(fe.get_config(0, 60))
        assert cfg.capacity == IMAGE_SIZE // 512 and cfg.num_queues == 2 and cfg.blk_size == 512
        # STATUS was not offered: refused before anything is sent.
        with pytest.raises(vu.FeatureNotNegotiatedError) as info:
            fe.get_status()
        assert info.value.request is vu.FrontendRequest.GET_STATUS
        # REPLY_ACK: requests are acknowledged.
        fe.set_owner()


def test_probe_cli(qsd: Path) -> None:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "vhostuser_rs", "probe", str(qsd), "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["features"] == QSD_FEATURES and doc["protocol_features"] == QSD_PROTOCOL_FEATURES
    assert "REPLY_ACK" in doc["protocol_feature_names"] and "VERSION_1" in doc["feature_names"]
    assert doc["queues"] == 2 and doc["block"]["capacity"] == IMAGE_SIZE // 512
    text = subprocess.run([sys.executable, "-m", "vhostuser_rs", "probe", str(qsd)], capture_output=True, text=True, timeout=60)
    assert "CONFIGURE_MEM_SLOTS" in text.stdout and "capacity" in text.stdout


@pytest.mark.parametrize("num_queues", [1, 2])
@pytest.mark.parametrize(("indirect", "event_idx"), [(False, False), (True, True), (False, True)])
def test_block_io(blk_backend: Path, image: Path, num_queues: int, indirect: bool, event_idx: bool) -> None:
    with BlockClient.connect(blk_backend, num_queues=num_queues, indirect=indirect, event_idx=event_idx) as disk:
        assert disk.capacity == IMAGE_SIZE
        assert (vu.VirtioFeature.EVENT_IDX in disk.features) == event_idx
        for q in range(num_queues):
            assert disk.read(512 * 100, 1024, queue=q) == sector_bytes(100) + sector_bytes(101)
        payload = os.urandom(8192)
        disk.write(MIB, payload, queue=num_queues - 1)
        disk.flush()
        assert disk.read(MIB, 8192) == payload
        disk.write_zeroes(2 * MIB, 4096)
        assert disk.read(2 * MIB, 4096) == bytes(4096)
        disk.discard(3 * MIB, 4096)
        assert disk.get_id() in (b"vhost_user_blk", b"vhostuser_rs-blk")
    with open(image, "rb") as f:
        f.seek(MIB)
        assert f.read(8192) == payload
        f.seek(2 * MIB)
        assert f.read(4096) == bytes(4096)


def test_stop_and_restart_a_queue(blk_backend: Path) -> None:
    with BlockClient.connect(blk_backend, num_queues=1, queue_size=16) as disk:
        for i in range(20):  # wrap the 16-entry ring
            assert disk.read(512 * i, 512) == sector_bytes(i)
        fe = disk.frontend
        base = fe.stop_queue(0)
        assert base == 20
        disk.queues[0] = fe.setup_queue(0, 16, disk.memory, base=base)
        for i in range(20, 40):
            assert disk.read(512 * i, 512) == sector_bytes(i)


def test_reconnect_to_the_same_daemon(blk_backend: Path) -> None:
    for _ in range(3):
        with BlockClient.connect(blk_backend) as disk:
            assert disk.read(0, 512) == sector_bytes(0)


def test_daemon_killed_mid_io_is_a_clean_error(image: Path, sock_dir: Path) -> None:
    sock = sock_dir / "dying.sock"
    with qemu_storage_daemon(image, sock) as proc:
        disk = BlockClient.connect(sock, timeout=5)
        try:
            assert disk.read(0, 512) == sector_bytes(0)
            proc.kill()
            proc.wait()
            with pytest.raises((vu.ConnectionClosedError, vu.VhostUserTimeoutError)):
                for _ in range(100):
                    disk.read(0, 512)
            with pytest.raises(vu.ConnectionClosedError):
                disk.frontend.get_features()
        finally:
            disk.close()


def test_dirty_log_marks_pages_the_daemon_writes(blk_backend: Path) -> None:
    with BlockClient.connect(blk_backend, num_queues=1) as disk:
        fe = disk.frontend
        assert vu.ProtocolFeature.LOG_SHMFD in fe.protocol_features
        log = fe.enable_logging()
        assert vu.VirtioFeature.LOG_ALL in fe.features
        log.take_dirty()
        disk.read(0, 4096)  # the daemon writes the data into guest memory
        dirty = set(log.take_dirty())
        data_page = (disk._scratch + 16) // 4096
        assert data_page in dirty
        used_page = disk.queues[0].queue.guest_addrs[2] // 4096
        assert used_page in dirty, "used ring writes are logged too (VHOST_VRING_F_LOG)"


def test_requests_while_the_backend_channel_runs(blk_backend: Path) -> None:
    class Handler(vu.BackendRequestHandler):
        pass

    with vu.Frontend.connect(blk_backend) as fe:
        mem = vu.GuestMemory.allocate(4 * MIB)
        result = fe.negotiate(memory=mem, handler=Handler())
        assert vu.ProtocolFeature.BACKEND_REQ in result.protocol_features
        assert fe.backend_channel_running
        vq = fe.setup_queue(0, 8, mem)
        hdr, data, status = mem.alloc(16), mem.alloc(512), mem.alloc(1)
        mem.write(hdr, struct.pack("<IIQ", 0, 0, 7))
        vq.queue.add([(hdr, 16)], [(data, 512), (status, 1)])
        vq.queue.publish()
        vq.kick()
        used: list[tuple[int, int]] = []
        for _ in range(50):  # the first call may be spurious (libvhost-user signals on SET_VRING_CALL)
            used += vq.queue.reap()
            if used:
                break
            vq.wait(0.1)
        assert len(used) == 1
        assert mem.read(data, 8) == struct.pack("<Q", 7)
    assert not fe.backend_channel_running


def test_concurrent_clients_on_two_threads(image: Path, sock_dir: Path) -> None:
    # qemu-storage-daemon serves one front-end at a time; two daemons on one image, one each.
    errors: list[BaseException] = []

    def worker(sock: Path, first: int) -> None:
        try:
            with BlockClient.connect(sock) as disk:
                for i in range(first, first + 50):
                    assert disk.read(512 * i, 512) == sector_bytes(i)
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    with qemu_storage_daemon(image, sock_dir / "a.sock", writable=False), qemu_storage_daemon(image, sock_dir / "b.sock", writable=False):
        threads = [threading.Thread(target=worker, args=(sock_dir / n, k * 100)) for k, n in enumerate(["a.sock", "b.sock"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors, errors


def test_bench_cli_against_the_daemon(blk_backend: Path) -> None:
    import json
    import subprocess
    import sys

    for args in (["--rw", "randread", "--iodepth", "8"], ["--rw", "randwrite", "--iodepth", "4", "--verify", "--queues", "2"]):
        out = subprocess.run(
            [sys.executable, "-m", "vhostuser_rs", "bench", "--socket", str(blk_backend), "--time", "0.5", "--json", *args],
            capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["ios"] > 100 and doc["errors"] == 0 and doc["verify_failures"] == 0
        assert doc["p50_us"] > 0 and doc["p99_us"] >= doc["p50_us"]


def test_bench_verify_catches_wrong_data(blk_backend: Path, image: Path) -> None:
    """The --verify read check is real: reads of a device whose stamps were not written fail."""
    with BlockClient.connect(blk_backend) as disk:
        disk.write(0, b"\xff" * 4096)  # corrupt the first block's stamps
        report = disk.run_io(rw="read", bs=4096, iodepth=1, duration=0.2, verify=True)
        assert report["verify_failures"] > 0


@pytest.mark.parametrize("poll", [0.0, 50e-6])
def test_batch_io_on_two_queues_writes_then_verifies(blk_backend: Path, image: Path, poll: float) -> None:
    """BlockClient.run_io: the Rust I/O loop, stamped writes then checked reads, both rings,
    with and without hybrid polling; the stamps land in the image file."""
    with BlockClient.connect(blk_backend, num_queues=2) as disk:
        disk.write(0, b"\xff" * 4096 * 4)  # wipe the image's own stamps of the first blocks
        w = disk.run_io(rw="write", bs=4096, iodepth=8, duration=0.3, queue=1, verify=True, poll=poll)
        assert w["ios"] > 10 and w["errors"] == 0 and w["bytes"] == w["ios"] * 4096
        r = disk.run_io(rw="read", bs=4096, iodepth=2, duration=0.3, queue=0, verify=True, poll=poll)
        assert r["ios"] > 10 and r["errors"] == 0
        # The image is stamped the same way to begin with, so only the wiped blocks tell whether
        # the writes landed: they are checked in the file below.
        assert r["verify_failures"] == 0
        disk.flush()
    with open(image, "rb") as f:
        data = f.read(4096 * 4)
    assert all(data[k * 512 : k * 512 + 8] == k.to_bytes(8, "little") for k in range(32))
