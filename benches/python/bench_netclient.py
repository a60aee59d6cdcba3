"""What a Python tool pays to move frames with NetClient: a Python loop doing send/recv bursts
against ``serve-net --loopback --poll-us 50`` (its worker pinned to one CPU, this loop to the
other), at most ``--window`` frames in flight; and the round trip of one frame.

Run: ``python benches/python/bench_netclient.py [--runs 5] [--time 3] [--pktlen 64]``.
Prints each run and the median (Mpps received back, ns per frame of send + recv).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from vhostuser_rs.netclient import NetClient


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--time", type=float, default=3.0)
    ap.add_argument("--pktlen", type=int, default=64)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--cpu", type=int, default=0, help="CPU of this loop (the back-end gets the other)")
    a = ap.parse_args()
    os.sched_setaffinity(0, {a.cpu})
    backend_cpu = 1 - a.cpu if os.cpu_count() and os.cpu_count() > 1 else 0  # type: ignore[operator]
    work = Path(tempfile.mkdtemp())
    sock = work / "net.sock"
    srv = subprocess.Popen(["vhostuser-rs", "serve-net", "--socket-path", str(sock), "--loopback", "--poll-us", "50",
                            "--cpus", str(backend_cpu)], stderr=subprocess.PIPE)
    try:
        while not sock.exists():
            time.sleep(0.01)
        frame = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x88\xb5" + bytes(a.pktlen - 14)
        burst = [frame] * a.burst
        rates, rtts = [], []
        for run in range(a.runs):
            with NetClient.connect(sock) as nic:
                send, recv = nic.send, nic.recv
                sent = got = calls = 0
                t0 = time.perf_counter()
                end = t0 + a.time
                while True:
                    if sent - got <= a.window - a.burst:
                        sent += send(burst)
                    got += len(recv(max_frames=64, timeout=0))
                    calls += 1
                    if (calls & 63) == 0 and time.perf_counter() > end:
                        break
                elapsed = time.perf_counter() - t0
                c = nic.counters()
                rates.append(got / elapsed / 1e6)
                print(f"run {run}: {rates[-1]:.3f} Mpps received ({c['tx_frames']} sent, {c['rx_frames']} received, "
                      f"{c['rx_dropped']} dropped) in {elapsed:.2f} s", flush=True)
            with NetClient.connect(sock) as nic:
                lat = []
                for _ in range(2000):
                    t = time.perf_counter()
                    nic.send([frame])
                    assert len(nic.recv(timeout=1.0)) == 1
                    lat.append(time.perf_counter() - t)
                rtts.append(statistics.median(lat) * 1e6)
        m = statistics.median(rates)
        print(f"median of {a.runs}: {m:.3f} Mpps ({min(rates):.3f}..{max(rates):.3f}; {1e3 / m:.0f} ns per frame, "
              f"send+recv from Python, {a.pktlen}-byte frames, bursts of {a.burst}); one-frame round trip median "
              f"{statistics.median(rtts):.1f} us; loop on CPU {a.cpu}, serve-net worker on CPU {backend_cpu}")
    finally:
        srv.terminate()
        err = srv.communicate(timeout=10)[1].decode(errors="replace").strip()
        print(err.splitlines()[-1] if err else "")


if __name__ == "__main__":
    main()
