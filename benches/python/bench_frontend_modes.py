"""The front-end's ring options side by side, against `vhostuser-rs serve-blk` (defaults) and
qemu-storage-daemon, 4 KiB randread, 1 queue, spread placement (back-end on CPU 0, front-end
on CPU 1), a fresh back-end per run, variants interleaved run by run:

- ``default``: `vhostuser-rs bench` as it is — at iodepth > 4 it polls or sleeps by whichever
  costs its thread less CPU per completion (`src/frontend/poll.rs`);
- ``--poll-us 0``: never polls at depth (the default before AdaptivePoll);
- ``--packed``: packed rings (VIRTIO_F_RING_PACKED; qemu-storage-daemon 7.2 does not offer them).

Reported: IOPS, p50 latency, back-end and front-end CPU per I/O, medians of the runs.

Run: ``python benches/python/bench_frontend_modes.py [--runs 5] [--time 2]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from placement import PLACEMENTS, bench_once, qsd_export, summary

VARIANTS = {"default": [], "--poll-us 0": ["--poll-us", "0"], "--packed": ["--packed"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--time", type=float, default=2.0)
    p.add_argument("--depths", default="1,32")
    a = p.parse_args()
    qsd = shutil.which("qemu-storage-daemon")
    work = Path(tempfile.mkdtemp(prefix="vu-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    image, sock = work / "disk.img", work / "be.sock"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    backends = {"serve-blk": [sys.executable, "-m", "vhostuser_rs", "serve-blk", str(image), "--socket-path", str(sock)]}
    if qsd:
        backends["qemu-storage-daemon"] = qsd_export(qsd, image, sock)
    be_cpus, fe_cpus = PLACEMENTS["spread"]
    results: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    try:
        for _ in range(a.runs):
            for depth in map(int, a.depths.split(",")):
                for name, cmd in backends.items():
                    for variant, extra in VARIANTS.items():
                        if variant == "--packed" and name == "qemu-storage-daemon":
                            continue  # split rings only (libvhost-user)
                        doc = bench_once(cmd, sock, ["--rw", "randread", "--iodepth", str(depth), *extra], a.time,
                                         be_cpus, fe_cpus)
                        results.setdefault((name, depth, variant), []).append(doc)
        print(f"4 KiB randread, 1 queue, spread, {a.time:g} s runs, median of {a.runs} (min..max)")
        for (name, depth, variant), docs in sorted(results.items()):
            print(f"  {name:<20} iodepth {depth:>2} {variant:<12} {summary(docs)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
