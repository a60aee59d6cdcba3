"""ACCESS_PLATFORM: ring and buffer addresses are IOVAs that the back-end translates through
the IOTLB the front-end fills, on demand, in answer to IOTLB MISS requests on the back-end
request channel (protocol.md §6.6). IOVAs here are the guest addresses plus a large offset, so
a back-end that used them as guest or front-end addresses would find nothing there."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import vhostuser_rs as vu
from vhostuser_rs.messages import IotlbMsg

IOVA_BASE = 0x7_0000_0000
PAGE = 4096
QSIZE = 16


class Echo(vu.Device):
    num_queues = 1
    features = int(vu.VirtioFeature.VERSION_1)

    def process_request(self, queue_index: int, chain: vu.DescriptorChain) -> int | None:
        return chain.write(chain.read()[::-1])


class Iommu(vu.BackendRequestHandler):
    """The front-end's IOMMU: answers each MISS with a one-page UPDATE (read-write unless the
    page is listed in `read_only`), as QEMU's vIOMMU does."""

    def __init__(self, mem: vu.GuestMemory) -> None:
        self.mem = mem
        self.fe: vu.Frontend | None = None
        self.misses: list[tuple[int, int]] = []
        self.read_only: set[int] = set()
        self.lock = threading.Lock()
        self.ring_pages: set[int] = set()  # the IOVA pages of the ring parts (set by session())

    def iotlb_msg(self, msg: IotlbMsg) -> int | None:
        assert msg.type == IotlbMsg.MISS and self.fe is not None
        with self.lock:
            self.misses.append((msg.iova, msg.perm))
        page = msg.iova & ~(PAGE - 1)
        perm = 1 if page in self.read_only else 3
        self.fe.iotlb_msg(IotlbMsg(page, PAGE, self.mem.user_addr(page - IOVA_BASE), perm, IotlbMsg.UPDATE))
        return 0


@contextmanager
def session(sock_dir: Path, handler: type[Iommu] = Iommu):  # type: ignore[no-untyped-def]
    # A context manager, not a fixture: pytest keeps fixture values (and their fds) alive until
    # after the fd-leak check.
    sock = sock_dir / "iommu.sock"
    with vu.Backend.listen(sock, Echo()) as backend:
        backend.start()
        while not sock.exists():
            time.sleep(0.01)
        mem = vu.GuestMemory.allocate(1 << 20)
        iommu = handler(mem)
        fds: list[int] = []
        with vu.Frontend.connect(sock) as fe:
            iommu.fe = fe
            result = fe.negotiate(
                memory=mem, handler=iommu, features=int(vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.ACCESS_PLATFORM)
            )
            assert vu.VirtioFeature.ACCESS_PLATFORM in result.features
            ring = vu.DriverQueue(mem, QSIZE)
            iommu.ring_pages = {(a + IOVA_BASE + k) & ~(PAGE - 1) for a in ring.guest_addrs for k in (0, PAGE - 1)}
            kick, call = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2))
            fds += [kick, call]
            desc, avail, used = (a + IOVA_BASE for a in ring.guest_addrs)
            fe.set_vring_num(0, QSIZE)
            fe.set_vring_base(0, 0)
            fe.set_vring_addr(0, desc, used, avail)
            fe.set_vring_call(0, call)
            fe.set_vring_kick(0, kick)
            fe.set_vring_enable(0, True)
            try:
                yield fe, mem, ring, kick, call, iommu
            finally:
                for fd in fds:
                    os.close(fd)
    assert backend.error is None


def echo(mem: vu.GuestMemory, ring: vu.DriverQueue, kick: int, call: int, data: bytes, *, timeout: float = 5) -> bytes | None:
    out, back = mem.alloc(len(data), PAGE), mem.alloc(len(data), PAGE)
    mem.write(out, data)
    ring.add([(out + IOVA_BASE, len(data))], [(back + IOVA_BASE, len(data))])
    ring.publish()
    os.eventfd_write(kick, 1)
    deadline = time.monotonic() + timeout
    while not (done := ring.reap()):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.001)
    (_, written), = done
    return mem.read(back, written)


