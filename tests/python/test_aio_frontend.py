"""vhostuser_rs.aio.AsyncFrontend: the message exchange driven by the event loop. Against
qemu-storage-daemon and serve-blk (negotiation, memory table, rings, then I/O through
AsyncBlockClient, whose connect runs on it); with scripted back-ends: the loop stays responsive
while a reply is slow, coroutines take turns on the channel, timeouts, cancellation (before and
after the request was sent), a back-end dying mid-exchange, a back-end request handler on its
thread sending on the main channel while a coroutine's reply is awaited, and every fd closed by
close()."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

import vhostuser_rs as vu
from test_blk_fast import IMAGE_SIZE, MIB, blk_backend, image  # noqa: F401 - fixtures
from test_frontend_hostile import PROTOCOL, expect, fake_backend, negotiate_reply_ack
from vhostuser_rs import BackendRequest as B
from vhostuser_rs import Channel
from vhostuser_rs import FrontendRequest as F
from vhostuser_rs import hazmat
from vhostuser_rs import messages as m
from vhostuser_rs.aio import AsyncBlockClient, AsyncFrontend
from vhostuser_rs.blk import CONFIG_SIZE, BlockConfig
from vhostuser_rs.frontend import _Requests, exchange


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


class Ticker:
    """Counts loop turns every millisecond: a blocked loop stops the count."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.001)
            self.ticks += 1

    def __enter__(self) -> Ticker:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def test_handshake_rings_and_io_on_the_loop(blk_backend: Path, image: Path) -> None:  # noqa: F811
    """Negotiate, share memory, set up a ring, check it with I/O; then AsyncBlockClient, built
    on the same exchange core, with many coroutines in flight while the ticker keeps ticking."""
    data = image.read_bytes()
    before = open_fds()

    async def main() -> None:
        with Ticker() as ticker:
            async with await AsyncFrontend.connect(blk_backend, timeout=5.0) as fe:
                offered = await fe.get_features()
                assert vu.VirtioFeature.VERSION_1 in offered
                # Several coroutines at once: they take turns on the channel.
                proto, again = await asyncio.gather(fe.get_protocol_features(), fe.get_features())
                assert again == offered and vu.ProtocolFeature.REPLY_ACK in proto
                mem = vu.GuestMemory.allocate(16 << 20)
                result = await fe.negotiate(memory=mem, config_size=CONFIG_SIZE)
                assert vu.ProtocolFeature.REPLY_ACK in fe.protocol_features
                assert result.config is not None
                assert BlockConfig.parse(result.config).capacity * 512 == IMAGE_SIZE
                # A reply with an fd (GET_INFLIGHT_FD), then SET_INFLIGHT_FD, as QEMU does
                # (serve-blk offers it; qemu-storage-daemon 7.2 does not).
                inflight = None
                if vu.ProtocolFeature.INFLIGHT_SHMFD in fe.protocol_features:
                    inflight = await fe.setup_inflight(1, 64)
                    assert inflight is not None and inflight.desc.mmap_size > 0
                vq = await fe.setup_queue(0, 64)
                assert fe.queue(0) is vq
                # One read through the ring the loop set up.
                hdr, buf, status = mem.alloc(16, 16), mem.alloc(4096, 4096), mem.alloc(1, 1)
                mem.write(hdr, (0).to_bytes(4, "little") + bytes(4) + (8).to_bytes(8, "little"))
                mem.write(status, b"\xff")
                vq.queue.add([(hdr, 16)], [(buf, 4096), (status, 1)])
                vq.queue.publish()
                vq.kick()
                for _ in range(500):
                    if vq.queue.reap():
                        break
                    await asyncio.sleep(0.01)
                assert mem.read(status, 1) == b"\0"
                assert mem.read(buf, 4096) == data[4096:8192]
                assert await fe.stop_queue(0) == 1
                if inflight is not None:
                    inflight.close()
            assert fe.closed
            async with await AsyncBlockClient.connect(blk_backend, queue_size=32) as disk:
                got = await asyncio.gather(*(disk.read(i * 8192, 4096) for i in range(64)))
                assert got == [data[i * 8192 : i * 8192 + 4096] for i in range(64)]
                await disk.write(MIB, b"z" * 8192)
                assert await disk.read(MIB, 8192) == b"z" * 8192
            assert ticker.ticks > 0

    asyncio.run(main())
    assert open_fds() == before


