"""A vhost-user-blk back-end on packed rings, served from this process on threads, for the
front-end's packed-ring tests while no installed back-end offers RING_PACKED for block
(qemu-storage-daemon's libvhost-user has no packed rings; serve-blk gets them in another
change). Its rings are the crate's packed device side (`DeviceQueue(packed=True)`), a different code
path from the driver under test; it completes every batch in reverse order, so the driver sees
out-of-order completions all the time. Requests read and write an image file with pread/pwrite.

`die_on_pop`: the session ends (the connection is closed) as soon as a chain has been popped,
without completing it — a crashed back-end with a request in flight.
"""

from __future__ import annotations

import os
import select
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import vhostuser_rs as vu
from vhostuser_rs import FrontendRequest as F
from vhostuser_rs import _native, hazmat
from vhostuser_rs import messages as m
from vhostuser_rs.blk import BlockFeature

FEATURES = int(
    vu.VirtioFeature.PROTOCOL_FEATURES | vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.RING_PACKED
    | vu.VirtioFeature.EVENT_IDX | vu.VirtioFeature.INDIRECT_DESC
    | BlockFeature.FLUSH | BlockFeature.MQ | BlockFeature.SEG_MAX
)
PROTOCOL = int(vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.CONFIG | vu.ProtocolFeature.MQ)
NUM_QUEUES = 2
_T_IN, _T_OUT, _T_FLUSH, _T_GET_ID = 0, 1, 4, 8


class _Ring:
    def __init__(self) -> None:
        self.size = 0
        self.base = 0x8000_8000
        self.addr: m.VringAddr | None = None
        self.kick: int | None = None
        self.call: int | None = None
        self.queue: _native.DeviceQueue | None = None
        self.thread: threading.Thread | None = None
        self.stop_r, self.stop_w = os.pipe()


