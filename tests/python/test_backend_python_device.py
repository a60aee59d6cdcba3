"""A virtio-blk device written in Python, served by the back-end and driven by our front-end."""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from pathlib import Path

import pytest

import vhostuser_rs as vu
from vhostuser_rs.blk import BlockClient

SECTORS = 2048


class MemBlock(vu.Device):
    """A RAM disk: handles IN/OUT/FLUSH/GET_ID in Python, one call per batch."""

    num_queues = 2
    features = int(vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.EVENT_IDX | vu.VirtioFeature.INDIRECT_DESC) | (1 << 12)

    def __init__(self) -> None:
        self.data = bytearray(SECTORS * 512)
        self.batches = 0
        self.fail_next = False

    def config(self) -> bytes:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("config failure for the test")
        # virtio_blk_config: capacity, size_max, seg_max, geometry, blk_size, topology..., num_queues
        return struct.pack("<QIIHBBI", SECTORS, 0, 126, 0, 0, 0, 512) + bytes(10) + struct.pack("<H", 2) + bytes(24)

    def process(self, queue: vu.backend.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
        self.batches += 1
        for chain in chains:
            rtype, _, sector = struct.unpack("<IIQ", chain.read(16))
            status, written = 0, 0
            if rtype == 0:  # IN
                n = chain.writable_len - 1
                written = chain.write(bytes(self.data[sector * 512 : sector * 512 + n]))
            elif rtype == 1:  # OUT
                payload = chain.read()[16:]
                self.data[sector * 512 : sector * 512 + len(payload)] = payload
            elif rtype == 8:  # GET_ID
                written = chain.write(b"pydevice".ljust(20, b"\0"))
            elif rtype != 4:
                status = 2
            chain.write(bytes([status]), chain.writable_len - 1)
            queue.complete(chain, written + 1)


@pytest.fixture
def served(sock_dir: Path):  # type: ignore[no-untyped-def]
    device = MemBlock()
    sock = sock_dir / "py.sock"
    backend = vu.Backend.listen(sock, device)
    t = threading.Thread(target=backend.serve_forever, kwargs={"max_connections": 2}, daemon=True)
    t.start()
    while not sock.exists():
        pass
    yield sock, device
    # Let the serving thread finish its remaining sessions.
    for _ in range(2):
        try:
            with vu.Frontend.connect(sock, timeout=0.5):
                pass
        except OSError:
            break
    t.join(10)


def test_python_device_serves_block_io(served) -> None:  # type: ignore[no-untyped-def]
    sock, device = served
    with BlockClient.connect(sock, num_queues=2) as disk:
        assert disk.capacity == SECTORS * 512 and disk.config is not None and disk.config.num_queues == 2
        disk.write(4096, b"p" * 4096, queue=1)
        assert disk.read(4096, 4096, queue=0) == b"p" * 4096
        assert disk.get_id() == b"pydevice"
        disk.flush()
    assert device.batches >= 4
    assert bytes(device.data[4096:8192]) == b"p" * 4096


def test_device_exceptions_are_answered_per_spec(served, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    sock, device = served
    device.fail_next = True
    with caplog.at_level(logging.WARNING, logger="vhostuser_rs"), vu.Frontend.connect(sock) as fe:
        fe.get_features()
        fe.set_protocol_features(fe.get_protocol_features() & (vu.ProtocolFeature.CONFIG | vu.ProtocolFeature.REPLY_ACK))
        with pytest.raises(vu.RequestRejectedError, match="GET_CONFIG"):
            fe.get_config(0, 60)  # the device raised: the spec's empty reply
        assert len(fe.get_config(0, 60)) == 60  # and it keeps serving
        with pytest.raises(vu.RequestRejectedError):
            fe.set_config(32, b"\x01")  # refused by default
    assert any("config failure" in r.getMessage() for r in caplog.records)


def test_background_start_stop_and_client_mode(sock_dir: Path) -> None:
    device = MemBlock()
    sock = sock_dir / "bg.sock"
    with vu.Backend.listen(sock, device) as backend:
        backend.start()
        while not sock.exists():
            pass
        with BlockClient.connect(sock) as disk:
            disk.write(0, b"b" * 512)
            assert disk.read(0, 512) == b"b" * 512
    assert backend.error is None
    # Client mode: the front-end listens, the back-end connects out.
    front = sock_dir / "front.sock"
    with vu.Listener.bind(front) as listener:
        client = vu.Backend.connect(front, device)
        client.start()
        conn = listener.accept(timeout=5)
        # (Connection.close() shuts the socket down, which would also end a duplicate of it:
        # close it only once the front-end is done.)
        with vu.Frontend(vu._native.FrontendCore.from_fd(conn.fileno())) as fe:
            assert vu.VirtioFeature.VERSION_1 in fe.get_features()
        conn.close()
        client.stop()
        assert client.error is None


class Echo(vu.Device):
    """Per-request mode with lifecycle hooks: writes the readable bytes back, reversed."""

    num_queues = 2
    features = int(vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.EVENT_IDX)

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.config_space = bytearray(8)

    def config(self) -> bytes:
        return bytes(self.config_space)

    def process_request(self, queue_index: int, chain: vu.DescriptorChain) -> int | None:
        data = chain.read()
        if data == b"boom":
            raise RuntimeError("per-request failure for the test")
        return chain.write(data[::-1])

    def queue_started(self, index: int) -> None:
        self.events.append(("started", index))

    def queue_stopped(self, index: int) -> None:
        self.events.append(("stopped", index))


def _echo(mem: vu.GuestMemory, vq: vu.Virtqueue, data: bytes) -> tuple[int, bytes]:
    out, back = mem.alloc(len(data)), mem.alloc(len(data))
    mem.write(out, data)
    vq.queue.add([(out, len(data))], [(back, len(data))])
    vq.queue.publish()
    vq.kick()
    while not (done := vq.queue.reap()):
        assert vq.wait(5)
    (_, written), = done
    return written, mem.read(back, written)


def test_per_request_mode_hooks_and_config_change(sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    device = Echo()
    sock = sock_dir / "echo.sock"
    changes: list[bytes] = []

    class Handler(vu.BackendRequestHandler):
        def config_change_msg(self) -> int | None:
            changes.append(b"")
            return 0

    with vu.Backend.listen(sock, device) as backend:
        backend.start()
        while not sock.exists():
            pass
        # No session yet: nowhere to send.
        with pytest.raises(vu.InvalidStateError):
            backend.config_changed()
        mem = vu.GuestMemory.allocate(1 << 20)
        with vu.Frontend.connect(sock) as fe:
            fe.negotiate(memory=mem, handler=Handler())
            vq0 = fe.setup_queue(0, 16)
            vq1 = fe.setup_queue(1, 16)
            assert device.events == [("started", 0), ("started", 1)]
            assert _echo(mem, vq0, b"hello") == (5, b"olleh")
            assert _echo(mem, vq1, b"abc") == (3, b"cba")
            with caplog.at_level(logging.WARNING, logger="vhostuser_rs"):
                assert _echo(mem, vq0, b"boom") == (0, b"")  # an exception completes with 0 bytes
            assert any("per-request failure" in r.getMessage() for r in caplog.records)
            assert _echo(mem, vq0, b"again") == (5, b"niaga")  # and the device keeps serving
            # The device tells the driver its config changed; the front-end's handler hears it
            # and reads the new value.
            device.config_space[:] = (42).to_bytes(8, "little")
            assert device.backend is backend
            backend.config_changed(need_reply=True)
            assert changes == [b""]
            assert fe.get_config(0, 8) == (42).to_bytes(8, "little")
            fe.stop_queue(1)
            assert device.events[-1] == ("stopped", 1)
        # The session ended: the remaining ring stopped, the channel is gone.
        deadline = time.monotonic() + 5
        while (("stopped", 0) not in device.events or backend.requests.is_open) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ("stopped", 0) in device.events
        assert not backend.requests.is_open
    assert backend.error is None


def test_backend_request_needs_its_feature(sock_dir: Path) -> None:
    device = Echo()
    sock = sock_dir / "gate.sock"

    class Handler(vu.BackendRequestHandler):
        pass

    with vu.Backend.listen(sock, device) as backend:
        backend.start()
        while not sock.exists():
            pass
        with vu.Frontend.connect(sock) as fe:
            # BACKEND_REQ without CONFIG: CONFIG_CHANGE_MSG may not be sent.
            fe.negotiate(handler=Handler(), protocol_features=vu.ProtocolFeature.BACKEND_REQ | vu.ProtocolFeature.MQ)
            fe.get_queue_num()  # a request with a reply: everything before it has been handled
            with pytest.raises(vu.FeatureNotNegotiatedError):
                backend.config_changed()
            # In-band calls need INBAND_NOTIFICATIONS; a reply needs REPLY_ACK.
            with pytest.raises(vu.FeatureNotNegotiatedError, match="INBAND_NOTIFICATIONS"):
                backend.backend_request(vu.BackendRequest.VRING_CALL, vu.messages.VringState(0, 0))
            with pytest.raises(vu.FeatureNotNegotiatedError, match="REPLY_ACK"):
                backend.backend_request(vu.BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)


def _worker_threads() -> dict[str, str]:
    """Name → allowed CPUs of this process's vhost-user worker threads."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        name = (task / "comm").read_text().strip()
        if name.startswith("vhost-user"):
            cpus = next(l for l in (task / "status").read_text().splitlines() if l.startswith("Cpus_allowed_list"))
            out[f"{name} ({task.name})"] = cpus.split()[-1]
    return out


@pytest.mark.parametrize("workers, expected", [(None, ["vhost-user ring", "vhost-user ring"]), (1, ["vhost-user work"])])
def test_rings_share_worker_threads_pinned_to_cpus(sock_dir: Path, workers: int | None, expected: list[str]) -> None:
    device = MemBlock()
    sock = sock_dir / "w.sock"
    cpu = sorted(os.sched_getaffinity(0))[-1]
    with vu.Backend.listen(sock, device, workers=workers, cpus=[cpu]) as backend:
        backend.start()
        while not sock.exists():
            time.sleep(0.01)
        with BlockClient.connect(sock, num_queues=2) as disk:
            disk.write(0, b"w" * 4096, queue=0)
            disk.write(4096, b"x" * 4096, queue=1)
            assert disk.read(0, 8192, queue=1) == b"w" * 4096 + b"x" * 4096
            threads = _worker_threads()
            assert sorted(n.split(" (")[0][:15] for n in threads) == expected
            assert set(threads.values()) == {str(cpu)}
    assert backend.error is None


def test_asyncio_programs_serve_with_serve_async_and_fileno(sock_dir: Path) -> None:
    import asyncio
    import select
    import socket

    sock = sock_dir / "aio.sock"
    device = MemBlock()

    def client_io() -> bytes:
        with BlockClient.connect(sock) as disk:
            disk.write(512, b"a" * 512)
            return disk.read(512, 512)

    async def main() -> None:
        with vu.Backend.listen(sock, device) as backend:
            # Bound at construction: a connecting front-end makes fileno() readable before any
            # serving starts (what an event loop would wait for).
            assert sock.exists()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(str(sock))
                assert select.select([backend.fileno()], [], [], 5)[0]
            task = asyncio.create_task(backend.serve_async())
            assert await asyncio.to_thread(client_io) == b"a" * 512
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert backend.error is None
        assert not sock.exists()  # close() stopped listening

    asyncio.run(main())


def test_worker_options_are_checked(sock_dir: Path) -> None:
    with vu.Backend.listen(sock_dir / "opt.sock", MemBlock(), cpus=[1 << 20]) as backend:
        with pytest.raises(ValueError, match="beyond"):
            backend.serve_forever()
    with vu.Backend.listen(sock_dir / "opt.sock", MemBlock(), workers=0) as backend:
        with pytest.raises(ValueError, match="at least 1"):
            backend.serve_forever()
    with vu.Backend.listen(sock_dir / "opt.sock", MemBlock(), poll=-1.0) as backend:
        with pytest.raises(ValueError):
            backend.serve_forever()


@pytest.mark.parametrize(
    "answer, error",
    [
        (lambda h: h.reply(vu.BackendRequest.IOTLB_MSG, 0), vu.UnexpectedReplyError),  # another request's reply
        (lambda h: h.request(vu.BackendRequest.CONFIG_CHANGE_MSG), vu.UnexpectedReplyError),  # not a reply
        (lambda h: h.reply(vu.BackendRequest.CONFIG_CHANGE_MSG, b"\0" * 3), vu.MalformedMessageError),  # wrong size
        (None, vu.VhostUserTimeoutError),  # no answer at all
    ],
)
def test_hostile_answers_to_backend_requests(sock_dir: Path, answer, error) -> None:  # type: ignore[no-untyped-def]
    """A front-end (a hazmat peer) answering the device's CONFIG_CHANGE_MSG wrongly: each is a
    clear exception in the device's call, bounded by its timeout; that channel is then closed
    (a late answer must not pass for the next request's) and the session goes on."""
    from vhostuser_rs import hazmat

    sock = sock_dir / "ans.sock"
    with vu.Backend.listen(sock, Echo()) as backend:
        backend.start()
        with vu.Frontend.connect(sock) as fe:
            ours, theirs = vu.Connection.pair()
            with ours, theirs:
                fe.negotiate(handler=vu.BackendRequestHandler(), protocol_features=vu.ProtocolFeature.BACKEND_REQ
                             | vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.CONFIG | vu.ProtocolFeature.MQ)
                # Replace the handler's channel by one this test answers by hand.
                fe.request(vu.FrontendRequest.SET_BACKEND_REQ_FD, None, [theirs.fileno()])
                result: list[BaseException] = []

                def device_side() -> None:
                    try:
                        backend.config_changed(need_reply=True, timeout=0.5)
                    except BaseException as e:  # noqa: BLE001 - inspected below
                        result.append(e)

                t = threading.Thread(target=device_side)
                t.start()
                msg, fds = ours.recv(channel_value=int(vu.Channel.BACKEND), timeout=5)
                assert msg.request is vu.BackendRequest.CONFIG_CHANGE_MSG and not fds
                if answer is not None:
                    hazmat.send(ours, answer(hazmat))
                t.join(5)
                assert result and isinstance(result[0], error), result
                with pytest.raises(vu.InvalidStateError):
                    backend.config_changed()
            assert fe.get_queue_num() == 2  # the session goes on
    assert backend.error is None


class AsyncBlock(vu.Device):
    """A RAM disk whose reads finish on another thread (asynchronous I/O): ``process`` defers
    each chain, a worker thread does the copy and signals an eventfd, ``on_event`` completes the
    chains on the ring's own worker."""

    num_queues = 1
    features = int(vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.EVENT_IDX)

    def __init__(self) -> None:
        self.data = bytes(range(256)) * (SECTORS * 2)
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.done: list[tuple[vu.DescriptorChain, int]] = []
        self.lock = threading.Lock()
        self.deferred_seen = 0

    def config(self) -> bytes:
        return struct.pack("<Q", SECTORS) + bytes(52)

    def event_fds(self, index: int) -> list[int]:
        return [self.efd]

    def process(self, queue: vu.backend.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
        for chain in chains:
            rtype, _, sector = struct.unpack("<IIQ", chain.read(16))
            if rtype != 0:  # only reads are asynchronous here
                chain.write(bytes([0]), chain.writable_len - 1)
                queue.complete(chain, 1)
                continue
            queue.defer(chain)
            threading.Thread(target=self._read, args=(chain, sector), daemon=True).start()

    def _read(self, chain: vu.DescriptorChain, sector: int) -> None:
        time.sleep(0.01)
        n = chain.writable_len - 1
        chain.write(self.data[sector * 512 : sector * 512 + n] + bytes([0]))
        with self.lock:
            self.done.append((chain, n + 1))
        os.eventfd_write(self.efd, 1)

    def on_event(self, queue: vu.backend.RingQueue, fd: int) -> bool:
        os.eventfd_read(fd)
        with self.lock:
            done, self.done = self.done, []
        self.deferred_seen = max(self.deferred_seen, queue.deferred)
        for chain, written in done:
            queue.complete(chain, written)
        return True


def test_python_device_completes_chains_later_from_its_own_fd(sock_dir: Path) -> None:
    device = AsyncBlock()
    sock = sock_dir / "async.sock"
    backend = vu.Backend.listen(sock, device)
    t = threading.Thread(target=backend.serve_forever, kwargs={"max_connections": 1}, daemon=True)
    try:
        t.start()
        with vu.Frontend.connect(sock) as fe:
            mem = vu.GuestMemory.allocate(8 << 20)
            fe.negotiate(memory=mem)
            vq = fe.setup_queue(0, 64)
            # Four reads in flight at once, completed after the batch that brought them.
            bufs = []
            for i in range(4):
                hdr, data, status = mem.alloc(16), mem.alloc(4096, 4096), mem.alloc(1)
                mem.write(hdr, struct.pack("<IIQ", 0, 0, i * 8))
                mem.write(status, b"\xff")
                head = vq.queue.add([(hdr, 16)], [(data, 4096), (status, 1)])
                bufs.append((head, data, status))
            vq.queue.publish()
            vq.kick()
            used: list[tuple[int, int]] = []
            deadline = time.monotonic() + 10
            while len(used) < 4 and time.monotonic() < deadline:
                vq.wait(0.1)
                used += vq.queue.reap()
            assert sorted(h for h, _ in used) == sorted(h for h, _, _ in bufs)
            assert all(n == 4097 for _, n in used)
            for i, (_, data, status) in enumerate(bufs):
                assert mem.read(status, 1) == b"\0"
                assert mem.read(data, 4096) == device.data[i * 4096 : (i + 1) * 4096]
            vq.close()
        t.join(10)
        assert device.deferred_seen >= 1
    finally:
        backend.close()
        os.close(device.efd)


def test_deferring_without_event_fds_is_refused(sock_dir: Path) -> None:
    errors: list[BaseException] = []

    class Bad(MemBlock):
        def process(self, queue: vu.backend.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
            for chain in chains:
                try:
                    queue.defer(chain)
                except RuntimeError as e:
                    errors.append(e)
            super().process(queue, chains)

    device = Bad()
    sock = sock_dir / "bad.sock"
    backend = vu.Backend.listen(sock, device)
    t = threading.Thread(target=backend.serve_forever, kwargs={"max_connections": 1}, daemon=True)
    try:
        t.start()
        with BlockClient.connect(sock, num_queues=1) as disk:
            disk.write(0, b"z" * 512)
            assert disk.read(0, 512) == b"z" * 512
        t.join(10)
        assert errors and "event_fds" in str(errors[0])
    finally:
        backend.close()


class Batched(MemBlock):
    """MemBlock taking at most 4 chains per process() call, recording each call's size."""

    drain_batch = 4

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def process(self, queue: vu.backend.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
        self.sizes.append(len(chains))
        super().process(queue, chains)


def test_drain_batch_bounds_each_process_call(sock_dir: Path) -> None:
    device = Batched()
    sock = sock_dir / "batched.sock"
    with vu.Backend.listen(sock, device) as backend:
        t = threading.Thread(target=backend.serve_forever, kwargs={"max_connections": 1}, daemon=True)
        t.start()
        with BlockClient.connect(sock, num_queues=1) as disk:
            disk.write(0, bytes(range(256)) * 64)
            device.sizes.clear()
            # 32 reads published with one store: the device sees them all at once.
            tokens = disk.submit([(vu.blk.RequestType.IN, 512 * i, 512) for i in range(32)])
            assert len(tokens) == 32
            done = []
            while len(done) < 32:
                done += disk.reap(32, timeout=5.0)
            data = dict((token, d) for token, status, d in done if status == 0)
            assert [data[t] for t in tokens] == [(bytes(range(256)) * 64)[512 * i : 512 * (i + 1)] for i in range(32)]
        t.join(10)
    assert sum(device.sizes) == 32 and max(device.sizes) == 4, device.sizes
    for bad in (0, 1025):
        device.drain_batch = bad
        with pytest.raises(ValueError, match="drain_batch"):
            vu.Backend.listen(sock_dir / f"bad{bad}.sock", device)
