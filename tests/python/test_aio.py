"""vhostuser_rs.aio: many coroutines in flight on one client against qemu-storage-daemon and
serve-blk (data checked end to end, a full ring); with the test playing the device: completions
out of order, cancellation (the ring entry is reclaimed only when the device completes it),
hostile used entries and a back-end dying with coroutines awaiting."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import struct
import subprocess
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

import vhostuser_rs as vu
from test_blk_fast import IMAGE_SIZE, MIB, Device, blk_backend, image, stopped  # noqa: F401 - fixtures
from vhostuser_rs.aio import AsyncBlockClient
from vhostuser_rs.blk import BlockClient, BlockError

Stopped = tuple[BlockClient, Device, subprocess.Popen[bytes]]

# The clients use only the loop's public interface (add_reader, futures, timers): they run on
# asyncio's own loop and on uvloop's (the test extra installs it; CI has it).
LOOPS = ["asyncio", "uvloop"]

uvloop: Any
try:
    import uvloop

    # libuv opens a pipe of its own with the first loop and keeps it for the process: open it
    # now, before any test counts its fds.
    uvloop.new_event_loop().close()
except ImportError:
    uvloop = None


def run_on(loop: str, coro: Coroutine[Any, Any, None]) -> None:
    if loop == "asyncio":
        asyncio.run(coro)
        return
    if uvloop is None:
        coro.close()
        if os.environ.get("CI"):
            pytest.fail("uvloop is required in CI (pip install '.[test]' installs it)")
        pytest.skip("uvloop is not installed (pip install uvloop)")
    uvloop.run(coro)


@pytest.mark.parametrize("loop", LOOPS)
def test_many_coroutines_in_flight(blk_backend: Path, image: Path, loop: str) -> None:  # noqa: F811
    data = bytearray(image.read_bytes())

    async def main() -> None:
        async with await AsyncBlockClient.connect(blk_backend, queue_size=16, slot_size=16384) as disk:
            assert disk.capacity == IMAGE_SIZE
            rng = random.Random(3)
            offsets = [rng.randrange(4 * MIB // 4096) * 4096 for _ in range(300)]
            # 300 reads at once on a ring that holds 5: back-pressure, not an error.
            got = await asyncio.gather(*(disk.read(o, 4096) for o in offsets))
            assert got == [bytes(data[o : o + 4096]) for o in offsets]
            payloads = {4 * MIB + i * 65536: rng.randbytes(65536) for i in range(20)}
            await asyncio.gather(*(disk.write(o, p) for o, p in payloads.items()))  # split in 16 KiB
            await disk.flush()
            for o, p in payloads.items():
                assert await disk.read(o, 65536) == p
                buf = bytearray(65536)
                assert await disk.readinto(o, buf) == 65536 and buf == p  # split: the general path
                small = bytearray(16384)
                assert await disk.readinto(o, small) == 16384 and small == p[:16384]
                data[o : o + 65536] = p
            await disk.write_zeroes(7 * MIB, 4096)
            assert await disk.read(7 * MIB, 4096) == bytes(4096)
            data[7 * MIB : 7 * MIB + 4096] = bytes(4096)
            assert await disk.get_id() in (b"vhost_user_blk", b"vhostuser_rs-blk")
            assert disk.in_flight == 0

    run_on(loop, main())
    assert image.read_bytes()[4 * MIB :] == bytes(data[4 * MIB :])


def test_out_of_order_and_cancellation(stopped: Stopped) -> None:  # noqa: F811
    disk, dev, _ = stopped

    async def main() -> None:
        adisk = AsyncBlockClient(disk)
        tasks = [asyncio.ensure_future(adisk.read(512 * i, 512)) for i in range(5)]
        await asyncio.sleep(0.05)
        heads = dev.take()
        assert len(heads) == 5
        tasks[2].cancel()
        await asyncio.sleep(0.05)
        assert tasks[2].cancelled()
        # The cancelled request still owns its ring entry: the next request must wait.
        extra = asyncio.ensure_future(adisk.read(0, 512))
        await asyncio.sleep(0.05)
        assert dev.take() == []  # the ring (16 descriptors, 3 per request) is full
        assert adisk.in_flight == 5
        for i in reversed(range(5)):
            dev.complete(heads[i], data=bytes([i]) * 512)
        results = await asyncio.wait_for(asyncio.gather(*(tasks[i] for i in (0, 1, 3, 4))), 5)
        assert results == [bytes([i]) * 512 for i in (0, 1, 3, 4)]
        await asyncio.sleep(0.05)
        [h] = dev.take()  # the waiting request went in once there was room
        dev.complete(h, data=b"e" * 512)
        assert await asyncio.wait_for(extra, 5) == b"e" * 512
        assert adisk.in_flight == 0

    asyncio.run(main())


def test_requests_are_futures_and_a_request_cancelled_before_submission_never_reaches_the_ring(
    stopped: Stopped,  # noqa: F811
) -> None:
    disk, dev, _ = stopped

    async def main() -> None:
        adisk = AsyncBlockClient(disk)
        # A plain future (no coroutine per request); arguments are checked at the call.
        read = adisk.read(0, 512)
        assert isinstance(read, asyncio.Future)
        with pytest.raises(ValueError):
            adisk.read(100, 512)
        dropped = adisk.read(512, 512)
        write = adisk.write(1024, b"w" * 512)
        dropped.cancel()  # in the same turn of the loop: not submitted yet
        await asyncio.sleep(0.05)
        heads = dev.take()
        kinds = {struct.unpack("<I", dev.mem.read(dev.chain(h)[0][0], 4))[0]: h for h in heads}
        assert len(heads) == 2 and sorted(kinds) == [0, 1]  # the read and the write, not the cancelled one
        assert adisk.in_flight == 2
        # A non-OK status fails the future with BlockError naming the request type.
        dev.complete(kinds[1], status=1)  # VIRTIO_BLK_S_IOERR
        dev.complete(kinds[0], data=b"r" * 512)
        assert await asyncio.wait_for(read, 5) == b"r" * 512
        with pytest.raises(BlockError, match="type 1 failed: IOERR") as err:
            await asyncio.wait_for(write, 5)
        assert err.value.status == 1
        assert adisk.in_flight == 0
        # Requests that need a coroutine (split, or with a result to shape) still work.
        gid = asyncio.ensure_future(adisk.get_id())
        await asyncio.sleep(0.05)
        [h] = dev.take()
        dev.complete(h, data=b"serial\0".ljust(20, b"\0"))
        assert await asyncio.wait_for(gid, 5) == b"serial"
        assert await adisk.read(0, 0) == b""

    asyncio.run(main())


def test_readinto_a_bytearray_straight_from_the_slot_and_a_cancelled_one_leaves_it_alone(
    stopped: Stopped,  # noqa: F811
) -> None:
    disk, dev, _ = stopped

    async def main() -> None:
        adisk = AsyncBlockClient(disk)
        kept, dropped = bytearray(b"k" * 1024), bytearray(b"d" * 512)
        into = adisk.readinto(0, kept)
        assert isinstance(into, asyncio.Future)  # the native path, not the coroutine
        gone = adisk.readinto(4096, dropped)
        await asyncio.sleep(0.05)
        heads = dev.take()
        assert len(heads) == 2
        with pytest.raises(BufferError):
            kept.extend(b"x")  # exported until the request completes
        gone.cancel()
        dev.complete(heads[1], data=b"D" * 512)
        dev.complete(heads[0], data=b"K" * 1024)
        assert await asyncio.wait_for(into, 5) == 1024
        assert kept == b"K" * 1024
        await asyncio.sleep(0.05)
        assert dropped == b"d" * 512  # completed after the cancellation: not written
        assert adisk.in_flight == 0
        kept.extend(b"x")  # released
        # Other buffers take the general path.
        view = memoryview(bytearray(512))
        other = asyncio.ensure_future(adisk.readinto(0, view))
        await asyncio.sleep(0.05)
        [h] = dev.take()
        dev.complete(h, data=b"v" * 512)
        assert await asyncio.wait_for(other, 5) == 512 and view == b"v" * 512

    asyncio.run(main())


def test_close_fails_every_request_and_releases_buffers(stopped: Stopped) -> None:  # noqa: F811
    disk, dev, _ = stopped

    async def main() -> None:
        adisk = AsyncBlockClient(disk)
        buf = bytearray(b"b" * 512)
        futures = [adisk.readinto(0, buf)] + [adisk.read(512 * i, 512) for i in range(6)]
        await asyncio.sleep(0.05)
        heads = dev.take()
        assert len(heads) == 5  # the ring holds five; two wait for room
        with pytest.raises(BufferError):
            buf.extend(b"x")  # on the ring: exported
        adisk.close()
        for f in futures:
            with pytest.raises(vu.ConnectionClosedError):
                await asyncio.wait_for(f, 5)
        with pytest.raises(vu.ConnectionClosedError):
            adisk.read(0, 512)
        adisk.close()  # idempotent
        buf.extend(b"x")  # the buffer's export went with its request
        assert buf == b"b" * 512 + b"x"

    asyncio.run(main())


def test_hostile_completion_fails_awaiting_coroutines(stopped: Stopped) -> None:  # noqa: F811
    disk, dev, _ = stopped

    async def main() -> None:
        adisk = AsyncBlockClient(disk)
        tasks = [asyncio.ensure_future(adisk.read(0, 512)) for _ in range(3)]
        await asyncio.sleep(0.05)
        heads = dev.take()
        dev.publish(heads[0], 1 << 20)  # longer than the chain's writable buffers
        done, pending = await asyncio.wait(tasks, timeout=5)
        assert not pending
        for t in done:
            assert isinstance(t.exception(), vu.VirtqueueError)
        with pytest.raises(vu.VirtqueueError):
            await adisk.read(0, 512)

    asyncio.run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_backend_dying_fails_every_awaiting_coroutine(stopped: Stopped, loop: str) -> None:  # noqa: F811
    disk, _, proc = stopped

    async def main() -> None:
        adisk = AsyncBlockClient(disk)
        tasks = [asyncio.ensure_future(adisk.read(0, 512)) for _ in range(20)]  # 5 in the ring
        await asyncio.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        done, pending = await asyncio.wait(tasks, timeout=5)
        assert not pending
        assert all(isinstance(t.exception(), vu.ConnectionClosedError) for t in done)
        with pytest.raises(vu.ConnectionClosedError):
            await adisk.read(0, 512)

    run_on(loop, main())
    proc.wait()


# -- AsyncNetClient against vhostuser-rs serve-net --loopback in its own process -----------------
@pytest.mark.parametrize("loop", LOOPS)
def test_async_net_client_loopback_and_a_vanishing_back_end(tmp_path: Path, sock_dir: Path, loop: str) -> None:
    import dpdk
    from netdriver import frame, swapped

    from vhostuser_rs.aio import AsyncNetClient

    sock = sock_dir / "serve-net.sock"
    frames = [frame(60 + i % 1000, seed=i) for i in range(2000)]

    async def main(server: dpdk.ServeNet) -> None:
        async with await AsyncNetClient.connect(sock, queue_size=128) as nic:

            got: list[bytes] = []

            async def receive() -> None:
                async for _, f in nic:
                    got.append(f)
                    if len(got) == len(frames):
                        return

            receiver = asyncio.ensure_future(receive())
            clock = asyncio.get_running_loop().time
            for i in range(0, len(frames), 64):
                # At most 64 frames unanswered, so that the RX ring (128) never overflows: a
                # loopback device drops what it has no buffer for, and a receiver slowed down
                # by a loaded machine must not make frames go missing.
                deadline = clock() + 10
                while len(got) < i:
                    assert clock() < deadline, f"{len(got)} of {i} frames came back; {nic.client.counters()}"
                    await asyncio.sleep(0.001)
                assert await nic.send(frames[i : i + 64]) == len(frames[i : i + 64])
            try:
                await asyncio.wait_for(receiver, 20)
            except TimeoutError:
                raise AssertionError(f"{len(got)} of {len(frames)} frames came back; {nic.client.counters()}") from None
            assert got == [swapped(f) for f in frames]
            # The back-end goes away while a coroutine waits for frames: the wait ends.
            waiting = asyncio.ensure_future(nic.recv())
            await asyncio.sleep(0.05)
            server.stop()
            with pytest.raises(vu.ConnectionClosedError):
                await asyncio.wait_for(waiting, 5)

    with dpdk.serve_net(sock, tmp_path, ["--loopback", "--poll-us", "50"]) as server:
        run_on(loop, main(server))


# -- AsyncNetClient against DPDK testpmd's net_vhost (macswap) ------------------------------------
@pytest.mark.timeout(120)
def test_async_net_client_handshakes_on_the_loop_with_dpdk(tmp_path: Path, sock_dir: Path) -> None:
    """The whole negotiation with DPDK's vhost library runs as loop callbacks: a ticker keeps
    ticking during connect and no executor thread is started; then frames go through
    testpmd's macswap and come back swapped, and the port counters agree."""
    import dpdk
    from netdriver import frame, swapped
    from test_net_client import check_features, vhost_pmd

    from vhostuser_rs.aio import AsyncNetClient

    sock = sock_dir / "vhost.sock"
    frames = [frame(60 + (i % 1400), seed=i) for i in range(1000)]

    async def main(pmd: dpdk.Testpmd) -> None:
        loop = asyncio.get_running_loop()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.ensure_future(ticker())
        nic = await AsyncNetClient.connect(sock, queue_size=256)
        t.cancel()
        # Each exchange yields to the loop at least once (GET_FEATURES .. SET_VRING_KICK).
        assert ticks >= 10, ticks
        assert getattr(loop, "_default_executor", None) is None, "connect used an executor thread"
        async with nic:
            await loop.run_in_executor(None, dpdk.wait_ready, pmd)
            check_features(pmd, nic.client)
            got: list[bytes] = []
            for i in range(0, len(frames), 64):  # a window, so that the RX ring never overflows
                assert await nic.send(frames[i:i + 64]) == len(frames[i:i + 64])
                while len(got) < i + 64 and len(got) < len(frames):
                    got += [f for _, f in await asyncio.wait_for(nic.recv(), 10)]
            assert got == [swapped(f) for f in frames]
            c = nic.client.counters()
            assert (c["tx_frames"], c["rx_frames"], c["rx_dropped"]) == (1000, 1000, 0)

    with vhost_pmd(sock, tmp_path, "macswap") as pmd:
        asyncio.run(main(pmd))


def test_a_client_dropped_with_requests_in_flight_is_collected(blk_backend: Path) -> None:  # noqa: F811
    """A future held by the native engine whose callback refers back to the client makes a
    cycle (client -> engine -> future -> callback -> client) that only the garbage collector
    can break: the engine shows its futures to it, so the client, its memory and its fds go
    (the back-end request channel's thread holds its handler weakly, the rings close their
    eventfds when collected)."""
    import gc
    import weakref

    def fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    loop = asyncio.new_event_loop()
    before = fds()
    try:
        disk = BlockClient.connect(blk_backend, queue_size=16)
        engine = disk._batch_engine(0)
        futures = [loop.create_future() for _ in range(4)]
        assert engine.submit_futures([(0, i, 512) for i in range(4)], futures) == 4
        def refers_to_the_client(_f: asyncio.Future[Any], client: BlockClient = disk) -> None:
            del client  # the default argument's reference is the point

        for f in futures:
            f.add_done_callback(refers_to_the_client)
        gone = weakref.ref(disk)
        del disk, engine, futures, f, refers_to_the_client
        gc.collect()
        assert gone() is None, "the cycle through the engine's futures was not collected"
        assert fds() <= before, fds() - before
    finally:
        loop.close()
