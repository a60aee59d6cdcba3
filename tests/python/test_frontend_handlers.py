"""The built-in answers to back-end requests (BuiltinHandler and its tables): every request of
the spec that a front-end can receive — IOTLB_MSG, CONFIG_CHANGE_MSG, VRING_HOST_NOTIFIER_MSG,
VRING_CALL, VRING_ERR, SHARED_OBJECT_ADD/REMOVE/LOOKUP, SHMEM_MAP/UNMAP — sent by a back-end,
and the front-end doing what the spec says, with the ack (REPLY_ACK on the back-end request
channel) carrying the outcome. Real back-ends where one sends the request (our serve-blk's
IOTLB misses under ACCESS_PLATFORM, a Python device's CONFIG_CHANGE_MSG), a scripted
back-end for the others."""

from __future__ import annotations

import errno
import mmap
import os
import struct
import time
from pathlib import Path

import pytest

import vhostuser_rs as vu
from vhostuser_rs import BackendRequest as B
from vhostuser_rs import FrontendRequest as F
from vhostuser_rs import messages as m
from vhostuser_rs.blk import CONFIG_SIZE, SECTOR, BlockClient

from peers import serve_blk
from scripted import FEATURES, memfd, scripted_backend

P = vu.ProtocolFeature
IOVA = 0x7_0000_0000
PAGE = mmap.PAGESIZE
CHANNEL = P.REPLY_ACK | P.BACKEND_REQ | P.BACKEND_SEND_FD | P.MQ


def errno_status(code: int) -> int:
    return (-code) & (2**64 - 1)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    return img


# -- negotiation: only what is implemented is acknowledged ----------------------------------------


def test_negotiate_acks_only_the_channel_features_the_handler_answers(sock_dir: Path) -> None:
    everything = int(P.REPLY_ACK | P.BACKEND_REQ | P.BACKEND_SEND_FD | P.HOST_NOTIFIER | P.SHARED_OBJECT | P.SHMEM
                     | P.INBAND_NOTIFICATIONS | P.CONFIG)

    class OnlyConfig(vu.BackendRequestHandler):
        def config_change_msg(self) -> int | None:
            return 0

    cases = [
        (None, False, P.REPLY_ACK | P.CONFIG),
        (OnlyConfig(), False, P.REPLY_ACK | P.CONFIG | P.BACKEND_REQ),
        (vu.BuiltinHandler(), False, P(everything) & ~P.INBAND_NOTIFICATIONS),
        (vu.BuiltinHandler(), True, P(everything)),
    ]
    for handler, inband, expected in cases:
        with scripted_backend(sock_dir, protocol_features=everything) as fake, vu.Frontend.connect(fake.path) as fe:
            result = fe.negotiate(handler=handler, inband_notifications=inband)
            assert result.protocol_features == expected, (handler, inband)
            assert (F.GET_SHMEM_CONFIG in [r for r, _, _ in fake.seen]) == (P.SHMEM in expected)


def test_dependencies_are_not_acked_without_what_they_need(sock_dir: Path) -> None:
    """INBAND_NOTIFICATIONS needs REPLY_ACK; HOST_NOTIFIER and SHMEM need BACKEND_SEND_FD."""
    offered = int(P.BACKEND_REQ | P.HOST_NOTIFIER | P.SHMEM | P.INBAND_NOTIFICATIONS | P.SHARED_OBJECT)
    with scripted_backend(sock_dir, protocol_features=offered) as fake, vu.Frontend.connect(fake.path) as fe:
        result = fe.negotiate(handler=vu.BuiltinHandler(), inband_notifications=True)
        assert result.protocol_features == P.BACKEND_REQ | P.SHARED_OBJECT


