"""The built-in back-end (`vhostuser-rs serve-blk`: its default, preadv/pwritev on an image file
with adaptive polling; the same with io_uring forced; preadv/pwritev in eventfd mode, the old
default) side by side with
qemu-storage-daemon, both
serving an image on tmpfs, driven by `vhostuser-rs bench`: 4 KiB random read and write, iodepth
1 and 32, 1 queue, each process placement of PLACEMENTS, a fresh back-end per run, interleaved
runs, medians.

Run: ``python benches/python/bench_backends.py [--runs 5] [--time 2]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from placement import PLACEMENTS, bench_once, qsd_export, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--placements", default="free,shared,spread", help=f"of {','.join(PLACEMENTS)}")
    p.add_argument("--time", type=float, default=2.0)
    p.add_argument("--only", help="comma-separated back-end names to run (default: all)")
    p.add_argument("--python-devices", action="store_true",
                   help="also the null device written in Python (benches/python/null_device.py), both modes")
    a = p.parse_args()
    qsd = shutil.which("qemu-storage-daemon")
    work = Path(tempfile.mkdtemp(prefix="vu-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    image, sock = work / "disk.img", work / "be.sock"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    backends = {"serve-blk": [sys.executable, "-m", "vhostuser_rs", "serve-blk", str(image), "--socket-path", str(sock)]}
    # The default is io_uring with adaptive polling; the old default (preadv/pwritev, eventfd
    # mode) and a fixed 50 us window run beside it.
    backends["serve-blk --io-engine sync --poll-us 0"] = backends["serve-blk"] + ["--io-engine", "sync", "--poll-us", "0"]
    backends["serve-blk --io-engine uring"] = backends["serve-blk"] + ["--io-engine", "uring"]
    null = str(Path(__file__).resolve().parent / "null_device.py")
    if a.python_devices:
        backends["python null, batch"] = [sys.executable, null, str(sock)]
        backends["python null, per-request"] = [sys.executable, null, str(sock), "--per-request"]
    if qsd:
        backends["qemu-storage-daemon"] = qsd_export(qsd, image, sock)
    if a.only:
        backends = {k: v for k, v in backends.items() if k in a.only.split(",")}
    results: dict[tuple[str, str, int, str], list[dict[str, float]]] = {}
    try:
        for _ in range(a.runs):
            for place in a.placements.split(","):
                be_cpus, fe_cpus = PLACEMENTS[place]
                for rw in ("randread", "randwrite"):
                    for depth in (1, 32):
                        for name, cmd in backends.items():
                            if name.startswith("python") and rw != "randread":
                                continue  # a null device: reads and writes cost the same
                            doc = bench_once(cmd, sock, ["--rw", rw, "--iodepth", str(depth)], a.time,
                                             be_cpus, fe_cpus)
                            results.setdefault((place, rw, depth, name), []).append(doc)
        print(f"4 KiB, 1 queue, {a.time:g} s runs, median of {a.runs} (min..max)")
        for (place, rw, depth, name), docs in sorted(results.items()):
            print(f"  {place:<6} {rw:<9} iodepth {depth:>2} {name:<20} {summary(docs)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
