"""`vhostuser-rs serve-net --loopback` driven by DPDK's testpmd as the front-end (`virtio_user`).

Each test runs once against serve-net and once against testpmd's own `net_vhost` forwarding in
macswap mode, the reference loopback: a test that passes on the reference and fails on serve-net
points at serve-net. testpmd's forwarding lcore runs on one CPU, the back-end's worker on the
other (`--cpus`).

Counting rule (serve-net's names): tx = frames the driver transmitted, rx = frames delivered into
the driver's RX queues, rx_dropped = frames with no RX buffer to go to. After testpmd stops and
drains its RX rings (rxonly, which transmits nothing): serve-net tx == testpmd TX, serve-net rx
== testpmd RX, rx + rx_dropped == tx, bytes likewise.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

import dpdk
import pytest

CPUS = sorted(os.sched_getaffinity(0))
FE_CPU, BE_CPU = CPUS[0], CPUS[-1]  # testpmd's forwarding lcore, the back-end's worker
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_F_RING_PACKED = 1 << 34
JUMBO_SEGMENTS = (2048, 2048, 2048, 2048, 808)  # 9000 bytes in mbufs of 2048 data bytes


class Loopback(Protocol):
    def counters(self) -> dpdk.Counters: ...


#: `loopback(sock, queue_pairs=1, mtu=None)` → a context manager running one loopback back-end
LoopbackFactory = Callable[..., AbstractContextManager[Loopback]]


@pytest.fixture(params=["serve-net", "testpmd-net_vhost"])
def loopback(request: pytest.FixtureRequest, tmp_path: Path) -> LoopbackFactory:
    """A factory: `loopback(sock, queue_pairs=1, mtu=None)` runs one loopback back-end on `sock`."""
    dpdk.need_testpmd()
    if request.param == "serve-net":

        @contextmanager
        def serve(sock: Path, queue_pairs: int = 1, mtu: int | None = None) -> Iterator[Loopback]:
            args = ["--loopback", "--queue-pairs", str(queue_pairs), "--cpus", str(BE_CPU)]
            with dpdk.serve_net(sock, tmp_path, args + (["--mtu", str(mtu)] if mtu else [])) as server:
                yield server

        return serve

    @contextmanager
    def reference(sock: Path, queue_pairs: int = 1, mtu: int | None = None) -> Iterator[Loopback]:
        extra = [f"--max-pkt-len={mtu + 18}"] if mtu else []
        with dpdk.testpmd_loopback(sock, tmp_path, queues=queue_pairs, extra=extra) as pmd:
            yield pmd

    return reference


def front_end(sock: Path, tmp_path: Path, **kwargs: object) -> AbstractContextManager[dpdk.Testpmd]:
    """testpmd virtio_user, forwarding lcore on FE_CPU, debug log of the features it negotiates."""
    main_cpu = next((c for c in CPUS if c != FE_CPU), FE_CPU)
    eal_extra = ["--log-level=pmd.net.virtio.init:debug", *kwargs.pop("eal_extra", ())]  # type: ignore[misc]
    return dpdk.virtio_user(sock, tmp_path, fwd_cpu=FE_CPU, main_cpu=main_cpu, eal_extra=eal_extra, **kwargs)  # type: ignore[arg-type]


def negotiated_features(pmd: dpdk.Testpmd) -> int:
    m = re.search(r"features after negotiate = ([0-9a-f]+)", pmd.output)
    assert m, f"virtio PMD did not log its negotiated features:\n{pmd.tail()}"
    return int(m.group(1), 16)


def drain(pmd: dpdk.Testpmd, timeout: float = 3.0) -> None:
    """Receives what is left in the RX rings (rxonly: nothing transmitted) until RX stops growing."""
    last = -1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = dpdk.forward(pmd, "rxonly", 0.2)
        if run.after.rx_packets == last:
            return
        last = run.after.rx_packets
    raise AssertionError(f"testpmd RX still growing after {timeout} s of rxonly")


def assert_counts_agree(stats: dpdk.PortStats, counters: dpdk.Counters, pmd: dpdk.Testpmd) -> None:
    """testpmd's totals (port 0) against the back-end's, by the counting rule of this module."""
    ours = (stats.tx_packets, stats.tx_bytes, stats.rx_packets, stats.rx_bytes)
    theirs = (counters.tx_frames, counters.tx_bytes, counters.rx_frames, counters.rx_bytes)
    assert ours == theirs, (
        f"testpmd (TX frames, TX bytes, RX frames, RX bytes) = {ours}, back-end (tx, tx_bytes, rx, rx_bytes) = "
        f"{theirs}; {counters}\ntestpmd log tail:\n{pmd.tail()}"
    )
    assert counters.rx_frames + counters.rx_dropped == counters.tx_frames, counters
    assert (stats.rx_errors, stats.rx_missed, stats.rx_nombuf, stats.tx_errors) == (0, 0, 0, 0), stats


def ping_pong(pmd: dpdk.Testpmd, mode: str, *, bursts: int, seconds: float = 2.0) -> dpdk.Run:
    """`bursts` bursts of frames sent first, then forwarded back each time they return; drained."""
    run = dpdk.forward(pmd, mode, seconds, tx_first=bursts)
    drain(pmd)
    return run


@pytest.mark.timeout(40)
def test_macswap_64_bytes_one_queue_pair(loopback: LoopbackFactory, sock_dir: Path, tmp_path: Path) -> None:
    sock = sock_dir / "net.sock"
    with loopback(sock) as backend, front_end(sock, tmp_path) as pmd:
        run = ping_pong(pmd, "macswap", bursts=4)
        stats = pmd.port_stats()
        counters = backend.counters()
    assert run.delta.rx_packets > 10_000, f"frames did not come back: {run.delta}"
    assert stats.tx_bytes == 64 * stats.tx_packets and stats.rx_bytes == 64 * stats.rx_packets, stats
    assert_counts_agree(stats, counters, pmd)


@pytest.mark.timeout(40)
def test_io_64_bytes_two_queue_pairs(loopback: LoopbackFactory, sock_dir: Path, tmp_path: Path) -> None:
    sock = sock_dir / "net.sock"
    with loopback(sock, queue_pairs=2) as backend, front_end(sock, tmp_path, queues=2) as pmd:
        run = ping_pong(pmd, "io", bursts=2)
        stats = pmd.port_stats()
        counters = backend.counters()
    for q in (0, 1):
        sent, received = run.delta.queue("tx", q)[0], run.delta.queue("rx", q)[0]
        assert sent > 10_000 and received > 10_000, (
            f"queue pair {q}: {sent} frames sent and {received} received in {run.seconds:.1f} s "
            f"(each pair should carry its own ping-pong)"
        )
    assert_counts_agree(stats, counters, pmd)


@pytest.mark.timeout(40)
def test_9000_byte_frames_mergeable_rx_buffers(
    loopback: LoopbackFactory, sock_dir: Path, tmp_path: Path
) -> None:
    """9000-byte frames sent as 5 chained mbufs, received into 2 KiB buffers: MRG_RXBUF merges
    them (testpmd needs the MTU, `--max-pkt-len`, and scattered RX; the back-end an MTU ≥ 9000)."""
    sock = sock_dir / "net.sock"
    jumbo = ["--max-pkt-len=9018", "--enable-scatter"]
    with (
        loopback(sock, mtu=9000) as backend,
        front_end(sock, tmp_path, mrg_rxbuf=True, txpkts=JUMBO_SEGMENTS, extra=jumbo) as pmd,
    ):
        assert negotiated_features(pmd) & VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF was not negotiated"
        run = ping_pong(pmd, "macswap", bursts=1)
        stats = pmd.port_stats()
        counters = backend.counters()
    assert run.delta.rx_packets > 1_000, f"9000-byte frames did not come back: {run.delta}"
    assert stats.rx_bytes == 9000 * stats.rx_packets, stats
    assert stats.xstats["rx_q0_size_1519_max_packets"] == stats.rx_packets, stats.xstats
    assert_counts_agree(stats, counters, pmd)


@pytest.mark.timeout(40)
def test_txonly_then_rxonly(loopback: LoopbackFactory, sock_dir: Path, tmp_path: Path) -> None:
    """txonly fills the RX ring (the rest is dropped and counted); rxonly then gets exactly the
    ring's frames, MAC addresses swapped (checked on the headers `set verbose 1` prints)."""
    sock = sock_dir / "net.sock"
    queue_size = 256
    with loopback(sock) as backend, front_end(sock, tmp_path, queue_size=queue_size) as pmd:
        mac = dpdk.port_mac(pmd)
        sent = dpdk.forward(pmd, "txonly", 1.0)
        assert sent.delta.tx_packets > 10_000, sent.delta
        time.sleep(0.5)  # the back-end takes what is left on the TX ring: all but a ring's worth dropped
        pmd.command("set verbose 1")
        start = len(pmd.output)
        drain(pmd)
        pmd.command("set verbose 0")
        frames = dpdk.received_frames(pmd.output[start:])
        stats = pmd.port_stats()
        counters = backend.counters()
    assert 0 < stats.rx_packets <= queue_size, stats
    assert len(frames) == stats.rx_packets
    # txonly sends from the port's address to the peer address 02:00:00:00:00:00 (testpmd's default)
    want = ("02:00:00:00:00:00", mac, 0x0800, 64, "L2_ETHER L3_IPV4 L4_UDP")
    bad = [f for f in frames if (f.src, f.dst, f.ethertype, f.length, f.sw_ptype) != want]
    assert not bad, f"{len(bad)} of {len(frames)} frames not as sent with MACs swapped, first: {bad[0]}"
    assert_counts_agree(stats, counters, pmd)


