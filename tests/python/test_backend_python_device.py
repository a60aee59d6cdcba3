"""A virtio-blk device written in Python, served by the back-end and driven by our front-end."""

from __future__ import annotations

import logging
import struct
import threading
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
