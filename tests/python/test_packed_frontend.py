"""The front-end on packed rings (VIRTIO_F_RING_PACKED): the negotiation and the ring set-up
messages (SET_VRING_ADDR's three parts, SET_VRING_BASE's packed encoding), hostile completions,
DPDK testpmd's net_vhost (which offers RING_PACKED) with frames checked both ways, and the block
client against every vhost-user-blk back-end: where the back-end offers RING_PACKED the same data
checks as on split rings, where it does not (qemu-storage-daemon 7.2's libvhost-user has no
packed rings; serve-blk until its packed device side lands) the clear refusal."""

from __future__ import annotations

import asyncio
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dpdk
import pytest

import vhostuser_rs as vu
from vhostuser_rs import FrontendRequest as F
from vhostuser_rs import _native
from vhostuser_rs import messages as m
from vhostuser_rs.aio import AsyncBlockClient
from vhostuser_rs.blk import BlockClient, RequestType
from vhostuser_rs.netclient import NetClient

from netdriver import frame, swapped
from packedblk import packed_block_backend
from peers import qemu_storage_daemon, serve_blk
from scripted import scripted_backend
from test_net_client import check_port_counters, exchange, vhost_pmd

pytestmark = pytest.mark.timeout(120)

PACKED = int(vu.VirtioFeature.RING_PACKED)
OFFER = int(
    vu.VirtioFeature.PROTOCOL_FEATURES | vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.EVENT_IDX
    | vu.VirtioFeature.INDIRECT_DESC | vu.VirtioFeature.RING_PACKED
)
REPLY_ACK = int(vu.ProtocolFeature.REPLY_ACK)
IMAGE_SIZE = 8 << 20
# Descriptor flags (virtio 1.2 §2.8): WRITE, AVAIL (bit 7), USED (bit 15).
WRITE, AVAIL, USED = 2, 1 << 7, 1 << 15


def sector_bytes(n: int) -> bytes:
    return struct.pack("<Q", n) + bytes(504)


