"""Backend.serve_async: the back-end driven by the asyncio loop (listening socket and session
socket watched with loop.add_reader, each readable event one native step with the GIL
released), no serving thread. Driven by our blocking front-end from threads: Python devices
doing I/O, their hooks, two sessions in sequence, a ring stopped while the device's worker is
busy in Python (the step must not hold the GIL), a hostile front-end, stop(), from_fd mode and
cancellation (the session ends, rings stop, serving stops)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest

import vhostuser_rs as vu
from test_backend_python_device import Echo, MemBlock, _echo
from vhostuser_rs import FrontendRequest as F
from vhostuser_rs import hazmat
from vhostuser_rs.blk import BlockClient


class Ticker:
    """Counts loop turns every millisecond: a blocked loop stops the count."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.001)
            self.ticks += 1

    def __enter__(self) -> Ticker:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def serving_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if "backend" in t.name or "asyncio" in t.name]


def test_two_sessions_in_sequence_with_a_python_device(sock_dir: Path) -> None:
    sock = sock_dir / "aio.sock"
    device = MemBlock()

    def first() -> bytes:
        with BlockClient.connect(sock, num_queues=2, timeout=10) as disk:
            disk.write(4096, b"a" * 8192)
            disk.write(0, b"q" * 512, queue=1)
            disk.flush()
            return disk.read(4096, 8192) + disk.read(0, 512, queue=1)

    def second() -> bytes:
        with BlockClient.connect(sock, timeout=10) as disk:
            return disk.read(0, 512) + disk.read(4096, 8192) + disk.get_id()

    async def main() -> None:
        with vu.Backend.listen(sock, device) as backend, Ticker() as ticker:
            task = asyncio.create_task(backend.serve_async(max_connections=2))
            assert await asyncio.to_thread(first) == b"a" * 8192 + b"q" * 512
            # No thread serves the socket: the loop does (to_thread's worker is the client's).
            assert not [n for n in serving_threads() if "backend" in n]
            assert await asyncio.to_thread(second) == b"q" * 512 + b"a" * 8192 + b"pydevice"
            await asyncio.wait_for(task, 10)  # ends by itself after two sessions
            assert ticker.ticks > 0  # other tasks ran on the loop meanwhile
            assert device.batches > 0

    asyncio.run(main())


def test_hooks_and_a_ring_stopped_while_python_processes_it(sock_dir: Path) -> None:
    """GET_VRING_BASE is handled in a loop step that waits for the ring's worker; the worker
    runs the Python device under the GIL: the step releases it, so this cannot deadlock."""
    sock = sock_dir / "echo.sock"
    slow = threading.Event()

    class SlowEcho(Echo):
        def process_request(self, queue_index: int, chain: vu.DescriptorChain) -> int | None:
            # Only ring 0's requests show its worker in Python: the echo on ring 1 below comes
            # first, and counting it let GET_VRING_BASE overtake ring 0's kick under load (base 0).
            if queue_index == 0:
                slow.set()
            time.sleep(0.002)  # busy in Python (the GIL held between sleeps)
            return super().process_request(queue_index, chain)

    device = SlowEcho()

    def client() -> list[tuple[str, int]]:
        mem = vu.GuestMemory.allocate(1 << 20)
        with vu.Frontend.connect(sock, timeout=10) as fe:
            fe.negotiate(memory=mem)
            vq0 = fe.setup_queue(0, 64)
            vq1 = fe.setup_queue(1, 16)
            assert _echo(mem, vq1, b"abc") == (3, b"cba")
            for _ in range(32):
                data = mem.alloc(4)
                mem.write(data, b"ping")
                vq0.queue.add([(data, 4)], [(mem.alloc(4), 4)])
            vq0.queue.publish()
            vq0.kick()
            assert slow.wait(5)
            base = fe.stop_queue(0)  # while the worker is in Python
            assert 0 < base <= 32
            events = list(device.events)
        return events

    async def main() -> None:
        with vu.Backend.listen(sock, device) as backend:
            task = asyncio.create_task(backend.serve_async(max_connections=1))
            events = await asyncio.wait_for(asyncio.to_thread(client), 30)
            assert events[:2] == [("started", 0), ("started", 1)]
            assert events[-1] == ("stopped", 0)
            await asyncio.wait_for(task, 10)
            assert ("stopped", 1) in device.events  # the end of the session stopped the other

    asyncio.run(main())


def test_cancellation_ends_the_session_and_serving(sock_dir: Path) -> None:
    sock = sock_dir / "cancel.sock"
    device = Echo()
    connected = threading.Event()
    release = threading.Event()

    def client() -> type[BaseException] | None:
        mem = vu.GuestMemory.allocate(1 << 20)
        with vu.Frontend.connect(sock, timeout=10) as fe:
            fe.negotiate(memory=mem)
            fe.setup_queue(0, 16)
            connected.set()
            release.wait(10)
            try:
                fe.get_features()
            except (vu.ConnectionClosedError, vu.VhostUserTimeoutError) as e:
                return type(e)
        return None

    async def main() -> None:
        with vu.Backend.listen(sock, device) as backend:
            task = asyncio.create_task(backend.serve_async())
            thread = asyncio.ensure_future(asyncio.to_thread(client))
            assert await asyncio.to_thread(connected.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert device.events[-1] == ("stopped", 0)  # the session ended with the task
            release.set()
            assert await thread is vu.ConnectionClosedError  # the front-end sees the hang-up
            assert sock.exists()  # still listening until close()
        assert not sock.exists()

    asyncio.run(main())


def test_stop_from_another_thread_and_a_hostile_frontend(sock_dir: Path) -> None:
    sock = sock_dir / "stop.sock"
    device = Echo()

    def hostile_then_good() -> bytes:
        conn = vu.Connection.connect(sock, timeout=10)
        with conn:
            # A payload beyond the cap: the session ends with a warning, serving goes on.
            conn.send(hazmat.encode_raw(F.GET_FEATURES, b"", flags=0x1, size=1 << 20))
            with pytest.raises(vu.ConnectionClosedError):
                conn.recv(timeout=10)
        with vu.Frontend.connect(sock, timeout=10) as fe:
            assert vu.VirtioFeature.VERSION_1 in fe.get_features()
            return b"ok"

    async def main() -> None:
        with vu.Backend.listen(sock, device) as backend:
            task = asyncio.create_task(backend.serve_async())
            assert await asyncio.to_thread(hostile_then_good) == b"ok"
            await asyncio.to_thread(backend.stop)
            await asyncio.wait_for(task, 5)  # ends within ~200 ms of stop()

    asyncio.run(main())


def test_from_fd_mode_serves_one_session(sock_dir: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    device = Echo()

    def client() -> int:
        with vu.Frontend.from_socket(ours, timeout=10) as fe:
            features = int(fe.get_features())
        ours.close()
        return features

    async def main() -> None:
        backend = vu.Backend.from_fd(theirs.fileno(), device)
        task = asyncio.create_task(backend.serve_async())
        assert await asyncio.to_thread(client) & int(vu.VirtioFeature.VERSION_1)
        await asyncio.wait_for(task, 5)  # the front-end hung up: the only session is over
        backend.close()

    try:
        asyncio.run(main())
    finally:
        theirs.close()
        ours.close()
