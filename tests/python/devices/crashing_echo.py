"""A one-queue device for the inflight tests: each request's readable bytes are a tag and a
command; the device writes the tag back. Command ``X`` makes the process die on the spot
(``os._exit``), before anything of that batch is completed, when started with ``--crash``.

Run: ``python crashing_echo.py SOCKET [--crash]``.
"""

from __future__ import annotations

import os
import sys

import vhostuser_rs as vu


class CrashingEcho(vu.Device):
    num_queues = 1
    features = int(vu.VirtioFeature.VERSION_1)

    def __init__(self, crash: bool) -> None:
        self.crash = crash

    def process(self, queue: vu.backend.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
        for chain in chains:
            data = chain.read()
            if self.crash and data.endswith(b"X"):
                os._exit(3)
            queue.complete(chain, chain.write(data[:-1]))


if __name__ == "__main__":
    vu.Backend.listen(sys.argv[1], CrashingEcho("--crash" in sys.argv)).serve_forever()
