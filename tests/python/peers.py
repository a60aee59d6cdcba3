"""Real peers for the interop tests, started and stopped by the tests themselves."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

QSD = shutil.which("qemu-storage-daemon")
VIRTIOFSD = next((p for p in ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd") if os.access(p, os.X_OK)), None)


def need(binary: str | None, name: str) -> str:
    """The binary, or skip with a clear reason (CI installs every peer, so CI never skips)."""
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI but not installed")
        pytest.skip(f"{name} is not installed (apt-get install qemu-system-common)")
    return binary


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"peer exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.01)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def freeze(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGSTOP `proc` and wait until every one of its threads has stopped. The signal only
    starts a group stop: one thread takes it and then stops the others, and until each has
    been scheduled again it runs on — on a loaded machine for milliseconds, long enough for a
    back-end's ring thread to serve the request a test submits right after kill() returned."""
    proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            try:
                with open(f"/proc/{proc.pid}/task/{tid}/comm") as f:
                    if f.read().startswith(("iou-wrk", "iou-sqp")):
                        continue  # io_uring's kernel workers do not take part in job control
                with open(f"/proc/{proc.pid}/task/{tid}/stat") as f:
                    # The state follows the command name, which is in parentheses.
                    states.append(f.read().rpartition(")")[2].split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass  # a thread that just exited
        if states and all(s in ("T", "t") for s in states):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"peer exited with {proc.returncode} instead of stopping")
        if time.monotonic() > deadline:
            raise TimeoutError(f"peer {proc.pid} did not stop: thread states {states}")
        time.sleep(0.001)


@contextmanager
def peer(args: list[str], sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Runs `args` until its socket `sock` appears; stops it (SIGTERM, then SIGKILL) at exit."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, proc)
        yield proc
    finally:
        stop(proc)


@contextmanager
def qemu_storage_daemon(image: Path, sock: Path, *, num_queues: int = 2, writable: bool = True) -> Iterator[subprocess.Popen[bytes]]:
    """qemu-storage-daemon exporting `image` as vhost-user-blk on `sock`."""
    binary = need(QSD, "qemu-storage-daemon")
    with peer(
        [
            binary,
            "--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},"
            f"writable={'on' if writable else 'off'},num-queues={num_queues}",
        ],
        sock,
    ) as proc:
        yield proc


@contextmanager
def virtiofsd(shared: Path, sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    """QEMU's C virtiofsd sharing `shared` on `sock` (it exits after one front-end)."""
    binary = need(VIRTIOFSD, "virtiofsd")
    args = [binary, f"--socket-path={sock}", "-o", f"source={shared}", "-o", "cache=none", "-o", "sandbox=chroot"]
    with peer(args, sock) as proc:
        yield proc


@contextmanager
def serve_blk(image: Path, sock: Path, *, num_queues: int = 2, readonly: bool = False,
              io_engine: str = "auto", direct: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """Our own built-in back-end (`vhostuser-rs serve-blk`) in a separate process."""
    import sys

    args = [sys.executable, "-m", "vhostuser_rs", "serve-blk", str(image), "--socket-path", str(sock), "--num-queues",
            str(num_queues), "--io-engine", io_engine]
    if readonly:
        args.append("--read-only")
    if direct:
        args.append("--direct")
    with peer(args, sock) as proc:
        yield proc


@contextmanager
def in_thread(fn: Callable[[], object]) -> Iterator[list[object]]:
    """Runs `fn` on a thread; the list gets its result or exception once the block ends.
    (Start peer processes from the main thread: one started with PR_SET_PDEATHSIG from a
    thread is killed when that thread ends.)"""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    try:
        yield out
    finally:
        t.join(60)
        assert not t.is_alive()