def test_rings_and_buffers_are_translated_through_misses(sock_dir: Path) -> None:
    with session(sock_dir) as (fe, mem, ring, kick, call, iommu):
        _test_rings_and_buffers_are_translated_through_misses(fe, mem, ring, kick, call, iommu)


def _test_rings_and_buffers_are_translated_through_misses(fe, mem, ring, kick, call, iommu) -> None:  # type: ignore[no-untyped-def]
    assert echo(mem, ring, kick, call, b"through the iommu") == b"ummoi eht hguorht"
    pages = {iova & ~(PAGE - 1) for iova, _ in iommu.misses}
    # Every miss is an IOVA (never a guest or front-end address), for each ring part and buffer.
    assert all(iova >= IOVA_BASE for iova, _ in iommu.misses)
    for part, perm in zip(ring.guest_addrs, (1, 1, 2)):
        assert (part + IOVA_BASE) & ~(PAGE - 1) in pages
    assert any(perm == 2 for iova, perm in iommu.misses if iova & ~(PAGE - 1) not in
               {(a + IOVA_BASE) & ~(PAGE - 1) for a in ring.guest_addrs})  # the writable buffer
    # Entries are kept: another request on fresh pages misses for its two buffers only.
    n = len(iommu.misses)
    assert echo(mem, ring, kick, call, b"again") == b"niaga"
    new = iommu.misses[n:]
    assert sorted(perm for _, perm in new) == [1, 2]
    assert not {iova & ~(PAGE - 1) for iova, _ in new} & {(a + IOVA_BASE) & ~(PAGE - 1) for a in ring.guest_addrs}


def test_invalidated_entries_are_asked_for_again(sock_dir: Path) -> None:
    with session(sock_dir) as (fe, mem, ring, kick, call, iommu):
        _test_invalidated_entries_are_asked_for_again(fe, mem, ring, kick, call, iommu)


def _test_invalidated_entries_are_asked_for_again(fe, mem, ring, kick, call, iommu) -> None:  # type: ignore[no-untyped-def]
    assert echo(mem, ring, kick, call, b"one") == b"eno"
    n = len(iommu.misses)
    # Drop everything, rings included: the ring restarts and asks for its pages again.
    fe.iotlb_msg(IotlbMsg(IOVA_BASE, 1 << 20, 0, 0, IotlbMsg.INVALIDATE))
    assert echo(mem, ring, kick, call, b"two") == b"owt"
    again = {iova & ~(PAGE - 1) for iova, _ in iommu.misses[n:]}
    assert (ring.guest_addrs[0] + IOVA_BASE) & ~(PAGE - 1) in again


def test_read_only_mapping_of_a_writable_buffer_stops_the_ring_not_the_session(sock_dir: Path) -> None:
    with session(sock_dir) as (fe, mem, ring, kick, call, iommu):
        _test_read_only_mapping_of_a_writable_buffer_stops_the_ring_not_the_session(fe, mem, ring, kick, call, iommu)


def _test_read_only_mapping_of_a_writable_buffer_stops_the_ring_not_the_session(fe, mem, ring, kick, call, iommu) -> None:  # type: ignore[no-untyped-def]
    assert echo(mem, ring, kick, call, b"ok") == b"ko"
    # The next writable buffer's page is mapped read-only: the device may not write it.
    probe = mem.alloc(1, PAGE)
    iommu.read_only.update({((probe + PAGE) & ~(PAGE - 1)) + IOVA_BASE + k * PAGE for k in range(4)})
    assert echo(mem, ring, kick, call, b"no", timeout=1) is None
    assert fe.get_queue_num() == 1  # the session goes on


def test_updates_outside_guest_memory_are_refused(sock_dir: Path) -> None:
    with session(sock_dir) as (fe, mem, ring, kick, call, iommu):
        _test_updates_outside_guest_memory_are_refused(fe, mem, ring, kick, call, iommu)