def test_access_platform_needs_someone_to_answer_misses(sock_dir: Path) -> None:
    """ACCESS_PLATFORM is refused before anything is acked without a handler, or without
    BACKEND_REQ and REPLY_ACK (spec: protocol.md §5.4)."""
    features = int(FEATURES | vu.VirtioFeature.ACCESS_PLATFORM)
    for proto, handler in ((int(CHANNEL), None), (int(P.BACKEND_REQ), vu.BuiltinHandler())):
        with scripted_backend(sock_dir, features=features, protocol_features=proto) as fake, \
                vu.Frontend.connect(fake.path) as fe:
            with pytest.raises(vu.NegotiationError, match="ACCESS_PLATFORM"):
                fe.negotiate(features=features, handler=handler)
            assert [r for r, _, _ in fake.seen] == [F.GET_FEATURES, F.GET_PROTOCOL_FEATURES]


# -- IOTLB_MSG -------------------------------------------------------------------------------------


def test_iommu_table_drives_serve_blk_with_access_platform(sock_dir: Path, image: Path) -> None:
    """The three-line use: a table mapping the client's memory at a high IOVA; every ring and
    buffer address is an IOVA, and our serve-blk asks for the translations it lacks."""
    sock = sock_dir / "blk.sock"
    with serve_blk(image, sock, num_queues=1):
        iommu = vu.IommuTable()
        iommu.map(IOVA, 64 << 20, 0)
        with BlockClient.connect(sock, iommu=iommu) as disk:
            assert vu.VirtioFeature.ACCESS_PLATFORM in disk.features
            disk.write(4096, b"through the iommu".ljust(SECTOR, b"."))
            assert disk.read(4096, SECTOR).startswith(b"through the iommu")
            assert iommu.misses, "the back-end asked for translations"
            assert all(msg.iova >= IOVA and msg.type == m.IotlbMsg.MISS for msg in iommu.misses)
            # The answer was one UPDATE covering the whole (contiguous) entry: the rest of the
            # I/O needs no further misses.
            n = len(iommu.misses)
            for i in range(8):
                disk.write(i * SECTOR, bytes([i]) * SECTOR)
            assert len(iommu.misses) == n
            # unmap sends INVALIDATE: the staging buffers' range is dropped from the back-end's
            # IOTLB, so after mapping it again the back-end asks for it again (the rings, whose
            # pages stay mapped, do not miss).
            staging = disk._scratch
            iommu.unmap(IOVA + staging, 1 << 20)
            assert [(e.iova - IOVA, e.size) for e in iommu.entries] == [(0, staging), (staging + (1 << 20), (63 << 20) - staging)]
            iommu.map(IOVA + staging, 1 << 20, staging)
            assert disk.read(0, SECTOR) == bytes([0]) * SECTOR
            again = iommu.misses[n:]
            assert again and all(IOVA + staging <= msg.iova < IOVA + staging + (1 << 20) for msg in again)


