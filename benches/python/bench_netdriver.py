"""The Rust driver loop against DPDK's own driver, side by side: `vhostuser-rs bench --device net`
and testpmd's `virtio_user` PMD, each driving a fresh testpmd `net_vhost` back-end (the
reference vhost-user switch), runs interleaved, medians.

Cases (64-byte frames, 1 queue pair, ring 256, burst `--burst`):
- `vhostuser-rs` txonly: `vhostuser-rs bench --device net --mode txonly --socket SOCK --json`
  (the Rust loop of NetClient.run_bench) on CPU 0;
- testpmd `virtio_user` txonly with its default `in_order=1` (it then negotiates
  VIRTIO_F_IN_ORDER, which our driver does not implement and so never acks) and with
  `in_order=0` (the same feature set as ours), forwarding lcore on CPU 0;
the back-end (net_vhost, rxonly) forwards on CPU 1, its prompt on CPU 0.

Figures: Mpps = frames the driver put on the TX ring over its measured interval (ours: its own
report over `--time`; testpmd: its port's TX-packets over the interval after a warm-up); CPU ns
per frame = CPU time of the driving thread / frames (testpmd's lcore busy-polls: one CPU);
back-end Mpps = net_vhost's RX-packets over the time it was forwarding (a cross-check).

Run: ``python benches/python/bench_netdriver.py [--runs 5] [--time 3] [--burst 32]`` (needs
dpdk-testpmd: ``apt-get install dpdk-dev librte-net-vhost23 librte-net-virtio23``, and the
installed package). Writes what it prints to benches/results/DATE-bench_netdriver.txt (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from placement import cpu_seconds

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tests" / "python"))
import dpdk  # noqa: E402  (the testpmd helper the tests use)

DRIVER_CPU, BACKEND_CPU = 0, 1


def ours(sock: Path, work: Path, seconds: float, burst: int) -> dict[str, float]:
    out = subprocess.run(
        ["vhostuser-rs", "bench", "--device", "net", "--mode", "txonly", "--socket", str(sock), "--time",
         str(seconds), "--burst", str(burst), "--cpus", str(DRIVER_CPU), "--json"],
        check=True, capture_output=True, text=True, timeout=seconds + 60,
    )
    doc = json.loads(out.stdout)
    return {"mpps": doc["mpps"], "cpu_ns": doc["cpu_ns_per_frame"], "frames": doc["frames"]}


def testpmd(in_order: bool) -> Callable[[Path, Path, float, int], dict[str, float]]:
    def run(sock: Path, work: Path, seconds: float, burst: int) -> dict[str, float]:
        with dpdk.virtio_user(sock, work, fwd_cpu=DRIVER_CPU, main_cpu=BACKEND_CPU, in_order=in_order,
                              burst=burst) as fe:
            fe.set_fwd("txonly")
            fe.start()
            time.sleep(0.5)
            before, t0, c0 = fe.port_stats(xstats=False), time.monotonic(), cpu_seconds(fe.proc.pid)
            time.sleep(seconds)
            after, t1, c1 = fe.port_stats(xstats=False), time.monotonic(), cpu_seconds(fe.proc.pid)
            fe.stop()
        frames = after.tx_packets - before.tx_packets
        # The forwarding lcore spins: its CPU is the interval; the rest of testpmd is idle.
        cpu = min(c1 - c0, t1 - t0)
        return {"mpps": frames / (t1 - t0) / 1e6, "cpu_ns": cpu / frames * 1e9 if frames else 0.0,
                "frames": frames}

    return run


CASES: dict[str, Callable[[Path, Path, float, int], dict[str, float]]] = {
    "vhostuser-rs bench txonly": ours,
    "testpmd virtio_user txonly (in_order=1, default)": testpmd(True),
    "testpmd virtio_user txonly (in_order=0)": testpmd(False),
}


def one_run(name: str, work: Path, seconds: float, burst: int) -> dict[str, float]:
    sock = work / "vhost.sock"
    with dpdk.net_vhost(sock, work, main_cpu=DRIVER_CPU, fwd_cpu=BACKEND_CPU) as be:
        be.set_fwd("rxonly")
        be.start()
        t0 = time.monotonic()
        r = CASES[name](sock, work, seconds, burst)
        time.sleep(0.2)
        be.stop()
        t1 = time.monotonic()
        s = be.port_stats(xstats=False)
    return {**r, "backend_rx": s.rx_packets, "backend_window_s": t1 - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--time", type=float, default=3.0)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--out", type=Path,
                    default=HERE.parent / "results" / f"{datetime.date.today()}-bench_netdriver.txt")
    a = ap.parse_args()
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"bench_netdriver: {a.runs} runs x {a.time} s, burst {a.burst}, 64-byte frames, 1 queue pair, ring 256; "
        f"driver on CPU {DRIVER_CPU}, net_vhost rxonly forwarding on CPU {BACKEND_CPU}")
    results: dict[str, list[dict[str, float]]] = {n: [] for n in CASES}
    with tempfile.TemporaryDirectory(prefix="bench_netdriver-") as tmp:
        for run in range(a.runs):
            for case, name in enumerate(CASES):
                work = Path(tmp) / f"{run}-{case}"
                work.mkdir()
                r = one_run(name, work, a.time, a.burst)
                results[name].append(r)
                say(f"run {run} {name}: {r['mpps']:.2f} Mpps, CPU {r['cpu_ns']:.1f} ns/frame, "
                    f"{r['frames']:.0f} frames; net_vhost received {r['backend_rx']:.0f}")
    say("medians:")
    ref = statistics.median(r["mpps"] for r in results["vhostuser-rs bench txonly"])
    for name, runs in results.items():
        mpps = statistics.median(r["mpps"] for r in runs)
        cpu = statistics.median(r["cpu_ns"] for r in runs)
        lo, hi = min(r["mpps"] for r in runs), max(r["mpps"] for r in runs)
        say(f"  {name}: {mpps:.2f} Mpps ({lo:.2f}..{hi:.2f}), CPU {cpu:.1f} ns/frame; "
            f"vhostuser-rs / this = {ref / mpps:.2f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
