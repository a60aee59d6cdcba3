"""NetClient against hostile virtio-net back-ends (test peers built on hazmat): a back-end thread
answers the handshake message by message and maps the client's memory; the test then plays the
device by writing the rings by hand, as no well-behaved device would. Every misbehaviour must end
in a clear exception (a VhostUserError, ValueError or TimeoutError) or a counted drop: never a
crash, never a hang without a timeout, never an fd leak (conftest checks the last).

On the RX ring every descriptor carries a posted buffer whenever the driver is idle, so a used
id that is "not in flight" is one out of range, one used twice in a batch, or a head the driver
took back and has not posted again yet (the TX head case below builds that state)."""

from __future__ import annotations

import gc
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import vhostuser_rs as vu
from vhostuser_rs import _native, hazmat
from vhostuser_rs import FrontendRequest as F
from vhostuser_rs import messages as m
from vhostuser_rs.net import NetHeader
from vhostuser_rs.netclient import NetClient

from conftest import open_fds

N = _native.VIRTIO_NET
MRG_RXBUF = 1 << N["VIRTIO_NET_F_MRG_RXBUF"]
MAC_F = 1 << N["VIRTIO_NET_F_MAC"]
MTU_F = 1 << N["VIRTIO_NET_F_MTU"]
BASE_FEATURES = int(vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.PROTOCOL_FEATURES) | MAC_F | MTU_F
PROTOCOL = int(vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.CONFIG)
MAC = bytes.fromhex("020000c0ffee")
CONFIG = MAC + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (1500).to_bytes(2, "little")
QSIZE = 16
HDR_LEN = 12  # VERSION_1: the header always has num_buffers
NON_MRG_RX_BUFFER = HDR_LEN + 1500 + 18  # what netio.rs posts without MRG_RXBUF (MTU 1500)
MRG_BUFFER = 2048

pytestmark = pytest.mark.timeout(30)


def frame(n: int = 60, seed: int = 0) -> bytes:
    """An Ethernet frame of `n` bytes (to the client's MAC) with a recognisable payload."""
    body = bytes((seed + i) & 0xFF for i in range(n - 14))
    return MAC + bytes.fromhex("02aabbccddee") + b"\x08\x00" + body


def hdr(num_buffers: int = 1, **fields: int) -> bytes:
    return NetHeader(num_buffers=num_buffers, **fields).to_bytes()


class Ring:
    """The device side of one split ring, written by hand through the back-end's mapping."""

    def __init__(self, mem: vu.GuestMemory, size: int, desc: int, avail: int, used: int, call: int) -> None:
        self.mem, self.size, self.desc, self.avail, self.used, self.call = mem, size, desc, avail, used, call
        self.last_avail = 0

    def avail_idx(self) -> int:
        return int.from_bytes(self.mem.read(self.avail + 2, 2), "little")

    def used_idx(self) -> int:
        return int.from_bytes(self.mem.read(self.used + 2, 2), "little")

    def take(self) -> list[int]:
        """Heads the driver made available since the last call."""
        end = self.avail_idx()
        heads = []
        while self.last_avail != end:
            slot = self.avail + 4 + 2 * (self.last_avail % self.size)
            heads.append(int.from_bytes(self.mem.read(slot, 2), "little"))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        return heads

    def buffer(self, head: int) -> tuple[int, int]:
        """(guest address, length) of the descriptor `head` (RX buffers and TX slots are one
        descriptor each here)."""
        addr, length, _flags, _next = struct.unpack("<QIHH", self.mem.read(self.desc + 16 * head, 16))
        return addr, length

    def push(
        self, entries: list[tuple[int, int]], *, data: dict[int, bytes] | None = None, notify: bool = True
    ) -> None:
        """Write `data` into the buffers of its heads, then the used entries (id, len), then
        used.idx once, then signal the call eventfd."""
        for head, payload in (data or {}).items():
            self.mem.write(self.buffer(head)[0], payload)
        idx = self.used_idx()
        for head, length in entries:
            self.mem.write(self.used + 4 + 8 * (idx % self.size), struct.pack("<II", head, length))
            idx = (idx + 1) & 0xFFFF
        self.mem.write(self.used + 2, idx.to_bytes(2, "little"))
        if notify:
            os.write(self.call, (1).to_bytes(8, "little"))

    def deliver(self, frames: list[bytes]) -> None:
        """Well-behaved delivery of whole frames, one buffer each (headers included)."""
        heads = self.take()
        assert len(heads) >= len(frames), (heads, frames)
        self.push([(h, len(f)) for h, f in zip(heads, frames)], data=dict(zip(heads, frames)))
        # What was not used stays available for the next delivery.
        self.last_avail = (self.last_avail - (len(heads) - len(frames))) & 0xFFFF