def test_iommu_misses_acks_and_failures(sock_dir: Path) -> None:
    """A scripted back-end sends MISSes: a mapped IOVA gets an IOTLB_MSG UPDATE on the main
    channel (clipped to the entry and the guest region, the entry's permission, the front-end's
    address) before the ack 0; an unmapped IOVA or a permission the entry lacks gets a failure
    (-EFAULT) and no UPDATE; ACCESS_FAIL is recorded and acked; UPDATE/INVALIDATE from a
    back-end are refused."""
    mem = vu.GuestMemory.allocate(1 << 20)
    iommu = vu.IommuTable()
    iommu.map(IOVA, 2 * PAGE, 0x3000, vu.IommuTable.RO)
    iommu.map(IOVA + 0x10000, 1 << 30, 0, vu.IommuTable.RW)  # beyond guest memory: clipped
    features = int(FEATURES | vu.VirtioFeature.ACCESS_PLATFORM)
    with scripted_backend(sock_dir, features=features, protocol_features=int(CHANNEL)) as fake, \
            vu.Frontend.connect(fake.path) as fe:
        fe.negotiate(memory=mem, handler=vu.BuiltinHandler(iommu=iommu), features=features)
        assert fake.ask(B.IOTLB_MSG, m.IotlbMsg(IOVA + 5, 0, 0, 1, m.IotlbMsg.MISS)) == (0, [])
        updates = fake.requests(F.IOTLB_MSG)
        assert updates == [(m.IotlbMsg(IOVA, 2 * PAGE, mem.user_addr(0x3000), 1, m.IotlbMsg.UPDATE), 0)]
        assert fake.ask(B.IOTLB_MSG, m.IotlbMsg(IOVA + 0x10000 + 64, 0, 0, 3, m.IotlbMsg.MISS)) == (0, [])
        assert fake.requests(F.IOTLB_MSG)[-1] == (
            m.IotlbMsg(IOVA + 0x10000, mem.guest_end, mem.user_addr(0), 3, m.IotlbMsg.UPDATE), 0)
        n = len(fake.seen)
        # Write access to a read-only entry, an unmapped IOVA, an IOVA mapped beyond memory.
        for iova, perm in ((IOVA, 2), (IOVA - PAGE, 1), (IOVA + 0x10000 + (2 << 20), 1)):
            status, _ = fake.ask(B.IOTLB_MSG, m.IotlbMsg(iova, 0, 0, perm, m.IotlbMsg.MISS))
            assert status == errno_status(errno.EFAULT), hex(iova)
        assert fake.ask(B.IOTLB_MSG, m.IotlbMsg(IOVA, 0, 0, 2, m.IotlbMsg.ACCESS_FAIL)) == (0, [])
        assert iommu.access_failures == [m.IotlbMsg(IOVA, 0, 0, 2, m.IotlbMsg.ACCESS_FAIL)]
        status, _ = fake.ask(B.IOTLB_MSG, m.IotlbMsg(IOVA, PAGE, 0, 3, m.IotlbMsg.UPDATE))
        assert status == errno_status(errno.EINVAL)
        fe.get_queue_num()  # every UPDATE the front-end sent has been seen by now
        assert [r for r, _, _ in fake.seen[n:]] == [F.GET_QUEUE_NUM]
        assert len(iommu.misses) == 5
        # Unmapping part of an entry splits it and invalidates the range in the back-end.
        iommu.unmap(IOVA + 0x10000 + PAGE, PAGE)
        assert fake.requests(F.IOTLB_MSG)[-1] == (m.IotlbMsg(IOVA + 0x10000 + PAGE, PAGE, 0, 0, m.IotlbMsg.INVALIDATE), 0)
        assert [(e.iova - IOVA, e.size) for e in iommu.entries] == [
            (0, 2 * PAGE), (0x10000, PAGE), (0x10000 + 2 * PAGE, (1 << 30) - 2 * PAGE)]
        assert iommu.translate(IOVA + 0x10000 + 2 * PAGE + 7) == 2 * PAGE + 7
        assert iommu.translate(IOVA + 0x10000 + PAGE) is None
        with pytest.raises(ValueError):
            iommu.map(IOVA + PAGE, PAGE, 0)  # overlaps
        with pytest.raises(ValueError):
            iommu.map(2**64 - PAGE, 2 * PAGE, 0)  # wraps
        with pytest.raises(ValueError):
            iommu.map(0, PAGE, 0, perm=0)


# -- CONFIG_CHANGE_MSG -----------------------------------------------------------------------------


class BlockConfigDevice(vu.Device):
    """A virtio-blk config space behind our back-end (no I/O needed here); qemu-storage-daemon
    7.2 does not send CONFIG_CHANGE_MSG after block_resize (checked with strace), so our own
    back-end sends it, as a resizing device would."""

    num_queues = 1
    features = int(vu.VirtioFeature.VERSION_1)

    def __init__(self, sectors: int) -> None:
        self.space = bytearray(CONFIG_SIZE)
        self.space[0:8] = sectors.to_bytes(8, "little")

    def config(self) -> bytes:
        return bytes(self.space)


