"""A virtio-blk RAM disk written in Python, for the ``vhostuser-rs serve MODULE:CLASS`` tests:
``vhostuser-rs serve tests/python/devices/ram_block.py:RamBlock size=1M`` (keyword arguments),
``... ram_block.py:ArgvBlock -- --size 1M`` (``from_args``), and the spec's block options
(``--read-only``, ``--blk-file PATH``) reach the constructor as ``read_only`` / ``blk_file``.
"""

from __future__ import annotations

import argparse
import struct
from collections.abc import Sequence

import vhostuser_rs as vu

VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP = 0, 1, 2
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID = 0, 1, 4, 8


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = str(text).strip().lower()
    return int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)


class RamBlock(vu.Device):
    """A RAM disk of `size` bytes (a multiple of 512), or the contents of `blk_file` (read into
    memory; writes stay in memory). `serial` answers GET_ID."""

    device_type = "block"
    max_queue_size = 256

    def __init__(self, size: int | str = "1M", *, num_queues: int = 1, read_only: bool = False,
                 blk_file: str | None = None, serial: str = "ram-block") -> None:
        if blk_file is not None:
            with open(blk_file, "rb") as f:
                self.data = bytearray(f.read())
        else:
            self.data = bytearray(_size(size))
        if not self.data or len(self.data) % 512:
            raise ValueError(f"size must be a positive multiple of 512, not {len(self.data)}")
        self.num_queues = num_queues
        self.read_only = read_only
        self.serial = serial.encode()[:20]
        self.features = int(vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.EVENT_IDX) | VIRTIO_BLK_F_FLUSH
        if read_only:
            self.features |= VIRTIO_BLK_F_RO
        self.features |= 1 << 12  # VIRTIO_BLK_F_MQ

    def config(self) -> bytes:
        # virtio_blk_config (VIRTIO 1.2 §5.2.4): capacity, size_max, seg_max, geometry, blk_size,
        # topology (4 bytes), writeback, unused, num_queues, then zeroed discard/zeroes fields.
        return (struct.pack("<QIIHBBI", len(self.data) // 512, 0, 126, 0, 0, 0, 512) + bytes(10)
                + struct.pack("<H", self.num_queues) + bytes(24))

    def process(self, queue: vu.backend.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
        for chain in chains:
            rtype, _, sector = struct.unpack("<IIQ", chain.read(16))
            status, written = VIRTIO_BLK_S_OK, 0
            start = sector * 512
            if rtype == VIRTIO_BLK_T_IN:
                n = chain.writable_len - 1
                if start + n > len(self.data):
                    status = VIRTIO_BLK_S_IOERR
                else:
                    written = chain.write(bytes(self.data[start:start + n]))
            elif rtype == VIRTIO_BLK_T_OUT:
                payload = chain.read()[16:]
                if self.read_only or start + len(payload) > len(self.data):
                    status = VIRTIO_BLK_S_IOERR
                else:
                    self.data[start:start + len(payload)] = payload
            elif rtype == VIRTIO_BLK_T_GET_ID:
                written = chain.write(self.serial.ljust(20, b"\0"))
            elif rtype != VIRTIO_BLK_T_FLUSH:
                status = VIRTIO_BLK_S_UNSUPP
            chain.write(bytes([status]), chain.writable_len - 1)
            queue.complete(chain, written + 1)


class ArgvBlock(RamBlock):
    """The same disk, configured from a command line of its own (``from_args``)."""

    @classmethod
    def from_args(cls, argv: Sequence[str], *, read_only: bool = False) -> ArgvBlock:
        parser = argparse.ArgumentParser(prog="ArgvBlock")
        parser.add_argument("--size", default="1M")
        parser.add_argument("--queues", type=int, default=1)
        args = parser.parse_args(argv)
        return cls(args.size, num_queues=args.queues, read_only=read_only)


class NotADevice:
    """Not a vu.Device: ``serve`` refuses it."""


class Untyped(vu.Device):
    """A device that does not say its type: it serves, but has no capabilities to print."""

    def process(self, queue: vu.backend.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
        for chain in chains:
            queue.complete(chain, 0)


class Echo(vu.NetDevice):
    """A net device (its type comes from vu.NetDevice): frames go back where they came from."""

    def receive(self, queue_pair: int, frames: list[vu.net.Frame]) -> None:
        self.send(queue_pair, frames)
