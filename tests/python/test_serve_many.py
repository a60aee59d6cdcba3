"""Many devices in one process: `serve-blk --export IMAGE,SOCKET` repeated serves each image on its
own socket, and the rings of every device run on `--workers` shared threads, however many
devices there are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from vhostuser_rs.blk import BlockClient

DEVICES = 4
WORKERS = 2
MIB = 1 << 20


def worker_threads(pid: int) -> list[str]:
    names = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(Path(f"/proc/{pid}/task/{task}/comm").read_text().strip())
        except FileNotFoundError:
            pass
    return [n for n in names if n.startswith("vhost-user work") or n.startswith("vhost-user ring")]


def test_many_devices_share_the_worker_threads(tmp_path: Path) -> None:
    images = [tmp_path / f"disk{k}.img" for k in range(DEVICES)]
    for k, image in enumerate(images):
        image.write_bytes(bytes([k]) * (4 * MIB))
    socks = [tmp_path / f"s{k}.sock" for k in range(DEVICES)]
    args = [sys.executable, "-m", "vhostuser_rs", "serve-blk", "--workers", str(WORKERS), "--num-queues", "2"]
    for image, sock in zip(images, socks):
        args += ["--export", f"{image},{sock}"]
    args += ["--export", f"{tmp_path / 'ro.img'},{tmp_path / 'ro.sock'},ro"]
    (tmp_path / "ro.img").write_bytes(b"r" * MIB)
    proc = subprocess.Popen(args, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not all(s.exists() for s in socks) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        disks = [BlockClient.connect(s, num_queues=2, timeout=10) for s in socks]
        try:
            errors: list[BaseException] = []

            def io(k: int, disk: BlockClient) -> None:
                try:
                    for i in range(100):
                        block = bytes([k * 16 + i % 16]) * 4096
                        q = i % 2
                        disk.write(i * 4096, block, queue=q)
                        assert disk.read(i * 4096, 4096, queue=1 - q) == block
                    # What the other devices wrote is not here.
                    assert disk.read(2 * MIB, 4096) == bytes([k]) * 4096
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            threads = [threading.Thread(target=io, args=(k, d)) for k, d in enumerate(disks)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, errors
            # 4 devices x 2 rings, all running: still WORKERS worker threads.
            assert len(worker_threads(proc.pid)) == WORKERS, worker_threads(proc.pid)
            with BlockClient.connect(tmp_path / "ro.sock", timeout=10) as ro:
                assert ro.read(0, 512) == b"r" * 512
        finally:
            for d in disks:
                d.close()
        for k, image in enumerate(images):
            data = image.read_bytes()
            assert data[:4096] == bytes([k * 16]) * 4096 and data[2 * MIB:2 * MIB + 4096] == bytes([k]) * 4096
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()


def test_a_bad_export_is_an_error_at_start(tmp_path: Path) -> None:
    good = tmp_path / "good.img"
    good.write_bytes(bytes(MIB))
    r = subprocess.run(
        [sys.executable, "-m", "vhostuser_rs", "serve-blk", "--export", f"{good},{tmp_path / 'a.sock'}",
         "--export", f"{tmp_path / 'missing.img'},{tmp_path / 'b.sock'}"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 1 and "missing.img" in r.stderr
    assert not (tmp_path / "b.sock").exists()
    r = subprocess.run([sys.executable, "-m", "vhostuser_rs", "serve-blk", "--export", "just-one-part"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "IMAGE,SOCKET" in r.stderr