class FakeNet:
    """A virtio-net back-end session played by a thread: it answers the handshake (features,
    protocol features, config, acks), maps the memory and keeps the rings' fds. `silent_on`
    names a request it never answers, `die_on` one on which it closes the socket; so does
    ``die()``."""

    def __init__(self, path: Path, *, features: int, silent_on: F | None = None, die_on: F | None = None) -> None:
        self.features = features
        self.silent_on = silent_on
        self.die_on = die_on
        self.listener = vu.Listener.bind(path)
        self.path = path
        self.memory: vu.GuestMemory | None = None
        self.regions: list[m.MemoryRegion] = []
        self.rings: dict[int, dict[str, object]] = {}
        self.fds: list[int] = []
        self.seen: list[object] = []
        self.errors: list[BaseException] = []
        self.ready = threading.Event()  # both rings of pair 0 are set up
        self.silenced = threading.Event()
        self._die = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fake-net", daemon=True)
        self.thread.start()

    # -- the session ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with self.listener.accept(timeout=10) as conn:
                while not self._die.is_set():
                    if not conn.poll(0.02):
                        continue
                    try:
                        msg, fds = conn.recv(timeout=5)
                    except vu.ConnectionClosedError:
                        return
                    self._handle(conn, msg, fds)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.errors.append(e)
        finally:
            self.listener.close()

    def _handle(self, conn: vu.Connection, msg: m.Message, fds: list[int]) -> None:
        r = msg.request
        self.seen.append(r)
        if r is self.silent_on and not self.silenced.is_set():
            hazmat.close_fds(fds)
            self.silenced.set()
            return
        if r is self.die_on:
            hazmat.close_fds(fds)
            self._die.set()
            return
        p: Any = msg.payload  # the request decides the payload's type
        answer: m.Payload = None
        if r is F.GET_FEATURES:
            answer = self.features
        elif r is F.GET_PROTOCOL_FEATURES:
            answer = PROTOCOL
        elif r is F.GET_CONFIG:
            answer = m.DeviceConfig(p.offset, CONFIG[p.offset:p.offset + len(p.data)].ljust(len(p.data), b"\0"), 0)
        elif r is F.GET_VRING_BASE:
            answer = m.VringState(p.index, 0)
        elif r is F.SET_MEM_TABLE:
            self.regions = list(p.regions)
            self.memory = vu.GuestMemory.map(self.regions, fds)
        elif r is F.SET_VRING_NUM:
            self.rings.setdefault(p.index, {})["num"] = p.num
        elif r is F.SET_VRING_ADDR:
            self.rings.setdefault(p.index, {})["addr"] = p
        elif r in (F.SET_VRING_KICK, F.SET_VRING_CALL, F.SET_VRING_ERR):
            if fds:
                self.fds.append(fds[0])
                self.rings.setdefault(p.index, {})[F(r).name] = fds[0]
                fds = fds[1:]
        hazmat.close_fds(f for f in fds if f not in self.fds)
        if answer is not None:
            hazmat.send(conn, hazmat.reply(r, answer))
        elif msg.need_reply:
            hazmat.send(conn, hazmat.reply(r, 0))
        if r is F.SET_VRING_ENABLE and p.index == 1:
            self.ready.set()

    # -- the device side -----------------------------------------------------------------------
    def _gpa(self, user_addr: int) -> int:
        for reg in self.regions:
            if reg.user_addr <= user_addr < reg.user_addr + reg.size:
                return user_addr - reg.user_addr + reg.guest_addr
        raise AssertionError(f"ring address {user_addr:#x} outside the memory table")

    def ring(self, index: int) -> Ring:
        assert self.ready.wait(5) and self.memory is not None
        r = self.rings[index]
        a, num, call = r["addr"], r["num"], r["SET_VRING_CALL"]
        assert isinstance(a, m.VringAddr) and isinstance(num, int) and isinstance(call, int)
        desc, avail, used = (self._gpa(x) for x in (a.desc_user_addr, a.avail_user_addr, a.used_user_addr))
        return Ring(self.memory, num, desc, avail, used, call)

    def die(self) -> None:
        """Close the connection, as a crashed back-end would (the fds go with it)."""
        self._die.set()
        self.thread.join(5)
        assert not self.thread.is_alive()

    def finish(self) -> None:
        self._die.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the fake back-end is stuck"
        self.listener.close()
        hazmat.close_fds(self.fds)
        self.fds.clear()
        self.memory = None
        if self.errors and not isinstance(self.errors[0], vu.ConnectionClosedError):
            raise self.errors[0]


