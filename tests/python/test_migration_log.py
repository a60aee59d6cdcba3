"""Migration as QEMU does it, from the front-end side: dirty logging (Frontend.enable_logging,
resize_logging, disable_logging) and SEND_RARP after a switch-over (Frontend.announce), against
our loopback device served in-process, a Python NetDevice, and DPDK testpmd's net_vhost.

The driver (tests/python/netdriver.py) knows where every buffer is, so the test says which pages
the back-end wrote: the RX buffers it filled (up to the length it reported) and the used rings.
Every other page (TX buffers it only read, pages nobody touches) must stay clear."""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Iterable
from pathlib import Path

import dpdk
import pytest

import vhostuser_rs as vu
from vhostuser_rs import frontend
from vhostuser_rs.devices import LoopbackNet
from vhostuser_rs.enums import FrontendRequest
from vhostuser_rs.net import NetFeature

from netdriver import HDR, NetDriver, _reap, frame, swapped
from test_net_backend import serving
from test_net_client import vhost_pmd

PAGE = frontend.LOG_PAGE_SIZE
FEATURES = int(vu.VirtioFeature.VERSION_1 | NetFeature.MRG_RXBUF | vu.VirtioFeature.EVENT_IDX)
NO_REPLY_ACK = int(frontend.SUPPORTED_PROTOCOL_FEATURES) & ~int(vu.ProtocolFeature.REPLY_ACK)


