"""A vhost-user-blk front-end in plain Python (socket, mmap, struct, os.eventfd): the baseline a
user would otherwise write, kept to compare `vhostuser-rs bench` against.

It negotiates like QEMU (features, protocol features with REPLY_ACK, owner, SET_MEM_TABLE, one
ring), then keeps `iodepth` 4 KiB random reads in flight for `duration` seconds and reports
IOPS and the CPU time of this process per I/O. No validation beyond what a quick tool does.

Run: ``python benches/python/baseline_frontend.py SOCKET [--iodepth N] [--time S]``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import resource
import select
import socket
import struct
import time

GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE = 1, 2, 3, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE = 8, 9, 10
SET_VRING_KICK, SET_VRING_CALL = 12, 13
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, SET_VRING_ENABLE, GET_CONFIG = 15, 16, 18, 24
REPLY_ACK, CONFIG = 1 << 3, 1 << 9
VERSION_1, PROTOCOL_FEATURES_BIT = 1 << 32, 1 << 30


class Baseline:
    def __init__(self, path: str, queue_size: int = 256, mem_size: int = 64 << 20) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.n = queue_size
        self.memfd = os.memfd_create("baseline-guest")
        os.ftruncate(self.memfd, mem_size)
        self.mem = mmap.mmap(self.memfd, mem_size)
        self.base = 0x7F0000000000  # our "user address" (any value works: only offsets matter)

    def send(self, code: int, payload: bytes = b"", fds: list[int] | None = None, need_reply: bool = False) -> None:
        hdr = struct.pack("<III", code, 1 | (8 if need_reply else 0), len(payload))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        self.sock.sendmsg([hdr + payload], anc)

    def recv(self) -> bytes:
        hdr = self.sock.recv(12, socket.MSG_WAITALL)
        _, _, size = struct.unpack("<III", hdr)
        return self.sock.recv(size, socket.MSG_WAITALL) if size else b""

    def call(self, code: int, payload: bytes = b"", fds: list[int] | None = None, ack: bool = True) -> bytes:
        self.send(code, payload, fds, need_reply=ack)
        return self.recv() if ack else b""

    def setup(self) -> None:
        self.send(GET_FEATURES)
        features = struct.unpack("<Q", self.recv())[0]
        self.send(GET_PROTOCOL_FEATURES)
        proto = struct.unpack("<Q", self.recv())[0] & (REPLY_ACK | CONFIG)
        self.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", proto))
        self.call(SET_OWNER)
        acked = features & (VERSION_1 | PROTOCOL_FEATURES_BIT)
        self.call(SET_FEATURES, struct.pack("<Q", acked))
        self.call(SET_MEM_TABLE, struct.pack("<II4Q", 1, 0, 0, len(self.mem), self.base, 0), [self.memfd])
        self.send(GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8))
        self.capacity = struct.unpack_from("<Q", self.recv(), 12)[0] * 512
        n = self.n
        self.desc, self.avail, self.used = 0x1000, 0x1000 + 16 * n, 0x1000 + 16 * n + 4096
        self.buffers = 0x100000
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.callfd = os.eventfd(0, os.EFD_NONBLOCK)
        self.call(SET_VRING_NUM, struct.pack("<II", 0, n))
        self.call(SET_VRING_BASE, struct.pack("<II", 0, 0))
        b = self.base
        self.call(SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, b + self.desc, b + self.used, b + self.avail, 0))
        self.call(SET_VRING_KICK, struct.pack("<Q", 0), [self.kick])
        self.call(SET_VRING_CALL, struct.pack("<Q", 0), [self.callfd])
        self.call(SET_VRING_ENABLE, struct.pack("<II", 0, 1))

    def run(self, iodepth: int, duration: float) -> dict[str, float]:
        mem, n = self.mem, self.n
        blocks = self.capacity // 4096
        avail_idx = used_idx = 0
        slot_of: dict[int, int] = {}

        def submit(slot: int) -> None:
            nonlocal avail_idx
            head = slot * 3
            hdr = self.buffers + slot * 8192
            data = hdr + 4096
            status = hdr + 16
            struct.pack_into("<IIQ", mem, hdr, 0, 0, random.randrange(blocks) * 8)
            struct.pack_into("<QIHH", mem, self.desc + 16 * head, hdr, 16, 1, head + 1)
            struct.pack_into("<QIHH", mem, self.desc + 16 * (head + 1), data, 4096, 3, head + 2)
            struct.pack_into("<QIHH", mem, self.desc + 16 * (head + 2), status, 1, 2, 0)
            struct.pack_into("<H", mem, self.avail + 4 + 2 * (avail_idx % n), head)
            avail_idx = (avail_idx + 1) & 0xFFFF
            slot_of[head] = slot

        for s in range(iodepth):
            submit(s)
        struct.pack_into("<H", mem, self.avail + 2, avail_idx)
        os.eventfd_write(self.kick, 1)
        ios = 0
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        end = t0 + duration
        while True:
            now_idx = struct.unpack_from("<H", mem, self.used + 2)[0]
            if now_idx == used_idx:
                select.select([self.callfd], [], [], 0.01)
                try:
                    os.eventfd_read(self.callfd)
                except BlockingIOError:
                    pass
                continue
            running = time.perf_counter() < end
            while used_idx != now_idx:
                head, _ = struct.unpack_from("<II", mem, self.used + 4 + 8 * (used_idx % n))
                used_idx = (used_idx + 1) & 0xFFFF
                ios += 1
                if running:
                    submit(slot_of[head])
            # Drain before leaving: qemu-storage-daemon 7.2 breaks its next session
            # ("vu_panic: Virtqueue size exceeded") if a front-end leaves requests in flight.
            if not running and used_idx == avail_idx:
                break
            struct.pack_into("<H", mem, self.avail + 2, avail_idx)
            os.eventfd_write(self.kick, 1)
        elapsed = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        return {"iops": ios / elapsed, "cpu_us_per_io": cpu / ios * 1e6, "ios": ios}

    def close(self) -> None:
        self.sock.close()
        self.mem.close()
        for fd in (self.memfd, self.kick, self.callfd):
            os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("socket")
    p.add_argument("--iodepth", type=int, default=32)
    p.add_argument("--time", type=float, default=10.0)
    a = p.parse_args()
    b = Baseline(a.socket)
    try:
        b.setup()
        print(json.dumps(b.run(a.iodepth, a.time)))
    finally:
        b.close()


if __name__ == "__main__":
    main()