@pytest.mark.timeout(40)
def test_frames_come_back_byte_for_byte(loopback: LoopbackFactory, sock_dir: Path, tmp_path: Path) -> None:
    """A net_pcap port (port 1) replays a pcap file into virtio_user (io mode: port 1 → port 0)
    and writes what comes back on port 0 into another: the same bytes, MAC addresses swapped."""
    sock = sock_dir / "net.sock"
    rng = random.Random(0x5EED)
    sizes = [60, 64, 65, 127, 128, 255, 256, 511, 512, 1000, 1023, 1024, 1500, 1514, 1514, 60]
    frames = [bytes.fromhex("525400000002 525400000001 88b5") + rng.randbytes(n - 14) for n in sizes]
    dpdk.write_pcap(tmp_path / "in.pcap", frames)
    with loopback(sock) as backend:
        pcap = dpdk.pcap_port(tmp_path / "in.pcap", tmp_path / "out.pcap")
        with front_end(sock, tmp_path, eal_extra=pcap, extra=["--no-flush-rx"]) as pmd:
            dpdk.forward(pmd, "io", 1.0)
            stats = pmd.port_stats()
            counters = backend.counters()
        # out.pcap is complete once testpmd has quit
    returned = dpdk.read_pcap(tmp_path / "out.pcap")
    expected = [f[6:12] + f[0:6] + f[12:] for f in frames]
    assert [len(f) for f in returned] == sizes
    for i, (got, want) in enumerate(zip(returned, expected, strict=True)):
        first = next((j for j in range(len(want)) if got[j] != want[j]), None)
        assert got == want, f"frame {i} ({sizes[i]} bytes) differs, first at byte {first}"
    assert_counts_agree(stats, counters, pmd)


