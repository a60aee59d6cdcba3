"""What the end-to-end benchmark scripts share: where the two processes run, and how much CPU a
process used.

On VMs (these machines: 2 vCPUs, haltpoll with no guest polling) waking a process on an idle
vCPU costs ~20 us, on the same vCPU a context switch (~2 us): a C eventfd ping-pong between two
processes does 24 K round trips/s across vCPUs and 279 K on one. So the placement decides
iodepth-1 results more than any code does, and every case runs in each placement.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")

#: name → (back-end CPUs, front-end CPUs); None = the scheduler's choice.
PLACEMENTS: dict[str, tuple[set[int] | None, set[int] | None]] = {
    "free": (None, None),
    "spread": ({0}, {1}),
    "shared": ({0}, {0}),
}


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    """A `preexec_fn` that pins the child to `cpus` (every thread it starts inherits it)."""
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def cpu_seconds(pid: int) -> float:
    """user+sys of a process and all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def qsd_export(qsd: str, image: Path, sock: Path) -> list[str]:
    """qemu-storage-daemon exporting `image` as a writable one-queue vhost-user-blk on `sock`."""
    return [
        qsd, "--blockdev", f"driver=file,node-name=file0,filename={image}", "--blockdev",
        "driver=raw,node-name=disk0,file=file0", "--export",
        f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},writable=on,num-queues=1",
    ]


def bench_once(backend: list[str], sock: Path, bench_args: list[str], seconds: float,
               be_cpus: set[int] | None, fe_cpus: set[int] | None) -> dict[str, Any]:
    """Start a fresh `backend` serving `sock`, run `vhostuser-rs bench --json` against it for
    `seconds`, stop the back-end; the bench's JSON plus the back-end's CPU per I/O."""
    sock.unlink(missing_ok=True)
    be = subprocess.Popen(backend, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pinned(be_cpus))
    try:
        while not sock.exists():
            time.sleep(0.01)
        c0 = cpu_seconds(be.pid)
        out = subprocess.run(
            [sys.executable, "-m", "vhostuser_rs", "bench", "--socket", str(sock), "--time", str(seconds), "--json",
             *bench_args],
            capture_output=True, text=True, check=True, timeout=seconds + 30, preexec_fn=pinned(fe_cpus),
        )
        c1 = cpu_seconds(be.pid)
    finally:
        be.terminate()
        be.wait()
    doc: dict[str, Any] = json.loads(out.stdout)
    doc["backend_cpu_us_per_io"] = (c1 - c0) / doc["ios"] * 1e6
    return doc


def summary(docs: list[dict[str, Any]]) -> str:
    """Medians of the runs of one case: IOPS (min..max), p50, CPU per I/O of both sides."""
    iops = [d["iops"] for d in docs]
    return (
        f"{statistics.median(iops):>9,.0f} IOPS ({min(iops):,.0f}..{max(iops):,.0f})"
        f"  p50 {statistics.median(d['p50_us'] for d in docs):6.1f} us"
        f"  back-end CPU {statistics.median(d['backend_cpu_us_per_io'] for d in docs):5.2f} us/IO"
        f"  front-end CPU {statistics.median(d['cpu_us_per_io'] for d in docs):5.2f} us/IO"
    )
