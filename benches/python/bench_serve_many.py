"""Many devices in one process: `serve-blk --export IMAGE,SOCKET` x N with `--workers 2`, one
`vhostuser-rs bench` front-end per device (4 KiB random read, iodepth 32, 1 queue) running at the
same time; aggregate IOPS against one device alone in the same run, the back-end's thread count
and its memory per device (RSS with every front-end connected, minus RSS before any connected,
divided by N). Images on tmpfs, runs interleaved, medians.

Run: ``python benches/python/bench_serve_many.py [--devices 8] [--runs 5] [--time 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def one_run(work: Path, n: int, seconds: float) -> dict[str, float]:
    socks = [work / f"s{k}.sock" for k in range(n)]
    args = [sys.executable, "-m", "vhostuser_rs", "serve-blk", "--workers", "2"]
    for k, sock in enumerate(socks):
        args += ["--export", f"{work / f'disk{k}.img'},{sock}"]
    be = subprocess.Popen(args)
    try:
        while not all(s.exists() for s in socks):
            time.sleep(0.02)
        rss0 = rss_kib(be.pid)
        fes = [
            subprocess.Popen([sys.executable, "-m", "vhostuser_rs", "bench", "--socket", str(s), "--rw", "randread",
                              "--iodepth", "32", "--time", str(seconds), "--json"], stdout=subprocess.PIPE, text=True)
            for s in socks
        ]
        time.sleep(min(1.0, seconds / 2))
        rss1 = rss_kib(be.pid)
        threads = sum(1 for t in os.listdir(f"/proc/{be.pid}/task")
                      if Path(f"/proc/{be.pid}/task/{t}/comm").read_text().startswith("vhost-user work"))
        ends: list[float] = [0.0] * n
        outs: list[str] = [""] * n

        def wait(k: int) -> None:
            outs[k] = fes[k].communicate(timeout=seconds + 60)[0]
            ends[k] = time.monotonic()

        waiters = [threading.Thread(target=wait, args=(k,)) for k in range(n)]
        for w in waiters:
            w.start()
        for w in waiters:
            w.join()
        docs = [json.loads(o) for o in outs]
    finally:
        be.send_signal(signal.SIGTERM)
        be.wait(20)
    # The front-ends start a little apart: the aggregate is every I/O over the whole window from
    # the first start to the last end (a lower bound of the rate while all of them ran).
    window = max(ends) - min(e - d["elapsed_s"] for e, d in zip(ends, docs))
    total = sum(d["iops"] * d["elapsed_s"] for d in docs)
    return {"iops": total / window, "threads": threads, "rss_per_device_kib": (rss1 - rss0) / n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--time", type=float, default=3.0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vu-many-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        work = Path(d)
        for k in range(a.devices):
            with open(work / f"disk{k}.img", "wb") as f:
                f.truncate(64 << 20)
        results: dict[int, list[dict[str, float]]] = {1: [], a.devices: []}
        for run in range(a.runs):
            for n in results:
                r = one_run(work, n, a.time)
                results[n].append(r)
                print(f"run {run} devices {n}: {r['iops']:,.0f} IOPS aggregate, {r['threads']} worker threads, "
                      f"{r['rss_per_device_kib']:.0f} KiB RSS per device", flush=True)
    one = statistics.median(r["iops"] for r in results[1])
    for n, runs in results.items():
        iops = statistics.median(r["iops"] for r in runs)
        print(f"devices {n}: median {iops:,.0f} IOPS aggregate ({min(r['iops'] for r in runs):,.0f}.."
              f"{max(r['iops'] for r in runs):,.0f}), {iops / one:.2f}x one device, worker threads "
              f"{max(r['threads'] for r in runs)}, RSS per device {statistics.median(r['rss_per_device_kib'] for r in runs):.0f} KiB")


if __name__ == "__main__":
    main()
