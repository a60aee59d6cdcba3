"""The built-in net devices (loopback, TAP) and Python net devices, driven by our front-end
acting as a virtio-net driver: frames checked byte for byte, merged receive buffers, the control
queue, NET_SET_MTU / SEND_RARP, and hostile drivers."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import vhostuser_rs as vu
from vhostuser_rs.devices import LoopbackNet, TapNet
from vhostuser_rs.net import VIRTIO_NET as N
from vhostuser_rs.net import NetFeature, NetHeader

from netdriver import HDR, NetDriver, frame, swapped

pytestmark = pytest.mark.timeout(60)


@contextmanager
def serving(device: object, sock: Path, sessions: int = 1) -> Iterator[Path]:
    """Serves `device` (a built-in net device or a Backend) for `sessions` front-ends."""
    if isinstance(device, vu.Backend):
        t = threading.Thread(target=device.serve_forever, kwargs={"max_connections": sessions}, daemon=True)
    else:
        t = threading.Thread(target=device.serve, args=(sock,), kwargs={"max_connections": sessions},  # type: ignore[attr-defined]
                             daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        yield sock
    finally:
        t.join(10)
        assert not t.is_alive(), "the back-end did not finish its sessions"


def test_loopback_returns_each_frame_with_macs_swapped(sock_dir: Path) -> None:
    dev = LoopbackNet(mac="02:11:22:33:44:55")
    with serving(dev, sock_dir / "lo.sock") as sock, NetDriver(sock) as drv:
        assert drv.queue_num == 1  # GET_QUEUE_NUM counts queue pairs for net
        assert NetFeature.MRG_RXBUF in NetFeature(drv.features & 0xFFFFFF)
        config = drv.fe.get_config(0, N["CONFIG_SIZE"])
        assert config[:6] == bytes.fromhex("021122334455") and struct.unpack_from("<H", config, 6)[0] & 1  # LINK_UP
        drv.post_rx(64)
        frames = [frame(60 + 23 * i, seed=i) for i in range(40)]
        drv.transmit(frames)
        drv.reap_tx(40)
        got = drv.receive(40)
        assert [f for _, f in got] == [swapped(f) for f in frames]
        assert all(h[:10] == bytes(10) and struct.unpack_from("<H", h, 10)[0] == 1 for h, _ in got)
    c = dev.counters()
    assert (c["tx_frames"], c["rx_frames"], c["rx_dropped"]) == (40, 40, 0)
    assert c["tx_bytes"] == c["rx_bytes"] == sum(map(len, frames))


def test_merged_receive_buffers_carry_a_jumbo_frame(sock_dir: Path) -> None:
    dev = LoopbackNet(mtu=9000)
    with serving(dev, sock_dir / "lo.sock") as sock, NetDriver(sock) as drv:
        drv.post_rx(16, size=2048)
        big = frame(9014, seed=7)
        drv.transmit([big])
        (hdr, data), = drv.receive(1)
        assert data == swapped(big)
        assert struct.unpack_from("<H", hdr, 10)[0] == -(-(9014 + HDR) // 2048)  # num_buffers
        # The ring goes on with the remaining buffers.
        small = frame(64)
        drv.transmit([small])
        assert drv.receive(1)[0][1] == swapped(small)
    assert dev.mtu == 9000


def test_without_merged_buffers_a_frame_too_big_is_dropped_and_the_buffer_kept(sock_dir: Path) -> None:
    dev = LoopbackNet()
    features = int(vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.EVENT_IDX | NetFeature.MAC)
    with serving(dev, sock_dir / "lo.sock") as sock, NetDriver(sock, features=features) as drv:
        assert not drv.features & NetFeature.MRG_RXBUF
        drv.post_rx(4, size=1526)
        drv.transmit([frame(3000)])
        drv.reap_tx(1)
        assert dev.counters()["rx_dropped"] == 1
        f = frame(1514, seed=3)
        drv.transmit([f])
        (hdr, data), = drv.receive(1)
        assert data == swapped(f) and len(hdr) == HDR


def test_frames_without_receive_buffers_are_dropped_and_counted(sock_dir: Path) -> None:
    dev = LoopbackNet()
    with serving(dev, sock_dir / "lo.sock") as sock, NetDriver(sock) as drv:
        drv.transmit([frame(100)] * 5)
        drv.reap_tx(5)
        assert dev.counters()["rx_dropped"] == 5
        drv.post_rx(8)
        f = frame(200, seed=9)
        drv.transmit([f])
        assert drv.receive(1)[0][1] == swapped(f)


def test_two_queue_pairs_each_loop_back_on_their_own_pair(sock_dir: Path) -> None:
    dev = LoopbackNet(queue_pairs=2)
    with serving(dev, sock_dir / "lo.sock") as sock, NetDriver(sock, pairs=2) as drv:
        assert drv.queue_num == 2 and drv.features & NetFeature.MQ
        assert drv.command(N["VIRTIO_NET_CTRL_MQ"], N["VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET"], struct.pack("<H", 2)) == 0
        for p in (0, 1):
            drv.post_rx(8, pair=p)
        a, b = frame(80, seed=1), frame(90, seed=2)
        drv.transmit([a], pair=0)
        drv.transmit([b], pair=1)
        assert drv.receive(1, pair=0)[0][1] == swapped(a)
        assert drv.receive(1, pair=1)[0][1] == swapped(b)
    assert dev.counters(1)["tx_frames"] == 1 and dev.counters(0)["rx_frames"] == 1


def test_control_queue_commands(sock_dir: Path) -> None:
    dev = LoopbackNet(queue_pairs=2)
    ok, err = N["VIRTIO_NET_OK"], N["VIRTIO_NET_ERR"]
    with serving(dev, sock_dir / "lo.sock") as sock, NetDriver(sock) as drv:
        mq, pairs_set = N["VIRTIO_NET_CTRL_MQ"], N["VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET"]
        assert drv.command(mq, pairs_set, struct.pack("<H", 2)) == ok
        assert drv.command(mq, pairs_set, struct.pack("<H", 3)) == err  # beyond the maximum
        assert drv.command(mq, pairs_set, struct.pack("<H", 0)) == err
        assert drv.command(mq, pairs_set, b"\x01") == err  # wrong size
        rx = N["VIRTIO_NET_CTRL_RX"]
        assert drv.command(rx, N["VIRTIO_NET_CTRL_RX_PROMISC"], b"\x01") == ok
        assert drv.command(rx, 99, b"\x01") == err
        mac = N["VIRTIO_NET_CTRL_MAC"]
        assert drv.command(mac, N["VIRTIO_NET_CTRL_MAC_ADDR_SET"], bytes.fromhex("02aabbccddee")) == ok
        assert drv.fe.get_config(0, 6) == bytes.fromhex("02aabbccddee")
        table = struct.pack("<I", 1) + bytes(6) + struct.pack("<I", 0)
        assert drv.command(mac, N["VIRTIO_NET_CTRL_MAC_TABLE_SET"], table) == ok
        assert drv.command(mac, N["VIRTIO_NET_CTRL_MAC_TABLE_SET"], struct.pack("<I", 1000) + bytes(6)) == err
        assert drv.command(N["VIRTIO_NET_CTRL_VLAN"], 0, b"\0\0") == err  # CTRL_VLAN not offered
        assert drv.command(77, 0) == err
        # No room for the ack: nothing written, the queue goes on.
        assert drv.command(rx, N["VIRTIO_NET_CTRL_RX_PROMISC"], b"\x00", ack_room=0) is None
        assert drv.command(rx, N["VIRTIO_NET_CTRL_RX_ALLMULTI"], b"\x01") == ok


def test_net_set_mtu_is_validated(sock_dir: Path) -> None:
    dev = LoopbackNet(mtu=1500)
    with serving(dev, sock_dir / "lo.sock") as sock, NetDriver(sock) as drv:
        assert drv.features & NetFeature.MTU and vu.ProtocolFeature.MTU in drv.fe.protocol_features
        drv.fe.net_set_mtu(4000)
        assert dev.mtu == 4000
        with pytest.raises(vu.RequestRejectedError):
            drv.fe.net_set_mtu(40)  # below the spec's 68
        with pytest.raises(vu.RequestRejectedError):
            drv.fe.net_set_mtu(70000)
        assert dev.mtu == 4000
        # The loopback has nobody to announce to: RARP is not offered.
        assert vu.ProtocolFeature.RARP not in drv.fe.protocol_features


def test_hostile_transmit_chains_are_refused_and_the_session_goes_on(sock_dir: Path) -> None:
    dev = LoopbackNet()
    with serving(dev, sock_dir / "lo.sock") as sock, NetDriver(sock) as drv:
        drv.post_rx(16)
        drv.transmit([b"\x01\x02\x03"], header=b"")        # shorter than the header
        drv.transmit([frame(60)], writable=64)              # TX buffer with a writable part
        drv.transmit([frame(70_000)])                       # beyond a 64 KiB GSO frame
        drv.transmit([bytes(5)])                            # a header and no Ethernet header
        used = drv.reap_tx(4)
        assert all(n == 0 for _, n in used)
        assert dev.counters()["tx_errors"] == 4 and dev.counters()["rx_frames"] == 0
        f = frame(128, seed=5)
        drv.transmit([f])
        assert drv.receive(1)[0][1] == swapped(f)


def test_receive_buffers_too_short_for_the_header(sock_dir: Path) -> None:
    dev = LoopbackNet()
    features = int(vu.VirtioFeature.VERSION_1 | NetFeature.MAC)
    with serving(dev, sock_dir / "lo.sock") as sock, NetDriver(sock, features=features) as drv:
        drv.post_rx(2, size=8)
        drv.transmit([frame(64)])
        drv.reap_tx(1)
        assert dev.counters()["rx_dropped"] == 1 and dev.counters()["rx_frames"] == 0


def test_a_driver_that_vanishes_mid_traffic_leaves_the_device_serving(sock_dir: Path) -> None:
    dev = LoopbackNet()
    with serving(dev, sock_dir / "lo.sock", sessions=2) as sock:
        drv = NetDriver(sock)
        drv.post_rx(128)
        drv.transmit([frame(64, seed=i) for i in range(100)])
        drv.close()  # no GET_VRING_BASE, no goodbye
        with NetDriver(sock) as drv2:
            drv2.post_rx(4)
            f = frame(64, seed=42)
            drv2.transmit([f])
            assert drv2.receive(1)[0][1] == swapped(f)


class Echo(vu.NetDevice):
    """Echoes every frame from its receive() callback (MACs swapped), and sends what other
    threads queue through send()."""

    queue_pairs = 2
    mtu = 1500

    def __init__(self) -> None:
        self.bursts = 0
        self.headers: list[NetHeader] = []
        self.accepted: list[int] = []
        self.mtus: list[int] = []

    def receive(self, queue_pair: int, frames: list[vu.net.Frame]) -> None:
        self.bursts += 1
        self.headers += [f.header for f in frames]
        self.accepted.append(self.send(queue_pair, [swapped(bytes(f)) for f in frames]))

    def set_mtu(self, mtu: int) -> bool:
        self.mtus.append(mtu)
        return mtu <= 9000

    def control(self, class_: int, command: int, data: bytes) -> bool | None:
        if class_ == 200:
            return data == b"yes"
        return None


def test_python_net_device_echoes_frames(sock_dir: Path) -> None:
    dev = Echo()
    backend = vu.Backend.listen(sock_dir / "py.sock", dev)
    with backend, serving(backend, sock_dir / "py.sock") as sock, NetDriver(sock, pairs=2) as drv:
        assert drv.queue_num == 2
        drv.post_rx(32, pair=1)
        frames = [frame(64 + i, seed=i) for i in range(20)]
        hdr = NetHeader(flags=0, gso_type=0, hdr_len=0, num_buffers=0)
        drv.transmit(frames, pair=1, header=hdr.to_bytes())
        got = drv.receive(20, pair=1)
        assert [f for _, f in got] == [swapped(f) for f in frames]
        assert sum(dev.accepted) == 20 and dev.headers[0] == hdr
        # From another thread: queued for the pair's worker, then delivered.
        assert dev.send(1, [frame(100, seed=77)]) == 1
        assert drv.receive(1, pair=1)[0][1] == frame(100, seed=77)  # as given: no swap here
        # Back-pressure: 4 buffers left for 10 frames.
        drv.post_rx(4, pair=0)
        drv.transmit([frame(60, seed=i) for i in range(10)], pair=0)
        drv.reap_tx(10, pair=0)
        drv.receive(4, pair=0)
        assert dev.accepted[-1] == 4 or sum(dev.accepted[-2:]) == 4
        # Device hooks: NET_SET_MTU and a control command answered by the device.
        drv.fe.net_set_mtu(9000)
        with pytest.raises(vu.RequestRejectedError):
            drv.fe.net_set_mtu(9001)
        assert dev.mtus == [9000, 9001]
        assert drv.command(200, 1, b"yes") == 0 and drv.command(200, 1, b"no") == 1
        assert drv.command(N["VIRTIO_NET_CTRL_RX"], 0, b"\x01") == 0  # left to the defaults
    c = dev.counters()
    assert c["tx_frames"] == 30 and c["rx_frames"] == 25


def test_python_net_device_feeds_rx_from_its_own_fd(sock_dir: Path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    class Bridge(vu.NetDevice):
        def event_fds(self, queue_pair: int) -> list[int]:
            return [b.fileno()]

        def on_event(self, queue_pair: int, fd: int) -> bool:
            data = b.recv(65536)
            return self.send(queue_pair, [data]) == 1

    dev = Bridge()
    backend = vu.Backend.listen(sock_dir / "br.sock", dev)
    try:
        with backend, serving(backend, sock_dir / "br.sock") as sock, NetDriver(sock) as drv:
            drv.post_rx(8)
            for i in range(3):
                a.send(frame(300, seed=i))
            got = drv.receive(3)
            assert [f for _, f in got] == [frame(300, seed=i) for i in range(3)]
    finally:
        a.close()
        b.close()


def _have_tun() -> bool:
    return Path("/dev/net/tun").exists() and subprocess.run(["ip", "link"], capture_output=True).returncode == 0


tap_only = pytest.mark.skipif(not _have_tun(), reason="needs /dev/net/tun and iproute2 (root)")


@tap_only
def test_tap_bridges_frames_both_ways_and_sends_rarp(sock_dir: Path) -> None:
    name = f"vut{int(time.time() * 1000) % 100000}"
    dev = TapNet(name, mac="02:00:00:00:00:07")
    assert Path(f"/sys/class/net/{name}").exists()
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    try:
        cap.bind((name, 0))
        cap.settimeout(5)
        with serving(dev, sock_dir / "tap.sock") as sock, NetDriver(sock) as drv:
            assert vu.ProtocolFeature.RARP in drv.fe.protocol_features
            drv.post_rx(32)
            out = frame(200, dst=b"\x02\0\0\0\0\x99", seed=11)
            drv.transmit([out])
            drv.reap_tx(1)
            while (seen := cap.recv(65536)) != out:
                pass  # skip IPv6 noise the kernel may send
            # What the kernel sends out of the TAP reaches the driver.
            inject = frame(300, dst=b"\x02\0\0\0\0\x07", seed=12)
            cap.send(inject)
            while inject not in [data for _, data in drv.receive(1)]:
                pass  # IPv6 noise the kernel sends may come first
            drv.fe.send_rarp(bytes.fromhex("020000000007"))
            while (seen := cap.recv(65536))[12:14] != b"\x80\x35":
                pass
            assert seen[:6] == b"\xff" * 6 and seen[6:12] == bytes.fromhex("020000000007")
        c = dev.counters()
        assert c["tx_frames"] >= 1 and c["rx_frames"] >= 1
    finally:
        cap.close()
        del dev
    deadline = time.monotonic() + 5
    while Path(f"/sys/class/net/{name}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/sys/class/net/{name}").exists(), "a TAP the device created outlives it"


@tap_only
def test_tap_deleted_under_the_device(sock_dir: Path) -> None:
    name = f"vud{int(time.time() * 1000) % 100000}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    dev = TapNet(name)
    try:
        with serving(dev, sock_dir / "tap.sock", sessions=2) as sock:
            with NetDriver(sock) as drv:
                drv.post_rx(8)
                subprocess.run(["ip", "link", "del", name], check=True)
                drv.transmit([frame(100)] * 3)
                used = drv.reap_tx(3)
                assert len(used) == 3
            assert dev.counters()["tx_errors"] >= 1 or dev.counters()["tx_frames"] == 3
            with NetDriver(sock) as drv2:  # the next session still works
                drv2.post_rx(2)
                drv2.transmit([frame(64)])
                drv2.reap_tx(1)
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def test_serve_net_command_line(sock_dir: Path) -> None:
    caps = subprocess.run(["vhostuser-rs", "serve-net", "--print-capabilities"], capture_output=True, text=True,
                          check=True)
    assert '"type": "net"' in caps.stdout
    bad = subprocess.run(["vhostuser-rs", "serve-net", "--loopback"], capture_output=True, text=True)
    assert bad.returncode == 2
    sock = sock_dir / "cli.sock"
    proc = subprocess.Popen(["vhostuser-rs", "serve-net", "--loopback", "--socket-path", str(sock),
                             "--queue-pairs", "2", "--mac", "02:00:00:00:00:42"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        with NetDriver(sock) as drv:
            assert drv.queue_num == 2 and drv.fe.get_config(0, 6) == bytes.fromhex("020000000042")
            drv.post_rx(4)
            drv.transmit([frame(64)])
            drv.receive(1)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "serve-net: tx_frames=1 " in err and "rx_frames=1 " in err


def test_a_frame_needing_more_buffers_than_the_ring_holds_is_dropped(sock_dir: Path) -> None:
    dev = LoopbackNet(mtu=9000)
    with serving(dev, sock_dir / "lo.sock") as sock, NetDriver(sock, queue_size=4) as drv:
        drv.post_rx(4, size=1024)
        drv.transmit([frame(9000)])  # would need 9 buffers of a 4-entry ring
        drv.reap_tx(1)
        assert dev.counters()["rx_dropped"] == 1
        f = frame(500, seed=1)
        drv.transmit([f])
        assert drv.receive(1)[0][1] == swapped(f)


def test_a_generic_python_device_declares_and_answers_its_requests(sock_dir: Path) -> None:
    class Announcer(vu.Device):
        num_queues = 1
        protocol_features = int(vu.ProtocolFeature.RARP)

        def __init__(self) -> None:
            self.requests: list[tuple[vu.FrontendRequest, int]] = []

        def process(self, queue: vu.backend.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
            pass

        def device_request(self, request: vu.FrontendRequest, value: int) -> bool:
            self.requests.append((request, value))
            return value != 0

    dev = Announcer()
    backend = vu.Backend.listen(sock_dir / "an.sock", dev)
    with backend, serving(backend, sock_dir / "an.sock") as sock, vu.Frontend.connect(sock) as fe:
        fe.negotiate()
        assert vu.ProtocolFeature.RARP in fe.protocol_features
        fe.send_rarp(bytes.fromhex("020000000009"))
        with pytest.raises(vu.RequestRejectedError):
            fe.send_rarp(bytes(6))
        # NET_SET_MTU was not declared: not offered, so the front-end refuses to send it.
        assert vu.ProtocolFeature.MTU not in fe.protocol_features
    assert dev.requests[0] == (vu.FrontendRequest.SEND_RARP, int.from_bytes(bytes.fromhex("020000000009"), "little"))


def test_a_region_added_twice_stays_until_removed_twice(sock_dir: Path) -> None:
    """QEMU's net front-end adds the whole guest memory once per queue pair (one vhost device
    each) on the same socket: a repeated ADD_MEM_REG is counted, not refused as an overlap."""
    dev = LoopbackNet(queue_pairs=2)
    with serving(dev, sock_dir / "lo.sock") as sock, NetDriver(sock) as drv:
        assert vu.ProtocolFeature.CONFIGURE_MEM_SLOTS in drv.fe.protocol_features
        region, fd = drv.mem.regions[0], drv.mem.fds()[0]
        drv.fe.add_mem_reg(region, fd)  # the second queue pair's device
        drv.post_rx(4)
        drv.fe.rem_mem_reg(region)  # that device goes away: the memory stays mapped
        f = frame(64, seed=3)
        drv.transmit([f])
        assert drv.receive(1)[0][1] == swapped(f)
        drv.fe.rem_mem_reg(region)
        with pytest.raises(vu.RequestRejectedError):
            drv.fe.rem_mem_reg(region)
