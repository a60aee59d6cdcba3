"""A null virtio-blk device written in Python (reads return whatever is in the buffer), served
on a socket: the Python-device figure of `vhostuser-rs bench`.

Run: ``python benches/python/null_device.py SOCKET [--per-request]`` then
``vhostuser-rs bench --socket SOCKET --iodepth 32``. ``--per-request`` serves the same device
through ``process_request`` (one Python call per request) instead of ``process`` (one per
batch).
"""

from __future__ import annotations

import struct
import sys

import vhostuser_rs as vu

CAPACITY = 1 << 21  # sectors: 1 GiB


class NullBlock(vu.Device):
    num_queues = 1
    features = int(vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.EVENT_IDX)

    def config(self) -> bytes:
        return struct.pack("<QIIHBBI", CAPACITY, 0, 126, 0, 0, 0, 512) + bytes(36)

    def process(self, queue: vu.backend.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
        complete = queue.complete
        for chain in chains:
            n = chain.writable_len
            chain.write(b"\0", n - 1)  # status OK
            complete(chain, n)


class NullBlockPerRequest(vu.Device):
    num_queues = 1
    features = int(vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.EVENT_IDX)
    config = NullBlock.config

    def process_request(self, queue_index: int, chain: vu.DescriptorChain) -> int:
        n = chain.writable_len
        chain.write(b"\0", n - 1)  # status OK
        return n


if __name__ == "__main__":
    device = NullBlockPerRequest() if "--per-request" in sys.argv else NullBlock()
    try:
        vu.Backend.listen(sys.argv[1], device).serve_forever()
    except KeyboardInterrupt:
        pass
