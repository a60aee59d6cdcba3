"""Guest memory from Python: allocation, reads and writes, zero-copy views, bounds, dirty log."""

from __future__ import annotations

import gc
import os

import pytest

import vhostuser_rs as vu

MIB = 1 << 20


def test_allocate_read_write_and_regions() -> None:
    mem = vu.GuestMemory.allocate(regions=[(0, MIB), (1 << 32, MIB)])
    assert mem.size == 2 * MIB and mem.guest_end == (1 << 32) + MIB
    regions = mem.regions
    assert [r.guest_addr for r in regions] == [0, 1 << 32]
    assert regions[0].user_addr == mem.user_addr(0)
    assert len(mem.fds()) == 2
    mem.write((1 << 32) + 100, b"abc")
    assert mem.read((1 << 32) + 100, 3) == b"abc"
    a = mem.alloc(100, 64)
    b = mem.alloc(10)
    assert a % 64 == 0 and b >= a + 100
    mem.reset_allocator()
    assert mem.alloc(8) == 0


def test_reads_and_writes_cross_adjacent_regions() -> None:
    mem = vu.GuestMemory.allocate(regions=[(0, 4096), (4096, 4096)])
    data = bytes(range(200))
    mem.write(4000, data)
    assert mem.read(4000, 200) == data
    with pytest.raises(vu.GuestMemoryError):
        mem.view(4000, 200)  # a view must lie in one mapping


def test_out_of_range_raises_with_address_and_length() -> None:
    mem = vu.GuestMemory.allocate(4096)
    for addr, n in [(4096, 1), (4090, 10), (1 << 40, 1)]:
        with pytest.raises(vu.GuestMemoryError) as info:
            mem.read(addr, n)
        assert (info.value.address, info.value.length) == (addr, n)
        assert isinstance(info.value, ValueError)
    with pytest.raises(vu.GuestMemoryError):
        mem.write(2**64 - 2, b"xyz")
    with pytest.raises(vu.GuestMemoryError):
        mem.alloc(8192)


def test_views_are_zero_copy_and_outlive_the_memory_object() -> None:
    mem = vu.GuestMemory.allocate(MIB)
    view = mem.view(4096, 16)
    view[:5] = b"hello"
    assert mem.read(4096, 5) == b"hello"
    mem.write(4096, b"HELLO")
    assert bytes(view[:5]) == b"HELLO"
    del mem
    gc.collect()
    # The mapping lives as long as the view.
    view[5:8] = b"!!!"
    assert bytes(view[:8]) == b"HELLO!!!"
    view.release()


def test_a_peer_maps_the_same_memory_from_fds() -> None:
    fe = vu.GuestMemory.allocate(regions=[(0, MIB), (2 * MIB, MIB)])
    be = vu.GuestMemory.map(fe.regions, fe.fds())
    fe.write(2 * MIB + 8, b"shared")
    assert be.read(2 * MIB + 8, 6) == b"shared"
    # A region larger than its file is refused (touching it would raise SIGBUS).
    big = vu.messages.MemoryRegion(guest_addr=0, size=2 * MIB, user_addr=0)
    with pytest.raises(vu.GuestMemoryError, match="too small"):
        vu.GuestMemory.map([big], fe.fds()[:1])
    overlapping = [vu.messages.MemoryRegion(0, 4096, 0), vu.messages.MemoryRegion(2048, 4096, 1 << 20)]
    with pytest.raises(vu.GuestMemoryError, match="overlaps"):
        vu.GuestMemory.map(overlapping, fe.fds())
    with pytest.raises(OSError):
        vu.GuestMemory.map([vu.messages.MemoryRegion(0, 4096, 0)], [9999])


def test_dirty_log() -> None:
    log = vu.DirtyLog.allocate(64 * 4096)
    assert log.size == 8
    log.mark(4096, 1)
    log.mark(3 * 4096 + 4095, 2)
    assert log.take_dirty() == [1, 3, 4]
    assert log.take_dirty() == []
    with pytest.raises(vu.GuestMemoryError, match="does not cover"):
        log.mark(64 * 4096, 1)
    fd = log.fileno()
    assert fd is not None
    peer = vu.DirtyLog.map(fd, log.size)
    peer.mark(0, 1)
    assert log.take_dirty() == [0]
    assert os.fstat(fd).st_size >= 8