def test_block_client_rereads_its_config_on_config_change(sock_dir: Path) -> None:
    sock = sock_dir / "blkcfg.sock"
    device = BlockConfigDevice(2048)
    with vu.Backend.listen(sock, device) as backend:
        backend.start()
        while not sock.exists():
            time.sleep(0.01)
        with BlockClient.connect(sock) as disk:
            assert disk.capacity == 2048 * SECTOR
            seen: list[int] = []
            disk.config_callbacks.append(lambda d: seen.append(d.capacity))
            device.space[0:8] = (4096).to_bytes(8, "little")
            backend.config_changed(need_reply=True)  # acked once the client re-read its config
            assert disk.capacity == 4096 * SECTOR and seen == [4096 * SECTOR]
    assert backend.error is None


class ConfigDevice(vu.Device):
    num_queues = 1
    features = int(vu.VirtioFeature.VERSION_1)

    def __init__(self) -> None:
        self.space = bytearray(8)

    def config(self) -> bytes:
        return bytes(self.space)


def test_config_change_callbacks_with_a_python_device(sock_dir: Path) -> None:
    """Our own back-end: the device's CONFIG_CHANGE_MSG (with and without NEED_REPLY) reaches
    the callbacks, which read the new config on the main channel before the ack; a callback
    that raises is answered with a failure and the session goes on."""
    sock = sock_dir / "cfg.sock"
    device = ConfigDevice()
    with vu.Backend.listen(sock, device) as backend:
        backend.start()
        while not sock.exists():
            time.sleep(0.01)
        values: list[bytes] = []
        handler = vu.BuiltinHandler(on_config_change=lambda fe: values.append(fe.get_config(0, 8)))
        with vu.Frontend.connect(sock) as fe:
            fe.negotiate(handler=handler)
            device.space[:] = (42).to_bytes(8, "little")
            backend.config_changed(need_reply=True)
            assert values == [(42).to_bytes(8, "little")] and handler.config_changes == 1
            device.space[:] = (43).to_bytes(8, "little")
            backend.config_changed()
            fe.get_queue_num()
            deadline = time.monotonic() + 5
            while len(values) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert values[-1] == (43).to_bytes(8, "little")

            def broken(_fe: vu.Frontend) -> None:
                raise RuntimeError("callback bug")

            handler.config_callbacks.append(broken)
            with pytest.raises(vu.RequestRejectedError):
                backend.config_changed(need_reply=True)
            assert fe.get_queue_num() == 1
    assert backend.error is None


# -- SHARED_OBJECT_ADD / REMOVE / LOOKUP -----------------------------------------------------------