@contextmanager
def fake_net(
    sock_dir: Path, *, mrg: bool = True, silent_on: F | None = None, die_on: F | None = None
) -> Iterator[FakeNet]:
    features = BASE_FEATURES | (MRG_RXBUF if mrg else 0)
    fake = FakeNet(sock_dir / "net.sock", features=features, silent_on=silent_on, die_on=die_on)
    try:
        yield fake
    finally:
        fake.finish()


@contextmanager
def session(sock_dir: Path, *, mrg: bool = True, queue_size: int = QSIZE) -> Iterator[tuple[FakeNet, NetClient, Ring]]:
    """A connected client and the fake back-end, with the RX ring of pair 0 to play."""
    with fake_net(sock_dir, mrg=mrg) as fake, NetClient.connect(fake.path, queue_size=queue_size, timeout=2.0) as nic:
        assert bool(nic.features & MRG_RXBUF) == mrg and nic.mac == MAC
        rx = fake.ring(0)
        assert rx.avail_idx() == queue_size, "every RX descriptor is posted at start"
        yield fake, nic, rx


def test_the_fake_backend_delivers(sock_dir: Path) -> None:
    """The peer itself: well-formed frames (one and two buffers) arrive intact."""
    with session(sock_dir) as (_fake, nic, rx):
        f1, f2 = frame(60, 1), frame(3000, 2)
        heads = rx.take()
        first = hdr(2) + f2[: MRG_BUFFER - HDR_LEN]
        rx.push(
            [(heads[0], HDR_LEN + len(f1)), (heads[1], len(first)), (heads[2], len(f2) - (MRG_BUFFER - HDR_LEN))],
            data={heads[0]: hdr(1) + f1, heads[1]: first, heads[2]: f2[MRG_BUFFER - HDR_LEN:]},
        )
        got = nic.recv(timeout=2.0)
        assert [d for _, d in got] == [f1, f2]
        assert [h.num_buffers for h, _ in got] == [1, 2]
        c = nic.counters()
        assert (c["rx_frames"], c["rx_bytes"], c["rx_dropped"]) == (2, len(f1) + len(f2), 0)
        assert rx.avail_idx() == QSIZE + 3, "the three buffers were posted again"


# -- 1. used entries naming heads that are not in flight -------------------------------------------


@pytest.mark.parametrize("bogus", [QSIZE, QSIZE + 5, 0xFFFF, 0xFFFFFFFF])
def test_rx_used_id_out_of_range(sock_dir: Path, bogus: int) -> None:
    with session(sock_dir) as (_fake, nic, rx):
        rx.push([(bogus, HDR_LEN + 60)])
        t0 = time.monotonic()
        with pytest.raises(vu.VirtqueueError, match=f"id {bogus}, which is not in flight") as info:
            nic.recv(timeout=1.0)
        assert info.value.queue_index == 0
        # The ring stays broken: the next call says so again, it does not hang or crash.
        with pytest.raises(vu.VirtqueueError, match="not in flight"):
            nic.recv(timeout=0.2)
        assert time.monotonic() - t0 < 5
        assert nic.counters()["rx_frames"] == 0


