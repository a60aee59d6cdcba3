"""HOST_NOTIFIER on the back-end: a device that declares it gets a doorbell page per running ring
sent to the front-end (VRING_HOST_NOTIFIER_MSG with a page of a memfd), the driver then kicks
by writing that page instead of the kick eventfd, and the ring's worker, which cannot tell one
doorbell write from the next (they carry the same ring index), polls the avail ring."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import vhostuser_rs as vu
from vhostuser_rs.blk import BlockClient

P = vu.ProtocolFeature
SECTORS = 2048


class RamDisk(vu.Device):
    num_queues = 1
    protocol_features = int(P.HOST_NOTIFIER | P.BACKEND_SEND_FD)

    def __init__(self) -> None:
        self.data = bytearray(SECTORS * 512)

    def config(self) -> bytes:
        return SECTORS.to_bytes(8, "little") + bytes(52)

    def process(self, queue, chains):  # type: ignore[no-untyped-def]
        for chain in chains:
            out = chain.read()
            rtype, _, sector = struct.unpack("<IIQ", out[:16])
            at = sector * 512
            if rtype == 0:  # IN
                n = chain.writable_len - 1
                chain.write(bytes(self.data[at:at + n]), 0)
            elif rtype == 1:  # OUT
                self.data[at:at + len(out) - 16] = out[16:]
            chain.write(b"\0", chain.writable_len - 1)
            queue.complete(chain, chain.writable_len)


class Plain(RamDisk):
    protocol_features = 0


def test_rings_get_doorbell_pages_and_are_polled(sock_dir: Path) -> None:
    sock = sock_dir / "hn.sock"
    with vu.Backend.listen(str(sock), RamDisk()) as backend:
        backend.start()
        with BlockClient.connect(sock, timeout=10) as disk:
            assert P.HOST_NOTIFIER in disk.frontend.protocol_features
            handler = disk.frontend.handler
            assert isinstance(handler, vu.BuiltinHandler)
            # The page comes on the back-end channel, served by its own thread: wait for it.
            deadline = time.monotonic() + 5
            while (notifier := handler.host_notifier(0)) is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert notifier is not None and notifier.size == os.sysconf("SC_PAGE_SIZE")
            vq = disk.queues[0]
            for i in range(200):
                block = bytes([i % 251]) * 4096
                disk.write(i * 4096, block)
                assert disk.read(i * 4096, 4096) == block
            # Every kick went to the page (the ring index), none to the eventfd.
            assert notifier.read() == struct.pack("<H", 0)
            try:
                value = os.eventfd_read(vq.kick_fd)
            except BlockingIOError:
                value = 0
            assert value == 0
        # The session ended: the page went with it.
        assert notifier.closed


def test_without_the_feature_there_is_no_doorbell(sock_dir: Path) -> None:
    sock = sock_dir / "plain.sock"
    with vu.Backend.listen(str(sock), Plain()) as backend:
        backend.start()
        with BlockClient.connect(sock, timeout=10) as disk:
            assert P.HOST_NOTIFIER not in disk.frontend.protocol_features
            handler = disk.frontend.handler
            assert isinstance(handler, vu.BuiltinHandler) and handler.host_notifier(0) is None
            disk.write(0, b"x" * 512)
            assert disk.read(0, 512) == b"x" * 512


def test_a_device_cannot_get_unimplemented_features_offered(sock_dir: Path) -> None:
    """What a device declares beyond what the session implements is not offered."""

    class Greedy(RamDisk):
        protocol_features = int(P.HOST_NOTIFIER | P.BACKEND_SEND_FD | P.PAGEFAULT | P.CROSS_ENDIAN | P.XEN_MMAP)

    sock = sock_dir / "greedy.sock"
    with vu.Backend.listen(str(sock), Greedy()) as backend:
        backend.start()
        with vu.Frontend.connect(sock, timeout=10) as fe:
            fe.get_features()
            offered = fe.get_protocol_features()
            assert P.HOST_NOTIFIER in offered and P.BACKEND_SEND_FD in offered
            assert not offered & (P.PAGEFAULT | P.CROSS_ENDIAN | P.XEN_MMAP)