def test_the_loop_runs_while_a_reply_is_slow(sock_dir: Path) -> None:
    def script(conn: vu.Connection) -> None:
        expect(conn, F.GET_FEATURES)
        time.sleep(0.5)
        hazmat.send(conn, hazmat.reply(F.GET_FEATURES, int(PROTOCOL)))
        conn.recv(timeout=10)  # the front-end hangs up

    async def main(path: Path) -> None:
        with Ticker() as ticker:
            async with await AsyncFrontend.connect(path) as fe:
                start = ticker.ticks
                assert await fe.get_features() == PROTOCOL
                # ~500 ms of waiting: a blocking exchange would have stopped the ticker.
                assert ticker.ticks - start >= 10, ticker.ticks - start

    with fake_backend(sock_dir, script) as path:
        asyncio.run(main(path))


def test_timeout_leaves_the_connection_out_of_step(sock_dir: Path) -> None:
    done = threading.Event()

    def silent(conn: vu.Connection) -> None:
        expect(conn, F.GET_FEATURES)
        done.wait(10)

    async def main(path: Path) -> None:
        async with await AsyncFrontend.connect(path, timeout=0.3) as fe:
            t0 = time.monotonic()
            with pytest.raises(vu.VhostUserTimeoutError):
                await fe.get_features()
            assert 0.25 < time.monotonic() - t0 < 3
            with pytest.raises(vu.InvalidStateError, match="out of step"):
                await fe.get_features()
            done.set()

    with fake_backend(sock_dir, silent) as path:
        asyncio.run(main(path))


def test_cancellation_before_and_after_sending(sock_dir: Path) -> None:
    """A request cancelled while its reply is awaited: the next request reads that reply and
    discards it. One cancelled while waiting for its turn: never sent."""
    seen: list[F] = []
    replied = threading.Event()

    def script(conn: vu.Connection) -> None:
        seen.append(expect(conn, F.GET_FEATURES).request)
        replied.wait(10)  # answered only after the front-end gave up on it
        hazmat.send(conn, hazmat.reply(F.GET_FEATURES, 0x1234))
        msg = conn.recv(timeout=10)[0]
        seen.append(msg.request)
        hazmat.send(conn, hazmat.reply(F.GET_FEATURES, int(PROTOCOL)))
        conn.recv(timeout=10)  # the front-end hangs up

    async def main(path: Path) -> None:
        async with await AsyncFrontend.connect(path, timeout=5.0) as fe:
            first = asyncio.ensure_future(fe.get_features())
            queued = asyncio.ensure_future(fe.get_queue_num())  # waits for its turn
            await asyncio.sleep(0.1)
            queued.cancel()
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            with pytest.raises(asyncio.CancelledError):
                await queued
            replied.set()
            # In step: this gets its own reply, not the abandoned one (which was recorded).
            assert await fe.get_features() == PROTOCOL

    with fake_backend(sock_dir, script) as path:
        asyncio.run(main(path))
    assert seen == [F.GET_FEATURES, F.GET_FEATURES]  # GET_QUEUE_NUM was never sent


def test_a_backend_dying_mid_exchange(sock_dir: Path) -> None:
    def hangup(conn: vu.Connection) -> None:
        expect(conn, F.GET_FEATURES)
        conn.send(hazmat.encode_raw(F.GET_FEATURES, b"\0" * 8, flags=0x5)[:7])  # half a reply

    async def main(path: Path) -> None:
        async with await AsyncFrontend.connect(path, timeout=10) as fe:
            t0 = time.monotonic()
            with pytest.raises(vu.ConnectionClosedError):
                await fe.get_features()
            assert time.monotonic() - t0 < 5
            with pytest.raises(vu.ConnectionClosedError):
                await fe.get_features()

    with fake_backend(sock_dir, hangup) as path:
        asyncio.run(main(path))


def test_connect_waits_for_a_late_backend_and_times_out(sock_dir: Path) -> None:
    async def main() -> None:
        with pytest.raises(FileNotFoundError):
            await AsyncFrontend.connect(sock_dir / "nobody.sock", timeout=0.2)
        path = sock_dir / "late.sock"

        def late() -> vu.Listener:
            time.sleep(0.2)
            return vu.Listener.bind(path)

        listen = asyncio.get_running_loop().run_in_executor(None, late)
        fe = await AsyncFrontend.connect(path, timeout=5)
        (await listen).close()
        fe.close()

    asyncio.run(main())


