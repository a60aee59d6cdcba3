"""What the end-to-end benchmark scripts share: where the two processes run, and how much CPU a
process used.

On VMs (these machines: 2 vCPUs, haltpoll with no guest polling) waking a process on an idle
vCPU costs ~20 us, on the same vCPU a context switch (~2 us): a C eventfd ping-pong between two
processes does 24 K round trips/s across vCPUs and 279 K on one. So the placement decides
iodepth-1 results more than any code does, and every case runs in each placement.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

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
