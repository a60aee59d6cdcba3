"""vhostuser_rs.netclient.NetClient, the virtio-net driver, against our loopback device served
in-process and against DPDK testpmd's net_vhost (macswap and io forwarding), and
Frontend.negotiate acknowledging only the transport bits the driver implements."""

from __future__ import annotations

import os
import re
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dpdk
import pytest

import vhostuser_rs as vu
from vhostuser_rs import _native, frontend
from vhostuser_rs.devices import LoopbackNet, TapNet
from vhostuser_rs.net import NetHeader
from vhostuser_rs.netclient import DEFAULT_FEATURES, NetClient, NetConfig

from netdriver import frame, swapped
from test_net_backend import serving, tap_only

pytestmark = pytest.mark.timeout(60)

N = _native.VIRTIO_NET
MRG_RXBUF = 1 << N["VIRTIO_NET_F_MRG_RXBUF"]
UNIMPLEMENTED = (
    vu.VirtioFeature.RING_PACKED
    | vu.VirtioFeature.IN_ORDER
    | vu.VirtioFeature.NOTIFICATION_DATA
    | vu.VirtioFeature.ORDER_PLATFORM
    | vu.VirtioFeature.SR_IOV
    | vu.VirtioFeature.NOTIFY_ON_EMPTY
    | vu.VirtioFeature.RING_RESET
)