def test_shared_object_table_between_two_backends(sock_dir: Path) -> None:
    """Back-end A exports an object; back-end B looks it up and receives A's dma-buf fd, which
    the front-end fetched with GET_SHARED_OBJECT on A's main channel. Only A may remove it."""
    uuid, other = b"A" * 16, b"B" * 16
    exported = memfd(b"dma-buf of A", PAGE)
    table = vu.SharedObjectTable()
    proto = int(CHANNEL | P.SHARED_OBJECT)
    try:
        with scripted_backend(sock_dir, "a.sock", protocol_features=proto, shared={uuid: exported}) as a, \
                scripted_backend(sock_dir, "b.sock", protocol_features=proto) as b, \
                vu.Frontend.connect(a.path) as fe_a, vu.Frontend.connect(b.path) as fe_b:
            fe_a.negotiate(handler=vu.BuiltinHandler(shared_objects=table))
            fe_b.negotiate(handler=vu.BuiltinHandler(shared_objects=table))
            assert a.ask(B.SHARED_OBJECT_ADD, m.SharedObject(uuid)) == (0, [])
            assert table.exporter(uuid) is fe_a and uuid in table
            assert a.ask(B.SHARED_OBJECT_ADD, m.SharedObject(uuid))[0] == errno_status(errno.EEXIST)
            status, fds = b.ask(B.SHARED_OBJECT_LOOKUP, m.SharedObject(uuid))
            assert status == 0 and len(fds) == 1
            assert os.pread(fds[0], 12, 0) == b"dma-buf of A"
            os.close(fds[0])
            assert a.requests(F.GET_SHARED_OBJECT) == [(m.SharedObject(uuid), 0)]
            # LOOKUP's reply is mandatory: sent even without NEED_REPLY.
            status, fds = b.ask(B.SHARED_OBJECT_LOOKUP, m.SharedObject(uuid), need_reply=False)
            assert status == 0 and len(fds) == 1
            os.close(fds[0])
            assert b.ask(B.SHARED_OBJECT_LOOKUP, m.SharedObject(other)) == (errno_status(errno.ENOENT), [])
            assert b.ask(B.SHARED_OBJECT_REMOVE, m.SharedObject(uuid))[0] == errno_status(errno.EPERM)
            assert a.ask(B.SHARED_OBJECT_REMOVE, m.SharedObject(uuid)) == (0, [])
            assert a.ask(B.SHARED_OBJECT_REMOVE, m.SharedObject(uuid))[0] == errno_status(errno.ENOENT)
            assert b.ask(B.SHARED_OBJECT_LOOKUP, m.SharedObject(uuid))[0] == errno_status(errno.ENOENT)
            # An object of the application's own, and objects of a session that ends.
            table.add(other, exported)
            status, fds = b.ask(B.SHARED_OBJECT_LOOKUP, m.SharedObject(other))
            assert status == 0 and os.pread(fds[0], 12, 0) == b"dma-buf of A"
            os.close(fds[0])
            assert b.ask(B.SHARED_OBJECT_ADD, m.SharedObject(uuid)) == (0, [])
            # A back-end exporting without end is stopped at the table's limit.
            table.MAX_OBJECTS = len(table) + 2
            statuses = [b.ask(B.SHARED_OBJECT_ADD, m.SharedObject(bytes([0xF0, i]) * 8))[0] for i in range(4)]
            assert statuses == [0, 0, errno_status(errno.ENOSPC), errno_status(errno.ENOSPC)]
            fe_b.close()
            assert uuid not in table and other in table
    finally:
        os.close(exported)


# -- SHMEM_MAP / SHMEM_UNMAP -----------------------------------------------------------------------


