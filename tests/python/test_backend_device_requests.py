"""Device-facing front-end requests, each sent by our front-end to our back-end: device state
transfer (DEVICE_STATE: SET_DEVICE_STATE_FD + CHECK_DEVICE_STATE, saved from one back-end and
loaded into another with the rings handed over, for a Python device, the built-in block device
and the built-in net device), shared objects (GET_SHARED_OBJECT; SHARED_OBJECT_ADD / REMOVE /
LOOKUP sent by the device) and shared memory regions (GET_SHMEM_CONFIG; SHMEM_MAP / UNMAP)."""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pytest

import vhostuser_rs as vu
from vhostuser_rs.devices import LoopbackNet
from vhostuser_rs.messages import MmapRequest
from vhostuser_rs.net import VIRTIO_NET as N

from netdriver import NetDriver, frame, swapped
from peers import serve_blk

pytestmark = pytest.mark.timeout(60)

SAVE, LOAD = 0, 1
PAGE = os.sysconf("SC_PAGE_SIZE")
QSIZE = 16


# -- helpers ---------------------------------------------------------------------------------

@contextmanager
def serving(
    device: vu.Device | vu.NetDevice | LoopbackNet, sock: Path, sessions: int = 1
) -> Iterator[vu.Backend | None]:
    """Serves `device` on `sock` on a thread for `sessions` front-ends."""
    backend: vu.Backend | None = None
    if isinstance(device, (vu.Device, vu.NetDevice)):
        backend = vu.Backend.listen(sock, device)
        t = threading.Thread(target=backend.serve_forever, kwargs={"max_connections": sessions}, daemon=True)
    else:
        t = threading.Thread(target=device.serve, args=(sock,), kwargs={"max_connections": sessions}, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        yield backend
    finally:
        if backend is not None:
            backend.stop()
            backend.close()
        t.join(10)
        assert not t.is_alive(), "the back-end did not finish its sessions"


def save(fe: vu.Frontend) -> bytes:
    """SET_DEVICE_STATE_FD(SAVE) over a pipe, read to EOF, CHECK_DEVICE_STATE."""
    r, w = os.pipe()
    try:
        own = fe.set_device_state_fd(SAVE, w)
    finally:
        os.close(w)  # the back-end has its copy: EOF comes when it closes it
    assert own is None  # our back-end keeps the front-end's channel
    chunks = []
    with os.fdopen(r, "rb") as f:
        while chunk := f.read(65536):
            chunks.append(chunk)
    fe.check_device_state()
    return b"".join(chunks)


def load(fe: vu.Frontend, blob: bytes) -> None:
    """SET_DEVICE_STATE_FD(LOAD), write the blob and close, CHECK_DEVICE_STATE."""
    r, w = os.pipe()
    try:
        assert fe.set_device_state_fd(LOAD, r) is None
    finally:
        os.close(r)
    with os.fdopen(w, "wb") as f:
        f.write(blob)
    fe.check_device_state()


def send_load(fe: vu.Frontend, blob: bytes) -> None:
    """LOAD without the CHECK (for tests that expect CHECK to fail)."""
    r, w = os.pipe()
    try:
        fe.set_device_state_fd(LOAD, r)
    finally:
        os.close(r)
    with os.fdopen(w, "wb") as f:
        f.write(blob)


def reap(vq: vu.Virtqueue, want: int) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    while len(got) < want:
        got += vq.queue.reap()
        if len(got) < want:
            assert vq.wait(5), f"only {len(got)} of {want} completions"
    return got


class Counter(vu.Device):
    """Answers each request with how many requests it has seen and the bytes it was sent
    before (its state: a count and a log); saves and loads that state."""

    num_queues = 1

    def __init__(self) -> None:
        self.count = 0
        self.log = b""

    def process(self, queue: vu.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
        for chain in chains:
            data = b"".join(bytes(b) for b in chain.readable)
            self.count += 1
            answer = struct.pack("<I", self.count) + self.log[-4:].ljust(4, b".")
            self.log += data
            out = chain.writable[0]
            out[: len(answer)] = answer
            queue.complete(chain, len(answer))

    def save_state(self, stream: BinaryIO) -> None:
        stream.write(struct.pack("<I", self.count) + self.log)

    def load_state(self, stream: BinaryIO) -> None:
        data = stream.read()
        if len(data) < 4:
            raise ValueError("state too short")
        self.count = struct.unpack_from("<I", data)[0]
        self.log = data[4:]


def ask(mem: vu.GuestMemory, vq: vu.Virtqueue, data: bytes) -> bytes:
    out, back = mem.alloc(16), mem.alloc(8)
    mem.write(out, data)
    head = vq.queue.add([(out, len(data))], [(back, 8)])
    vq.queue.publish()
    vq.kick()
    assert reap(vq, 1) == [(head, 8)]
    return mem.read(back, 8)


# -- DEVICE_STATE ----------------------------------------------------------------------------

def test_python_device_state_moves_to_another_backend_and_io_continues(sock_dir: Path) -> None:
    mem = vu.GuestMemory.allocate(1 << 20)
    src_dev, dst_dev = Counter(), Counter()
    with serving(src_dev, sock_dir / "src.sock"), vu.Frontend.connect(sock_dir / "src.sock") as fe:
        fe.negotiate(memory=mem)
        assert vu.ProtocolFeature.DEVICE_STATE in fe.protocol_features
        vq = fe.setup_queue(0, QSIZE)
        assert ask(mem, vq, b"abcd") == struct.pack("<I", 1) + b"...."
        assert ask(mem, vq, b"efgh") == struct.pack("<I", 2) + b"abcd"
        ring = vq.queue
        base = fe.stop_queue(0)  # the STOPPED phase: every ring stopped
        blob = save(fe)
    assert blob == struct.pack("<I", 2) + b"abcdefgh"

    with serving(dst_dev, sock_dir / "dst.sock"), vu.Frontend.connect(sock_dir / "dst.sock") as fe2:
        fe2.negotiate(memory=mem)
        load(fe2, blob)
        assert (dst_dev.count, dst_dev.log) == (2, b"abcdefgh")
        # The driver goes on with the same ring: no re-initialisation, the count goes on.
        vq2 = fe2.setup_queue(0, QSIZE, ring=ring, base=base)
        assert ask(mem, vq2, b"ijkl") == struct.pack("<I", 3) + b"efgh"


def test_a_device_that_cannot_save_reports_it_and_the_session_goes_on(sock_dir: Path) -> None:
    class Broken(Counter):
        def save_state(self, stream: BinaryIO) -> None:
            raise RuntimeError("cannot save")

    mem = vu.GuestMemory.allocate(1 << 20)
    with serving(Broken(), sock_dir / "b.sock"), vu.Frontend.connect(sock_dir / "b.sock") as fe:
        fe.negotiate(memory=mem)
        r, w = os.pipe()
        try:
            with pytest.raises(vu.RequestRejectedError) as e:
                fe.set_device_state_fd(SAVE, w)
            assert e.value.status & 0xFF == errno.EOPNOTSUPP and e.value.status & 0x100  # error, no fd
        finally:
            os.close(r)
            os.close(w)
        with pytest.raises(vu.RequestRejectedError):
            fe.check_device_state()
        # The session goes on: rings work.
        vq = fe.setup_queue(0, QSIZE)
        assert ask(mem, vq, b"abcd")[:4] == struct.pack("<I", 1)


def test_a_refused_or_truncated_state_fails_the_check_and_the_session_goes_on(sock_dir: Path) -> None:
    dev = Counter()
    mem = vu.GuestMemory.allocate(1 << 20)
    with serving(dev, sock_dir / "c.sock"), vu.Frontend.connect(sock_dir / "c.sock") as fe:
        fe.negotiate(memory=mem)
        send_load(fe, b"xy")  # load_state raises on it
        with pytest.raises(vu.RequestRejectedError) as e:
            fe.check_device_state()
        assert e.value.status == errno.EINVAL
        assert dev.count == 0
        load(fe, struct.pack("<I", 41) + b"zz")
        assert dev.count == 41
        vq = fe.setup_queue(0, QSIZE)
        assert ask(mem, vq, b"q")[:4] == struct.pack("<I", 42)


def test_transfer_is_refused_while_a_ring_runs_and_check_needs_a_transfer(sock_dir: Path) -> None:
    mem = vu.GuestMemory.allocate(1 << 20)
    with serving(Counter(), sock_dir / "r.sock"), vu.Frontend.connect(sock_dir / "r.sock") as fe:
        fe.negotiate(memory=mem)
        with pytest.raises(vu.RequestRejectedError):
            fe.check_device_state()  # nothing was transferred
        fe.setup_queue(0, QSIZE)
        r, w = os.pipe()
        try:
            with pytest.raises(vu.RequestRejectedError) as e:
                fe.set_device_state_fd(SAVE, w)
            assert e.value.status & 0xFF == errno.EBUSY
        finally:
            os.close(r)
            os.close(w)
        fe.stop_queue(0)
        assert save(fe) == struct.pack("<I", 0)


def test_check_does_not_hang_when_the_frontend_never_closes_its_end(sock_dir: Path) -> None:
    dev = Counter()
    with serving(dev, sock_dir / "h.sock"), vu.Frontend.connect(sock_dir / "h.sock", timeout=10) as fe:
        fe.negotiate()
        r, w = os.pipe()
        try:
            fe.set_device_state_fd(LOAD, r)
            os.write(w, struct.pack("<I", 7))  # and never closed before CHECK
            t0 = time.monotonic()
            with pytest.raises(vu.RequestRejectedError) as e:
                fe.check_device_state()
            assert e.value.status == errno.ETIMEDOUT and time.monotonic() - t0 < 8
        finally:
            os.close(r)
            os.close(w)
        assert dev.count == 0
        assert fe.get_features()  # still serving


def test_devices_without_state_hooks_do_not_offer_device_state(sock_dir: Path) -> None:
    class Plain(vu.Device):
        def process(self, queue: vu.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
            pass

    with serving(Plain(), sock_dir / "p.sock"), vu.Frontend.connect(sock_dir / "p.sock") as fe:
        fe.get_features()
        proto = fe.get_protocol_features()
        for bit in (vu.ProtocolFeature.DEVICE_STATE, vu.ProtocolFeature.SHARED_OBJECT, vu.ProtocolFeature.SHMEM,
                    vu.ProtocolFeature.HOST_NOTIFIER):
            assert bit not in proto


def blk_request(mem: vu.GuestMemory, vq: vu.Virtqueue, kind: int, sector: int, data: bytes = b"",
                read_len: int = 0) -> tuple[int, bytes]:
    hdr = mem.alloc(16)
    mem.write(hdr, struct.pack("<IIQ", kind, 0, sector))
    status = mem.alloc(1)
    readable = [(hdr, 16)]
    writable = []
    if data:
        buf = mem.alloc(len(data))
        mem.write(buf, data)
        readable.append((buf, len(data)))
    if read_len:
        into = mem.alloc(read_len)
        writable.append((into, read_len))
    writable.append((status, 1))
    vq.queue.add(readable, writable)
    vq.queue.publish()
    vq.kick()
    reap(vq, 1)
    return mem.read(status, 1)[0], mem.read(into, read_len) if read_len else b""


def test_builtin_block_device_state_moves_and_io_continues(sock_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    other = tmp_path / "other.img"
    other.write_bytes(bytes(2 << 20))
    mem = vu.GuestMemory.allocate(1 << 20)
    pattern = bytes(range(256)) * 2
    with serve_blk(image, sock_dir / "b1.sock", num_queues=1), vu.Frontend.connect(sock_dir / "b1.sock") as fe:
        fe.negotiate(memory=mem)
        assert vu.ProtocolFeature.DEVICE_STATE in fe.protocol_features
        vq = fe.setup_queue(0, QSIZE)
        assert blk_request(mem, vq, 1, 8, pattern)[0] == 0  # OUT
        ring = vq.queue
        base = fe.stop_queue(0)
        blob = save(fe)
    with serve_blk(image, sock_dir / "b2.sock", num_queues=1), vu.Frontend.connect(sock_dir / "b2.sock") as fe2:
        fe2.negotiate(memory=mem)
        load(fe2, blob)
        vq2 = fe2.setup_queue(0, QSIZE, ring=ring, base=base)
        assert blk_request(mem, vq2, 0, 8, read_len=512) == (0, pattern)  # IN
    # A back-end serving another disk refuses the state: the driver would see a different disk.
    with serve_blk(other, sock_dir / "b3.sock", num_queues=1), vu.Frontend.connect(sock_dir / "b3.sock") as fe3:
        fe3.negotiate(memory=mem)
        send_load(fe3, blob)
        with pytest.raises(vu.RequestRejectedError):
            fe3.check_device_state()
        assert fe3.get_queue_num() == 1  # the session goes on


def move_rings(drv: NetDriver, fe2: vu.Frontend) -> vu.Frontend:
    """Stops the driver's rings on its back-end, saves the state, loads it into `fe2`'s back-end
    and hands the same rings (with the buffers posted before) to it; returns the old front-end
    (for the caller to close). Rings stay stopped during the transfer, as the spec's STOPPED
    phase requires."""
    assert drv.ctrl is not None
    vqs = [*drv.rx, *drv.tx, drv.ctrl]
    bases = [drv.fe.stop_queue(vq.index) for vq in vqs]
    blob = save(drv.fe)
    fe2.negotiate(memory=drv.mem)
    load(fe2, blob)
    new = {vq.index: fe2.setup_queue(vq.index, vq.queue.size, ring=vq.queue, base=b) for vq, b in zip(vqs, bases)}
    old, drv.fe = drv.fe, fe2
    drv.rx = [new[vq.index] for vq in drv.rx]
    drv.tx = [new[vq.index] for vq in drv.tx]
    drv.ctrl = new[drv.ctrl.index]
    return old


class CountingEcho(vu.NetDevice):
    """Echoes frames, MACs swapped, and counts them: the count is its own state."""

    def __init__(self) -> None:
        self.frames = 0

    def receive(self, queue_pair: int, frames: list[vu.net.Frame]) -> None:
        self.frames += len(frames)
        self.send(queue_pair, [swapped(bytes(f)) for f in frames])

    def save_state(self, stream: BinaryIO) -> None:
        stream.write(struct.pack("<Q", self.frames))

    def load_state(self, stream: BinaryIO) -> None:
        (self.frames,) = struct.unpack("<Q", stream.read())


def test_python_net_device_state_moves_with_the_library_part(sock_dir: Path) -> None:
    src, dst = CountingEcho(), CountingEcho()
    new_mac = bytes.fromhex("02aabbccddef")
    with serving(src, sock_dir / "p1.sock"), NetDriver(sock_dir / "p1.sock") as drv:
        assert vu.ProtocolFeature.DEVICE_STATE in drv.fe.protocol_features
        assert drv.command(N["VIRTIO_NET_CTRL_MAC"], N["VIRTIO_NET_CTRL_MAC_ADDR_SET"], new_mac) == N["VIRTIO_NET_OK"]
        drv.post_rx(8)
        drv.transmit([frame(60, seed=i) for i in range(3)])
        drv.reap_tx(3)
        assert len(drv.receive(3)) == 3
        with serving(dst, sock_dir / "p2.sock"), vu.Frontend.connect(sock_dir / "p2.sock") as fe2:
            old = move_rings(drv, fe2)
            old.close()
            assert dst.frames == 3 and fe2.get_config(0, 6) == new_mac
            f = frame(70, seed=9)
            drv.transmit([f])
            assert [g for _, g in drv.receive(1)] == [swapped(f)]
            assert dst.frames == 4
            for vq in [*drv.rx, *drv.tx, drv.ctrl]:
                assert vq is not None
                vq.close()


def test_python_net_device_without_state_hooks_does_not_offer_device_state(sock_dir: Path) -> None:
    class Plain(vu.NetDevice):
        def receive(self, queue_pair: int, frames: list[vu.net.Frame]) -> None:
            pass

    with serving(Plain(), sock_dir / "pn.sock"), vu.Frontend.connect(sock_dir / "pn.sock") as fe:
        fe.get_features()
        assert vu.ProtocolFeature.DEVICE_STATE not in fe.get_protocol_features()


def test_builtin_net_device_state_moves_and_traffic_continues(sock_dir: Path) -> None:
    src, dst = LoopbackNet(), LoopbackNet()
    new_mac = bytes.fromhex("02aabbccddee")
    ok = N["VIRTIO_NET_OK"]
    with serving(src, sock_dir / "n1.sock"), NetDriver(sock_dir / "n1.sock") as drv:
        assert vu.ProtocolFeature.DEVICE_STATE in drv.fe.protocol_features
        assert drv.command(N["VIRTIO_NET_CTRL_MAC"], N["VIRTIO_NET_CTRL_MAC_ADDR_SET"], new_mac) == ok
        drv.post_rx(8)
        f1 = frame(60, seed=1)
        drv.transmit([f1])
        drv.reap_tx(1)
        assert [f for _, f in drv.receive(1)] == [swapped(f1)]
        with serving(dst, sock_dir / "n2.sock"), vu.Frontend.connect(sock_dir / "n2.sock") as fe2:
            move_rings(drv, fe2).close()
            # The driver's MAC_ADDR_SET on the source (this device's own MAC is 52:54:00:12:34:56).
            assert fe2.get_config(0, 6) == new_mac
            # The same rings, with the receive buffers the driver had posted, go on.
            f2 = frame(80, seed=2)
            drv.transmit([f2])
            drv.reap_tx(1)
            assert [f for _, f in drv.receive(1)] == [swapped(f2)]
            assert drv.command(N["VIRTIO_NET_CTRL_RX"], N["VIRTIO_NET_CTRL_RX_PROMISC"], b"\x01") == ok
            for vq in [*drv.rx, *drv.tx, drv.ctrl]:
                assert vq is not None
                vq.close()
    assert dst.counters()["rx_frames"] == 1


# -- SHARED_OBJECT ---------------------------------------------------------------------------

class Recorder(vu.BackendRequestHandler):
    """The front-end's side of the back-end request channel: records what arrives."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []
        self.table: dict[bytes, int] = {}
        self.lookup_fd: int | None = None

    def shared_object_add(self, uuid: bytes) -> int | None:
        self.seen.append(("add", uuid))
        return None

    def shared_object_remove(self, uuid: bytes) -> int | None:
        self.seen.append(("remove", uuid))
        return None if uuid in [u for k, u in self.seen if k == "add"] else 1

    def shared_object_lookup(self, uuid: bytes) -> tuple[int, int | None]:
        self.seen.append(("lookup", uuid))
        if uuid == UUID_B and self.lookup_fd is not None:
            return 0, self.lookup_fd
        return 1, None

    def shmem_map(self, request: MmapRequest, fd: int) -> int | None:
        self.seen.append(("map", (request, os.fstat(fd).st_ino)))
        return None

    def shmem_unmap(self, request: MmapRequest) -> int | None:
        self.seen.append(("unmap", request))
        return None


UUID_A = bytes(range(16))
UUID_B = bytes(range(16, 32))


class Exporter(vu.Device):
    num_queues = 1

    def __init__(self) -> None:
        self.buf = os.memfd_create("exported", os.MFD_CLOEXEC)
        os.write(self.buf, b"shared bytes")

    def process(self, queue: vu.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
        pass

    def get_shared_object(self, uuid: bytes) -> int | None:
        return self.buf if uuid == UUID_A else None


def test_shared_objects_exported_looked_up_and_fetched(sock_dir: Path) -> None:
    dev = Exporter()
    handler = Recorder()
    imported = os.memfd_create("imported", os.MFD_CLOEXEC)
    os.write(imported, b"from elsewhere")
    handler.lookup_fd = imported
    try:
        with serving(dev, sock_dir / "s.sock") as backend, vu.Frontend.connect(sock_dir / "s.sock") as fe:
            assert backend is not None
            fe.negotiate(handler=handler)
            assert vu.ProtocolFeature.SHARED_OBJECT in fe.protocol_features
            backend.shared_object_add(UUID_A, need_reply=True)
            # GET_SHARED_OBJECT: the device's dma-buf (here a memfd), a copy of its fd.
            fd = fe.get_shared_object(UUID_A)
            assert fd is not None
            try:
                assert os.fstat(fd).st_ino == os.fstat(dev.buf).st_ino and os.pread(fd, 12, 0) == b"shared bytes"
            finally:
                os.close(fd)
            assert fe.get_shared_object(UUID_B) is None  # not exported: no fd
            # SHARED_OBJECT_LOOKUP: the reply is mandatory and carries the fd on success.
            got = backend.shared_object_lookup(UUID_B)
            try:
                assert os.pread(got, 14, 0) == b"from elsewhere"
            finally:
                os.close(got)
            with pytest.raises(vu.RequestRejectedError):
                backend.shared_object_lookup(UUID_A)  # the handler has no fd for it
            backend.shared_object_remove(UUID_A, need_reply=True)
            with pytest.raises(vu.RequestRejectedError):
                backend.shared_object_remove(UUID_B, need_reply=True)  # never added
            assert [k for k, _ in handler.seen] == ["add", "lookup", "lookup", "remove", "remove"]
            assert fe.get_features()
    finally:
        os.close(imported)
        os.close(dev.buf)


def test_shared_object_requests_need_the_feature(sock_dir: Path) -> None:
    dev = Exporter()
    try:
        with serving(dev, sock_dir / "s.sock") as backend, vu.Frontend.connect(sock_dir / "s.sock") as fe:
            assert backend is not None
            fe.negotiate(handler=Recorder(), protocol_features=int(vu.ProtocolFeature.BACKEND_REQ
                                                                    | vu.ProtocolFeature.REPLY_ACK))
            with pytest.raises(vu.FeatureNotNegotiatedError):
                backend.shared_object_add(UUID_A)
            with pytest.raises(vu.FeatureNotNegotiatedError):
                backend.shared_object_lookup(UUID_A)
    finally:
        os.close(dev.buf)


# -- SHMEM -----------------------------------------------------------------------------------

class Windowed(vu.Device):
    num_queues = 1
    shmem_regions = (0, 4 * PAGE)

    def process(self, queue: vu.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
        pass


def test_shmem_config_and_map_unmap(sock_dir: Path) -> None:
    handler = Recorder()
    area = os.memfd_create("window", os.MFD_CLOEXEC)
    os.ftruncate(area, 2 * PAGE)
    try:
        with serving(Windowed(), sock_dir / "m.sock") as backend, vu.Frontend.connect(sock_dir / "m.sock") as fe:
            assert backend is not None
            fe.get_features()
            proto = fe.get_protocol_features()
            assert vu.ProtocolFeature.SHMEM in proto and vu.ProtocolFeature.BACKEND_SEND_FD in proto
            fe.negotiate(handler=handler, protocol_features=int(vu.frontend.SUPPORTED_PROTOCOL_FEATURES
                                                                | vu.ProtocolFeature.SHMEM))
            assert vu.ProtocolFeature.SHMEM in fe.protocol_features
            sizes = fe.get_shmem_config()
            assert len(sizes) == 256 and sizes[:2] == (0, 4 * PAGE) and not any(sizes[2:])
            backend.shmem_map(1, area, shm_offset=PAGE, length=2 * PAGE, need_reply=True)
            kind, (req, ino) = handler.seen[-1]  # type: ignore[misc]
            assert kind == "map" and ino == os.fstat(area).st_ino
            assert req == MmapRequest(shmid=1, fd_offset=0, shm_offset=PAGE, len=2 * PAGE, flags=1)
            backend.shmem_map(1, area, shm_offset=0, length=PAGE, writable=False)
            backend.shmem_unmap(1, shm_offset=PAGE, length=2 * PAGE, need_reply=True)
            assert handler.seen[-1] == ("unmap", MmapRequest(1, 0, PAGE, 2 * PAGE, 0))
            assert [k for k, _ in handler.seen] == ["map", "map", "unmap"]
            # Checked against the declared regions before anything is sent.
            for shmid, offset, length in [(0, 0, PAGE), (2, 0, PAGE), (1, 3 * PAGE, 2 * PAGE), (1, 1, PAGE),
                                          (1, 0, 0)]:
                with pytest.raises(vu.InvalidStateError):
                    backend.shmem_map(shmid, area, shm_offset=offset, length=length)
            assert len(handler.seen) == 3
    finally:
        os.close(area)


def test_qemu_style_get_shared_object_without_its_uuid_asks_for_the_nil_uuid(sock_dir: Path) -> None:
    """QEMU sends GET_SHARED_OBJECT with size 0 (its UUID never goes out): the back-end takes
    it as the nil UUID instead of dropping the session."""
    from vhostuser_rs import hazmat

    class NilExporter(Exporter):
        def get_shared_object(self, uuid: bytes) -> int | None:
            return self.buf if uuid == bytes(16) else None

    dev = NilExporter()
    F = vu.FrontendRequest
    try:
        with serving(dev, sock_dir / "q.sock"), vu.Connection.connect(sock_dir / "q.sock", timeout=5) as conn:
            hazmat.send(conn, hazmat.request(F.GET_FEATURES))
            conn.recv(timeout=5)
            proto = vu.ProtocolFeature.SHARED_OBJECT | vu.ProtocolFeature.BACKEND_REQ
            hazmat.send(conn, hazmat.request(F.SET_PROTOCOL_FEATURES, int(proto)))
            hazmat.send(conn, hazmat.encode_raw(F.GET_SHARED_OBJECT))
            reply, fds = conn.recv(timeout=5)
            try:
                assert reply.request is F.GET_SHARED_OBJECT and reply.is_reply and reply.payload is None  # empty body
                assert len(fds) == 1 and os.fstat(fds[0]).st_ino == os.fstat(dev.buf).st_ino
            finally:
                hazmat.close_fds(fds)
            hazmat.send(conn, hazmat.request(F.GET_PROTOCOL_FEATURES))
            assert conn.recv(timeout=5)[0].request is F.GET_PROTOCOL_FEATURES  # the session goes on
    finally:
        os.close(dev.buf)


def test_a_state_beyond_the_limit_is_refused(sock_dir: Path) -> None:
    dev = Counter()
    with serving(dev, sock_dir / "big.sock"), vu.Frontend.connect(sock_dir / "big.sock") as fe:
        fe.negotiate()
        r, w = os.pipe()
        try:
            fe.set_device_state_fd(LOAD, r)
        finally:
            os.close(r)
        chunk = bytes(1 << 20)
        try:
            with pytest.raises(BrokenPipeError):  # the back-end stops reading at the limit
                for _ in range(80):  # a write cut short by the close returns its count; the next fails
                    os.write(w, chunk)
        finally:
            os.close(w)
        with pytest.raises(vu.RequestRejectedError) as e:
            fe.check_device_state()
        assert e.value.status == errno.EIO and dev.count == 0


def test_declared_regions_must_be_whole_pages(sock_dir: Path) -> None:
    class Odd(Windowed):
        shmem_regions = (PAGE + 1,)

    with vu.Backend.listen(sock_dir / "odd.sock", Odd()) as backend, pytest.raises(ValueError, match="page size"):
        backend.serve_forever(max_connections=0)


def test_a_frontend_that_stops_reading_fails_the_save_and_the_session_goes_on(sock_dir: Path) -> None:
    dev = Counter()
    dev.log = bytes(1 << 20)  # far more than a pipe holds
    with serving(dev, sock_dir / "e.sock"), vu.Frontend.connect(sock_dir / "e.sock") as fe:
        fe.negotiate()
        r, w = os.pipe()
        try:
            fe.set_device_state_fd(SAVE, w)
        finally:
            os.close(w)
        assert len(os.read(r, 4096)) > 0
        os.close(r)  # gone before EOF: the back-end's writes fail with EPIPE
        with pytest.raises(vu.RequestRejectedError) as e:
            fe.check_device_state()
        assert e.value.status == errno.EIO
        assert fe.get_queue_num() == 1


def test_reset_device_abandons_a_transfer_in_progress(sock_dir: Path) -> None:
    """RESET_DEVICE during a LOAD: the reset discards the device state, so the state that
    arrives afterwards must not land in the device, and CHECK_DEVICE_STATE reports no
    completed transfer; a new LOAD then works."""
    dev = Counter()
    with serving(dev, sock_dir / "reset.sock"), vu.Frontend.connect(sock_dir / "reset.sock") as fe:
        fe.negotiate()
        assert vu.ProtocolFeature.RESET_DEVICE in fe.protocol_features
        r, w = os.pipe()
        try:
            assert fe.set_device_state_fd(LOAD, r) is None
            os.write(w, struct.pack("<I", 7))  # half of the state: the transfer is running
            fe.reset_device()
            os.write(w, b"late")
        finally:
            os.close(r)
            os.close(w)  # EOF: a transfer still running would load count=7 now
        time.sleep(0.3)
        assert dev.count == 0
        with pytest.raises(vu.RequestRejectedError) as e:
            fe.check_device_state()
        assert e.value.status == errno.EINVAL  # no transfer took place
        fe.negotiate()  # after the reset the driver negotiates again (virtio reset)
        load(fe, struct.pack("<I", 41))
        assert dev.count == 41