def pages(addr: int, length: int) -> set[int]:
    return set(range(addr // PAGE, (addr + length - 1) // PAGE + 1)) if length else set()


def used_ring_pages(vq: vu.Virtqueue) -> set[int]:
    """The pages of `vq`'s used ring (flags, idx, entries, avail_event)."""
    return pages(vq.queue.guest_addrs[2], 4 + 8 * vq.queue.size + 2)


class Traffic:
    """Frames through a NetDriver, with the pages the device wrote and the ones it only read."""

    def __init__(self, drv: NetDriver) -> None:
        self.drv = drv

    def round_trip(self, frames: list[bytes], *, macswap: bool = True) -> tuple[set[int], set[int]]:
        """Posts RX buffers, transmits `frames`, waits for them back; returns (pages of RX
        buffers written, pages of TX buffers). The frames are checked too."""
        drv = self.drv
        rx_buffers: dict[int, int] = {}
        for _ in frames:
            addr = drv.mem.alloc(2048, 64)
            head = drv.rx[0].queue.add([], [(addr, 2048)])
            rx_buffers[head] = drv.buffers[(0, head)] = addr
        drv.rx[0].queue.publish()
        drv.rx[0].kick()
        tx_mark = drv.mem.alloc(PAGE, PAGE)  # TX buffers start on a page of their own
        drv.transmit(frames)
        tx_end = drv.mem.alloc(64, 64)
        drv.reap_tx(len(frames))
        written: set[int] = set()
        got: list[bytes] = []
        for head, length in _reap(drv.rx[0], len(frames), 10.0):
            addr = rx_buffers[head]
            assert length <= 2048
            written |= pages(addr, length)
            data = drv.mem.read(addr, length)
            assert struct.unpack_from("<H", data, 10)[0] == 1  # num_buffers: one buffer each
            got.append(data[HDR:])
        assert got == ([swapped(f) for f in frames] if macswap else frames)
        return written, pages(tx_mark + PAGE, tx_end - tx_mark - PAGE)

    def allowed(self) -> set[int]:
        return used_ring_pages(self.drv.rx[0]) | used_ring_pages(self.drv.tx[0])


def settle(log: vu.DirtyLog, quiet: float = 0.1, timeout: float = 5.0) -> None:
    """Clears `log` until the back-end has written nothing for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    log.take_dirty()
    while True:
        time.sleep(quiet)
        if not log.take_dirty():
            return
        assert time.monotonic() < deadline, "the back-end keeps writing"


def check_marks(dirty: Iterable[int], written: set[int], tx: set[int], untouched: int, traffic: Traffic) -> None:
    d = set(dirty)
    assert written, "no RX buffer was written"
    assert written <= d, f"written pages not marked: {sorted(written - d)}"
    extra = d - written
    assert extra <= traffic.allowed(), f"pages marked the device did not write: {sorted(extra - traffic.allowed())}"
    assert used_ring_pages(traffic.drv.rx[0]) & d, "the RX used ring is not marked"
    read_only = tx - written - traffic.allowed()
    assert read_only, "no TX page to check"
    assert not read_only & d, f"TX buffer pages marked: {sorted(read_only & d)}"
    assert untouched // PAGE not in d


def wait_marked(log: vu.DirtyLog, at_least: set[int], timeout: float = 5.0) -> set[int]:
    """Reads and clears `log` until every page of `at_least` was seen (the used index is
    logged right after it is published)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while not at_least <= seen:
        assert time.monotonic() < deadline, f"never marked: {sorted(at_least - seen)}"
        seen |= set(log.take_dirty())
        time.sleep(0.01)
    time.sleep(0.05)
    return seen | set(log.take_dirty())


def record_requests(fe: vu.Frontend) -> list[FrontendRequest]:
    """Makes `fe` record every request code it sends (every exchange goes through its core)."""
    sent: list[FrontendRequest] = []
    core = fe._core

    class Recording:
        def request(self, req: int, *args: object, **kw: object) -> object:
            sent.append(FrontendRequest(req))
            return core.request(req, *args, **kw)  # type: ignore[arg-type]

        def __getattr__(self, name: str) -> object:
            return getattr(core, name)

    fe._core = Recording()  # type: ignore[assignment]
    return sent


# -- our back-end ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_device_writes_mark_exactly_their_pages(sock_dir: Path) -> None:
    with serving(LoopbackNet(), sock_dir / "lo.sock") as sock, NetDriver(sock, features=FEATURES) as drv:
        fe = drv.fe
        assert vu.ProtocolFeature.LOG_SHMFD in fe.protocol_features
        assert fe.negotiated["offered_features"] & int(vu.VirtioFeature.LOG_ALL)
        assert vu.VirtioFeature.LOG_ALL not in fe.features  # negotiate never acks it
        untouched = drv.mem.alloc(PAGE, PAGE)
        drv.mem.write(untouched, b"the front-end's writes are not logged")
        log = fe.enable_logging()
        assert fe.dirty_log is log and vu.VirtioFeature.LOG_ALL in fe.features
        assert log.size * 8 * PAGE >= drv.mem.guest_end
        settle(log)
        traffic = Traffic(drv)
        frames = [frame(60 + 37 * i, seed=i) for i in range(40)]
        written, tx = traffic.round_trip(frames)
        check_marks(wait_marked(log, written), written, tx, untouched, traffic)
        # Read and clear: nothing new until new traffic.
        assert log.take_dirty() == []
        time.sleep(0.05)
        assert log.take_dirty() == []
        written2, tx2 = traffic.round_trip(frames[:5])
        check_marks(wait_marked(log, written2), written2, tx2, untouched, traffic)
        # Off: the feature bit goes, the rings stop logging, the same traffic marks nothing.
        assert fe.disable_logging() is log
        assert fe.dirty_log is None and vu.VirtioFeature.LOG_ALL not in fe.features
        log.take_dirty()
        traffic.round_trip(frames[:10])
        time.sleep(0.1)
        assert log.take_dirty() == []


@pytest.mark.timeout(60)
def test_resize_after_memory_grows(sock_dir: Path) -> None:
    with serving(LoopbackNet(), sock_dir / "lo.sock") as sock, \
            NetDriver(sock, features=FEATURES, memory=8 << 20) as drv:
        fe = drv.fe
        log = fe.enable_logging()
        assert log.size * 8 * PAGE == 8 << 20
        traffic = Traffic(drv)
        written, _ = traffic.round_trip([frame(100)])
        wait_marked(log, written)
        # Pages marked before the resize must survive it.
        log.mark(3 * PAGE, 1)
        assert fe.resize_logging(drv.mem) is log  # large enough already
        grown = vu.GuestMemory.allocate(regions=[(16 << 20, 1 << 20)])
        if vu.ProtocolFeature.CONFIGURE_MEM_SLOTS in fe.protocol_features:
            (region,), (fd,) = grown.regions, grown.fds()
            fe.add_mem_reg(region, fd)
        else:
            fe.set_mem_table(vu.GuestMemory.map([*drv.mem.regions, *grown.regions], [*drv.mem.fds(), *grown.fds()]))
        new = fe.resize_logging(grown)
        assert new is not log and fe.dirty_log is new
        assert new.size * 8 * PAGE >= grown.guest_end == 17 << 20
        assert 3 in new.take_dirty()
        # The device writes a frame into a buffer of the new region: its page is marked.
        buffer = (16 << 20) + 5 * PAGE + 3072  # the frame straddles a page boundary
        head = drv.rx[0].queue.add([], [(buffer, 2048)])
        drv.rx[0].queue.publish()
        drv.rx[0].kick()
        f = frame(1500, seed=9)
        drv.transmit([f])
        drv.reap_tx(1)
        (got_head, length), = _reap(drv.rx[0], 1, 5.0)
        assert (got_head, length) == (head, HDR + len(f))
        assert grown.read(buffer + HDR, len(f)) == swapped(f)
        seen = wait_marked(new, pages(buffer, length))
        assert pages(buffer, length) == {(16 << 20) // PAGE + 5, (16 << 20) // PAGE + 6}
        assert not {p for p in seen if p >= (16 << 20) // PAGE} - pages(buffer, length)
        fe.disable_logging()


@pytest.mark.timeout(60)
def test_get_features_barrier_without_reply_ack(sock_dir: Path) -> None:
    """Without REPLY_ACK, SET_FEATURES with LOG_ALL and the SET_VRING_ADDRs with the log flag are
    each followed by a GET_FEATURES (the spec's barrier); with REPLY_ACK they are acked instead."""
    with serving(LoopbackNet(), sock_dir / "lo.sock", sessions=2) as sock:
        for protocol_features, barrier in ((NO_REPLY_ACK, True), (None, False)):
            with vu.Frontend.connect(sock) as fe:
                mem = vu.GuestMemory.allocate(4 << 20)
                fe.negotiate(features=FEATURES, protocol_features=protocol_features, memory=mem)
                assert (vu.ProtocolFeature.REPLY_ACK not in fe.protocol_features) == barrier
                rings = [fe.setup_queue(i, 64) for i in (0, 1)]
                sent = record_requests(fe)
                log = fe.enable_logging()
                F = FrontendRequest
                g = [F.GET_FEATURES] if barrier else []
                assert sent == [F.SET_LOG_BASE, F.SET_FEATURES, *g, F.SET_VRING_ADDR, F.SET_VRING_ADDR, *g]
                del sent[:]
                fe.disable_logging()
                assert sent == [F.SET_FEATURES, *g, F.SET_VRING_ADDR, F.SET_VRING_ADDR, *g]
                assert log.size and rings


class StatusLast(vu.Device):
    """Writes one status byte in the last writable byte of each chain and reports 1 byte, as a
    virtio-blk device answering IOERR does."""

    num_queues = 1
    features = int(vu.VirtioFeature.VERSION_1)

    def process(self, queue: vu.backend.BatchQueue, chains: list[vu.DescriptorChain]) -> None:
        for chain in chains:
            chain.write(b"\x01", chain.writable_len - 1)
            queue.complete(chain, 1)


class StatusLastPerRequest(vu.Device):
    """The same per request; a chain reading b"raise" makes it raise after the write (Rust then
    completes the chain with 0 bytes)."""

    num_queues = 1
    features = int(vu.VirtioFeature.VERSION_1)

    def process_request(self, queue_index: int, chain: vu.DescriptorChain) -> int | None:
        chain.writable[-1][-1] = 1
        if chain.read() == b"raise":
            raise RuntimeError("a device failing after it wrote into the chain")
        return 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("device", [StatusLast, StatusLastPerRequest])
def test_python_device_writes_are_logged_past_the_used_length(
    sock_dir: Path, caplog: pytest.LogCaptureFixture, device: type[vu.Device]
) -> None:
    """A Python device writes anywhere in its writable views: the pages of every writable buffer
    of a completed chain are logged, whatever length it reports, also when it raised."""
    requests = [b"ok"] if device is StatusLast else [b"ok", b"raise"]
    backend = vu.Backend.listen(sock_dir / "py.sock", device())
    with serving(backend, sock_dir / "py.sock") as sock, vu.Frontend.connect(sock) as fe:
        mem = vu.GuestMemory.allocate(4 << 20)
        fe.negotiate(features=int(vu.VirtioFeature.VERSION_1), memory=mem)
        vq = fe.setup_queue(0, 16)
        log = fe.enable_logging()
        for request in requests:
            out, data, status = mem.alloc(8, 8), mem.alloc(2 * PAGE, PAGE), mem.alloc(1, PAGE)
            mem.write(out, request)
            settle(log)
            vq.queue.add([(out, len(request))], [(data, 2 * PAGE), (status, 1)])
            vq.queue.publish()
            vq.kick()
            dirty = wait_marked(log, {status // PAGE})
            assert mem.read(status, 1) == b"\x01"
            # The device did not say it wrote the data buffer: it is logged anyway (safe), as
            # the status byte after it is.
            assert pages(data, 2 * PAGE) <= dirty, (request, sorted(dirty))
            vq.queue.reap()
    assert (b"raise" in requests) == ("a device failing after it wrote" in caplog.text)


class Announcer(vu.NetDevice):
    """A Python net device that offers RARP (it overrides send_rarp) and records the MACs."""

    queue_pairs = 1

    def __init__(self) -> None:
        self.rarps: list[bytes] = []

    def send_rarp(self, mac: bytes) -> None:
        self.rarps.append(bytes(mac))


@pytest.mark.timeout(60)
def test_send_rarp_only_without_guest_announce(sock_dir: Path) -> None:
    dev = Announcer()
    mac = bytes.fromhex("020000abcdef")
    announce = 1 << vu.net.VIRTIO_NET["VIRTIO_NET_F_GUEST_ANNOUNCE"]
    with vu.Backend.listen(sock_dir / "py.sock", dev) as backend, \
            serving(backend, sock_dir / "py.sock", sessions=2) as sock:
        # A guest that cannot announce itself: the front-end asks the back-end to.
        with NetDriver(sock, features=FEATURES) as drv:
            assert vu.ProtocolFeature.RARP in drv.fe.protocol_features
            assert not drv.features & announce
            assert drv.fe.announce(mac)
            assert dev.rarps == [mac]
        # GUEST_ANNOUNCE negotiated: the guest announces itself, no SEND_RARP.
        with NetDriver(sock, features=FEATURES | announce | int(NetFeature.CTRL_VQ)) as drv:
            assert drv.features & announce
            sent = record_requests(drv.fe)
            assert not drv.fe.announce(mac)
            assert sent == [] and dev.rarps == [mac]


@pytest.mark.timeout(60)
def test_no_send_rarp_without_the_rarp_feature(sock_dir: Path) -> None:
    with serving(LoopbackNet(), sock_dir / "lo.sock") as sock, NetDriver(sock, features=FEATURES) as drv:
        assert vu.ProtocolFeature.RARP not in drv.fe.protocol_features
        sent = record_requests(drv.fe)
        assert not drv.fe.announce(bytes(6))
        assert sent == []


# -- DPDK testpmd's net_vhost -----------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_dpdk_vhost_pmd_dirty_log_and_rarp(tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "vhost.sock"
    with vhost_pmd(sock, tmp_path, "macswap") as pmd, NetDriver(sock, features=FEATURES) as drv:
        fe = drv.fe
        if vu.ProtocolFeature.STATUS in fe.protocol_features:
            fe.set_status(vu.DeviceStatus.ACKNOWLEDGE | vu.DeviceStatus.DRIVER | vu.DeviceStatus.FEATURES_OK
                          | vu.DeviceStatus.DRIVER_OK)
        dpdk.wait_ready(pmd)
        assert vu.ProtocolFeature.LOG_SHMFD in fe.protocol_features
        assert vu.ProtocolFeature.RARP in fe.protocol_features
        untouched = drv.mem.alloc(PAGE, PAGE)
        traffic = Traffic(drv)
        assert traffic.round_trip([frame(64)])[0]  # forwarding works before logging
        log = fe.enable_logging()
        assert vu.VirtioFeature.LOG_ALL in fe.features
        settle(log)
        frames = [frame(60 + 37 * i, seed=i) for i in range(40)]
        written, tx = traffic.round_trip(frames)
        check_marks(wait_marked(log, written), written, tx, untouched, traffic)
        assert log.take_dirty() == []
        # Switch-over: GUEST_ANNOUNCE not negotiated, so SEND_RARP; DPDK injects the RARP into
        # its receive path and macswap sends it back to us.
        assert not drv.features & (1 << vu.net.VIRTIO_NET["VIRTIO_NET_F_GUEST_ANNOUNCE"])
        mac = bytes.fromhex("02000000beef")
        drv.post_rx(4)
        assert fe.announce(mac)
        (_, rarp), = drv.receive(1)
        assert rarp[12:14] == b"\x80\x35" and rarp[:6] == mac, rarp[:14].hex()
        fe.disable_logging()
        assert vu.VirtioFeature.LOG_ALL not in fe.features
        m = re.findall(r"negotiated Virtio features: (0x[0-9a-f]+)", pmd.output)
        assert m and int(m[-1], 16) & int(vu.VirtioFeature.LOG_ALL) == 0, pmd.tail()