@pytest.fixture
def image(sock_dir: Path) -> Path:
    path = sock_dir / "disk.img"
    with open(path, "wb") as f:
        for sector in range(IMAGE_SIZE // 512):
            f.write(sector_bytes(sector))
    return path


# -- negotiation and ring set-up (a scripted back-end records every message) -----------------------


def test_packed_rings_are_acked_only_when_asked_and_set_up_with_their_three_parts(sock_dir: Path) -> None:
    mem = vu.GuestMemory.allocate(4 << 20)
    with scripted_backend(sock_dir, features=OFFER, protocol_features=REPLY_ACK) as fake:
        with vu.Frontend.connect(fake.path) as fe:  # type: ignore[attr-defined]
            result = fe.negotiate(memory=mem, packed=True)
            assert vu.VirtioFeature.RING_PACKED in result.features
            [(acked, _)] = fake.requests(F.SET_FEATURES)
            assert isinstance(acked, int) and acked & PACKED
            # Any size: packed rings need no power of two.
            vq = fe.setup_queue(0, 12, indirect_max=4)
            dq = vq.queue
            assert dq.packed and dq.size == 12
            [(base, _)] = fake.requests(F.SET_VRING_BASE)
            # Slot 0 with wrap counter 1 for both halves (bits 0-14 / 15, 16-30 / 31).
            assert base == m.VringState(0, 0x8000_8000) and dq.vring_base == 0x8000_8000
            [(addr, _)] = fake.requests(F.SET_VRING_ADDR)
            assert isinstance(addr, m.VringAddr)
            desc, driver_event, device_event = dq.user_addrs
            # SET_VRING_ADDR: desc = descriptor ring, avail = driver area, used = device area.
            assert (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr) == (desc, driver_event, device_event)
            assert addr.log_guest_addr == dq.guest_addrs[0] == dq.log_guest_addr
            # The scripted back-end answers GET_VRING_BASE with 0: slot 0, wrap counter 0.
            stopped = fe.stop_queue(0)
            assert stopped == 0
            again = fe.setup_queue(0, 12, base=stopped).queue
            assert fake.requests(F.SET_VRING_BASE)[-1][0] == m.VringState(0, 0)
            # A fresh ring restarted with wrap counter 0 has nothing used in it.
            assert again.reap() == [] and again.vring_base == 0
            with pytest.raises(vu.NegotiationError, match="split rings only"):
                fe.setup_inflight(1, 12)
    # Offered but not asked for: a split ring, RING_PACKED not acknowledged.
    with scripted_backend(sock_dir, features=OFFER, protocol_features=REPLY_ACK) as fake:
        with vu.Frontend.connect(fake.path) as fe:  # type: ignore[attr-defined]
            fe.negotiate(memory=mem)
            [(acked, _)] = fake.requests(F.SET_FEATURES)
            assert isinstance(acked, int) and not acked & PACKED
            assert not fe.setup_queue(0, 16).queue.packed


def test_packed_asked_for_but_not_offered_is_a_clear_error(sock_dir: Path) -> None:
    with scripted_backend(sock_dir, features=OFFER & ~PACKED, protocol_features=REPLY_ACK) as fake:
        with vu.Frontend.connect(fake.path) as fe:  # type: ignore[attr-defined]
            with pytest.raises(vu.NegotiationError, match="VIRTIO_F_RING_PACKED"):
                fe.negotiate(memory=vu.GuestMemory.allocate(1 << 20), packed=True)
            assert not fake.requests(F.SET_FEATURES), "nothing was acknowledged"


# -- hostile completions on a packed ring ------------------------------------------------------


def _used(mem: vu.GuestMemory, dq: vu.DriverQueue, slot: int, buffer_id: int, length: int, *, wrap: bool = True,
          write: bool = True) -> None:
    """Writes a used descriptor at `slot` as a device with used wrap counter `wrap` would."""
    flags = (AVAIL | USED if wrap else 0) | (WRITE if write else 0)
    mem.write(dq.guest_addrs[0] + 16 * slot, struct.pack("<QIHH", 0, length, buffer_id, flags))


def test_hostile_used_descriptors_on_a_packed_driver_queue() -> None:
    mem = vu.GuestMemory.allocate(1 << 20)
    buf = mem.alloc(4096, 64)
    dq = vu.DriverQueue(mem, 8, packed=True, index=3)
    a = dq.add([(buf, 16)], [(buf + 16, 512)])
    dq.publish()
    # Wrap bits the device got wrong (a used descriptor of the previous lap): not a completion.
    _used(mem, dq, 0, a, 100, wrap=False)
    assert dq.reap() == []
    # An id never submitted.
    _used(mem, dq, 0, 5, 1)
    with pytest.raises(vu.VirtqueueError, match="not in flight") as e:
        dq.reap()
    assert e.value.queue_index == 3
    # A length beyond the buffer's writable bytes.
    _used(mem, dq, 0, a, 513)
    with pytest.raises(vu.VirtqueueError, match="513"):
        dq.reap()
    # Nothing was taken by the errors: the right completion is reaped.
    _used(mem, dq, 0, a, 512)
    assert dq.reap() == [(a, 512)] and dq.in_flight == 0
    # A device event suppression area with reserved flags: the kick decision is an error.
    dq.add([(buf, 1)])
    dq.publish()
    mem.write(dq.guest_addrs[2] + 2, struct.pack("<H", 3))
    with pytest.raises(vu.VirtqueueError, match="flags"):
        dq.kick_needed()


def test_hostile_completions_through_the_native_block_path(sock_dir: Path) -> None:
    """The one-crossing request engine on a packed ring whose device (played here on the shared
    memory) returns an id never submitted: a VirtqueueError, later calls fail the same way, and
    everything still closes (the fd-leak check of conftest runs after)."""
    mem = vu.GuestMemory.allocate(8 << 20)
    with scripted_backend(sock_dir, features=OFFER, protocol_features=REPLY_ACK) as fake:
        with vu.Frontend.connect(fake.path) as fe:  # type: ignore[attr-defined]
            fe.negotiate(memory=mem, packed=True)
            vq = fe.setup_queue(0, 16)
            engine = _native.BlockRequests(vq.queue, mem, vq.kick_fd, vq.call_fd, fe._main_fd(), index=0,
                                           slot_bytes=4096)
            try:
                [good, _] = engine.submit([(RequestType.IN, 0, 512), (RequestType.IN, 1, 512)])
                # Flipped wrap bits first: ignored, the request stays in flight.
                _used(mem, vq.queue, 0, 0, 513, wrap=False)
                assert engine.reap(8, timeout=0.05) == []
                _used(mem, vq.queue, 0, 9, 1)
                os.eventfd_write(vq.call_fd, 1)
                with pytest.raises(vu.VirtqueueError, match="not in flight"):
                    engine.reap(8, timeout=1.0)
                with pytest.raises(vu.VirtqueueError):
                    engine.submit([(RequestType.FLUSH, 0, 0)])
                del good
            finally:
                engine.close()


def test_block_client_survives_a_hostile_packed_device(sock_dir: Path) -> None:
    """BlockClient(packed=True) whose device answers a read with a used descriptor naming an id
    never submitted: the read raises VirtqueueError, the next request too (the ring is broken
    for good), and the client closes (no fd left behind: conftest checks)."""
    proto = int(vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.CONFIG)
    with scripted_backend(sock_dir, features=OFFER, protocol_features=proto) as fake:
        disk = BlockClient.connect(fake.path, packed=True, timeout=10.0)  # type: ignore[attr-defined]
        try:
            dq = disk.queues[0].queue
            errors: list[BaseException] = []

            def read() -> None:
                try:
                    disk.read(0, 512)
                except BaseException as e:  # noqa: BLE001 - checked below
                    errors.append(e)

            reader = threading.Thread(target=read)
            reader.start()
            deadline = time.monotonic() + 5
            while dq.in_flight == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            _used(disk.memory, dq, 0, 77, 1)
            os.eventfd_write(disk.queues[0].call_fd, 1)
            reader.join(10)
            assert len(errors) == 1 and isinstance(errors[0], vu.VirtqueueError), errors
            assert "77" in str(errors[0])
            with pytest.raises(vu.VirtqueueError):
                disk.flush()
        finally:
            disk.close()


# -- DPDK testpmd's net_vhost (offers RING_PACKED) ----------------------------------------------


def _negotiated_by_testpmd(pmd: dpdk.Testpmd) -> int:
    found = re.findall(r"negotiated Virtio features: (0x[0-9a-f]+)", pmd.output)
    assert found, pmd.tail()
    return int(found[-1], 16)


@pytest.mark.parametrize("mode", ["macswap", "io"])
def test_net_client_on_packed_rings_against_dpdk(tmp_path: Path, sock_dir: Path, mode: str) -> None:
    sock = sock_dir / "vhost.sock"
    with vhost_pmd(sock, tmp_path, mode) as pmd, NetClient.connect(sock, packed=True) as nic:
        dpdk.wait_ready(pmd)
        assert nic.packed and nic.features & PACKED
        assert _negotiated_by_testpmd(pmd) == nic.features, "testpmd runs the same (packed) features"
        frames = [frame(60 + (i % 1400), seed=i) for i in range(3000)]
        got = exchange(nic, frames)
        assert got == ([swapped(f) for f in frames] if mode == "macswap" else frames)
        check_port_counters(pmd, nic)


def test_net_client_two_packed_queue_pairs_against_dpdk(tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "vhost.sock"
    with vhost_pmd(sock, tmp_path, "macswap", queues=2) as pmd, \
            NetClient.connect(sock, queue_pairs=2, packed=True, queue_size=100) as nic:
        dpdk.wait_ready(pmd)
        assert _negotiated_by_testpmd(pmd) & PACKED
        for qp in (0, 1):
            frames = [frame(64 + i % 300, seed=qp * 11 + i) for i in range(700)]
            assert exchange(nic, frames, queue_pair=qp, window=64) == [swapped(f) for f in frames]
        check_port_counters(pmd, nic)


def test_bench_net_packed_against_dpdk(tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "vhost.sock"
    with vhost_pmd(sock, tmp_path, "macswap") as pmd:
        out = subprocess.run(
            [sys.executable, "-m", "vhostuser_rs", "bench", "--device", "net", "--socket", str(sock), "--packed",
             "--mode", "loopback", "--time", "1", "--json"],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["packed"] is True and doc["rx_frames"] > 1000 and doc["drops"] == 0
        assert _negotiated_by_testpmd(pmd) & PACKED


def test_net_client_on_packed_rings_against_serve_net(tmp_path: Path, sock_dir: Path) -> None:
    """Our own serve-net --loopback: frames checked both ways on packed rings once it offers
    RING_PACKED (its packed device side is another change; until then this skips)."""
    sock = sock_dir / "serve-net.sock"
    with dpdk.serve_net(sock, tmp_path, ["--loopback", "--poll-us", "50"]):
        if not _offers_packed(sock):
            pytest.skip("serve-net does not offer RING_PACKED yet (its packed device side is another change)")
        with NetClient.connect(sock, packed=True, queue_size=100) as nic:
            assert nic.packed and nic.features & PACKED
            frames = [frame(60 + i % 1000, seed=i) for i in range(2000)]
            assert exchange(nic, frames, window=64) == [swapped(f) for f in frames]


# -- virtio-blk back-ends --------------------------------------------------------------------------


def _offers_packed(sock: Path) -> bool:
    with vu.Frontend.connect(sock) as fe:
        return vu.VirtioFeature.RING_PACKED in fe.get_features()


def _block_checks_on_packed_rings(sock: Path, image: Path) -> None:
    """What the split-ring block tests check, on packed rings: data both ways against the image
    file, requests completing out of order, a full ring, the batch API, aio and run_io."""
    with BlockClient.connect(sock, num_queues=2, queue_size=24, packed=True, indirect=True) as disk:
        assert disk.packed and disk.features & PACKED
        assert disk.queues[0].queue.packed
        # Plain reads and writes, across slot boundaries (128 KiB slots: 300 KiB is 3 requests).
        assert disk.read(512 * 10, 1024) == sector_bytes(10) + sector_bytes(11)
        blob = os.urandom(300 << 10)
        disk.write(1 << 20, blob)
        assert disk.read(1 << 20, len(blob)) == blob
        disk.flush()
        with open(image, "rb") as f:
            f.seek(1 << 20)
            assert f.read(len(blob)) == blob
        # Many in flight on a 24-slot ring (3 slots per request direct, 1 with indirect): the
        # submit returns a prefix when the ring is full, the back-end completes in any order.
        reqs = [(RequestType.IN, 512 * (100 + 7 * i), 512) for i in range(80)]
        tokens: dict[int, int] = {}
        done: dict[int, bytes | None] = {}
        deadline = time.monotonic() + 20
        while len(done) < len(reqs):
            assert time.monotonic() < deadline
            sent = disk.submit(reqs[len(tokens):], queue=1)
            assert len(sent) <= 24
            tokens.update({t: len(tokens) + k for k, t in enumerate(sent)})
            for token, status, data in disk.reap(64, timeout=1.0, queue=1):
                assert status == 0
                done[tokens[token]] = data
        assert all(done[i] == sector_bytes(100 + 7 * i) for i in range(80))
        # The Rust I/O loop: stamped writes, checked reads.
        w = disk.run_io(rw="write", bs=4096, iodepth=16, duration=0.3, queue=0, verify=True)
        assert w["ios"] > 10 and w["errors"] == 0
        r = disk.run_io(rw="randread", bs=4096, iodepth=16, duration=0.3, queue=1, verify=True)
        assert r["ios"] > 10 and r["errors"] == 0 and r["verify_failures"] == 0

    async def aio() -> None:
        async with await AsyncBlockClient.connect(sock, packed=True, queue_size=16) as disk:
            got = await asyncio.gather(*(disk.read(512 * (2000 + i), 512) for i in range(64)))
            assert got == [sector_bytes(2000 + i) for i in range(64)]

    asyncio.run(aio())


def test_block_client_on_packed_rings_against_qemu_storage_daemon(image: Path, sock_dir: Path) -> None:
    """qemu-storage-daemon is served by libvhost-user, which (QEMU 7.2 to 10.x) has no packed
    rings and does not offer RING_PACKED: asking for them is the clear NegotiationError, and
    the same client on split rings works. Should a daemon offer them, the packed checks run."""
    sock = sock_dir / "qsd.sock"
    with qemu_storage_daemon(image, sock, num_queues=2):
        if _offers_packed(sock):
            _block_checks_on_packed_rings(sock, image)
            return
        with pytest.raises(vu.NegotiationError, match="does not offer VIRTIO_F_RING_PACKED"):
            BlockClient.connect(sock, packed=True)
        # The refused session was closed and the daemon takes the next one.
        with BlockClient.connect(sock) as disk:
            assert not disk.packed and disk.read(0, 512) == sector_bytes(0)
        out = subprocess.run(
            [sys.executable, "-m", "vhostuser_rs", "bench", "--socket", str(sock), "--packed", "--time", "0.2"],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 1 and "VIRTIO_F_RING_PACKED" in out.stderr, out


@contextmanager
def _serve_blk_packed(image: Path, sock_dir: Path) -> Iterator[Path]:
    sock = sock_dir / "blk.sock"
    with serve_blk(image, sock, num_queues=2):
        if not _offers_packed(sock):
            pytest.skip("serve-blk does not offer RING_PACKED yet (its packed device side is another change)")
        yield sock


def test_block_client_on_packed_rings_against_serve_blk(image: Path, sock_dir: Path) -> None:
    with _serve_blk_packed(image, sock_dir) as sock:
        _block_checks_on_packed_rings(sock, image)


def test_bench_packed_against_serve_blk(image: Path, sock_dir: Path) -> None:
    with _serve_blk_packed(image, sock_dir) as sock:
        out = subprocess.run(
            [sys.executable, "-m", "vhostuser_rs", "bench", "--socket", str(sock), "--packed", "--time", "0.5",
             "--iodepth", "8", "--json"],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["packed"] is True and doc["ios"] > 100 and doc["errors"] == 0


def test_packed_rings_handed_to_a_restarted_serve_blk(image: Path, sock_dir: Path) -> None:
    """reconnect= on packed rings: a read is put in the ring while the back-end is dead; the
    restarted back-end gets the ring handed over (the request written into it again) and the
    read completes with the right data."""
    sock = sock_dir / "blk.sock"
    with serve_blk(image, sock, num_queues=1) as proc:
        if not _offers_packed(sock):
            pytest.skip("serve-blk does not offer RING_PACKED yet (its packed device side is another change)")
        with BlockClient.connect(sock, packed=True, reconnect=20.0, timeout=30.0) as disk:
            assert disk.read(0, 512) == sector_bytes(0)
            proc.kill()
            proc.wait()
            sock.unlink(missing_ok=True)
            got: list[bytes] = []
            reader = threading.Thread(target=lambda: got.append(disk.read(512 * 77, 4096)))
            reader.start()
            time.sleep(0.5)
            assert disk.queues[0].queue.in_flight == 1, "the read waits in the ring"
            with serve_blk(image, sock, num_queues=1):
                reader.join(30)
                assert got == [b"".join(sector_bytes(77 + i) for i in range(8))]
                assert disk.frontend.sessions == 2


# -- a packed vhost-user-blk device in this process (tests/python/packedblk.py) ---------------------


def test_block_client_on_packed_rings_against_a_packed_device(image: Path, sock_dir: Path) -> None:
    """Every block path on packed rings against a device that completes each batch in reverse
    order: the crate's packed device side served on threads (no installed block back-end
    offers RING_PACKED)."""
    sock = sock_dir / "packed.sock"
    with packed_block_backend(sock, image) as be:
        _block_checks_on_packed_rings(sock, image)
        assert be.sessions == 2 and be.acked & PACKED
        # EVENT_IDX goes with packed rings as with split ones (DESC event suppression).
        assert be.acked & int(vu.VirtioFeature.EVENT_IDX)
        # The Python request path (native=False) too.
        with BlockClient.connect(sock, packed=True, native=False, queue_size=10) as disk:
            assert disk.read(512 * 5, 512) == sector_bytes(5)
            disk.write(512 * 6, b"\x5a" * 1024)
            assert disk.read(512 * 6, 1024) == b"\x5a" * 1024
            assert disk.get_id() == b"packed-test"


def test_bench_packed_against_a_packed_device(image: Path, sock_dir: Path) -> None:
    sock = sock_dir / "packed.sock"
    with packed_block_backend(sock, image):
        out = subprocess.run(
            [sys.executable, "-m", "vhostuser_rs", "bench", "--socket", str(sock), "--packed", "--time", "0.5",
             "--iodepth", "8", "--rw", "rw", "--json"],
            capture_output=True, text=True, timeout=60,
        )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["packed"] is True and doc["ios"] > 50 and doc["errors"] == 0


def test_reconnect_hands_a_packed_ring_with_a_request_in_flight_to_a_new_device(image: Path, sock_dir: Path) -> None:
    """The back-end takes a read from the ring and dies without completing it; the restarted
    back-end gets the ring with the read written into it again (DriverQueue.hand_over) and
    completes it with the right data."""
    sock = sock_dir / "packed.sock"
    got: list[bytes] = []
    with packed_block_backend(sock, image) as first:
        disk = BlockClient.connect(sock, packed=True, reconnect=20.0, timeout=30.0)
        try:
            assert disk.read(0, 512) == sector_bytes(0)
            first.die_on_pop = True
            reader = threading.Thread(target=lambda: got.append(disk.read(512 * 77, 4096)))
            reader.start()
            assert first.dead.wait(10), "the back-end took the read"
        except BaseException:
            disk.close()
            raise
    try:
        assert disk.queues[0].queue.in_flight == 1
        with packed_block_backend(sock, image) as second:
            reader.join(30)
            assert got == [b"".join(sector_bytes(77 + i) for i in range(8))]
            assert second.sessions == 1 and disk.frontend.sessions == 2
            assert disk.read(512 * 9, 512) == sector_bytes(9)
    finally:
        disk.close()


# -- one interface: the same code over split and packed queues --------------------------------------


def _queues(packed: bool, mem: vu.GuestMemory, size: int) -> tuple[vu.DriverQueue, vu.DeviceQueue]:
    driver = vu.DriverQueue(mem, size, event_idx=True, indirect_max=4, packed=packed)
    # Packed: desc, driver event area, device event area, passed as SET_VRING_ADDR's desc, avail
    # and used.
    desc, avail, used = driver.guest_addrs
    return driver, vu.DeviceQueue(mem, size, desc_addr=desc, avail_addr=avail, used_addr=used, event_idx=True,
                                  indirect=True, packed=packed)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_the_same_code_drives_split_and_packed_queues(packed: bool) -> None:
    """Driver and device code written once runs on both formats: chains direct and indirect,
    completions out of order, several laps of the ring, kicks and interrupts decided by the
    rings (EVENT_IDX on both)."""
    mem = vu.GuestMemory.allocate(1 << 20)
    buf = mem.alloc(64 << 10, 64)
    driver, device = _queues(packed, mem, 8)
    assert driver.packed is packed
    kicks = calls = 0
    for lap in range(12):
        heads = {}
        for i in range(3):
            src, dst = buf + 1024 * i, buf + 32768 + 1024 * i
            mem.write(src, bytes([lap, i]) * 8)
            heads[driver.add([(src, 16)], [(dst, 64)], indirect=i == 1)] = dst
        driver.publish()
        kicks += driver.kick_needed()

        def echo(chains: list[vu.DescriptorChain]) -> list[int]:
            return [c.write(c.read()) for c in chains]

        # process() completes in order; complete the last chain first by hand for disorder.
        chains = device.pop()
        assert len(chains) == 3 and device.in_flight == 3
        for c in reversed(chains):
            device.complete(c, c.write(c.read()))
        calls += device.publish()
        assert not device.process(echo)  # nothing left
        done = driver.reap()
        assert sorted(done) == sorted((h, 16) for h in heads)
        assert [h for h, _ in done] == [c.head for c in reversed(chains)]
        for h, dst in heads.items():
            assert mem.read(dst, 16) == mem.read(buf + 1024 * list(heads).index(h), 16)
    assert driver.in_flight == 0 and driver.num_free == 8
    assert kicks >= 1 and calls >= 1
    assert not device.is_broken