def test_rx_used_id_twice_in_one_batch(sock_dir: Path) -> None:
    with session(sock_dir) as (_fake, nic, rx):
        head = rx.take()[0]
        rx.push([(head, HDR_LEN + 60), (head, HDR_LEN + 60)], data={head: hdr(1) + frame()})
        with pytest.raises(vu.VirtqueueError, match=f"id {head}, which is not in flight") as info:
            nic.recv(timeout=1.0)
        assert info.value.head == head


def test_rx_used_entry_naming_a_tx_head(sock_dir: Path) -> None:
    """A TX head used on the RX ring while the RX ring does not have that head in flight: three
    frames arrive, recv takes one (its buffer is posted again under one of the three heads), the
    other two heads are free; the back-end then 'completes' the TX frame's head on RX."""
    with session(sock_dir) as (fake, nic, rx):
        tx = fake.ring(1)
        heads = rx.take()[:3]
        frames = [hdr(1) + frame(60, i) for i in range(3)]
        rx.push([(h, len(f)) for h, f in zip(heads, frames)], data=dict(zip(heads, frames)))
        got = nic.recv(max_frames=1, timeout=1.0)
        assert [d for _, d in got] == [frames[0][HDR_LEN:]]
        reposted = rx.take()
        assert len(reposted) == 1
        free = set(heads) - set(reposted)
        assert len(free) == 2
        assert nic.send([frame(64, 9)]) == 1
        (tx_head,) = tx.take()
        bogus = tx_head if tx_head in free else min(free)
        rx.push([(bogus, HDR_LEN + 60)])
        with pytest.raises(vu.VirtqueueError, match=f"id {bogus}, which is not in flight"):
            nic.recv(timeout=1.0)
        c = nic.counters()
        assert (c["rx_frames"], c["tx_frames"]) == (1, 1)


def test_rx_used_index_jumps_past_what_is_in_flight(sock_dir: Path) -> None:
    with session(sock_dir) as (_fake, nic, rx):
        rx.mem.write(rx.used + 2, (QSIZE + 7).to_bytes(2, "little"))
        os.write(rx.call, (1).to_bytes(8, "little"))
        with pytest.raises(vu.VirtqueueError, match="more than the 16 chains in flight"):
            nic.recv(timeout=1.0)


def test_tx_used_id_not_in_flight(sock_dir: Path) -> None:
    """The same on the TX ring: noticed when the next send reclaims slots."""
    with session(sock_dir) as (fake, nic, _rx):
        tx = fake.ring(1)
        assert nic.send([frame(64, 1), frame(64, 2)]) == 2
        heads = tx.take()
        bogus = max(heads) + 5  # inside the ring, not in flight
        tx.push([(heads[0], 0), (bogus, 0)], notify=False)
        with pytest.raises(vu.VirtqueueError, match=f"id {bogus}, which is not in flight") as info:
            nic.send([frame(64, 3)])
        assert info.value.queue_index == 1 and info.value.head == bogus


def test_device_scribbling_over_the_driver_rings(sock_dir: Path) -> None:
    """The descriptor tables and avail rings are the driver's, but live in shared memory: a
    device that overwrites them does not change what the driver believes it posted."""
    with session(sock_dir) as (fake, nic, rx):
        tx = fake.ring(1)
        heads = rx.take()
        addrs = {h: rx.buffer(h)[0] for h in heads}
        for ring in (rx, tx):
            ring.mem.write(ring.desc, b"\xff" * 16 * QSIZE)
            ring.mem.write(ring.avail + 4, b"\xee" * 2 * QSIZE)
        frames = [hdr(1) + frame(60 + i, i) for i in range(3)]
        for h, f in zip(heads, frames):
            rx.mem.write(addrs[h], f)
        rx.push([(h, len(f)) for h, f in zip(heads, frames)])
        assert [d for _, d in nic.recv(timeout=1.0)] == [f[HDR_LEN:] for f in frames]
        assert rx.avail_idx() == QSIZE + 3
        assert nic.send([frame(64, 7)]) == 1
        (head,) = tx.take()
        assert tx.mem.read(tx.buffer(head)[0], HDR_LEN + 64) == bytes(HDR_LEN) + frame(64, 7)


