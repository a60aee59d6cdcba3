"""A minimal virtio-net driver over our front-end, for tests of the net back-ends: post RX
buffers, transmit frames, reap what comes back, send control-queue commands. It knows where each
of its buffers is, so what the device wrote is checked byte for byte."""

from __future__ import annotations

import os
import select
import struct
import time
from pathlib import Path

import vhostuser_rs as vu
from vhostuser_rs.net import VIRTIO_NET, NetFeature

HDR = 12


class NetDriver:
    """Negotiates a virtio-net device on `sock` and sets up `pairs` queue pairs (and the
    control queue when CTRL_VQ is negotiated)."""

    def __init__(self, sock: Path | str, *, pairs: int = 1, features: int | None = None, queue_size: int = 256,
                 memory: int = 64 << 20) -> None:
        self.fe = vu.Frontend.connect(sock, timeout=5.0)
        try:
            self.mem = vu.GuestMemory.allocate(memory)
            result = self.fe.negotiate(memory=self.mem, features=features)
            self.features = int(result.features)
            self.queue_num = result.num_queues
            self.rx = [self.fe.setup_queue(2 * p, queue_size) for p in range(pairs)]
            self.tx = [self.fe.setup_queue(2 * p + 1, queue_size) for p in range(pairs)]
            self.ctrl = None
            if self.features & NetFeature.CTRL_VQ:
                # The control queue is the last ring of the device (after all its pairs).
                self.ctrl = self.fe.setup_queue(2 * result.num_queues, 64)
        except BaseException:
            self.fe.close()
            raise
        self.buffers: dict[tuple[int, int], tuple[int, int]] = {}

    def close(self) -> None:
        for vq in [*self.rx, *self.tx, *([self.ctrl] if self.ctrl else [])]:
            vq.close()
        self.fe.close()

    def __enter__(self) -> NetDriver:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def post_rx(self, n: int, size: int = 2048, pair: int = 0) -> None:
        """Makes `n` receive buffers of `size` bytes available."""
        vq = self.rx[pair]
        for _ in range(n):
            addr = self.mem.alloc(size, 64)
            head = vq.queue.add([], [(addr, size)])
            self.buffers[(pair, head)] = (addr, size)
        vq.queue.publish()
        vq.kick()

    def transmit(self, frames: list[bytes], pair: int = 0, header: bytes = bytes(HDR),
                 writable: int = 0) -> list[int]:
        """Queues `frames` (each after `header`) and kicks; returns the heads."""
        vq = self.tx[pair]
        heads = []
        for f in frames:
            data = header + f
            addr = self.mem.alloc(max(len(data), 1), 64)
            self.mem.write(addr, data)
            extra = [(self.mem.alloc(writable, 64), writable)] if writable else []
            heads.append(vq.queue.add([(addr, len(data))] if data else [], extra))
        vq.queue.publish()
        vq.kick()
        return heads

    def reap_tx(self, n: int, pair: int = 0, timeout: float = 5.0) -> list[tuple[int, int]]:
        """Waits until `n` TX chains came back."""
        return _reap(self.tx[pair], n, timeout)

    def receive(self, n: int, pair: int = 0, timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
        """Waits for `n` received frames: (header, frame) each, merged buffers joined."""
        out: list[tuple[bytes, bytes]] = []
        pending: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            pending += _reap(self.rx[pair], 1, max(0.0, deadline - time.monotonic()))
            while pending:
                head, length = pending[0]
                addr, size = self.buffers[(pair, head)]
                assert length <= size
                first = self.mem.read(addr, length)
                num = struct.unpack_from("<H", first, 10)[0] if self.features & NetFeature.MRG_RXBUF else 1
                if len(pending) < num:
                    break
                data = first
                for head2, len2 in pending[1:num]:
                    addr2, _ = self.buffers[(pair, head2)]
                    data += self.mem.read(addr2, len2)
                del pending[:num]
                out.append((data[:HDR], data[HDR:]))
        return out

    def command(self, cls: int, cmd: int, data: bytes = b"", *, ack_room: int = 1) -> int | None:
        """Sends a control command; returns the ack byte (None if the device wrote nothing)."""
        assert self.ctrl is not None
        vq = self.ctrl
        out = self.mem.alloc(2 + len(data), 8)
        self.mem.write(out, bytes([cls, cmd]) + data)
        ack = self.mem.alloc(max(ack_room, 1), 8)
        self.mem.write(ack, b"\xee")
        vq.queue.add([(out, 2 + len(data))], [(ack, ack_room)] if ack_room else [])
        vq.queue.publish()
        vq.kick()
        (_, written), = _reap(vq, 1, 5.0)
        return self.mem.read(ack, 1)[0] if written else None


def _reap(vq: vu.Virtqueue, n: int, timeout: float) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        got += vq.queue.reap()
        if len(got) >= n:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"ring {vq.index}: {len(got)} of {n} used entries came back")
        ready, _, _ = select.select([vq.call_fd], [], [], min(left, 0.05))
        if ready:
            os.eventfd_read(vq.call_fd)
    return got


def frame(n: int, seed: int = 0, dst: bytes = b"\x02\0\0\0\0\x01", src: bytes = b"\x02\0\0\0\0\x02") -> bytes:
    """An Ethernet frame of `n` bytes with a recognisable payload."""
    body = bytes((seed + i) & 0xFF for i in range(n - 14))
    return dst + src + b"\x88\xb5" + body


def swapped(f: bytes) -> bytes:
    return f[6:12] + f[0:6] + f[12:]


CTRL = VIRTIO_NET