@pytest.mark.timeout(40)
def test_testpmd_pair_reference(sock_dir: Path, tmp_path: Path) -> None:
    """The helper itself: virtio_user txonly against net_vhost rxonly, totals equal on both sides."""
    sock = sock_dir / "net.sock"
    with dpdk.net_vhost(sock, tmp_path, fwd_cpu=BE_CPU, main_cpu=FE_CPU) as be:
        be.set_fwd("rxonly")
        be.start()
        with front_end(sock, tmp_path) as fe:
            dpdk.wait_ready(be)
            run = dpdk.forward(fe, "txonly", 1.0)
            time.sleep(0.2)
            sent = fe.port_stats()
            received = be.port_stats()
    assert run.tx_mpps > 0.1, run.delta
    assert (received.rx_packets, received.rx_bytes) == (sent.tx_packets, sent.tx_bytes)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_net_exits_on_one_signal_while_serving(
    sig: signal.Signals, sock_dir: Path, tmp_path: Path
) -> None:
    """One SIGTERM/SIGINT, with testpmd connected and frames just sent: exit 0 within 5 s and
    the counters line, which counts what testpmd sent."""
    dpdk.need_testpmd()
    sock = sock_dir / "net.sock"
    args = ["--loopback", "--cpus", str(BE_CPU)]
    with dpdk.serve_net(sock, tmp_path, args) as server, front_end(sock, tmp_path) as pmd:
        dpdk.forward(pmd, "txonly", 0.5)
        sent = pmd.port_stats(xstats=False)
        server.proc.send_signal(sig)
        try:
            status: int | None = server.proc.wait(5)
        except subprocess.TimeoutExpired:
            status = None
        if status is None:
            pytest.fail(f"serve-net still running 5 s after one {sig.name} with a front-end connected")
    assert status == 0, server.stderr()
    counters = dpdk.parse_serve_net_counters(server.stderr())
    assert (counters.tx_frames, counters.tx_bytes) == (sent.tx_packets, sent.tx_bytes)


NET_DEVICE = Path(__file__).resolve().parents[2] / "benches" / "python" / "net_device.py"