# -- 2. a used length beyond the buffer ------------------------------------------------------------


@pytest.mark.parametrize(("mrg", "size"), [(True, MRG_BUFFER), (False, NON_MRG_RX_BUFFER)])
@pytest.mark.parametrize("excess", [1, 1 << 20, None])
def test_rx_used_length_beyond_the_buffer(sock_dir: Path, mrg: bool, size: int, excess: int | None) -> None:
    length = 0xFFFFFFFF if excess is None else size + excess
    with session(sock_dir, mrg=mrg) as (_fake, nic, rx):
        assert nic.core.rx_buffer_len == size
        head = rx.take()[0]
        rx.push([(head, length)], data={head: hdr(1) + frame()})
        expected = f"wrote {length} bytes into chain {head}, whose writable buffers hold {size}"
        with pytest.raises(vu.VirtqueueError, match=expected):
            nic.recv(timeout=1.0)
        assert nic.counters()["rx_frames"] == 0


def test_rx_used_length_exactly_the_buffer_is_fine(sock_dir: Path) -> None:
    with session(sock_dir, mrg=False) as (_fake, nic, rx):
        head = rx.take()[0]
        full = hdr(0) + frame(NON_MRG_RX_BUFFER - HDR_LEN, 3)
        rx.push([(head, len(full))], data={head: full})
        assert [d for _, d in nic.recv(timeout=1.0)] == [full[HDR_LEN:]]


# -- 3. num_buffers larger than the entries used (MRG_RXBUF) -----------------------------------------


@pytest.mark.parametrize("num_buffers", [2, 5, QSIZE, QSIZE + 1, 0xFFFF, 0])
def test_num_buffers_beyond_the_used_entries_is_a_counted_drop(sock_dir: Path, num_buffers: int) -> None:
    with session(sock_dir) as (_fake, nic, rx):
        heads = rx.take()
        bad = hdr(num_buffers) + frame(60, 1)
        rx.push([(heads[0], len(bad))], data={heads[0]: bad})
        assert nic.recv(timeout=0.3) == []
        c = nic.counters()
        assert (c["rx_frames"], c["rx_dropped"]) == (0, 1)
        # The buffer went back to the device and the ring keeps working.
        assert rx.avail_idx() == QSIZE + 1
        good = hdr(1) + frame(70, 2)
        rx.push([(heads[1], len(good))], data={heads[1]: good})
        assert [d for _, d in nic.recv(timeout=1.0)] == [good[HDR_LEN:]]
        c = nic.counters()
        assert (c["rx_frames"], c["rx_dropped"]) == (1, 1)


def test_num_buffers_swallowing_the_next_frames(sock_dir: Path) -> None:
    """num_buffers 3 over two used entries, the second a frame of its own: the driver cannot tell,
    so the entries are dropped together as one frame (what Linux does); later frames arrive."""
    with session(sock_dir) as (_fake, nic, rx):
        heads = rx.take()
        a, b = hdr(3) + frame(60, 1), hdr(1) + frame(60, 2)
        rx.push([(heads[0], len(a)), (heads[1], len(b))], data={heads[0]: a, heads[1]: b})
        assert nic.recv(timeout=0.3) == []
        assert nic.counters()["rx_dropped"] == 1
        assert rx.avail_idx() == QSIZE + 2, "both buffers were posted again"
        c = hdr(1) + frame(80, 3)
        rx.push([(heads[2], len(c))], data={heads[2]: c})
        assert [d for _, d in nic.recv(timeout=1.0)] == [c[HDR_LEN:]]


@pytest.mark.parametrize("length", [0, 1, HDR_LEN - 1])
def test_used_length_shorter_than_the_header_is_a_counted_drop(sock_dir: Path, length: int) -> None:
    with session(sock_dir) as (_fake, nic, rx):
        heads = rx.take()
        rx.push([(heads[0], length)], data={heads[0]: hdr(1)})
        assert nic.recv(timeout=0.3) == []
        assert nic.counters()["rx_dropped"] == 1
        good = hdr(1) + frame()
        rx.push([(heads[1], len(good))], data={heads[1]: good})
        assert [d for _, d in nic.recv(timeout=1.0)] == [good[HDR_LEN:]]


