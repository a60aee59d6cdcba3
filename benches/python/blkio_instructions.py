"""Instructions per I/O of the bench's Rust I/O loop (``frontend::blkio::run``, with everything it
calls), counted by callgrind: a cost measure that, unlike IOPS, does not move with the load of a
shared machine. The back-end (``serve-blk --poll-us 0`` on a temporary image) runs outside
valgrind; the loop runs with ``poll=0`` (no yielding window, whose instruction count would
follow the timing).

Run: ``python benches/python/blkio_instructions.py [--rw randrw] [--iodepth 1] [--time 3]``
(needs valgrind; about 30 s per run under valgrind).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys
from vhostuser_rs import _native
from vhostuser_rs.blk import BlockClient
sock, rw, depth, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
with BlockClient.connect(sock, queue_size=256, timeout=60) as disk:
    vq = disk.queues[0]
    r = _native.block_io(vq.queue, disk.memory, vq.kick_fd, vq.call_fd, rw=rw, bs=4096, iodepth=depth,
                         duration=secs, capacity=disk.capacity, poll=0.0)
    print("IOS", r["ios"], flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rw", default="randrw")
    parser.add_argument("--iodepth", type=int, default=1)
    parser.add_argument("--time", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vu-cg-") as work:
        image, sock, out = Path(work) / "d.img", Path(work) / "s.sock", Path(work) / "cg.out"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        backend = subprocess.Popen([sys.executable, "-m", "vhostuser_rs", "serve-blk", str(image), "--socket-path",
                                    str(sock), "--poll-us", "0"])
        try:
            while not sock.exists():
                time.sleep(0.05)
            r = subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=no",
                 # The binding's entry point (called through a function pointer, so never
                 # inlined): a release build may inline frontend::blkio::run or the binding
                 # into their callers, and a toggle on an inlined function collects nothing.
                 "--toggle-collect=vhostuser_rs::python::frontend::__pyfunction_block_io",
                 sys.executable, "-c", CHILD, str(sock), args.rw, str(args.iodepth), str(args.time)],
                capture_output=True, text=True, check=True, env=dict(os.environ),
            )
        finally:
            backend.terminate()
            backend.wait()
    ios = int(re.search(r"^IOS (\d+)", r.stdout, re.M).group(1))  # type: ignore[union-attr]
    ir = int(re.search(r"Collected : (\d+)", r.stderr).group(1))  # type: ignore[union-attr]
    if ir == 0:
        raise SystemExit("callgrind collected nothing: the toggle's function name no longer matches the build")
    print(f"{args.rw} iodepth={args.iodepth}: {ios} I/Os, {ir} instructions, {ir / ios:.0f} per I/O")


if __name__ == "__main__":
    main()
