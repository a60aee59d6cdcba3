"""virtio-net back-ends side by side, driven by DPDK testpmd's virtio_user (txonly, 64-byte
frames, 1 queue pair): testpmd's own net_vhost (rxonly, the reference), `vhostuser-rs serve-net
--loopback` polling and in eventfd mode, optionally serve-net bridged to a TAP and a counting
device written in Python (benches/python/net_device.py); a fresh back-end per run, interleaved
runs, medians.

Placement (2 CPUs): testpmd's forwarding lcore on CPU 0 (its main lcore, the prompt, on CPU 1),
the back-end's worker on CPU 1 (`--cpus 1`, net_vhost's forwarding lcore); other
threads (serve-net's accept loop, DPDK's control threads) where the scheduler puts them.

Figures: testpmd Mpps = frames testpmd's TX queue took over the measured interval (after a
warm-up); back-end Mpps = the back-end's own total of frames taken from the driver (serve-net's
`tx_frames`, net_vhost's RX-packets) over the whole forwarding time; testpmd drops = frames its
txonly burst could not enqueue because the ring was full (the back-end was the slower side);
others' CPU = CPU time of every other process during the interval (100% = one CPU): on a 2-CPU
machine any of it comes out of the two processes measured, so compare runs where it is ~0.

Run: ``python benches/python/bench_net.py [--runs 5] [--time 3] [--tap] [--python-devices]`` as
root (the TAP case creates and deletes a TAP). Needs dpdk-testpmd (``apt-get install dpdk-dev
librte-net-vhost23 librte-net-virtio23``) and the installed package. Writes what it prints, with
every run's raw figures, to benches/results/DATE-bench_net.txt (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from placement import TICK, cpu_seconds

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tests" / "python"))
import dpdk  # noqa: E402  (the testpmd helper the tests use)

FE_CPU, BE_CPU = 0, 1


@dataclass
class Backend:
    """A running back-end: its pid (for CPU time) and a way to read its frame total at the end."""

    pid: int
    frames: Callable[[], int]
    ready: Callable[[], None] = lambda: None


@contextmanager
def reference(sock: Path, work: Path) -> Iterator[Backend]:
    with dpdk.net_vhost(sock, work, main_cpu=FE_CPU, fwd_cpu=BE_CPU) as pmd:
        pmd.set_fwd("rxonly")
        pmd.start()
        yield Backend(pmd.proc.pid, lambda: pmd.port_stats(xstats=False).rx_packets, lambda: dpdk.wait_ready(pmd))


def serve_net(*args: str) -> Callable[[Path, Path], AbstractContextManager[Backend]]:
    @contextmanager
    def run(sock: Path, work: Path) -> Iterator[Backend]:
        with dpdk.serve_net(sock, work, [*args, "--cpus", str(BE_CPU)]) as server:
            yield Backend(server.proc.pid, lambda: server.counters().tx_frames)

    return run


def python_device(kind: str, *args: str) -> Callable[[Path, Path], AbstractContextManager[Backend]]:
    """benches/python/net_device.py: a net device written in Python, counters line as serve-net's."""

    @contextmanager
    def run(sock: Path, work: Path) -> Iterator[Backend]:
        server = dpdk.ServeNet(sock, work, [], name=f"net_device-{kind}",
                               command=[sys.executable, str(HERE / "net_device.py"), str(sock), kind,
                                        "--cpus", str(BE_CPU), *args])
        try:
            yield Backend(server.proc.pid, lambda: server.counters().tx_frames)
        finally:
            server.stop()
            sock.unlink(missing_ok=True)

    return run


def serve_net_tap(name: str) -> Callable[[Path, Path], AbstractContextManager[Backend]]:
    @contextmanager
    def run(sock: Path, work: Path) -> Iterator[Backend]:
        subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True, capture_output=True)
        try:
            subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
            with serve_net("--tap", name)(sock, work) as backend:
                yield backend
        finally:
            subprocess.run(["ip", "link", "del", name], capture_output=True)

    return run


