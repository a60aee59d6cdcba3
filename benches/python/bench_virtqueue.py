"""What Python pays per descriptor chain on the device side, next to a pure-Python ring walker.

Run: ``python benches/python/bench_virtqueue.py`` (after ``pip install .``). Prints the median of
``--runs`` runs (default 5) of each variant, in ns per chain, for batches of 32 single-descriptor
64-byte chains on a 256-entry ring. Only the device side is timed; the driver refills the ring
between batches, untimed.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time
from collections.abc import Callable

import vhostuser_rs as vu

SIZE = 256
BATCH = 32


def setup() -> tuple[vu.GuestMemory, vu.DriverQueue, vu.DeviceQueue, list[tuple[list[tuple[int, int]], list[tuple[int, int]]]]]:
    mem = vu.GuestMemory.allocate(16 << 20)
    drv = vu.DriverQueue(mem, SIZE)
    desc, avail, used = drv.guest_addrs
    dev = vu.DeviceQueue(mem, SIZE, desc_addr=desc, avail_addr=avail, used_addr=used)
    chains = [([(mem.alloc(64, 64), 64)], []) for _ in range(BATCH)]
    return mem, drv, dev, chains


def run(step: Callable[[], None], drv: vu.DriverQueue, chains: list, iterations: int) -> float:
    total = 0
    for _ in range(iterations):
        drv.add_batch(chains)
        drv.publish()
        t0 = time.perf_counter_ns()
        step()
        total += time.perf_counter_ns() - t0
        drv.reap()
    return total / (iterations * BATCH)


def variant_process_untouched() -> Callable[[int], float]:
    _, drv, dev, chains = setup()
    zeros = [0] * BATCH
    return lambda n: run(lambda: dev.process(lambda cs: zeros, max_batch=BATCH), drv, chains, n)


def variant_process_head_and_view() -> Callable[[int], float]:
    _, drv, dev, chains = setup()

    def handler(cs: list[vu.DescriptorChain]) -> list[int]:
        out = []
        for c in cs:
            _ = c.head
            _ = c.readable[0]
            out.append(0)
        return out

    return lambda n: run(lambda: dev.process(handler, max_batch=BATCH), drv, chains, n)


def variant_pop_complete_batch() -> Callable[[int], float]:
    _, drv, dev, chains = setup()

    def step() -> None:
        cs = dev.pop(BATCH)
        dev.complete_batch([(c, 0) for c in cs])
        dev.publish()

    return lambda n: run(step, drv, chains, n)


def variant_pure_python() -> Callable[[int], float]:
    """The ring walker a user would otherwise write: struct over a memoryview of the memfd."""
    mem, drv, _, chains = setup()
    desc, avail, used = drv.guest_addrs
    view = mem.view(0, 1 << 20)
    state = {"next_avail": 0, "next_used": 0}
    mask = SIZE - 1

    def step() -> None:
        avail_idx = struct.unpack_from("<H", view, avail + 2)[0]
        na, nu = state["next_avail"], state["next_used"]
        while na != avail_idx:
            head = struct.unpack_from("<H", view, avail + 4 + 2 * (na & mask))[0]
            if head >= SIZE:
                raise ValueError("head")
            addr, length, flags, _ = struct.unpack_from("<QIHH", view, desc + 16 * head)
            if addr + length > len(view):
                raise ValueError("buffer")
            _ = view[addr : addr + length]
            struct.pack_into("<II", view, used + 4 + 8 * (nu & mask), head, 0)
            na = (na + 1) & 0xFFFF
            nu = (nu + 1) & 0xFFFF
        struct.pack_into("<H", view, used + 2, nu)
        state["next_avail"], state["next_used"] = na, nu

    return lambda n: run(step, drv, chains, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=3000)
    args = parser.parse_args()
    variants = {
        "process(handler) untouched chains": variant_process_untouched(),
        "process(handler) head + one memoryview": variant_process_head_and_view(),
        "pop + complete_batch + publish": variant_pop_complete_batch(),
        "pure-Python ring walker (baseline)": variant_pure_python(),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, fn in variants.items():  # interleaved, so drift hits all variants alike
            results[name].append(fn(args.iterations))
    print(f"ns per chain, batches of {BATCH}, median of {args.runs} runs (min..max)")
    for name, values in results.items():
        print(f"  {name:<42} {statistics.median(values):8.1f}   ({min(values):.1f}..{max(values):.1f})")


if __name__ == "__main__":
    main()
