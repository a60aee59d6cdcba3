"""Split virtqueues from Python: driver side against device side in one process, across
threads and across two processes sharing memfds; malformed rings; batch processing."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vhostuser_rs as vu

MIB = 1 << 20


def make_pair(size: int = 16, *, event_idx: bool = False, indirect: bool = True) -> tuple[vu.GuestMemory, vu.DriverQueue, vu.DeviceQueue]:
    mem = vu.GuestMemory.allocate(4 * MIB)
    drv = vu.DriverQueue(mem, size, event_idx=event_idx, indirect_max=8 if indirect else 0, index=3)
    desc, avail, used = drv.user_addrs
    dev = vu.DeviceQueue(
        mem, size, desc_addr=desc, avail_addr=avail, used_addr=used, address_space="user",
        event_idx=event_idx, indirect=indirect, index=3,
    )
    return mem, drv, dev


@pytest.mark.parametrize("indirect", [False, True])
def test_block_request_end_to_end(indirect: bool) -> None:
    mem, drv, dev = make_pair()
    hdr, data, status = mem.alloc(16), mem.alloc(4096, 4096), mem.alloc(1)
    mem.write(hdr, struct.pack("<IIQ", 0, 0, 8))  # virtio-blk read of sector 8
    head = drv.add([(hdr, 16)], [(data, 4096), (status, 1)], indirect=indirect)
    drv.publish()
    assert drv.kick_needed()
    [chain] = dev.pop()
    assert chain.head == head and (chain.readable_len, chain.writable_len) == (16, 4097)
    assert struct.unpack("<IIQ", chain.read()) == (0, 0, 8)
    with pytest.raises(TypeError):
        chain.readable[0][0] = 1  # device-readable views are read-only
    d, s = chain.writable
    d[:] = b"\xab" * 4096
    s[0] = 0
    dev.complete(chain, 4097)
    assert dev.publish()
    assert drv.reap() == [(head, 4097)]
    assert mem.read(data, 4096) == b"\xab" * 4096


def test_batches_and_process_loop() -> None:
    mem, drv, dev = make_pair(64, event_idx=True)
    bufs = [mem.alloc(64) for _ in range(30)]
    for i, b in enumerate(bufs):
        mem.write(b, i.to_bytes(4, "little"))
    heads = drv.add_batch([([(b, 4)], [(b + 32, 4)]) for b in bufs])
    drv.publish()

    def handler(chains: list[vu.DescriptorChain]) -> list[int]:
        out = []
        for c in chains:
            n = int.from_bytes(c.read(), "little")
            out.append(c.write((n * 2).to_bytes(4, "little")))
        return out

    assert dev.process(handler, max_batch=16) is True
    used = drv.reap()
    assert [h for h, _ in used] == heads and all(n == 4 for _, n in used)
    for i, b in enumerate(bufs):
        assert int.from_bytes(mem.read(b + 32, 4), "little") == 2 * i
    assert dev.in_flight == 0 and dev.next_avail == 30


def test_handler_errors_propagate_and_bad_lengths_are_refused() -> None:
    mem, drv, dev = make_pair()
    b = mem.alloc(64)
    drv.add([], [(b, 8)])
    drv.publish()
    with pytest.raises(ZeroDivisionError):
        dev.process(lambda chains: [1 // 0])
    mem2, drv2, dev2 = make_pair()
    b = mem2.alloc(64)
    drv2.add([], [(b, 8)])
    drv2.publish()
    [chain] = dev2.pop()
    with pytest.raises(ValueError, match="exceeds"):
        dev2.complete(chain, 9)
    dev2.complete(chain, 8)
    with pytest.raises(vu.VirtqueueError, match="not in flight"):
        dev2.complete(chain, 8)


def write_desc(mem: vu.GuestMemory, drv: vu.DriverQueue, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
    desc, _, _ = drv.guest_addrs
    mem.write(desc + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))


def publish_head(mem: vu.GuestMemory, drv: vu.DriverQueue, head: int) -> None:
    _, avail, _ = drv.guest_addrs
    idx = int.from_bytes(mem.read(avail + 2, 2), "little")
    mem.write(avail + 4 + 2 * (idx % drv.size), head.to_bytes(2, "little"))
    mem.write(avail + 2, ((idx + 1) & 0xFFFF).to_bytes(2, "little"))


NEXT, WRITE, INDIRECT = 1, 2, 4


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("loop", "longer than"),
        ("next_out_of_range", "out of range"),
        ("head_out_of_range", "head 16 out of range"),
        ("zero_length", "zero-length"),
        ("unmapped", "not in mapped memory"),
        ("readable_after_writable", "readable descriptor after"),
        ("nested_indirect", "inside an indirect table"),
        ("indirect_size", "indirect table of"),
        ("avail_jump", "more than the ring size"),
    ],
)
def test_malformed_rings_raise_and_stop_only_that_queue(case: str, fragment: str) -> None:
    mem, drv, dev = make_pair()
    ok = mem.alloc(64)
    head = 5
    if case == "loop":
        write_desc(mem, drv, 5, ok, 8, NEXT, 6)
        write_desc(mem, drv, 6, ok, 8, NEXT, 5)
    elif case == "next_out_of_range":
        write_desc(mem, drv, 5, ok, 8, NEXT, 99)
    elif case == "head_out_of_range":
        head = 16
    elif case == "zero_length":
        write_desc(mem, drv, 5, ok, 0, 0, 0)
    elif case == "unmapped":
        write_desc(mem, drv, 5, 4 * MIB - 4, 8, 0, 0)
    elif case == "readable_after_writable":
        write_desc(mem, drv, 5, ok, 8, WRITE | NEXT, 6)
        write_desc(mem, drv, 6, ok, 8, 0, 0)
    elif case == "nested_indirect":
        table = mem.alloc(16, 16)
        mem.write(table, struct.pack("<QIHH", table, 16, INDIRECT, 0))
        write_desc(mem, drv, 5, table, 16, INDIRECT, 0)
    elif case == "indirect_size":
        write_desc(mem, drv, 5, ok, 24, INDIRECT, 0)
    if case == "avail_jump":
        _, avail, _ = drv.guest_addrs
        mem.write(avail + 2, (17).to_bytes(2, "little"))
    else:
        publish_head(mem, drv, head)
    with pytest.raises(vu.VirtqueueError, match=fragment) as info:
        dev.pop()
    assert info.value.queue_index == 3
    if case not in ("avail_jump",):
        assert info.value.head == head
    assert dev.is_broken
    with pytest.raises(vu.VirtqueueError, match="broken"):
        dev.pop()
    # Other queues over the same memory are unharmed.
    _, drv2, dev2 = make_pair()
    b = mem.alloc(8)
    drv2.add([(b, 8)])
    drv2.publish()
    assert len(dev2.pop()) == 1


def test_bad_ring_setup() -> None:
    mem = vu.GuestMemory.allocate(MIB)
    for size in (0, 3, 65536):
        with pytest.raises((vu.VirtqueueError, OverflowError)):
            vu.DeviceQueue(mem, size, desc_addr=0, avail_addr=4096, used_addr=8192)
    with pytest.raises(vu.VirtqueueError, match="aligned"):
        vu.DeviceQueue(mem, 8, desc_addr=8, avail_addr=4096, used_addr=8192)
    with pytest.raises(vu.VirtqueueError, match="not inside mapped memory"):
        vu.DeviceQueue(mem, 8, desc_addr=MIB, avail_addr=4096, used_addr=8192)
    with pytest.raises(ValueError):
        vu.DeviceQueue(mem, 8, desc_addr=0, avail_addr=4096, used_addr=8192, address_space="iova")


def test_misbehaving_device_is_detected() -> None:
    mem, drv, dev = make_pair()
    b = mem.alloc(64)
    head = drv.add([], [(b, 64)])
    drv.publish()
    _, _, used = drv.guest_addrs
    mem.write(used + 4, struct.pack("<II", head, 65))
    mem.write(used + 2, (1).to_bytes(2, "little"))
    with pytest.raises(vu.VirtqueueError, match="wrote 65 bytes") as info:
        drv.reap()
    assert info.value.queue_index == 3 and info.value.head == head


def test_driver_and_device_on_two_threads() -> None:
    mem, drv, dev = make_pair(128, event_idx=True)
    total = 5000
    bufs = [mem.alloc(16) for _ in range(128)]
    done = threading.Event()

    def device() -> None:
        served = 0
        while served < total:
            chains = dev.pop(64)
            for c in chains:
                n = int.from_bytes(c.read(), "little")
                dev.complete(c, c.write((n + 1).to_bytes(4, "little")))
            dev.publish()
            served += len(chains)
        done.set()

    t = threading.Thread(target=device)
    t.start()
    sent = got = 0
    pending: dict[int, tuple[int, int]] = {}
    while got < total:
        while sent < total and drv.num_free >= 2:
            b = bufs[sent % 128]
            mem.write(b, sent.to_bytes(4, "little"))
            pending[drv.add([(b, 4)], [(b + 8, 4)])] = (b, sent)
            sent += 1
        drv.publish()
        for head, n in drv.reap():
            b, seq = pending.pop(head)
            assert n == 4 and int.from_bytes(mem.read(b + 8, 4), "little") == seq + 1
            got += 1
    t.join(30)
    assert done.is_set()


DEVICE_CHILD = textwrap.dedent(
    """
    import sys, vhostuser_rs as vu
    from vhostuser_rs.messages import MemoryRegion
    fd, size, desc, avail, used, total = map(int, sys.argv[1:])
    mem = vu.GuestMemory.map([MemoryRegion(0, size, 0)], [fd])
    dev = vu.DeviceQueue(mem, 64, desc_addr=desc, avail_addr=avail, used_addr=used)
    served = 0
    while served < total:
        for c in dev.pop():
            data = c.read()
            dev.complete(c, c.write(data[::-1]))
            served += 1
        dev.publish()
    """
)


def test_two_processes_share_a_memfd() -> None:
    """The way a real front-end and back-end run: the device lives in another process that maps
    the front-end's memfd and serves the ring in it."""
    mem = vu.GuestMemory.allocate(MIB)
    drv = vu.DriverQueue(mem, 64)
    desc, avail, used = drv.guest_addrs
    total = 500
    fd = mem.fds()[0]
    child = subprocess.Popen(
        [sys.executable, "-c", DEVICE_CHILD, str(fd), str(MIB), str(desc), str(avail), str(used), str(total)],
        pass_fds=[fd],
    )
    try:
        bufs = [mem.alloc(32) for _ in range(64)]
        pending: dict[int, tuple[int, bytes]] = {}
        sent = got = 0
        while got < total:
            while sent < total and drv.num_free >= 2:
                b = bufs[sent % 64]
                payload = os.urandom(16)
                mem.write(b, payload)
                pending[drv.add([(b, 16)], [(b + 16, 16)])] = (b, payload)
                sent += 1
            drv.publish()
            for head, n in drv.reap():
                b, payload = pending.pop(head)
                assert n == 16 and mem.read(b + 16, 16) == payload[::-1]
                got += 1
            assert child.poll() is None or got == total, "device process died"
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@settings(max_examples=60, deadline=None)
@given(
    chains=st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(1, 3000), st.booleans()), min_size=1, max_size=20
    )
)
def test_random_chains_arrive_intact(chains: list[tuple[int, int, int, bool]]) -> None:
    mem, drv, dev = make_pair(32)
    for n_read, n_write, length, indirect in chains:
        if n_read + n_write == 0:
            n_read = 1
        readable = [(mem.alloc(length), length) for _ in range(n_read)]
        writable = [(mem.alloc(length), length) for _ in range(n_write)]
        for i, (addr, _) in enumerate(readable):
            mem.write(addr, bytes([i + 1]) * length)
        head = drv.add(readable, writable, indirect=indirect)
        drv.publish()
        [chain] = dev.pop()
        assert chain.head == head
        assert chain.read() == b"".join(bytes([i + 1]) * length for i in range(n_read))
        assert [len(v) for v in chain.writable] == [length] * n_write
        written = chain.write(b"\x77" * (length * n_write))
        dev.complete(chain, written)
        dev.publish()
        assert drv.reap() == [(head, length * n_write)]