def busy_seconds() -> float:
    """CPU time spent by everything on the machine (all CPUs) so far, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / TICK


def one_run(backend: Callable[[Path, Path], AbstractContextManager[Backend]], work: Path, seconds: float,
            warmup: float) -> dict[str, float]:
    sock = work / "net.sock"
    with backend(sock, work) as be, dpdk.virtio_user(sock, work, fwd_cpu=FE_CPU, main_cpu=BE_CPU) as fe:
        be.ready()
        fe.set_fwd("txonly")
        t_start = time.monotonic()
        fe.start()
        try:
            time.sleep(warmup)
            before, t0 = fe.port_stats(xstats=False), time.monotonic()
            c0, f0, b0 = cpu_seconds(be.pid), cpu_seconds(fe.proc.pid), busy_seconds()
            time.sleep(seconds)
            after, t1 = fe.port_stats(xstats=False), time.monotonic()
            c1, f1, b1 = cpu_seconds(be.pid), cpu_seconds(fe.proc.pid), busy_seconds()
        finally:
            forward_stats = fe.stop()
        t_stop = time.monotonic()
        total = fe.port_stats(xstats=False).tx_packets
        time.sleep(0.2)  # the back-end takes what is still on the ring
        frames = be.frames()
    m = re.search(r"TX-dropped:\s+(\d+)", forward_stats)
    dropped = int(m.group(1)) if m else -1
    return {
        "testpmd_mpps": (after.tx_packets - before.tx_packets) / (t1 - t0) / 1e6,
        "backend_mpps": frames / (t_stop - t_start) / 1e6,
        "testpmd_total": total,
        "backend_total": frames,
        "testpmd_dropped": dropped,
        "backend_cpu": (c1 - c0) / (t1 - t0),
        # CPU time of everything but testpmd and the back-end: other load skews the figures
        "others_cpu": max(0.0, (b1 - b0) - (c1 - c0) - (f1 - f0)) / (t1 - t0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--time", type=float, default=3.0, help="measured seconds per run (after --warmup)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--only", help="comma-separated case names to run (default: all)")
    p.add_argument("--tap", action="store_true", help="also serve-net --tap (root: creates a TAP)")
    p.add_argument("--python-devices", action="store_true",
                   help="also the counting net device written in Python (benches/python/net_device.py count)")
    p.add_argument("--out", type=Path, help="results file (default benches/results/DATE-bench_net.txt)")
    a = p.parse_args()
    if dpdk.TESTPMD is None:
        sys.exit(f"dpdk-testpmd not found ({dpdk.INSTALL_HINT})")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs 2 CPUs (testpmd's forwarding lcore and the back-end's worker apart)")
    cases: dict[str, Callable[[Path, Path], AbstractContextManager[Backend]]] = {
        "testpmd net_vhost rxonly": reference,
        "serve-net --loopback --poll-us 50": serve_net("--loopback", "--poll-us", "50"),
        "serve-net --loopback": serve_net("--loopback"),
    }
    if a.tap:
        cases["serve-net --tap"] = serve_net_tap(f"vubench{os.getpid() % 100000}")
    if a.python_devices:
        cases["python count --poll-us 50"] = python_device("count", "--poll-us", "50")
        cases["python count"] = python_device("count")
    if a.only:
        cases = {k: v for k, v in cases.items() if k in a.only.split(",")}
    out = a.out or HERE.parent / "results" / f"{datetime.date.today()}-bench_net.txt"
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"$ python benches/python/bench_net.py {' '.join(sys.argv[1:])}")
    say(f"testpmd virtio_user txonly, 64-byte frames, burst 32, 1 queue pair, ring 256; {a.warmup:g} s warm-up + "
        f"{a.time:g} s measured; median of {a.runs} (min..max)")
    say(f"placement: testpmd forwarding lcore CPU {FE_CPU} (main lcore CPU {BE_CPU}); back-end worker CPU {BE_CPU} "
        f"(serve-net --cpus {BE_CPU}; net_vhost forwarding lcore {BE_CPU}, main lcore {FE_CPU})")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    work = Path(tempfile.mkdtemp(prefix="vu-bench-net-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    try:
        say("raw runs:")
        for i in range(a.runs):
            for name, backend in cases.items():
                r = one_run(backend, work, a.time, a.warmup)
                results[name].append(r)
                say(f"  run {i + 1} {name:<34} testpmd {r['testpmd_mpps']:6.2f} Mpps  back-end {r['backend_mpps']:6.2f} Mpps"
                    f"  totals testpmd {r['testpmd_total']:.0f} back-end {r['backend_total']:.0f}"
                    f"  testpmd drops {r['testpmd_dropped']:.0f}  back-end CPU {100 * r['backend_cpu']:.0f}%"
                    f"  others' CPU {100 * r['others_cpu']:.0f}%")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say("medians:")
    for name, runs in results.items():
        if not runs:
            continue

        def med(key: str, runs: list[dict[str, float]] = runs) -> str:
            xs = [r[key] for r in runs]
            return f"{statistics.median(xs):6.2f} ({min(xs):.2f}..{max(xs):.2f})"

        mismatch = sum(r["testpmd_total"] != r["backend_total"] for r in runs)
        say(f"  {name:<34} testpmd {med('testpmd_mpps')} Mpps  back-end {med('backend_mpps')} Mpps"
            f"  back-end CPU {100 * statistics.median(r['backend_cpu'] for r in runs):.0f}%"
            f"  others' CPU {100 * statistics.median(r['others_cpu'] for r in runs):.0f}%"
            + (f"  TOTALS DIFFER in {mismatch} of {len(runs)} runs" if mismatch else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
