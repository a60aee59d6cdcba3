"""`vhostuser-rs bench` side by side with the plain-Python front-end (baseline_frontend.py)
against qemu-storage-daemon serving an image on tmpfs: 4 KiB random reads, 1 queue, iodepth 1
and 32, interleaved runs, medians.

Run: ``python benches/python/bench_frontend.py [--runs 5] [--time 10]`` (needs
qemu-storage-daemon: ``apt-get install qemu-system-common``).
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

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--placements", default="free,shared,spread", help=f"of {','.join(PLACEMENTS)}")
    p.add_argument("--time", type=float, default=10.0)
    p.add_argument("--iodepths", default="1,32")
    a = p.parse_args()
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        sys.exit("qemu-storage-daemon not found (apt-get install qemu-system-common)")
    work = Path(tempfile.mkdtemp(prefix="vu-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    image, sock = work / "disk.img", work / "qsd.sock"
    with open(image, "wb") as f:
        f.truncate(256 << 20)

    def start_daemon(cpus: set[int] | None) -> subprocess.Popen[bytes]:
        # A fresh daemon per run: qemu-storage-daemon 7.2 can carry ring state from one session
        # into the next ("vu_panic: Virtqueue size exceeded" after a session with another ring
        # size), and a fresh process also keeps runs independent.
        sock.unlink(missing_ok=True)
        proc = subprocess.Popen(
            [qsd, "--blockdev", f"driver=file,node-name=file0,filename={image}", "--blockdev",
             "driver=raw,node-name=disk0,file=file0", "--export",
             f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},writable=on,num-queues=1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pinned(cpus),
        )
        while not sock.exists():
            time.sleep(0.01)
        return proc

    def commands(depth: int) -> list[tuple[str, list[str]]]:
        return [
            ("vhostuser-rs", [sys.executable, "-m", "vhostuser_rs", "bench", "--socket", str(sock),
                              "--iodepth", str(depth), "--time", str(a.time), "--json"]),
            ("plain Python", [sys.executable, str(HERE / "baseline_frontend.py"), str(sock),
                              "--iodepth", str(depth), "--time", str(a.time)]),
        ]

    try:
        results: dict[tuple[str, int, str], list[dict[str, float]]] = {}
        failures: dict[tuple[str, int, str], int] = {}
        for _ in range(a.runs):
            for place in a.placements.split(","):
                be_cpus, fe_cpus = PLACEMENTS[place]
                for depth in (int(d) for d in a.iodepths.split(",")):
                    for name, cmd in commands(depth):
                        key = (place, depth, name)
                        daemon = start_daemon(be_cpus)
                        try:
                            d0 = cpu_seconds(daemon.pid)
                            try:
                                out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                                     timeout=a.time + 20, preexec_fn=pinned(fe_cpus))
                            except subprocess.TimeoutExpired:
                                # Seen with the plain-Python baseline only: the daemon stops
                                # answering ("vu_panic: Virtqueue size exceeded"); counted as hung.
                                failures[key] = failures.get(key, 0) + 1
                                continue
                            d1 = cpu_seconds(daemon.pid)
                        finally:
                            daemon.terminate()
                            daemon.wait()
                        doc = json.loads(out.stdout)
                        doc["daemon_cpu_us_per_io"] = (d1 - d0) / doc["ios"] * 1e6
                        results.setdefault(key, []).append(doc)
        print(f"4 KiB randread, 1 queue, {a.time:g} s runs, median of {a.runs} (min..max)")
        for (place, depth, name), docs in sorted(results.items()):
            iops = [d["iops"] for d in docs]
            cpu = [d["cpu_us_per_io"] for d in docs]
            dcpu = [d["daemon_cpu_us_per_io"] for d in docs]
            p50 = [d.get("p50_us", 0.0) for d in docs]
            print(f"  {place:<6} iodepth {depth:>2} {name:<13} {statistics.median(iops):>9,.0f} IOPS"
                  f" ({min(iops):,.0f}..{max(iops):,.0f})  p50 {statistics.median(p50):6.1f} us"
                  f"  front-end CPU {statistics.median(cpu):5.2f} us/IO  daemon CPU {statistics.median(dcpu):5.2f} us/IO"
                  f"  runs {len(docs)}, hung {failures.get((place, depth, name), 0)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