@pytest.mark.timeout(40)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_python_echo_device_macswap(sock_dir: Path, tmp_path: Path, packed: bool) -> None:
    """A Python NetDevice echoing every burst (benches/python/net_device.py echo) behind testpmd's
    virtio_user in macswap: frames come back, and testpmd's totals equal the device's. Packed:
    the same device code on packed rings (`packed_vq=1`, RING_PACKED negotiated)."""
    dpdk.need_testpmd()
    sock = sock_dir / "net.sock"
    command = [sys.executable, str(NET_DEVICE), str(sock), "echo", "--cpus", str(BE_CPU)]
    backend = dpdk.ServeNet(sock, tmp_path, [], name="python-echo", command=command)
    try:
        with front_end(sock, tmp_path, packed_vq=packed) as pmd:
            assert bool(negotiated_features(pmd) & VIRTIO_F_RING_PACKED) == packed
            run = ping_pong(pmd, "macswap", bursts=4)
            stats = pmd.port_stats()
            counters = backend.counters()
    finally:
        backend.stop()
    assert run.delta.rx_packets > 1_000, f"frames did not come back: {run.delta}"
    assert_counts_agree(stats, counters, pmd)


@pytest.mark.timeout(40)
def test_serve_net_tap_txonly(sock_dir: Path, tmp_path: Path) -> None:
    """testpmd's virtio_user transmits into `serve-net --tap` (a TAP it creates): every frame
    testpmd sent is written to the TAP, none refused."""
    dpdk.need_testpmd()
    if not os.path.exists("/dev/net/tun") or os.geteuid() != 0:
        pytest.skip("creating a TAP needs root and /dev/net/tun")
    sock = sock_dir / "net.sock"
    tap = f"vudp{os.getpid() % 100000}"
    with dpdk.serve_net(sock, tmp_path, ["--tap", tap, "--cpus", str(BE_CPU)], name="serve-net-tap") as server:
        with front_end(sock, tmp_path) as pmd:
            run = dpdk.forward(pmd, "txonly", 1.0)
            sent = pmd.port_stats(xstats=False)
            counters = server.counters()
    assert run.delta.tx_packets > 1_000, run.delta
    assert (counters.tx_frames, counters.tx_bytes) == (sent.tx_packets, sent.tx_bytes), counters
    assert "tx_errors=0" in server.stderr()
    assert not Path(f"/sys/class/net/{tap}").exists(), "the TAP serve-net created outlived it"



@pytest.mark.timeout(60)
@pytest.mark.parametrize("frames", ["64-byte", "9000-byte"])
def test_packed_rings_two_queue_pairs(
    sock_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frames: str
) -> None:
    """virtio_user with `packed_vq=1` against serve-net: RING_PACKED negotiated (testpmd's log
    and the back-end's SET_FEATURES trace agree), two queue pairs and the control queue on
    packed rings, each pair carrying its own ping-pong, totals equal on both sides. 9000-byte
    frames: chained TX descriptors and RX frames merged over 2 KiB buffers (MRG_RXBUF)."""
    dpdk.need_testpmd()
    sock = sock_dir / "net.sock"
    jumbo = frames == "9000-byte"
    args = ["--loopback", "--queue-pairs", "2", "--cpus", str(BE_CPU)] + (["--mtu", "9000"] if jumbo else [])
    extra = ["--max-pkt-len=9018", "--enable-scatter"] if jumbo else []
    txpkts = JUMBO_SEGMENTS if jumbo else (64,)
    monkeypatch.setenv("VHOSTUSER_RS_TRACE", "1")  # the back-end logs each request it receives
    with (
        dpdk.serve_net(sock, tmp_path, args) as backend,
        front_end(sock, tmp_path, queues=2, packed_vq=True, txpkts=txpkts, extra=extra) as pmd,
    ):
        assert negotiated_features(pmd) & VIRTIO_F_RING_PACKED, "virtio_user did not negotiate RING_PACKED"
        run = ping_pong(pmd, "macswap" if jumbo else "io", bursts=1 if jumbo else 2)
        stats = pmd.port_stats()
        counters = backend.counters()
    acked = [int(v) for v in re.findall(r"SET_FEATURES U64\((\d+)\)", backend.stderr())]
    assert acked and all(f & VIRTIO_F_RING_PACKED for f in acked), acked
    if jumbo:
        assert run.delta.rx_packets > 500, f"9000-byte frames did not come back: {run.delta}"
        assert stats.rx_bytes == 9000 * stats.rx_packets, stats
    else:
        for q in (0, 1):
            sent, received = run.delta.queue("tx", q)[0], run.delta.queue("rx", q)[0]
            assert sent > 10_000 and received > 10_000, (q, sent, received)
    assert_counts_agree(stats, counters, pmd)