class PackedBlockBackend:
    """One front-end session (see the module)."""

    def __init__(self, listener: vu.Listener, image: Path, *, die_on_pop: bool = False) -> None:
        self.listener = listener
        self.fd = os.open(image, os.O_RDWR)
        self.capacity = os.fstat(self.fd).st_size // 512
        self.die_on_pop = die_on_pop
        self.memory: vu.GuestMemory | None = None
        self.rings = [_Ring() for _ in range(NUM_QUEUES)]
        self.acked = 0
        self.error: BaseException | None = None
        self.conn: vu.Connection | None = None
        self.dead = threading.Event()
        self.closing = threading.Event()
        self.sessions = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # One front-end after the other (as qemu-storage-daemon does), until finish().
        while not self.closing.is_set() and not self.dead.is_set():
            try:
                conn = self.listener.accept(timeout=0.2)
            except (vu.VhostUserTimeoutError, TimeoutError):
                continue
            except BaseException as e:  # noqa: BLE001 - the listener was closed by finish()
                if not self.closing.is_set():
                    self.error = e
                return
            self.sessions += 1
            self.memory = None
            self.acked = 0
            try:
                with conn:
                    self.conn = conn
                    self._serve(conn)
            except vu.ConnectionClosedError:
                pass
            except BaseException as e:  # noqa: BLE001 - reported by finish()
                if not self.dead.is_set():
                    self.error = e
                    return
            finally:
                for r in self.rings:
                    self._stop(r)
                    r.queue, r.base = None, 0x8000_8000

    def _serve(self, conn: vu.Connection) -> None:
        while True:
            msg, fds = conn.recv(timeout=60)
            req, p = msg.request, msg.payload
            reply: m.Payload = None
            keep = False
            if req is F.GET_FEATURES:
                reply = FEATURES
            elif req is F.SET_FEATURES:
                assert isinstance(p, int)
                self.acked = p
            elif req is F.GET_PROTOCOL_FEATURES:
                reply = PROTOCOL
            elif req is F.GET_QUEUE_NUM:
                reply = NUM_QUEUES
            elif req is F.GET_CONFIG:
                assert isinstance(p, m.DeviceConfig)
                cfg = bytearray(60)
                cfg[0:8] = struct.pack("<Q", self.capacity)
                cfg[12:16] = struct.pack("<I", 128)
                cfg[34:36] = struct.pack("<H", NUM_QUEUES)
                reply = m.DeviceConfig(p.offset, bytes(cfg[p.offset : p.offset + len(p.data)]))
            elif req is F.SET_MEM_TABLE:
                assert isinstance(p, m.MemoryTable)
                self.memory = vu.GuestMemory.map(list(p.regions), fds)
            elif req is F.SET_VRING_NUM:
                assert isinstance(p, m.VringState)
                self.rings[p.index].size = p.num
            elif req is F.SET_VRING_BASE:
                assert isinstance(p, m.VringState)
                self.rings[p.index].base = p.num
            elif req is F.SET_VRING_ADDR:
                assert isinstance(p, m.VringAddr)
                self.rings[p.index].addr = p
            elif req in (F.SET_VRING_KICK, F.SET_VRING_CALL, F.SET_VRING_ERR):
                assert isinstance(p, m.VringFd) and not p.nofd
                ring = self.rings[p.index]
                if req is F.SET_VRING_KICK:
                    ring.kick, keep = fds[0], True
                    self._start(ring, p.index)
                elif req is F.SET_VRING_CALL:
                    ring.call, keep = fds[0], True
            elif req is F.GET_VRING_BASE:
                assert isinstance(p, m.VringState)
                ring = self.rings[p.index]
                self._stop(ring)
                reply = m.VringState(p.index, ring.queue.base if ring.queue is not None else ring.base)
            if not keep:
                hazmat.close_fds(fds)
            if reply is None and msg.flags & hazmat.FLAG_NEED_REPLY:
                reply = 0
            if reply is not None:
                hazmat.send(conn, hazmat.reply(req, reply), [])

    def _start(self, ring: _Ring, index: int) -> None:
        assert self.acked & int(vu.VirtioFeature.RING_PACKED), "this back-end serves packed rings only"
        assert self.memory is not None and ring.addr is not None
        a = ring.addr
        # Packed: SET_VRING_ADDR's avail field is the driver area, used the device area.
        ring.queue = _native.DeviceQueue(
            self.memory, ring.size, desc_addr=a.desc_user_addr, avail_addr=a.avail_user_addr,
            used_addr=a.used_user_addr, address_space="user",
            event_idx=bool(self.acked & int(vu.VirtioFeature.EVENT_IDX)),
            indirect=bool(self.acked & int(vu.VirtioFeature.INDIRECT_DESC)), base=ring.base, index=index,
            packed=True,
        )
        ring.thread = threading.Thread(target=self._ring_loop, args=(ring,), daemon=True)
        ring.thread.start()

    def _stop(self, ring: _Ring) -> None:
        if ring.thread is not None:
            os.write(ring.stop_w, b"x")
            ring.thread.join(10)
            ring.thread = None
        for fd in (ring.kick, ring.call):
            if fd is not None:
                os.close(fd)
        ring.kick = ring.call = None

    def _ring_loop(self, ring: _Ring) -> None:
        q = ring.queue
        assert q is not None and ring.kick is not None
        while True:
            ready, _, _ = select.select([ring.kick, ring.stop_r], [], [], 1.0)
            if ring.stop_r in ready:
                os.read(ring.stop_r, 1)
                return
            if ring.kick in ready:
                try:
                    os.eventfd_read(ring.kick)
                except BlockingIOError:
                    pass
            notify = False
            while True:
                q.disable_notifications()
                while chains := q.pop(32):
                    if self.die_on_pop:
                        self.dead.set()
                        if self.conn is not None:
                            self.conn.close()
                        return
                    # Out of order on purpose: the last chain of the batch first.
                    for chain in reversed(chains):
                        q.complete(chain, self._do(chain))
                    notify |= q.publish()
                if not q.enable_notifications():
                    break
            if notify and ring.call is not None:
                os.eventfd_write(ring.call, 1)

    def _do(self, chain: vu.DescriptorChain) -> int:
        head = chain.read(16)
        rtype, _, sector = struct.unpack("<IIQ", head)
        status, data = 0, b""
        if rtype == _T_IN:
            data = os.pread(self.fd, chain.writable_len - 1, sector * 512)
        elif rtype == _T_OUT:
            os.pwrite(self.fd, chain.read()[16:], sector * 512)
        elif rtype == _T_FLUSH:
            os.fsync(self.fd)
        elif rtype == _T_GET_ID:
            data = b"packed-test".ljust(20, b"\0")
        else:
            status = 2  # VIRTIO_BLK_S_UNSUPP
        chain.write(data + bytes([status]))
        return len(data) + 1

    def finish(self) -> None:
        self.closing.set()
        if self.conn is not None and not self.dead.is_set():
            self.conn.close()
        self._thread.join(20)
        assert not self._thread.is_alive()
        for r in self.rings:
            os.close(r.stop_r)
            os.close(r.stop_w)
        os.close(self.fd)
        if self.error is not None:
            raise self.error


@contextmanager
def packed_block_backend(sock: Path, image: Path, *, die_on_pop: bool = False) -> Iterator[PackedBlockBackend]:
    listener = vu.Listener.bind(sock)
    be = PackedBlockBackend(listener, image, die_on_pop=die_on_pop)
    try:
        yield be
    finally:
        be.finish()
        listener.close()
