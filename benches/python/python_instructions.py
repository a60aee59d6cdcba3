"""Instructions per 4 KiB read of what a Python user of `vhostuser_rs.blk` writes, under
callgrind, which counts the same on a loaded machine as on a quiet one: the client runs at two
request counts against ``vhostuser-rs serve-blk`` (not under valgrind) and the difference is
divided by the difference of the counts, so start-up and connection cost drop out. Reported per
request: the total and its share in the interpreter (libpython and _asyncio), the native module
and libc. System calls are not counted (see ``strace -c``).

Modes: ``read`` / ``readinto`` / ``readinto-view`` — `vhostuser_rs.aio.AsyncBlockClient` with 32
coroutines on one client; ``floor`` — asyncio alone (the same 32 tasks awaiting futures a
callback resolves, no I/O), ``floor-uvloop`` the same on uvloop's loop; ``disk-read`` — a loop
of ``disk.read(offset, 4096)`` on a ``BlockClient`` (one request in flight); ``batch`` —
``disk.submit`` / ``disk.reap`` from one thread keeping 32 in flight.

Run: ``python benches/python/python_instructions.py [--mode MODE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEPTH = 32
BS = 4096
SPAN = 64 << 20


def drive(sock: str, n: int, mode: str) -> None:
    """The measured program: `n` requests from DEPTH coroutines."""
    per = n // DEPTH

    async def floor() -> None:
        loop = asyncio.get_running_loop()
        new = functools.partial(asyncio.Future, loop=loop)
        pending: list[asyncio.Future[bytes]] = []
        scheduled = [False]

        def resolve() -> None:
            scheduled[0] = False
            done = pending[:]
            pending.clear()
            for f in done:
                f.set_result(b"")

        def read(offset: int, length: int) -> asyncio.Future[bytes]:
            f: asyncio.Future[bytes] = new()
            pending.append(f)
            if not scheduled[0]:
                scheduled[0] = True
                loop.call_soon(resolve)
            return f

        async def worker(k: int) -> None:
            off = k * BS
            for _ in range(per):
                await read(off, BS)
                off = (off + DEPTH * BS) % SPAN

        await asyncio.gather(*(worker(k) for k in range(DEPTH)))

    async def main() -> None:
        from vhostuser_rs.aio import AsyncBlockClient

        async with await AsyncBlockClient.connect(sock, queue_size=128) as disk:

            async def worker(k: int) -> None:
                off = k * BS
                if mode.startswith("readinto"):
                    buf = bytearray(BS) if mode == "readinto" else memoryview(bytearray(BS))
                    for _ in range(per):
                        await disk.readinto(off, buf)
                        off = (off + DEPTH * BS) % SPAN
                else:
                    for _ in range(per):
                        await disk.read(off, BS)
                        off = (off + DEPTH * BS) % SPAN

            await asyncio.gather(*(worker(k) for k in range(DEPTH)))

    if mode in ("disk-read", "batch"):
        from vhostuser_rs.blk import BlockClient, RequestType

        with BlockClient.connect(sock, queue_size=128) as disk:
            if mode == "disk-read":
                off = 0
                for _ in range(n):
                    disk.read(off, BS)
                    off = (off + BS) % SPAN
                return
            done = 0
            submitted = len(disk.submit([(RequestType.IN, i * BS, BS) for i in range(DEPTH)]))
            while done < n:
                got = disk.reap(64, timeout=5.0)
                done += len(got)
                k = min(len(got), n - submitted)
                if k > 0:
                    reqs = [(RequestType.IN, ((submitted + i) * BS) % SPAN, BS) for i in range(k)]
                    submitted += len(disk.submit(reqs))
        return
    if mode == "floor-uvloop":
        import uvloop

        uvloop.run(floor())
        return
    asyncio.run(floor() if mode == "floor" else main())


def by_object(path: Path) -> collections.Counter[str]:
    out = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--auto=no", str(path)], capture_output=True, text=True, check=True
    ).stdout
    parts: collections.Counter[str] = collections.Counter()
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*?)(?: \[(.*)\])?$", line)
        if not m:
            continue
        n = int(m.group(1).replace(",", ""))
        if "PROGRAM TOTALS" in line:
            parts["total"] += n
            continue
        where = f"{m.group(2)} {m.group(3) or ''}"
        if "Python-3" in where or "libpython" in where or "_asyncio" in where:
            parts["interpreter"] += n
        elif "_native" in where or "/rustc/" in where or "/src/" in where or ".cargo" in where:
            parts["native"] += n
        else:
            parts["libc and other"] += n
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="read", choices=["read", "readinto", "readinto-view", "floor", "floor-uvloop", "disk-read", "batch"])
    ap.add_argument("--counts", default="3200,19200", help="the two request counts")
    ap.add_argument("--drive", nargs=2, metavar=("SOCKET", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.drive:
        drive(a.drive[0], int(a.drive[1]), a.mode)
        return
    lo, hi = (int(x) for x in a.counts.split(","))
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="vu-cg-") as d:
        image, sock = Path(d) / "disk.img", Path(d) / "blk.sock"
        with open(image, "wb") as f:
            f.truncate(SPAN)
        server = subprocess.Popen(
            [sys.executable, "-m", "vhostuser_rs", "serve-blk", str(image), "--socket-path", str(sock),
             "--num-queues", "1", "--read-only"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            counts = {}
            for n in (lo, hi):
                out = Path(d) / f"cg.{n}"
                subprocess.run(
                    ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
                     "--mode", a.mode, "--drive", str(sock), str(n)],
                    check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                counts[n] = by_object(out)
        finally:
            server.terminate()
            server.wait()
    shape = "1 in flight" if a.mode == "disk-read" else f"{DEPTH} in flight"
    print(f"mode {a.mode}, {shape}, instructions per request ({lo} -> {hi} requests):")
    for key in ("total", "interpreter", "native", "libc and other"):
        print(f"  {key:16} {(counts[hi][key] - counts[lo][key]) / (hi - lo):9.0f}")


if __name__ == "__main__":
    main()
