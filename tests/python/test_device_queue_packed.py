"""The Python `DeviceQueue` on a packed ring (`packed=True`): the same methods and chain views
as on a split ring, against a driver written here byte by byte (virtio 1.2 §2.8: descriptors
with AVAIL/USED flags against wrap counters, buffer ids, used descriptors in completion order)."""

from __future__ import annotations

import struct

import pytest

import vhostuser_rs as vu

MIB = 1 << 20
NEXT, WRITE = 1, 2
AVAIL, USED = 1 << 7, 1 << 15


class Driver:
    """A minimal packed driver: writes lists at its position, reads used descriptors at its own."""

    def __init__(self, mem: vu.GuestMemory, size: int) -> None:
        self.mem, self.size = mem, size
        self.desc = mem.alloc(16 * size, 16)
        self.driver_event = mem.alloc(4, 4)
        self.device_event = mem.alloc(4, 4)
        self.avail, self.avail_wrap = 0, True
        self.used, self.used_wrap = 0, True
        self.slots: dict[int, int] = {}

    def add(self, buf_id: int, buffers: list[tuple[int, int, bool]]) -> None:
        """One list: `buffers` are (addr, len, device-writable); the id goes in the last."""
        first = None
        for k, (addr, n, writable) in enumerate(buffers):
            flags = (NEXT if k + 1 < len(buffers) else 0) | (WRITE if writable else 0)
            flags |= AVAIL if self.avail_wrap else USED
            raw = struct.pack("<QIHH", addr, n, buf_id, flags)
            if first is None:
                first = (self.avail, raw)  # its flags go last: the list appears at once
            else:
                self.mem.write(self.desc + 16 * self.avail, raw)
            self.avail += 1
            if self.avail == self.size:
                self.avail, self.avail_wrap = 0, not self.avail_wrap
        assert first is not None
        self.mem.write(self.desc + 16 * first[0], first[1])
        self.slots[buf_id] = len(buffers)

    def reap(self) -> list[tuple[int, int]]:
        out = []
        while True:
            _, n, buf_id, flags = struct.unpack("<QIHH", self.mem.read(self.desc + 16 * self.used, 16))
            if bool(flags & AVAIL) != self.used_wrap or bool(flags & USED) != self.used_wrap:
                return out
            out.append((buf_id, n))
            self.used += self.slots.pop(buf_id)
            if self.used >= self.size:
                self.used, self.used_wrap = self.used - self.size, not self.used_wrap


def make(size: int = 5, **kwargs: object) -> tuple[vu.GuestMemory, Driver, vu.DeviceQueue]:
    mem = vu.GuestMemory.allocate(4 * MIB)
    drv = Driver(mem, size)
    dev = vu.DeviceQueue(
        mem, size, desc_addr=drv.desc, avail_addr=drv.driver_event, used_addr=drv.device_event,
        packed=True, **kwargs,  # type: ignore[arg-type]
    )
    return mem, drv, dev


def test_lists_round_the_ring_with_the_split_ring_api() -> None:
    mem, drv, dev = make(5)  # not a power of two: packed rings take any size
    assert dev.packed and dev.size == 5 and dev.vring_base == 0x8000_8000
    hdr, data = mem.alloc(16), mem.alloc(64)
    for round_ in range(7):  # 14 slots: the ring wraps twice
        mem.write(hdr, struct.pack("<IIQ", 0, 0, round_))
        drv.add(3, [(hdr, 16, False), (data, 64, True)])
        [chain] = dev.pop()
        assert (chain.head, chain.readable_len, chain.writable_len) == (3, 16, 64)
        assert struct.unpack("<IIQ", chain.read()) == (0, 0, round_)
        with pytest.raises(TypeError):
            chain.readable[0][0] = 1
        assert chain.write(b"%d" % round_) == 1
        dev.complete(chain, 1)
        dev.publish()
        assert drv.reap() == [(3, 1)]
        assert mem.read(data, 1) == b"%d" % round_
    # 14 slots of 5: slot 4, wrap counter 1 again (two laps), on both halves.
    assert dev.next_avail == dev.next_used == 4 | 0x8000
    assert dev.vring_base == (4 | 0x8000) * 0x10001
    assert dev.in_flight == 0 and not dev.is_broken


def test_out_of_order_completion_and_the_process_loop() -> None:
    mem, drv, dev = make(8, event_idx=True)
    bufs = [mem.alloc(8) for _ in range(3)]
    for i, b in enumerate(bufs):
        mem.write(b, bytes([i]))
        drv.add(5 + i, [(b, 1, False), (b + 4, 4, True)])
    chains = dev.pop()
    assert [c.head for c in chains] == [5, 6, 7]
    dev.complete_batch([(chains[2], 4), (chains[0], 0)])
    dev.publish()
    assert drv.reap() == [(7, 4), (5, 0)]

    def handler(batch: list[vu.DescriptorChain]) -> list[int]:
        return [c.write(c.read() * 4) for c in batch]

    drv.add(1, [(bufs[0], 1, False), (bufs[0] + 4, 4, True)])
    assert dev.process(handler, max_batch=4) in (True, False)
    dev.complete(chains[1], 2)
    dev.publish()
    assert sorted(drv.reap()) == [(1, 4), (6, 2)]
    assert dev.in_flight == 0


def test_a_base_resumes_and_bad_input_raises() -> None:
    mem, drv, dev = make(4)
    b = mem.alloc(8)
    for _ in range(3):
        drv.add(0, [(b, 8, False)])
        [c] = dev.pop()
        dev.complete(c, 0)
        dev.publish()
        drv.reap()
    again = vu.DeviceQueue(
        mem, 4, desc_addr=drv.desc, avail_addr=drv.driver_event, used_addr=drv.device_event,
        packed=True, base=dev.vring_base,
    )
    drv.add(2, [(b, 8, False)])
    assert [c.head for c in again.pop()] == [2]
    # A buffer id beyond the ring: the queue breaks with a VirtqueueError, nothing else.
    drv.add(9, [(b, 8, False)])
    with pytest.raises(vu.VirtqueueError):
        again.pop()
    assert again.is_broken
    with pytest.raises(ValueError):
        vu.DeviceQueue(mem, 4, desc_addr=drv.desc, avail_addr=drv.driver_event, used_addr=drv.device_event, base=0)
    with pytest.raises(vu.VirtqueueError):  # a position beyond the ring
        vu.DeviceQueue(
            mem, 4, desc_addr=drv.desc, avail_addr=drv.driver_event, used_addr=drv.device_event,
            packed=True, base=4,
        )
    with pytest.raises(vu.VirtqueueError):  # the descriptor ring is 16-byte aligned
        vu.DeviceQueue(
            mem, 4, desc_addr=drv.desc + 8, avail_addr=drv.driver_event, used_addr=drv.device_event, packed=True
        )