def test_shmem_regions_map_the_fds_the_backend_sends(sock_dir: Path) -> None:
    sizes = {0: 4 * PAGE, 3: 2 * PAGE}
    proto = int(CHANNEL | P.SHMEM | P.RESET_DEVICE)
    fd = memfd(b"hello from the back-end", 2 * PAGE)
    try:
        with scripted_backend(sock_dir, protocol_features=proto, shmem_sizes=sizes) as fake, \
                vu.Frontend.connect(fake.path) as fe:
            handler = vu.BuiltinHandler()
            result = fe.negotiate(handler=handler)
            assert P.SHMEM in result.protocol_features
            regions = handler.shared_regions
            assert sorted((i, r.size) for i, r in regions.items()) == [(0, 4 * PAGE), (3, 2 * PAGE)]
            r0 = regions[0]
            with pytest.raises(vu.VhostUserError):
                r0.read(0, 1)  # nothing mapped yet: an error, not a fault
            # Read-write mapping of the fd's first page at offset 2 pages.
            assert fake.ask(B.SHMEM_MAP, m.MmapRequest(0, 0, 2 * PAGE, PAGE, 1), [fd]) == (0, [])
            assert r0.read(2 * PAGE, 23) == b"hello from the back-end"
            r0.write(2 * PAGE, b"HELLO")
            assert os.pread(fd, 5, 0) == b"HELLO"  # the back-end sees the front-end's writes
            # Read-only mapping of the second page of the fd.
            os.pwrite(fd, b"second page", PAGE)
            assert fake.ask(B.SHMEM_MAP, m.MmapRequest(0, PAGE, 0, PAGE, 0), [fd]) == (0, [])
            assert r0.read(0, 11) == b"second page"
            with pytest.raises(vu.VhostUserError):
                r0.write(0, b"x")
            einval = errno_status(errno.EINVAL)
            refused = [
                m.MmapRequest(0, 0, 2 * PAGE, PAGE, 1),  # exactly over an existing mapping
                m.MmapRequest(0, 0, PAGE, 2 * PAGE, 1),  # overlapping one
                m.MmapRequest(0, 0, 3 * PAGE, 2 * PAGE, 1),  # beyond the region
                m.MmapRequest(0, 0, 2**64 - PAGE, 2 * PAGE, 1),  # offset + len overflows
                m.MmapRequest(0, 0, 3 * PAGE, 100, 1),  # not whole pages
                m.MmapRequest(0, 0, 3 * PAGE, 0, 1),  # empty
                m.MmapRequest(1, 0, 0, PAGE, 1),  # no such region
                m.MmapRequest(0, 0, 3 * PAGE, PAGE, 2),  # unknown flag
            ]
            for req in refused:
                assert fake.ask(B.SHMEM_MAP, req, [fd])[0] == einval, req
            assert fake.ask(B.SHMEM_MAP, m.MmapRequest(3, 0, 0, 2 * PAGE, 1), [fd]) == (0, [])
            assert regions[3].read(0, 5) == b"HELLO"
            # UNMAP names exactly one mapping (same offset and length).
            assert fake.ask(B.SHMEM_UNMAP, m.MmapRequest(0, 0, 2 * PAGE, 2 * PAGE, 0))[0] == einval
            assert fake.ask(B.SHMEM_UNMAP, m.MmapRequest(0, 0, PAGE, PAGE, 0))[0] == einval
            assert fake.ask(B.SHMEM_UNMAP, m.MmapRequest(0, 0, 2 * PAGE, PAGE, 0)) == (0, [])
            with pytest.raises(vu.VhostUserError):
                r0.read(2 * PAGE, 1)
            assert r0.mappings == [(0, PAGE, PAGE, False)]
            # RESET_DEVICE drops every mapping; the regions stay for the next SHMEM_MAP.
            fe.reset_device()
            assert r0.mappings == [] and regions[3].mappings == [] and handler.shared_regions[0] is r0
            assert fake.ask(B.SHMEM_MAP, m.MmapRequest(0, 0, 2 * PAGE, PAGE, 1), [fd]) == (0, [])
            # The session's end drops every mapping (the fd can then go too).
            fe.close()
            assert r0.mappings == [] and regions[3].mappings == []
    finally:
        os.close(fd)


# -- VRING_HOST_NOTIFIER_MSG -----------------------------------------------------------------------