def _test_updates_outside_guest_memory_are_refused(fe, mem, ring, kick, call, iommu) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(vu.RequestRejectedError):
        fe.iotlb_msg(IotlbMsg(IOVA_BASE, PAGE, 0x1000, 3, IotlbMsg.UPDATE))
    with pytest.raises(vu.RequestRejectedError):
        fe.iotlb_msg(IotlbMsg(IOVA_BASE, PAGE, mem.user_addr(0), 0, IotlbMsg.UPDATE))
    # (A MISS sent by the front-end breaks the wire rules: the protocol layer ends the session,
    # see the protocol tests.)
    assert echo(mem, ring, kick, call, b"still") == b"llits"


def test_dirty_log_is_kept_in_guest_physical_pages(sock_dir: Path) -> None:
    """LOG_ALL behind an IOMMU: buffers and the used ring are logged at their guest-physical
    pages (log_guest_addr is an IOVA here), not at their IOVAs."""
    with session(sock_dir) as (fe, mem, ring, kick, call, iommu):
        log = vu.DirtyLog.allocate(mem.guest_end)
        fe.set_log_base(log)
        fe.set_features(int(fe.features) | int(vu.VirtioFeature.LOG_ALL))
        desc, avail, used = (a + IOVA_BASE for a in ring.guest_addrs)
        fe.set_vring_addr(0, desc, used, avail, log_guest_addr=used, log=True)
        log.take_dirty()
        out, back = mem.alloc(64, PAGE), mem.alloc(64, PAGE)
        mem.write(out, b"logged")
        ring.add([(out + IOVA_BASE, 6)], [(back + IOVA_BASE, 6)])
        ring.publish()
        os.eventfd_write(kick, 1)
        deadline = time.monotonic() + 5
        while not ring.reap():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert mem.read(back, 6) == b"deggol"
        dirty = set(log.take_dirty())
        assert back // PAGE in dirty and ring.guest_addrs[2] // PAGE in dirty
        assert out // PAGE not in dirty  # only read by the device


def test_hostile_iotlb_messages_get_failure_answers(sock_dir: Path) -> None:
    """IOTLB_MSG without ACCESS_PLATFORM, UPDATEs beyond guest memory, empty or without
    permission get a non-zero status and the session goes on; ranges that overflow 64 bits or an
    unknown type break the wire rules and end that session only; the next one is served."""
    sock = sock_dir / "hostile.sock"
    features = int(vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.ACCESS_PLATFORM)
    with vu.Backend.listen(sock, Echo()) as backend:
        backend.start()
        while not sock.exists():
            time.sleep(0.01)
        mem = vu.GuestMemory.allocate(1 << 20)
        with vu.Frontend.connect(sock) as fe:
            fe.negotiate(memory=mem)  # ACCESS_PLATFORM left off
            reply, _ = fe.request(
                vu.FrontendRequest.IOTLB_MSG,
                IotlbMsg(0, PAGE, mem.user_addr(0), 3, IotlbMsg.UPDATE),
                check_gate=False,
            )
            assert reply is not None and reply.payload != 0
        with vu.Frontend.connect(sock) as fe:
            fe.negotiate(memory=mem, handler=vu.BackendRequestHandler(), features=features)
            for msg in (
                IotlbMsg(IOVA_BASE, 1 << 30, mem.user_addr(0), 3, IotlbMsg.UPDATE),  # beyond guest memory
                IotlbMsg(IOVA_BASE, 0, mem.user_addr(0), 3, IotlbMsg.UPDATE),  # empty
                IotlbMsg(IOVA_BASE, PAGE, mem.user_addr(0), 0, IotlbMsg.UPDATE),  # no permission
            ):
                with pytest.raises(vu.RequestRejectedError):
                    fe.iotlb_msg(msg)
            fe.iotlb_msg(IotlbMsg(IOVA_BASE, PAGE, 0, 0, IotlbMsg.INVALIDATE))  # of nothing: fine
            assert fe.get_queue_num() == 1
        for msg in (
            IotlbMsg(2**64 - PAGE, 2 * PAGE, mem.user_addr(0), 3, IotlbMsg.UPDATE),  # overflows
            IotlbMsg(IOVA_BASE, PAGE, mem.user_addr(0), 3, 9),  # no such type
        ):
            with vu.Frontend.connect(sock) as fe:
                fe.negotiate(memory=mem, handler=vu.BackendRequestHandler(), features=features)
                with pytest.raises(vu.ConnectionClosedError):
                    fe.iotlb_msg(msg)
        with vu.Frontend.connect(sock) as fe:
            fe.negotiate(memory=mem)
            assert fe.get_queue_num() == 1
    assert backend.error is None