@pytest.mark.parametrize("frame_len", [0, 1, 13])
def test_runt_frame_after_the_header_is_a_counted_drop(sock_dir: Path, frame_len: int) -> None:
    with session(sock_dir) as (_fake, nic, rx):
        rx.deliver([hdr(1) + frame()[:frame_len]])
        got = [d for _, d in nic.recv(timeout=0.3)]
        c = nic.counters()
    del _fake, nic, rx  # closed: a failed assertion's traceback must not keep their fds alive
    assert got == [] and (c["rx_frames"], c["rx_dropped"]) == (0, 1), (got, c)


# -- 4. nonsense offload fields ----------------------------------------------------------------------

GARBAGE = dict(flags=0xFF, gso_type=0xEE, hdr_len=0xFFFF, gso_size=0xFFFF, csum_start=0xFFFF, csum_offset=0xFFFF)


@pytest.mark.parametrize("mrg", [True, False])
def test_nonsense_offload_fields(sock_dir: Path, mrg: bool) -> None:
    """Garbage flags / gso_type / lengths: the frame comes back with the header as the device
    wrote it (the driver does not act on offload fields), or is dropped and counted."""
    with session(sock_dir, mrg=mrg) as (_fake, nic, rx):
        frames = [frame(60 + i, i) for i in range(4)]
        headers = [
            hdr(1, **GARBAGE),
            hdr(1, flags=0x80, gso_type=0x80 | 4),  # reserved bits, ECN on an unknown type
            hdr(1, flags=1, csum_start=0x7FFF, csum_offset=0x7FFF),  # NEEDS_CSUM far past the frame
            hdr(1, gso_type=1, gso_size=0, hdr_len=9000),  # TSO with no segment size
        ]
        rx.deliver([h + f for h, f in zip(headers, frames)])
        got = nic.recv(timeout=1.0)
        c = nic.counters()
        assert len(got) + c["rx_dropped"] == 4 and c["rx_frames"] == len(got)
        for h, data in got:
            i = frames.index(data)
            assert h.to_bytes() == headers[i]
        assert got[0][0].flags == 0xFF and got[0][0].gso_type == 0xEE and got[0][0].csum_offset == 0xFFFF


def test_many_distinct_nonsense_headers(sock_dir: Path) -> None:
    """More distinct headers than the client's header cache holds (64): all parsed, none mixed up."""
    with session(sock_dir, queue_size=32) as (_fake, nic, rx):
        sent: list[tuple[bytes, bytes]] = []
        got: list[tuple[bytes, bytes]] = []
        for batch in range(5):
            b = [
                (hdr(1, flags=(batch * 20 + i) & 0xFF, gso_type=0xC0 | i, gso_size=batch * 1000 + i), frame(60, batch * 20 + i))
                for i in range(20)
            ]
            rx.deliver([h + f for h, f in b])
            sent += b
            while len(got) < len(sent):
                got += [(h.to_bytes(), d) for h, d in nic.recv(timeout=1.0)]
        assert got == sent
        assert nic.counters()["rx_frames"] == 100


# -- 5. the back-end dies mid-burst ----------------------------------------------------------------


def test_backend_dies_while_recv_waits(sock_dir: Path) -> None:
    with session(sock_dir) as (fake, nic, _rx):
        threading.Timer(0.3, fake.die).start()
        t0 = time.monotonic()
        with pytest.raises(vu.ConnectionClosedError):
            nic.recv(timeout=10.0)
        assert time.monotonic() - t0 < 5, "the hang-up ends the wait, not the timeout"
        with pytest.raises(vu.ConnectionClosedError):
            nic.recv(timeout=None)  # None would block forever without the hang-up check
        assert nic.recv(timeout=0) == []
        nic.close()
        nic.close()
        with pytest.raises(vu.ConnectionClosedError):
            nic.recv(timeout=0)


