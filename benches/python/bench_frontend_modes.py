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
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from placement import PLACEMENTS, cpu_seconds, pinned

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
        backends["qemu-storage-daemon"] = [
            qsd, "--blockdev", f"driver=file,node-name=file0,filename={image}", "--blockdev",
            "driver=raw,node-name=disk0,file=file0", "--export",
            f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},writable=on,num-queues=1",
        ]
    be_cpus, fe_cpus = PLACEMENTS["spread"]
    results: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    try:
        for _ in range(a.runs):
            for depth in map(int, a.depths.split(",")):
                for name, cmd in backends.items():
                    for variant, extra in VARIANTS.items():
                        if variant == "--packed" and name == "qemu-storage-daemon":
                            continue  # split rings only (libvhost-user)
                        sock.unlink(missing_ok=True)
                        be = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                              preexec_fn=pinned(be_cpus))
                        try:
                            while not sock.exists():
                                time.sleep(0.01)
                            c0 = cpu_seconds(be.pid)
                            out = subprocess.run(
                                [sys.executable, "-m", "vhostuser_rs", "bench", "--socket", str(sock), "--rw",
                                 "randread", "--iodepth", str(depth), "--time", str(a.time), "--json", *extra],
                                capture_output=True, text=True, check=True, timeout=a.time + 30,
                                preexec_fn=pinned(fe_cpus),
                            )
                            c1 = cpu_seconds(be.pid)
                        finally:
                            be.terminate()
                            be.wait()
                        doc = json.loads(out.stdout)
                        doc["backend_cpu_us_per_io"] = (c1 - c0) / doc["ios"] * 1e6
                        results.setdefault((name, depth, variant), []).append(doc)
        print(f"4 KiB randread, 1 queue, spread, {a.time:g} s runs, median of {a.runs} (min..max)")
        for (name, depth, variant), docs in sorted(results.items()):
            iops = [d["iops"] for d in docs]
            print(
                f"  {name:<20} iodepth {depth:>2} {variant:<12} {statistics.median(iops):>11,.0f} IOPS"
                f" ({min(iops):,.0f}..{max(iops):,.0f})  p50 {statistics.median(d['p50_us'] for d in docs):6.1f} us"
                f"  back-end CPU {statistics.median(d['backend_cpu_us_per_io'] for d in docs):5.2f} us/IO"
                f"  front-end CPU {statistics.median(d['cpu_us_per_io'] for d in docs):5.2f} us/IO"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
