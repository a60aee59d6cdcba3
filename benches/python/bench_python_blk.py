"""What a Python user of `vhostuser_rs.blk` gets: 4 KiB random reads on one queue, from a Python
loop of ``disk.read`` / ``disk.readinto``, from the batch API in one thread (32 in flight), from
`vhostuser_rs.aio` (32 coroutines on one client; on asyncio's loop, and on uvloop's when
uvloop is installed), side by side with the Rust loop
(``BlockClient.run_io``, what ``vhostuser-rs bench`` runs) at iodepth 1 and 32 — against
``vhostuser-rs serve-blk`` and qemu-storage-daemon, on an image in tmpfs, round after round so
that every mode sees the same machine state.

Reported per mode: IOPS and the CPU time of this (the front-end's) process per I/O, median of
the rounds and min..max.

Run: ``python benches/python/bench_python_blk.py [--time 2] [--rounds 5] [--placement free|spread|shared]
[--out FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from placement import PLACEMENTS, pinned

from vhostuser_rs.aio import AsyncBlockClient
from vhostuser_rs.blk import BlockClient, RequestType

BS = 4096
DEPTH = 32


def offsets(capacity: int, n: int = 1 << 16) -> list[int]:
    rng = random.Random(1)
    return [rng.randrange(capacity // BS) * BS for _ in range(n)]


def timed(run: Callable[[float], int], seconds: float) -> tuple[float, float]:
    """(IOPS, µs of process CPU per I/O)."""
    c0, t0 = time.process_time(), time.perf_counter()
    ios = run(seconds)
    c1, t1 = time.process_time(), time.perf_counter()
    return ios / (t1 - t0), (c1 - c0) / ios * 1e6


def py_read(disk: BlockClient, offs: list[int]) -> Callable[[float], int]:
    def run(seconds: float) -> int:
        end = time.perf_counter() + seconds
        n, mask, read = 0, len(offs) - 1, disk.read
        while True:
            for _ in range(256):
                read(offs[n & mask], BS)
                n += 1
            if time.perf_counter() >= end:
                return n

    return run


def py_readinto(disk: BlockClient, offs: list[int]) -> Callable[[float], int]:
    def run(seconds: float) -> int:
        buf = bytearray(BS)
        end = time.perf_counter() + seconds
        n, mask, readinto = 0, len(offs) - 1, disk.readinto
        while True:
            for _ in range(256):
                readinto(offs[n & mask], buf)
                n += 1
            if time.perf_counter() >= end:
                return n

    return run


def batch(disk: BlockClient, offs: list[int]) -> Callable[[float], int]:
    def run(seconds: float) -> int:
        end = time.perf_counter() + seconds
        mask = len(offs) - 1
        n = 0
        submitted = len(disk.submit([(RequestType.IN, offs[i & mask], BS) for i in range(DEPTH)]))
        running = True
        while submitted > n:
            done = disk.reap(64, timeout=5.0)
            n += len(done)
            if running:
                k = len(done)
                submitted += len(disk.submit([(RequestType.IN, offs[(submitted + i) & mask], BS) for i in range(k)]))
                running = time.perf_counter() < end
        return n

    return run


def aio(path: str, offs: list[int], *, into: bool = False, uv: bool = False) -> Callable[[float], int]:
    def run(seconds: float) -> int:
        async def main() -> int:
            async with await AsyncBlockClient.connect(path, queue_size=128) as disk:
                mask = len(offs) - 1
                end = time.perf_counter() + seconds
                count = [0]

                async def worker(k: int) -> None:
                    # The clock is read every 64 requests, as the loops above do every 256.
                    i, n, buf = k, 0, bytearray(BS)
                    read, readinto = disk.read, disk.readinto
                    while True:
                        if into:
                            for _ in range(64):
                                await readinto(offs[i & mask], buf)
                                i += DEPTH
                        else:
                            for _ in range(64):
                                await read(offs[i & mask], BS)
                                i += DEPTH
                        n += 64
                        if time.perf_counter() >= end:
                            break
                    count[0] += n

                await asyncio.gather(*(worker(k) for k in range(DEPTH)))
                return count[0]

        if uv:
            import uvloop

            return int(uvloop.run(main()))
        return asyncio.run(main())

    return run


def rust(disk: BlockClient, depth: int) -> Callable[[float], int]:
    def run(seconds: float) -> int:
        return int(disk.run_io(rw="randread", bs=BS, iodepth=depth, duration=seconds)["ios"])

    return run


def start(args: list[str], sock: Path, cpus: set[int] | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pinned(cpus))
    deadline = time.monotonic() + 10
    while not sock.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"{args[0]} did not start")
        time.sleep(0.05)
    time.sleep(0.2)
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time", type=float, default=2.0, help="seconds per mode and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=256, help="image size in MiB (in /dev/shm)")
    ap.add_argument("--backends", default="serve-blk,qsd")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--placement", choices=["free", "spread", "shared"], default="free",
                    help="free: where the scheduler puts the two processes; spread: back-end on CPU 0, "
                         "this (the front-end) on CPU 1; shared: both on CPU 0 (see placement.py: placement "
                         "decides more than code)")
    a = ap.parse_args()
    lines: list[str] = []
    try:
        import uvloop  # noqa: F401 - only whether it is there

        has_uvloop = True
    except ImportError:
        has_uvloop = False

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    backend_cpus, frontend_cpus = PLACEMENTS[a.placement]
    if frontend_cpus:
        os.sched_setaffinity(0, frontend_cpus)
    say(f"# {' '.join(sys.argv)}")
    say(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="vu-bench-") as d:
        image = Path(d) / "disk.img"
        with open(image, "wb") as f:
            rng = random.Random(2)
            for _ in range(a.size):
                f.write(rng.randbytes(1 << 20))
        for backend in a.backends.split(","):
            sock = Path(d) / f"{backend}.sock"
            if backend == "qsd":
                qsd = shutil.which("qemu-storage-daemon") or "qemu-storage-daemon"
                argv = [qsd, "--blockdev", f"driver=file,node-name=f0,filename={image},cache.direct=off",
                        "--blockdev", "driver=raw,node-name=d0,file=f0", "--export",
                        f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={sock},"
                        "writable=off,num-queues=1"]
            else:
                argv = [sys.executable, "-m", "vhostuser_rs", "serve-blk", str(image), "--socket-path", str(sock),
                        "--num-queues", "1", "--read-only"]
            proc = start(argv, sock, backend_cpus)
            try:
                say(f"\n## back-end: {' '.join(argv[:1] + argv[1:])}")
                results: dict[str, list[tuple[float, float]]] = {}
                with BlockClient.connect(sock, queue_size=128) as disk:
                    offs = offsets(disk.capacity)
                    modes: dict[str, Callable[[float], int]] = {
                        "python disk.read loop": py_read(disk, offs),
                        "python disk.readinto loop": py_readinto(disk, offs),
                        "rust loop iodepth 1 (bench)": rust(disk, 1),
                        f"batch submit/reap, 1 thread, {DEPTH} in flight": batch(disk, offs),
                        f"rust loop iodepth {DEPTH} (bench)": rust(disk, DEPTH),
                    }
                    aio_run = aio(str(sock), offs)
                    aio_into = aio(str(sock), offs, into=True)
                    aio_uv = aio(str(sock), offs, uv=True)
                    for r in range(a.rounds):
                        for name, run in modes.items():
                            results.setdefault(name, []).append(timed(run, a.time))
                        # A client of its own (the same back-end accepts one front-end at a
                        # time: qsd serves them one after the other, so close ours first).
                        results.setdefault(f"aio, {DEPTH} coroutines on one client", [])
                    # aio needs its own session: run its rounds after closing the sync client.
                old = "before: disk.read loop on the Python request path (native=False)"
                for r in range(a.rounds):
                    results[f"aio, {DEPTH} coroutines on one client"].append(timed(aio_run, a.time))
                    results.setdefault(f"aio readinto, {DEPTH} coroutines", []).append(timed(aio_into, a.time))
                    if has_uvloop:
                        results.setdefault(f"aio on uvloop, {DEPTH} coroutines", []).append(timed(aio_uv, a.time))
                    with BlockClient.connect(sock, queue_size=128, native=False) as slow:
                        results.setdefault(old, []).append(timed(py_read(slow, offs), a.time))
                say(f"{'mode':48} {'IOPS median (min..max)':>32} {'CPU us/IO median (min..max)':>30}")
                for name, rs in results.items():
                    iops = [x for x, _ in rs]
                    cpu = [y for _, y in rs]
                    say(
                        f"{name:48} {statistics.median(iops) / 1e3:10.1f} K ({min(iops) / 1e3:.1f}..{max(iops) / 1e3:.1f})"
                        f"   {statistics.median(cpu):8.2f} ({min(cpu):.2f}..{max(cpu):.2f})"
                    )
            finally:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if a.out:
        a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
