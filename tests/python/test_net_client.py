"""vhostuser_rs.netclient.NetClient, the virtio-net driver, against our loopback device served
in-process, and Frontend.negotiate acknowledging only the transport bits the driver implements."""

from __future__ import annotations

import selectors
import threading
import time
from pathlib import Path

import pytest

import vhostuser_rs as vu
from vhostuser_rs import _native
from vhostuser_rs.devices import LoopbackNet
from vhostuser_rs.net import NetHeader
from vhostuser_rs.netclient import NetClient, NetConfig

from netdriver import frame, swapped
from test_net_backend import serving

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
    with serving(backend, sock):
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
            # Asking for an unimplemented bit explicitly does not get it acked either.
            fe2_features = int(vu.VirtioFeature.RING_PACKED | vu.VirtioFeature.VERSION_1)
            assert fe2_features & ~acked


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
        got = []
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
            NetClient.connect(sock, queue_pairs=2) as nic:
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


def test_jumbo_frames_over_merged_buffers(sock_dir: Path) -> None:
    with serving(LoopbackNet(mtu=9000), sock_dir / "lo.sock") as sock, NetClient.connect(sock) as nic:
        assert nic.mtu == 9000 and nic.features & MRG_RXBUF
        big = [frame(9014, seed=s) for s in range(20)]
        assert nic.send(big) == 20
        got = []
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
    with serving(dev, sock_dir / "lo.sock") as sock, NetClient.connect(sock, mac="02:aa:bb:cc:dd:ee") as nic:
        assert nic.mac == bytes.fromhex("02aabbccddee")
        nic.set_promisc(True)
        nic.set_allmulti(True)
        nic.set_mac("02:00:00:00:00:42")
        assert nic.mac.hex() == "020000000042"
        with pytest.raises(ValueError):
            nic.set_mac("02:00")


def test_close_releases_everything(sock_dir: Path) -> None:
    with serving(LoopbackNet(), sock_dir / "lo.sock") as sock:
        nic = NetClient.connect(sock)
        nic.send([frame(64)])
        nic.close()
        nic.close()
        with pytest.raises(vu.ConnectionClosedError):
            nic.recv(timeout=0)
