"""The front-end against QEMU's C virtiofsd: negotiation and one FUSE_INIT round trip on its
request queue (virtiofsd exits after its front-end disconnects, so each test starts one)."""

from __future__ import annotations

import struct
from pathlib import Path

import vhostuser_rs as vu
from peers import virtiofsd

FUSE_INIT = 26
FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR_VERSION = 31


def test_negotiation_and_fuse_init(sock_dir: Path) -> None:
    shared = sock_dir / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_text("hi")
    sock = sock_dir / "fs.sock"
    with virtiofsd(shared, sock):
        with vu.Frontend.connect(sock, timeout=10) as fe:
            mem = vu.GuestMemory.allocate(8 << 20)
            result = fe.negotiate(memory=mem)
            assert vu.VirtioFeature.VERSION_1 in result.features
            # Queue 0 is the high-priority queue, queue 1 the first request queue.
            hiprio = fe.setup_queue(0, 64, mem)
            request = fe.setup_queue(1, 64, mem)
            assert hiprio.index == 0
            unique = 0x1234
            init_in = struct.pack("<IIII", FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION, 0x20000, 0)
            header = struct.pack("<IIQQIIII", 40 + len(init_in), FUSE_INIT, unique, 0, 0, 0, 0, 0)
            req = mem.alloc(len(header) + len(init_in))
            mem.write(req, header + init_in)
            reply = mem.alloc(4096)
            head = request.queue.add([(req, len(header) + len(init_in))], [(reply, 4096)])
            request.queue.publish()
            request.kick()
            used: list[tuple[int, int]] = []
            for _ in range(100):
                used += request.queue.reap()
                if used:
                    break
                request.wait(0.1)
            assert used and used[0][0] == head
            written = used[0][1]
            length, error, got_unique = struct.unpack_from("<IiQ", mem.read(reply, 16))
            assert error == 0 and got_unique == unique and length == written
            major, minor = struct.unpack_from("<II", mem.read(reply + 16, 8))
            assert major == FUSE_KERNEL_VERSION and minor >= 27