def test_host_notifier_pages_are_mapped_and_used_for_kicks(sock_dir: Path) -> None:
    proto = int(CHANNEL | P.HOST_NOTIFIER)
    doorbells = memfd(b"", 4 * PAGE)
    mem = vu.GuestMemory.allocate(1 << 20)
    try:
        with scripted_backend(sock_dir, protocol_features=proto, num_queues=2) as fake, \
                vu.Frontend.connect(fake.path) as fe:
            handler = vu.BuiltinHandler()
            fe.negotiate(memory=mem, handler=handler)
            vq0, vq1 = fe.setup_queue(0, 16), fe.setup_queue(1, 16)
            # Ring 1's doorbell is the fd's third page.
            assert fake.ask(B.VRING_HOST_NOTIFIER_MSG, m.VringArea(1, PAGE, 2 * PAGE), [doorbells]) == (0, [])
            notifier = handler.host_notifier(1)
            assert notifier is not None and notifier.index == 1
            vq1.kick()
            assert os.pread(doorbells, 2, 2 * PAGE) == struct.pack("<H", 1)
            with pytest.raises(BlockingIOError):
                os.eventfd_read(vq1.kick_fd)  # the eventfd was not used
            vq0.kick()  # no page for ring 0: the eventfd
            assert os.eventfd_read(vq0.kick_fd) == 1
            einval = errno_status(errno.EINVAL)
            for area in (
                m.VringArea(0, 2 * PAGE, 0),  # size is not the page size
                m.VringArea(0, PAGE, 100),  # offset not page-aligned
                m.VringArea(5, PAGE, 0),  # no such ring
                m.VringArea(0, PAGE, 16 * PAGE),  # beyond the file
            ):
                assert fake.ask(B.VRING_HOST_NOTIFIER_MSG, area, [doorbells])[0] == einval, area
            # Without an fd (or with NOFD): unregistered; kicks go back to the eventfd.
            assert fake.ask(B.VRING_HOST_NOTIFIER_MSG, m.VringArea(1, PAGE, 0, nofd=True)) == (0, [])
            assert handler.host_notifier(1) is None and notifier.closed
            vq1.kick()
            assert os.eventfd_read(vq1.kick_fd) == 1
            # Stopping a ring unmaps its page (before GET_VRING_BASE, as QEMU does).
            assert fake.ask(B.VRING_HOST_NOTIFIER_MSG, m.VringArea(1, PAGE, 0), [doorbells]) == (0, [])
            stopped = handler.host_notifier(1)
            fe.stop_queue(1)
            assert stopped is not None and stopped.closed and handler.host_notifier(1) is None
            assert fake.ask(B.VRING_HOST_NOTIFIER_MSG, m.VringArea(0, PAGE, 0), [doorbells]) == (0, [])
            kept = handler.host_notifier(0)
            assert kept is not None
        assert kept.closed  # close() unmapped it
    finally:
        os.close(doorbells)


# -- VRING_CALL / VRING_ERR (INBAND_NOTIFICATIONS) -------------------------------------------------


def test_inband_notifications(sock_dir: Path) -> None:
    """With INBAND_NOTIFICATIONS the rings get no fds (NOFD), kicks are VRING_KICK messages, and
    the back-end's VRING_CALL / VRING_ERR wake the ring's waiters (acked 0); for a ring that
    was not set up they are refused."""
    proto = int(CHANNEL | P.INBAND_NOTIFICATIONS)
    mem = vu.GuestMemory.allocate(1 << 20)
    with scripted_backend(sock_dir, protocol_features=proto) as fake, vu.Frontend.connect(fake.path) as fe:
        handler = vu.BuiltinHandler()
        result = fe.negotiate(memory=mem, handler=handler, inband_notifications=True)
        assert P.INBAND_NOTIFICATIONS in result.protocol_features
        vq = fe.setup_queue(0, 16)
        for req in (F.SET_VRING_KICK, F.SET_VRING_CALL, F.SET_VRING_ERR):
            assert fake.requests(req) == [(m.VringFd(0, True), 0)], req
        vq.kick()
        assert fake.requests(F.VRING_KICK) == [(m.VringState(0, 0), 0)]
        assert not vq.wait(0)
        assert fake.ask(B.VRING_CALL, m.VringState(0, 0)) == (0, [])
        assert vq.wait(1)
        assert fake.ask(B.VRING_ERR, m.VringState(0, 0)) == (0, [])
        assert handler.vring_errors == {0: 1} and os.eventfd_read(vq.err_fd) == 1
        einval = errno_status(errno.EINVAL)
        assert fake.ask(B.VRING_CALL, m.VringState(1, 0))[0] == einval
        assert fake.ask(B.VRING_ERR, m.VringState(7, 0))[0] == einval
        # Without NEED_REPLY nothing is answered, and the call still lands.
        fake.ask(B.VRING_CALL, m.VringState(0, 0), need_reply=False)
        assert vq.wait(5)