def test_handler_thread_takes_its_turn_on_the_main_channel(sock_dir: Path) -> None:
    """A back-end request handled on the channel thread sends a main-channel request while a
    coroutine awaits its reply: the handler's request waits for its turn, then goes."""
    proto = vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.BACKEND_REQ | vu.ProtocolFeature.CONFIG
    results: dict[str, object] = {}
    handler_sent = threading.Event()

    def script(conn: vu.Connection) -> None:
        negotiate_reply_ack(conn, int(proto))
        msg, fds = conn.recv(timeout=10)
        assert msg.request is F.SET_BACKEND_REQ_FD and len(fds) == 1
        chan = vu.Connection.from_fd(fds[0])
        hazmat.close_fds(fds)
        hazmat.send(conn, hazmat.reply(F.SET_BACKEND_REQ_FD, 0))
        with chan:
            expect(conn, F.GET_FEATURES)  # the coroutine's request
            hazmat.send(chan, hazmat.request(B.CONFIG_CHANGE_MSG, need_reply=True))
            time.sleep(0.2)  # the handler is waiting for its turn meanwhile
            hazmat.send(conn, hazmat.reply(F.GET_FEATURES, int(PROTOCOL)))
            expect(conn, F.GET_CONFIG)  # the handler's
            handler_sent.set()
            # Now a coroutine's request waits for the handler's exchange to end.
            with pytest.raises(vu.VhostUserTimeoutError):
                conn.recv(timeout=0.3)
            hazmat.send(conn, hazmat.reply(F.GET_CONFIG, m.DeviceConfig(0, b"c" * 8)))
            results["ack"] = chan.recv(Channel.BACKEND, timeout=10)[0].payload
            expect(conn, F.GET_FEATURES)
            hazmat.send(conn, hazmat.reply(F.GET_FEATURES, int(PROTOCOL)))
            conn.recv(timeout=10)  # the front-end hangs up

    got: list[bytes] = []

    def on_change(fe: vu.Frontend) -> None:
        got.append(fe.get_config(0, 8))

    async def main(path: Path) -> None:
        async with await AsyncFrontend.connect(path, timeout=10) as fe:
            await fe.get_features()
            await fe.get_protocol_features()
            await fe.set_protocol_features(proto)
            await fe.set_backend_req_fd(vu.BuiltinHandler(on_config_change=on_change))
            with Ticker() as ticker:
                assert await fe.get_features() == PROTOCOL
                assert await asyncio.to_thread(handler_sent.wait, 10)
                # The handler's GET_CONFIG holds the channel: this waits for its turn (without
                # blocking the loop), then goes.
                assert await fe.get_features() == PROTOCOL
                assert got == [b"c" * 8]
                assert ticker.ticks > 0

    with fake_backend(sock_dir, script) as path:
        asyncio.run(main(path))
    assert got == [b"c" * 8]
    assert results["ack"] == 0


def test_coroutine_calls_and_blocking_calls_share_definitions() -> None:
    """Every request of the spec and the compositions are defined once (an ``exchange`` of the
    shared table) and are the same object on Frontend and AsyncFrontend: blocking on one,
    coroutine methods on the other."""
    defined = {n for n, v in vars(_Requests).items() if isinstance(v, exchange)}
    requests = {r.name.lower() for r in F}
    assert requests <= defined, sorted(requests - defined)
    assert {"negotiate", "setup_queue", "stop_queue", "add_memory", "enable_logging", "setup_inflight"} <= defined
    for name in defined:
        assert getattr(AsyncFrontend, name) is getattr(vu.Frontend, name)
    assert asyncio.iscoroutinefunction(AsyncFrontend.connect)


def test_close_while_a_reply_is_awaited(sock_dir: Path) -> None:
    done = threading.Event()

    def silent(conn: vu.Connection) -> None:
        expect(conn, F.GET_FEATURES)
        done.wait(10)

    async def main(path: Path) -> None:
        fe = await AsyncFrontend.connect(path, timeout=10)
        pending = asyncio.ensure_future(fe.get_features())
        await asyncio.sleep(0.1)
        fe.close()
        with pytest.raises(vu.ConnectionClosedError):
            await asyncio.wait_for(pending, 5)
        with pytest.raises(vu.ConnectionClosedError):
            await fe.get_features()
        done.set()

    with fake_backend(sock_dir, silent) as path:
        asyncio.run(main(path))