def test_backend_dies_mid_burst(sock_dir: Path) -> None:
    """The back-end takes part of a TX burst, completes some of it, delivers two RX frames and
    closes the socket: the frames it used before it went are received, then recv raises; close()
    releases every fd (the conftest fixture checks)."""
    with session(sock_dir) as (fake, nic, rx):
        tx = fake.ring(1)
        burst = [frame(64 + i, i) for i in range(8)]
        assert nic.send(burst) == 8
        heads = tx.take()
        assert len(heads) == 8
        assert [tx.mem.read(tx.buffer(h)[0] + HDR_LEN, len(f)) for h, f in zip(heads[:3], burst)] == burst[:3]
        tx.push([(h, 0) for h in heads[:3]])
        rx.deliver([hdr(1) + frame(60, 40), hdr(1) + frame(61, 41)])
        fake.die()
        got = nic.recv(timeout=2.0)
        assert [d for _, d in got] == [frame(60, 40), frame(61, 41)]
        t0 = time.monotonic()
        with pytest.raises(vu.ConnectionClosedError):
            nic.recv(timeout=5.0)
        assert time.monotonic() - t0 < 2
        # Control requests on the main channel see the hang-up too.
        with pytest.raises(vu.ConnectionClosedError):
            nic.frontend.get_features()
        c = nic.counters()
        assert (c["tx_frames"], c["rx_frames"], c["rx_dropped"]) == (8, 2, 0)
    # close() ran (context exit) with the back-end gone: idempotent, nothing left open.
    nic.close()


@pytest.mark.parametrize("backend_died", [False, True])
def test_close_releases_every_fd_at_once(sock_dir: Path, backend_died: bool) -> None:
    """close() with the client still referenced leaves nothing open, whether the back-end is
    still there or died mid-session."""
    with fake_net(sock_dir) as fake:
        gc.collect()
        before = open_fds()
        nic = NetClient.connect(fake.path, queue_size=QSIZE, timeout=2.0)
        # The listing fd of the first snapshot may be reused by the socket: look it up by inode.
        sock = os.readlink(f"/proc/self/fd/{nic.frontend.fileno()}")
        if backend_died:
            fake.die()
            with pytest.raises(vu.ConnectionClosedError):
                nic.recv(timeout=2.0)
        nic.close()
    gc.collect()
    links = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() if os.path.exists(f"/proc/self/fd/{fd}")}
    left = sorted((fd, link) for fd, link in links.items() if fd not in before or link == sock)
    del nic
    assert left == []


def test_send_after_the_backend_died_raises(sock_dir: Path) -> None:
    with session(sock_dir) as (fake, nic, _rx):
        assert nic.send([frame(64, 1)]) == 1
        fake.die()
        time.sleep(0.1)
        with pytest.raises(vu.ConnectionClosedError):
            for _ in range(QSIZE + 2):  # enough to fill the ring if nothing is raised
                nic.send([frame(64, 2)])


# -- 6. silence during connect -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.SET_OWNER, F.SET_MEM_TABLE, F.GET_CONFIG, F.SET_VRING_ADDR,
        F.SET_VRING_ENABLE,
    ],
    ids=lambda r: r.name,
)
def test_connect_times_out_when_the_backend_goes_silent(sock_dir: Path, request_: F) -> None:
    with fake_net(sock_dir, silent_on=request_) as fake:
        t0 = time.monotonic()
        with pytest.raises(vu.VhostUserTimeoutError) as info:
            NetClient.connect(fake.path, timeout=0.5)
        elapsed = time.monotonic() - t0
        assert isinstance(info.value, TimeoutError)
        assert fake.silenced.is_set() and fake.seen[-1] is request_
        assert elapsed < 3, elapsed


@pytest.mark.parametrize(
    "request_",
    [F.GET_FEATURES, F.SET_MEM_TABLE, F.GET_CONFIG, F.SET_VRING_KICK, F.SET_VRING_ENABLE],
    ids=lambda r: r.name,
)
def test_backend_dies_during_connect(sock_dir: Path, request_: F) -> None:
    """The back-end closes the socket instead of answering: a clear error, every fd released
    (the client's memory, the eventfds of the rings already set up)."""
    with fake_net(sock_dir, die_on=request_) as fake:
        t0 = time.monotonic()
        with pytest.raises(vu.ConnectionClosedError):
            NetClient.connect(fake.path, timeout=5.0)
        assert time.monotonic() - t0 < 3
        assert fake.seen[-1] is request_
