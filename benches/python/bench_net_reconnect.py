"""How long `NetClient(reconnect=)` takes to get back to work after its back-end restarts:
`vhostuser-rs serve-net --loopback` killed with SIGKILL and started again on the same socket,
and DPDK testpmd's net_vhost (macswap) quit and started again. Per restart: the time from the
new back-end listening to ``recv(timeout=0)`` returning on the new session (the reconnect:
connect, negotiate, hand the rings over, DRIVER_OK), and to the first frame sent afterwards
coming back; and how many frames the new back-end read again (TX is at least once).

Run: ``python benches/python/bench_net_reconnect.py [--restarts 10] [--dpdk-restarts 5]``
(uses the test suite's peer helpers in tests/python; testpmd from Debian's dpdk package).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "python"))

import dpdk  # noqa: E402
from netdriver import frame, swapped  # noqa: E402
from test_net_client import vhost_pmd  # noqa: E402

from vhostuser_rs.netclient import NetClient  # noqa: E402


def after_restart(nic: NetClient, seed: int, rec: list[float], first: list[float], extra: list[int]) -> None:
    """Called once the new back-end listens: `recv(timeout=0)` reconnects (appended to `rec`),
    then one frame is sent and waited for swapped (the time since the start to `first`, the
    frames that came back before it, read again by the new back-end, to `extra`)."""
    t0 = time.monotonic()
    nic.recv(timeout=0)
    rec.append(time.monotonic() - t0)
    f = frame(100, seed=seed)
    nic.send([f])
    got: list[bytes] = []
    while swapped(f) not in got:
        got += [x for _, x in nic.recv(timeout=5)]
    first.append(time.monotonic() - t0)
    extra.append(len(got) - 1)


def report(name: str, reconnect: list[float], first: list[float], extra: list[int]) -> None:
    print(f"{name}: reconnect {statistics.median(reconnect) * 1e3:.1f} ms median "
          f"({min(reconnect) * 1e3:.1f}..{max(reconnect) * 1e3:.1f}), first frame back "
          f"{statistics.median(first) * 1e3:.1f} ms median over {len(reconnect)} restarts; "
          f"frames read again per restart: {extra}")


def serve_net(work: Path, restarts: int) -> None:
    sock = work / "serve-net.sock"
    srv = dpdk.ServeNet(sock, work, ["--loopback"], name="s0")
    nic = NetClient.connect(sock, reconnect=20.0)
    rec, first, extra = [], [], []
    try:
        for i in range(restarts):
            srv.proc.send_signal(signal.SIGKILL)
            srv.proc.wait()
            srv = dpdk.ServeNet(sock, work, ["--loopback"], name=f"s{i + 1}")  # returns once listening
            after_restart(nic, i, rec, first, extra)
        assert nic.sessions == restarts + 1, nic.sessions
    finally:
        nic.close()
        srv.stop()
    report("serve-net --loopback", rec, first, extra)


def testpmd(work: Path, restarts: int) -> None:
    sock = work / "vhost.sock"
    nic: NetClient | None = None
    rec, first, extra = [], [], []
    try:
        for i in range(restarts + 1):
            run = work / f"testpmd{i}"
            run.mkdir()
            with vhost_pmd(sock, run, "macswap") as pmd:
                if nic is None:
                    nic = NetClient.connect(sock, reconnect=30.0)
                    dpdk.wait_ready(pmd)
                    continue
                after_restart(nic, i, rec, first, extra)
    finally:
        if nic is not None:
            nic.close()
    report("DPDK testpmd net_vhost", rec, first, extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--restarts", type=int, default=10, help="serve-net restarts")
    ap.add_argument("--dpdk-restarts", type=int, default=5, help="testpmd restarts (0: skip)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vu-reconnect-") as d:
        serve_net(Path(d), a.restarts)
        if a.dpdk_restarts:
            testpmd(Path(d), a.dpdk_restarts)


if __name__ == "__main__":
    main()
