"""`vhostuser-rs bench --device net`: the Rust burst loop (NetClient.run_bench) against the
built-in `serve-net --loopback`, a LoopbackNet served in this process, and testpmd's net_vhost
generating traffic for rxonly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import dpdk
import pytest

from vhostuser_rs.devices import LoopbackNet
from vhostuser_rs.netclient import NetClient

from test_net_backend import serving

CPUS = sorted(os.sched_getaffinity(0))


def bench(*args: str, timeout: float = 30, seconds: float = 1) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "vhostuser_rs", "bench", "--device", "net", "--time", str(seconds), "--json", *args],
        capture_output=True, text=True, timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    assert doc["errors"] == 0 and doc["rx_dropped"] == 0
    assert 0.9 * seconds < doc["elapsed_s"] < seconds + 2, doc
    return doc


@pytest.mark.timeout(60)
def test_txonly_against_the_builtin_backend() -> None:
    doc = bench("--mode", "txonly")
    assert doc["backend"] == "built-in serve-net --loopback"
    assert doc["frames"] == doc["tx_frames"] > 0 and doc["tx_bytes"] == 64 * doc["tx_frames"]
    # Nothing was received (serve-net had no buffers of ours to fill while we never read: its
    # frames are dropped on its side, not counted here).
    assert doc["mpps"] > 0 and doc["cpu_ns_per_frame"] > 0
    assert 0 <= doc["in_flight"] <= 256


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pktlen", [64, 1500])
def test_loopback_gets_back_what_it_sent(pktlen: int) -> None:
    doc = bench("--mode", "loopback", "--pktlen", str(pktlen), "--burst", "16")
    assert doc["rx_frames"] > 0 and doc["frames"] == doc["rx_frames"]
    assert doc["rx_frames"] == doc["tx_frames"] - doc["in_flight"]
    assert doc["drops"] == doc["in_flight"] == 0, "serve-net finds RX buffers: the window is one RX ring"
    assert doc["rx_bytes"] == pktlen * doc["rx_frames"]


@pytest.mark.timeout(60)
def test_two_queue_pairs() -> None:
    doc = bench("--mode", "loopback", "--queue-pairs", "2", "--cpus", ",".join(map(str, CPUS)))
    assert doc["queue_pairs"] == 2 and doc["rx_frames"] == doc["tx_frames"] - doc["in_flight"] > 0


def test_rxonly_without_a_socket_is_refused() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vhostuser_rs", "bench", "--device", "net", "--mode", "rxonly", "--time", "1"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 2 and "rxonly needs --socket" in out.stderr


@pytest.mark.timeout(60)
def test_socket_against_loopbacknet_in_process(sock_dir: Path) -> None:
    dev = LoopbackNet()
    with serving(dev, sock_dir / "lo.sock") as sock:
        doc = bench("--socket", str(sock), "--mode", "loopback", "--poll-us", "0")
    assert doc["socket"] == str(sock) and "backend" not in doc
    assert doc["rx_frames"] == doc["tx_frames"] - doc["in_flight"] > 0
    assert doc["poll_us"] == 0


@pytest.mark.timeout(60)
def test_run_bench_method_and_busy_pair(sock_dir: Path) -> None:
    """One call runs the loop; send/recv on the pair are refused meanwhile; bad arguments raise."""
    dev = LoopbackNet()
    with serving(dev, sock_dir / "lo.sock") as sock, NetClient.connect(sock) as client:
        with pytest.raises(ValueError, match="mode"):
            client.run_bench("sideways", seconds=0.1)
        with pytest.raises(ValueError, match="pktlen"):
            client.run_bench("txonly", pktlen=10, seconds=0.1)
        seen: list[BaseException] = []

        def poke() -> None:
            import time

            time.sleep(0.1)
            try:
                client.send([bytes(64)])
            except BaseException as e:  # noqa: BLE001
                seen.append(e)

        t = threading.Thread(target=poke)
        t.start()
        r = client.run_bench("loopback", seconds=0.5, burst=8)
        t.join()
        assert r["rx_frames"] == r["tx_frames"] - r["in_flight"] > 0 and r["cpu"] > 0
        assert seen and isinstance(seen[0], RuntimeError), seen
        # The data path still works afterwards, counters include the run.
        assert client.send([bytes(64)]) == 1
        assert client.recv(timeout=2)
        assert client.counters()["tx_frames"] == r["tx_frames"] + 1


@pytest.mark.timeout(60)
def test_rxonly_against_testpmd_txonly(sock_dir: Path, tmp_path: Path) -> None:
    """rxonly needs a back-end that generates traffic: testpmd's net_vhost in txonly."""
    dpdk.need_testpmd()
    sock = sock_dir / "net.sock"
    with dpdk.net_vhost(sock, tmp_path, fwd_cpu=CPUS[-1], main_cpu=CPUS[0]) as be:
        be.set_fwd("txonly")
        be.start()
        # testpmd sends once it has seen the device come up, which a loaded machine can take
        # a second to notice: a longer run leaves room for that.
        doc = bench("--socket", str(sock), "--mode", "rxonly", "--cpus", str(CPUS[0]), seconds=3)
        be.stop()
    assert doc["frames"] == doc["rx_frames"] > 0 and doc["tx_frames"] == 0
    assert doc["rx_bytes"] == 64 * doc["rx_frames"]