class GreedyOffer(vu.Device):
    """Offers transport bits no split-ring driver of ours implements, plus device bits."""

    num_queues = 1
    features = int(
        vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.EVENT_IDX | vu.VirtioFeature.INDIRECT_DESC | UNIMPLEMENTED
    ) | (1 << 5) | (1 << 45)

    def __init__(self) -> None:
        self.acked: int | None = None

    def process(self, queue: vu.backend.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
        for chain in chains:
            queue.complete(chain, 0)


@pytest.mark.timeout(30)
def test_negotiate_acks_only_implemented_transport_bits(sock_dir: Path) -> None:
    sock = sock_dir / "greedy.sock"
    backend = vu.Backend.listen(sock, GreedyOffer())
    with serving(backend, sock, sessions=2):
        with vu.Frontend.connect(sock) as fe:
            mem = vu.GuestMemory.allocate(1 << 20)
            result = fe.negotiate(memory=mem)
            offered = fe.negotiated["offered_features"]
            assert offered & int(UNIMPLEMENTED) == int(UNIMPLEMENTED)
            acked = int(fe.features)
            assert acked == int(result.features)
            assert not acked & int(UNIMPLEMENTED), vu.VirtioFeature(acked & int(UNIMPLEMENTED))
            # Implemented transport bits and every device bit (0..23, 41..63) stay.
            for bit in (vu.VirtioFeature.VERSION_1, vu.VirtioFeature.EVENT_IDX, vu.VirtioFeature.INDIRECT_DESC,
                        vu.VirtioFeature.PROTOCOL_FEATURES):
                assert bit in vu.VirtioFeature(acked)
            assert acked & (1 << 5) and acked & (1 << 45)
        # Asking for unimplemented bits explicitly does not get them acked either.
        with vu.Frontend.connect(sock) as fe:
            asked = int(UNIMPLEMENTED | vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.EVENT_IDX) | (1 << 5)
            acked = int(fe.negotiate(features=asked).features)
            assert acked & ~int(vu.VirtioFeature.PROTOCOL_FEATURES) == int(
                vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.EVENT_IDX) | (1 << 5)


def test_send_and_receive_macs_swapped(sock_dir: Path) -> None:
    dev = LoopbackNet(mac="02:11:22:33:44:55")
    with serving(dev, sock_dir / "lo.sock") as sock, NetClient.connect(sock) as nic:
        assert nic.mac == bytes.fromhex("021122334455")
        assert isinstance(nic.config, NetConfig) and nic.config.link_up and nic.link_up
        assert nic.features & MRG_RXBUF
        frames = [frame(60 + 14 * i, seed=i) for i in range(100)]
        sent = 0
        got: list[bytes] = []
        while sent < len(frames) or len(got) < len(frames):
            sent += nic.send(frames[sent:sent + 32])
            for header, data in nic.recv(timeout=2.0):
                assert header.num_buffers == 1 and header.flags == 0 and header.gso_type == 0
                got.append(data)
        assert got == [swapped(f) for f in frames]
        c = nic.counters()
        assert (c["tx_frames"], c["rx_frames"], c["rx_dropped"]) == (100, 100, 0)
        assert c["tx_bytes"] == c["rx_bytes"] == sum(map(len, frames))
        assert nic.counters(0) == c
    dc = dev.counters()
    assert (dc["tx_frames"], dc["rx_frames"]) == (100, 100)


def test_headers_and_buffers_as_frames(sock_dir: Path) -> None:
    with serving(LoopbackNet(), sock_dir / "lo.sock") as sock, NetClient.connect(sock) as nic:
        f = frame(200, seed=3)
        hdr = NetHeader(num_buffers=7)  # the driver sends 0 whatever it is given
        assert nic.send([bytearray(f), memoryview(f), (hdr, f)]) == 3
        got: list[tuple[NetHeader, bytes]] = []
        while len(got) < 3:
            got += nic.recv(timeout=2.0)
        assert [d for _, d in got] == [swapped(f)] * 3
        with pytest.raises(ValueError, match="frame 1"):
            nic.send([f, b"short"])
        with pytest.raises(ValueError):
            nic.send([bytes(nic.max_frame_len + 1)])
        assert nic.counters()["tx_frames"] == 3


def test_two_queue_pairs(sock_dir: Path) -> None:
    with serving(LoopbackNet(queue_pairs=2), sock_dir / "lo.sock") as sock, \
            NetClient.connect(sock, queue_pairs=2, control_queue=True) as nic:
        for qp in (0, 1):
            frames = [frame(64 + i, seed=qp * 50 + i) for i in range(40)]
            assert nic.send(frames, queue_pair=qp) == 40
            got: list[bytes] = []
            while len(got) < 40:
                got += [d for _, d in nic.recv(timeout=2.0, queue_pair=qp)]
            assert got == [swapped(f) for f in frames]
        assert nic.counters(0)["rx_frames"] == nic.counters(1)["rx_frames"] == 40
        assert nic.counters()["rx_frames"] == 80
        with pytest.raises(ValueError):
            nic.recv(queue_pair=2, timeout=0)


def test_two_queue_pairs_without_the_control_queue(sock_dir: Path) -> None:
    """As QEMU does for vhost-user net: no control ring, pairs enabled with SET_VRING_ENABLE."""
    with serving(LoopbackNet(queue_pairs=2), sock_dir / "lo.sock") as sock, \
            NetClient.connect(sock, queue_pairs=2) as nic:
        assert not nic.features & (1 << N["VIRTIO_NET_F_CTRL_RX"])
        for qp in (1, 0):
            assert nic.send([frame(64, seed=qp)], queue_pair=qp) == 1
            assert [d for _, d in nic.recv(timeout=2.0, queue_pair=qp)] == [swapped(frame(64, seed=qp))]
        nic.set_queue_pairs(1)
        nic.set_queue_pairs(2)
        with pytest.raises(vu.NegotiationError):
            nic.set_promisc(True)
        with pytest.raises(ValueError):
            nic.set_queue_pairs(3)


def test_jumbo_frames_over_merged_buffers(sock_dir: Path) -> None:
    with serving(LoopbackNet(mtu=9000), sock_dir / "lo.sock") as sock, NetClient.connect(sock) as nic:
        assert nic.mtu == 9000 and nic.features & MRG_RXBUF
        big = [frame(9014, seed=s) for s in range(20)]
        assert nic.send(big) == 20
        got: list[tuple[NetHeader, bytes]] = []
        while len(got) < 20:
            got += nic.recv(timeout=2.0)
        assert [d for _, d in got] == [swapped(f) for f in big]
        assert all(h.num_buffers == 5 for h, _ in got)  # (9014 + 12) / 2048 rounded up
        assert nic.counters()["rx_dropped"] == 0


def test_recv_timeout_returns_empty(sock_dir: Path) -> None:
    with serving(LoopbackNet(), sock_dir / "lo.sock") as sock, NetClient.connect(sock) as nic:
        t = time.monotonic()
        assert nic.recv(timeout=0.2) == []
        assert 0.15 < time.monotonic() - t < 2.0
        assert nic.recv(timeout=0) == []


def test_fileno_wakes_an_event_loop(sock_dir: Path) -> None:
    with serving(LoopbackNet(), sock_dir / "lo.sock") as sock, NetClient.connect(sock) as nic:
        sel = selectors.DefaultSelector()
        sel.register(nic.fileno(), selectors.EVENT_READ)
        try:
            nic.recv(timeout=0)
            assert sel.select(0.05) == []
            nic.send([frame(64)])
            assert sel.select(2.0)
            assert len(nic.recv(timeout=0)) == 1
            assert sel.select(0.05) == []  # recv cleared it
            # Frames left over by a short recv keep it readable.
            nic.send([frame(64, seed=s) for s in range(5)])
            got: list[tuple[NetHeader, bytes]] = []
            while len(got) < 5:
                assert sel.select(2.0)
                got += nic.recv(max_frames=2, timeout=0)
            assert sel.select(0.05) == []
        finally:
            sel.close()


def test_recv_from_another_thread_while_sending(sock_dir: Path) -> None:
    with serving(LoopbackNet(), sock_dir / "lo.sock") as sock, NetClient.connect(sock) as nic:
        got: list[bytes] = []

        def reader() -> None:
            while len(got) < 500:
                got.extend(d for _, d in nic.recv(timeout=2.0))

        t = threading.Thread(target=reader)
        t.start()
        frames = [frame(64, seed=i) for i in range(500)]
        sent = 0
        deadline = time.monotonic() + 10
        while sent < 500 and time.monotonic() < deadline:
            if sent - len(got) < 128:  # the loopback drops what finds no RX buffer: stay in the window
                sent += nic.send(frames[sent:sent + 32])
            else:
                time.sleep(0.001)
        t.join(10)
        assert got == [swapped(f) for f in frames]


def test_control_queue_commands(sock_dir: Path) -> None:
    dev = LoopbackNet()
    with serving(dev, sock_dir / "lo.sock") as sock, NetClient.connect(sock, mac="02:aa:bb:cc:dd:ee", control_queue=True) as nic:
        assert nic.mac == bytes.fromhex("02aabbccddee")
        nic.set_promisc(True)
        nic.set_allmulti(True)
        nic.set_mac("02:00:00:00:00:42")
        assert nic.mac.hex() == "020000000042"
        with pytest.raises(ValueError):
            nic.set_mac("02:00")


def test_failed_connects_release_everything(sock_dir: Path) -> None:
    with serving(LoopbackNet(queue_pairs=2), sock_dir / "lo.sock", sessions=3) as sock:
        with pytest.raises(vu.NegotiationError, match="2 queue pairs, 3 requested"):
            NetClient.connect(sock, queue_pairs=3)
        with pytest.raises(ValueError, match="MAC"):
            NetClient.connect(sock, mac="02:00", control_queue=True)
        with NetClient.connect(sock, queue_pairs=2, mac=b"\x02\0\0\0\0\x05") as nic:
            assert nic.mac == b"\x02\0\0\0\0\x05"


def test_close_releases_everything(sock_dir: Path) -> None:
    with serving(LoopbackNet(), sock_dir / "lo.sock") as sock:
        nic = NetClient.connect(sock)
        nic.send([frame(64)])
        nic.close()
        nic.close()
        with pytest.raises(vu.ConnectionClosedError):
            nic.recv(timeout=0)
        with pytest.raises(vu.ConnectionClosedError):
            nic.send([frame(64)])
        with pytest.raises(vu.ConnectionClosedError):
            nic.frontend.get_features()


class Mirror(vu.NetDevice):
    """A Python net device that sends every frame back as it came."""

    queue_pairs = 1

    def receive(self, queue_pair: int, frames: list[vu.net.Frame]) -> None:
        self.send(queue_pair, [bytes(f) for f in frames])


@pytest.mark.timeout(30)
def test_python_net_device_and_link_status_changes(sock_dir: Path) -> None:
    dev = Mirror()
    backend = vu.Backend.listen(sock_dir / "py.sock", dev)
    with backend, serving(backend, sock_dir / "py.sock") as sock, NetClient.connect(sock) as nic:
        frames = [frame(64 + i, seed=i) for i in range(50)]
        assert exchange(nic, frames) == frames
        assert nic.link_up
        dev.link_down()  # CONFIG_CHANGE_MSG on the back-end request channel
        deadline = time.monotonic() + 5
        while nic.link_up:
            assert time.monotonic() < deadline, "the config change was not seen"
            time.sleep(0.01)
        dev.link_up()
        while not nic.link_up:
            assert time.monotonic() < deadline, "the config change was not seen"
            time.sleep(0.01)


@pytest.mark.timeout(30)
def test_announce_on_request(sock_dir: Path) -> None:
    """GUEST_ANNOUNCE: the device sets status ANNOUNCE and signals a config change; the client
    sends a gratuitous RARP for its MAC and acks on the control queue (status ANNOUNCE cleared)."""
    dev = Mirror()
    backend = vu.Backend.listen(sock_dir / "py.sock", dev)
    with backend, serving(backend, sock_dir / "py.sock") as sock, \
            NetClient.connect(sock, control_queue=True) as nic:
        assert nic.features & (1 << N["VIRTIO_NET_F_GUEST_ANNOUNCE"])
        assert dev.announce()
        deadline = time.monotonic() + 5
        while not nic.handle_config_change():
            assert time.monotonic() < deadline, "the config change was not seen"
            time.sleep(0.01)
        (_, rarp), = nic.recv(timeout=2.0)  # the mirror sends it back
        assert rarp[12:14] == b"\x80\x35" and rarp[6:12] == nic.mac
        assert nic.frontend.get_config(0, N["CONFIG_SIZE"])[6] & N["VIRTIO_NET_S_ANNOUNCE"] == 0  # acked


class HostileRx(vu.Device):
    """Fills the first RX buffers it is given with what `script` says (header + payload) and
    keeps the others: a back-end that lies about num_buffers and sends short headers."""

    num_queues = 2
    features = int(vu.VirtioFeature.VERSION_1) | MRG_RXBUF

    def __init__(self, script: list[bytes]) -> None:
        self.script = script

    def process(self, queue: vu.backend.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
        for chain in chains:
            if queue.index == 0 and self.script:
                data = self.script.pop(0)
                chain.write(data)
                queue.complete(chain, len(data))
            elif queue.index == 0:
                queue.defer(chain)
            else:
                queue.complete(chain, 0)


@pytest.mark.timeout(30)
def test_hostile_num_buffers_and_short_headers_are_counted_drops(sock_dir: Path) -> None:
    def hdr(num_buffers: int) -> bytes:
        return NetHeader(num_buffers=num_buffers).to_bytes()

    good = frame(64, seed=1)
    script = [
        hdr(1) + good,           # a frame
        b"\0" * 5,               # shorter than the header: a drop
        hdr(0) + good,           # num_buffers 0: a drop
        hdr(1) + good,           # a frame again
        hdr(200) + good,         # more buffers than the device used: a drop (and what follows)
        good,
    ]
    dev = HostileRx(script)
    backend = vu.Backend.listen(sock_dir / "h.sock", dev)
    with backend, serving(backend, sock_dir / "h.sock") as sock, NetClient.connect(sock) as nic:
        got: list[tuple[NetHeader, bytes]] = []
        deadline = time.monotonic() + 5
        while nic.counters()["rx_dropped"] < 3:
            assert time.monotonic() < deadline, nic.counters()
            got += nic.recv(timeout=0.2)
        assert [d for _, d in got] == [good, good]
        assert nic.counters()["rx_dropped"] == 3 and nic.counters()["rx_frames"] == 2
        assert nic.send([good]) == 1  # the client goes on


# -- DPDK testpmd's net_vhost as the back-end ------------------------------------------------------

IMPLEMENTED = int(frontend.DRIVER_TRANSPORT_FEATURES) | int(DEFAULT_FEATURES)


@contextmanager
def vhost_pmd(sock: Path, workdir: Path, mode: str, *, queues: int = 1, mtu: int | None = None) -> Iterator[dpdk.Testpmd]:
    """testpmd net_vhost forwarding in `mode`, logging the features it negotiates."""
    dpdk.need_testpmd()
    sock.unlink(missing_ok=True)
    cpus = sorted(os.sched_getaffinity(0))
    eal = dpdk.eal_args(main_cpu=cpus[0], fwd_cpu=cpus[-1], mem_mb=256,
                        vdev=f"net_vhost0,iface={sock},queues={queues},client=0",
                        extra=["--log-level=lib.vhost.config:debug"])
    extra = [f"--max-pkt-len={mtu + 18}"] if mtu else []
    app = dpdk.app_args(queues=queues, burst=32, txpkts=(64,), mbufs=16384, extra=extra)
    pmd = dpdk.Testpmd(eal, app, log=workdir / f"net_vhost-{mode}.log")
    try:
        pmd.wait_for(re.escape(dpdk.PROMPT), 15)
        pmd.set_fwd(mode)
        pmd.start()
        yield pmd
    finally:
        pmd.close()
        sock.unlink(missing_ok=True)


def exchange(nic: NetClient, frames: list[bytes], *, queue_pair: int = 0, window: int = 128,
             timeout: float = 20.0) -> list[bytes]:
    """Sends `frames` keeping at most `window` unanswered, returns what came back."""
    got: list[bytes] = []
    sent = 0
    deadline = time.monotonic() + timeout
    while len(got) < len(frames):
        assert time.monotonic() < deadline, f"{len(got)} of {len(frames)} frames came back"
        if sent < len(frames) and sent - len(got) < window:
            sent += nic.send(frames[sent:sent + 32], queue_pair=queue_pair)
        got += [d for _, d in nic.recv(timeout=0 if sent < len(frames) else 1.0, queue_pair=queue_pair)]
    return got


def check_features(pmd: dpdk.Testpmd, nic: NetClient) -> None:
    """testpmd's negotiated features are ours, and contain nothing the driver does not implement
    although DPDK offers RING_PACKED and IN_ORDER."""
    m = re.findall(r"negotiated Virtio features: (0x[0-9a-f]+)", pmd.output)
    assert m, pmd.tail()
    negotiated = int(m[-1], 16)
    assert negotiated == nic.features
    offered = nic.frontend.negotiated["offered_features"]
    assert offered & int(vu.VirtioFeature.RING_PACKED | vu.VirtioFeature.IN_ORDER)
    assert not negotiated & int(vu.VirtioFeature.RING_PACKED | vu.VirtioFeature.IN_ORDER)
    assert negotiated & ~IMPLEMENTED == 0, hex(negotiated & ~IMPLEMENTED)


def check_port_counters(pmd: dpdk.Testpmd, nic: NetClient) -> None:
    """testpmd's port counters (after stopping) agree with ours, both ways."""
    pmd.stop()
    stats = pmd.port_stats(xstats=False)
    c = nic.counters()
    assert (stats.rx_packets, stats.rx_bytes) == (c["tx_frames"], c["tx_bytes"])
    assert (stats.tx_packets, stats.tx_bytes) == (c["rx_frames"], c["rx_bytes"])
    assert c["rx_dropped"] == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["macswap", "io"])
def test_dpdk_vhost_pmd_forwards_back(tmp_path: Path, sock_dir: Path, mode: str) -> None:
    sock = sock_dir / "vhost.sock"
    with vhost_pmd(sock, tmp_path, mode) as pmd, NetClient.connect(sock) as nic:
        dpdk.wait_ready(pmd)
        check_features(pmd, nic)
        frames = [frame(60 + (i % 1400), seed=i) for i in range(2000)]
        got = exchange(nic, frames)
        assert got == ([swapped(f) for f in frames] if mode == "macswap" else frames)
        check_port_counters(pmd, nic)


@pytest.mark.timeout(120)
def test_dpdk_vhost_pmd_two_queue_pairs(tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "vhost.sock"
    with vhost_pmd(sock, tmp_path, "macswap", queues=2) as pmd, NetClient.connect(sock, queue_pairs=2) as nic:
        dpdk.wait_ready(pmd)
        check_features(pmd, nic)
        for qp in (0, 1):
            frames = [frame(64 + i % 100, seed=qp * 7 + i) for i in range(500)]
            assert exchange(nic, frames, queue_pair=qp) == [swapped(f) for f in frames]
            assert nic.counters(qp)["rx_frames"] == 500
        check_port_counters(pmd, nic)


@pytest.mark.timeout(120)
def test_dpdk_vhost_pmd_jumbo_frames_merged(tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "vhost.sock"
    with vhost_pmd(sock, tmp_path, "macswap", mtu=9000) as pmd, NetClient.connect(sock, mtu=9000) as nic:
        dpdk.wait_ready(pmd)
        assert nic.features & MRG_RXBUF and nic.max_frame_len == 9018
        frames = [frame(9014, seed=i) for i in range(50)]
        got = exchange(nic, frames, window=16)
        assert got == [swapped(f) for f in frames]
        assert nic.counters()["rx_bytes"] == 50 * 9014
        check_port_counters(pmd, nic)


# -- vhostuser-rs serve-net in its own process -------------------------------------------------------


@pytest.mark.timeout(60)
def test_serve_net_loopback_counters_and_a_vanishing_back_end(tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "serve-net.sock"
    with dpdk.serve_net(sock, tmp_path, ["--loopback", "--poll-us", "50"]) as server, \
            NetClient.connect(sock, queue_size=128) as nic:
        frames = [frame(60 + i % 1000, seed=i) for i in range(3000)]
        assert exchange(nic, frames, window=96) == [swapped(f) for f in frames]
        mine = nic.counters()
        theirs = server.counters()  # ends serve-net
        assert (theirs.tx_frames, theirs.tx_bytes) == (mine["tx_frames"], mine["tx_bytes"])
        assert (theirs.rx_frames, theirs.rx_bytes, theirs.rx_dropped) == (mine["rx_frames"], mine["rx_bytes"], 0)
        # A wait for frames from a back-end that went away ends, without a timeout.
        t = time.monotonic()
        with pytest.raises(vu.ConnectionClosedError):
            nic.recv(timeout=None)
        assert time.monotonic() - t < 5


# -- the TAP bridge: frames checked on the TAP with an AF_PACKET socket ------------------------------


@tap_only
@pytest.mark.timeout(60)
def test_tap_bridge_both_ways(sock_dir: Path) -> None:
    name = f"vuc{int(time.time() * 1000) % 100000}"
    dev = TapNet(name, mac="02:00:00:00:00:07")
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    try:
        cap.bind((name, 0))
        cap.settimeout(5)
        with serving(dev, sock_dir / "tap.sock") as sock, NetClient.connect(sock) as nic:
            out = [frame(100 + 50 * i, dst=b"\x02\0\0\0\0\x99", seed=i) for i in range(10)]
            assert nic.send(out) == 10
            seen: list[bytes] = []
            while len(seen) < 10:
                seen.append(cap.recv(65536))
            assert seen == out
            inject = [frame(200 + i, dst=b"\x02\0\0\0\0\x07", seed=40 + i) for i in range(10)]
            for f in inject:
                cap.send(f)
            got: list[bytes] = []
            deadline = time.monotonic() + 5
            while len(got) < 10 and time.monotonic() < deadline:
                got += [d for _, d in nic.recv(timeout=1.0) if d[12:14] == b"\x88\xb5"]  # skip IPv6 noise
            assert got == inject
            assert vu.ProtocolFeature.RARP in nic.frontend.protocol_features
            cap.close()
            cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x8035))
            cap.bind((name, 0))
            cap.settimeout(5)
            nic.send_rarp()
            rarp = cap.recv(65536)
            assert rarp[:6] == b"\xff" * 6 and rarp[6:12] == nic.mac == bytes.fromhex("020000000007")
    finally:
        cap.close()
        del dev


def test_a_client_dropped_without_close_ends_its_session(sock_dir: Path) -> None:
    """Dropping the last reference (no close()) is enough: the garbage collector takes the
    client, the back-end request channel's thread does not hold it (its handler is held
    weakly), the rings' eventfds close, and the back-end sees its session end."""
    import gc

    def fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    with serving(LoopbackNet(), sock_dir / "lo.sock") as sock:
        before = fds()
        nic = NetClient.connect(sock, control_queue=True)
        assert nic.send([frame(60)]) == 1
        assert nic.recv(timeout=2.0)
        del nic
        gc.collect()
        deadline = time.monotonic() + 5
        while not fds() <= before:  # the in-process back-end closes its side as it notices
            assert time.monotonic() < deadline, fds() - before
            time.sleep(0.01)
    # Leaving `serving` checked that the back-end finished its one session.