class InvalidatingIommu(Iommu):
    """QEMU's order behind a vIOMMU in strict mode: the guest's unmap reaches the front-end
    while the back-end's MISS for a buffer is unanswered, and the front-end sends the
    INVALIDATE on the main channel, and waits for its answer, before it answers the MISS (QEMU
    reads the back-end request channel only between main-channel requests). The INVALIDATE
    covers the ring's own pages, so the back-end must re-translate the ring meanwhile."""

    def __init__(self, mem: vu.GuestMemory) -> None:
        super().__init__(mem)
        self.invalidate_took: float | None = None

    def iotlb_msg(self, msg: IotlbMsg) -> int | None:
        page = msg.iova & ~(PAGE - 1)
        if self.invalidate_took is None and self.ring_pages and page not in self.ring_pages:
            assert self.fe is not None
            lo, hi = min(self.ring_pages), max(self.ring_pages) + PAGE
            started = time.monotonic()
            self.fe.iotlb_msg(IotlbMsg(lo, hi - lo, 0, 0, IotlbMsg.INVALIDATE))
            self.invalidate_took = time.monotonic() - started
        return super().iotlb_msg(msg)


def test_invalidate_of_the_ring_while_a_buffer_miss_is_unanswered(sock_dir: Path) -> None:
    """The INVALIDATE is answered at once (the ring's worker does not block on its MISS, so
    taking the ring off it does not wait for the front-end), the ring asks for its pages again,
    the request completes, and the back-end request channel stays usable for the next one.
    (A worker that waited for the MISS's REPLY_ACK held the INVALIDATE for its 5 s timeout,
    then closed the channel and broke the ring: the guest hung.)"""
    with session(sock_dir, InvalidatingIommu) as (fe, mem, ring, kick, call, iommu):
        assert echo(mem, ring, kick, call, b"held back") == b"kcab dleh"
        assert iommu.invalidate_took is not None and iommu.invalidate_took < 1.0, iommu.invalidate_took
        # The ring was translated again: its pages were asked for after the buffer's MISS.
        first_buffer = next(i for i, (iova, _) in enumerate(iommu.misses) if iova & ~(PAGE - 1) not in iommu.ring_pages)
        assert {iova & ~(PAGE - 1) for iova, _ in iommu.misses[first_buffer:]} & iommu.ring_pages
        assert echo(mem, ring, kick, call, b"and after") == b"retfa dna"


class SlowIommu(Iommu):
    """Leaves the first MISS for a buffer unanswered (a front-end that lost it or is slow)."""

    def __init__(self, mem: vu.GuestMemory) -> None:
        super().__init__(mem)
        self.ignored: list[float] = []

    def iotlb_msg(self, msg: IotlbMsg) -> int | None:
        if not self.ignored and self.ring_pages and msg.iova & ~(PAGE - 1) not in self.ring_pages:
            self.ignored.append(time.monotonic())
            with self.lock:
                self.misses.append((msg.iova, msg.perm))
            return None
        return super().iotlb_msg(msg)


def test_an_unanswered_miss_is_sent_again_and_the_request_completes(sock_dir: Path) -> None:
    """The chain whose buffer missed stays on the ring: after the MISS goes unanswered the
    back-end asks again (within a few seconds), the answer arrives, and the request completes
    exactly once."""
    with session(sock_dir, SlowIommu) as (fe, mem, ring, kick, call, iommu):
        assert echo(mem, ring, kick, call, b"patience", timeout=10) == b"ecneitap"
        first = iommu.misses.index(next(m for m in iommu.misses if m[0] & ~(PAGE - 1) not in iommu.ring_pages))
        assert iommu.misses[first] in iommu.misses[first + 1 :]  # the same MISS, sent again
        assert ring.reap() == []  # completed once
        assert echo(mem, ring, kick, call, b"next") == b"txen"