def test_without_inband_notifications_rings_keep_their_fds(sock_dir: Path) -> None:
    proto = int(CHANNEL | P.INBAND_NOTIFICATIONS)
    mem = vu.GuestMemory.allocate(1 << 20)
    with scripted_backend(sock_dir, protocol_features=proto) as fake, vu.Frontend.connect(fake.path) as fe:
        fe.negotiate(memory=mem, handler=vu.BuiltinHandler())
        assert P.INBAND_NOTIFICATIONS not in fe.protocol_features
        fe.setup_queue(0, 16).kick()
        assert fake.requests(F.SET_VRING_CALL) == [(m.VringFd(0, False), 1)]
        fe.get_queue_num()
        assert fake.requests(F.VRING_KICK) == []


def test_unknown_backend_requests_are_refused_and_the_channel_goes_on(sock_dir: Path) -> None:
    """A request code the spec does not define (with NEED_REPLY and an fd): answered with a
    failure, the fd closed, the next request served."""
    from vhostuser_rs import Channel, hazmat

    fd = memfd(b"", PAGE)
    try:
        with scripted_backend(sock_dir, protocol_features=int(CHANNEL | P.CONFIG)) as fake, \
                vu.Frontend.connect(fake.path) as fe:
            handler = vu.BuiltinHandler()
            fe.negotiate(handler=handler)
            assert fake.has_channel.wait(10) and fake.channel is not None
            fake.channel.send(hazmat.encode_raw(99, b"", flags=hazmat.FLAG_VERSION | hazmat.FLAG_NEED_REPLY), [fd])
            reply, fds = fake.channel.recv(Channel.BACKEND, timeout=10)
            assert reply.request == 99 and reply.payload != 0 and fds == []
            assert fake.ask(B.CONFIG_CHANGE_MSG) == (0, []) and handler.config_changes == 1
    finally:
        os.close(fd)


class Doorbells(vu.Device):
    """A device of our own back-end that maps doorbell pages and exports objects (it only sends
    the requests; the front-end's answers are what is tested)."""

    num_queues = 2
    features = int(vu.VirtioFeature.VERSION_1)
    protocol_features = int(P.HOST_NOTIFIER | P.BACKEND_SEND_FD | P.SHARED_OBJECT)


def test_host_notifier_and_shared_objects_from_our_own_backend(sock_dir: Path) -> None:
    sock = sock_dir / "door.sock"
    page = memfd(b"", PAGE)
    try:
        with vu.Backend.listen(sock, Doorbells()) as backend:
            backend.start()
            while not sock.exists():
                time.sleep(0.01)
            mem = vu.GuestMemory.allocate(1 << 20)
            handler = vu.BuiltinHandler()
            with vu.Frontend.connect(sock) as fe:
                result = fe.negotiate(memory=mem, handler=handler)
                assert P.HOST_NOTIFIER | P.SHARED_OBJECT in result.protocol_features
                fe.setup_queue(0, 16)
                vq1 = fe.setup_queue(1, 16)
                status = backend.backend_request(B.VRING_HOST_NOTIFIER_MSG, m.VringArea(1, PAGE, 0), [page], need_reply=True)
                assert status == 0 and handler.host_notifier(1) is not None
                vq1.kick()
                assert os.pread(page, 2, 0) == struct.pack("<H", 1)
                assert backend.backend_request(B.VRING_HOST_NOTIFIER_MSG, m.VringArea(1, PAGE, 0, nofd=True), need_reply=True) == 0
                assert handler.host_notifier(1) is None
                uuid = bytes(range(16))
                assert backend.backend_request(B.SHARED_OBJECT_ADD, m.SharedObject(uuid), need_reply=True) == 0
                assert handler.shared_objects.exporter(uuid) is fe
                assert backend.backend_request(B.SHARED_OBJECT_REMOVE, m.SharedObject(uuid), need_reply=True) == 0
                assert uuid not in handler.shared_objects
        assert backend.error is None
    finally:
        os.close(page)
