"""NetClient.connect(reconnect=SECONDS): the virtio-net driver survives its back-end restarting
(QEMU's ``-chardev socket,reconnect=N`` for vhost-user-net; spec: protocol.md §6.16, a new
connection starts from scratch). Against real peers started and stopped here: ``vhostuser-rs
serve-net --loopback`` killed with SIGKILL and started again on the same socket, and DPDK
testpmd's net_vhost quit and started again. Frames after the restart come back byte for byte,
the same object keeps working (same ``fileno()``, counters going on), no back-end coming back
is a VhostUserTimeoutError in bounded time, close() ends a reconnect, no fd leaks, a back-end
that comes back with fewer features is a NegotiationError."""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dpdk
import pytest

import vhostuser_rs as vu
from vhostuser_rs.aio import AsyncNetClient
from vhostuser_rs.netclient import NetClient

from netdriver import frame, swapped
from peers import in_thread
from test_net_client import exchange, vhost_pmd

pytestmark = pytest.mark.timeout(120)

LOOPBACK = ["--loopback"]


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def kill(server: dpdk.ServeNet) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()


@contextmanager
def servers(sock: Path, workdir: Path) -> Iterator[Callable[..., dpdk.ServeNet]]:
    """Starts serve-net processes on `sock` on demand; every one is ended at exit."""
    started: list[dpdk.ServeNet] = []

    def start(args: list[str] = LOOPBACK) -> dpdk.ServeNet:
        s = dpdk.ServeNet(sock, workdir, args, name=f"serve-net-{len(started)}")
        started.append(s)
        return s

    try:
        yield start
    finally:
        for s in started:
            s.stop(signal.SIGKILL)
        sock.unlink(missing_ok=True)


def batch(n: int, seed: int) -> list[bytes]:
    return [frame(60 + (i * 37) % 1400, seed=seed + i) for i in range(n)]


def exchange_after(nic: NetClient, previous: list[bytes], frames: list[bytes], *, queue_pair: int = 0,
                   window: int = 64, timeout: float = 30.0) -> int:
    """`exchange` on a new session: `frames` come back byte for byte, in order, after at most a
    few frames of `previous` sent again (TX is at least once across a restart: a chain the old
    back-end had looped back without marking it used yet is read again by the new one).
    Returns how many came again."""
    old = {swapped(f) for f in previous}
    want = [swapped(f) for f in frames]
    got: list[bytes] = []
    again = sent = 0
    deadline = time.monotonic() + timeout
    while len(got) < len(want):
        assert time.monotonic() < deadline, f"{len(got)} of {len(want)} frames came back"
        if sent < len(frames) and sent - len(got) < window:
            sent += nic.send(frames[sent:sent + 32], queue_pair=queue_pair)
        for _, d in nic.recv(timeout=0 if sent < len(frames) else 1.0, queue_pair=queue_pair):
            if not got and d in old:
                again += 1
            else:
                got.append(d)
    assert got == want
    assert again <= len(previous)
    return again


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_serve_net_killed_and_restarted(tmp_path: Path, sock_dir: Path, packed: bool) -> None:
    """SIGKILL mid-session, a new serve-net on the same path a second later while the client
    waits for frames: the wait reconnects, the frames sent meanwhile (kept in the TX ring and
    handed over) and those after come back byte for byte, same fileno, counters go on. Split
    rings (SET_VRING_BASE = the used index) and packed rings (the buffers in flight written
    again, DriverQueue.hand_over)."""
    sock = sock_dir / "net.sock"
    with servers(sock, tmp_path) as start:
        first = start()
        with NetClient.connect(sock, queue_size=128, reconnect=20.0, packed=packed) as nic:
            assert nic.packed == packed
            fd = nic.fileno()
            one = batch(300, 0)
            assert exchange(nic, one, window=96) == [swapped(f) for f in one]
            kill(first)
            # Queued with nobody there: the frames wait in the ring for the next back-end.
            two = batch(40, 1000)
            assert nic.send(two) == 40
            got: list[bytes] = []
            old = {swapped(f) for f in one}

            def receive() -> float:
                t = time.monotonic()
                while len(got) < len(two):
                    # Frames of `one` looped back but not yet completed when the old back-end
                    # died come again first (TX is at least once across a restart).
                    got.extend(d for _, d in nic.recv(timeout=10.0) if got or d not in old)
                return time.monotonic() - t

            with in_thread(receive) as took:
                time.sleep(1.0)  # the receiver meets the hang-up and keeps trying meanwhile
                second = start()
            assert isinstance(took[0], float) and took[0] < 15, took
            assert got == [swapped(f) for f in two]
            assert nic.sessions == 2 and nic.fileno() == fd
            three = batch(500, 2000)
            assert exchange(nic, three, window=96) == [swapped(f) for f in three]
            c = nic.counters()
            again = c["rx_frames"] - 840
            assert 0 <= again <= len(one)
            assert (c["tx_frames"], c["rx_dropped"]) == (840, 0)
            # The new back-end saw the frames of the new session (and those it read again).
            theirs = second.counters()
            assert (theirs.tx_frames, theirs.rx_frames) == (540 + again, 540 + again)


def test_sender_and_receiver_threads_share_one_reconnect(tmp_path: Path, sock_dir: Path) -> None:
    """send() on one thread, recv() on another (NetClient's thread-safety rule), the back-end
    killed and restarted under them: one reconnect (sessions == 2) whichever thread meets the
    hang-up first; the receiver gets the frames in order, the last 1000 all of them, without
    duplicates once those the new back-end read again (at least once) are skipped, and at most
    a ring's worth missing (in flight in the killed process: lost, as on a NIC)."""
    sock = sock_dir / "net.sock"
    frames = batch(3000, 0)
    want = [swapped(f) for f in frames]
    with servers(sock, tmp_path) as start:
        first = start()
        with NetClient.connect(sock, queue_size=256, reconnect=20.0) as nic:
            got: list[bytes] = []
            seen: set[bytes] = set()
            sent = 0
            done = threading.Event()

            def send_all() -> None:
                nonlocal sent
                deadline = time.monotonic() + 60
                try:
                    while sent < len(frames):
                        assert time.monotonic() < deadline
                        if sent - len(got) < 128:  # keep the RX ring from overflowing
                            sent += nic.send(frames[sent:sent + 32])
                        else:
                            time.sleep(0.001)
                finally:
                    done.set()

            def receive_all() -> None:
                deadline = time.monotonic() + 60
                while True:
                    assert time.monotonic() < deadline, f"{len(got)} of {len(frames)}"
                    more = nic.recv(timeout=1.0)
                    if not more and done.is_set():
                        return
                    for _, d in more:
                        if d not in seen:  # frames are all different: a second copy is a resend
                            seen.add(d)
                            got.append(d)

            with in_thread(send_all) as s_out, in_thread(receive_all) as r_out:
                while len(got) < 1000:
                    time.sleep(0.01)
                kill(first)
                time.sleep(0.3)
                start()
            assert s_out == [None] and r_out == [None], (s_out, r_out)
            assert nic.sessions == 2
            expected = iter(want)
            assert all(g in expected for g in got), "out of order"
            assert len(want) - len(got) <= 256 and got[-1000:] == want[-1000:]


def test_sender_only_reconnects_when_the_ring_fills(tmp_path: Path, sock_dir: Path) -> None:
    """A client that only sends meets the hang-up when the TX ring is full: send() then
    reconnects and goes on; no frame is lost: the new back-end gets all 200 (the 64 in the
    ring handed over, then the rest), and loops back the first 64 in order (the RX ring's 64
    buffers; it drops what finds no buffer, nobody receiving yet)."""
    sock = sock_dir / "net.sock"
    with servers(sock, tmp_path) as start:
        first = start()
        with NetClient.connect(sock, queue_size=64, reconnect=20.0) as nic:
            kill(first)
            frames = batch(200, 0)
            sent = 0

            def send_all() -> None:
                nonlocal sent
                deadline = time.monotonic() + 30
                while sent < len(frames):
                    assert time.monotonic() < deadline
                    sent += nic.send(frames[sent:sent + 32])
                    if sent < len(frames):
                        time.sleep(0.01)

            with in_thread(send_all) as out:
                time.sleep(0.5)
                second = start()
            assert out == [None] and nic.sessions == 2
            got: list[bytes] = []
            while more := nic.recv(timeout=1.0):  # until quiet
                got += [d for _, d in more]
            # In order, the first 64 certainly (the buffers were there); more if the device was
            # still looping frames back while these were received and their buffers reposted.
            expected = iter([swapped(f) for f in frames])
            assert len(got) >= 64 and all(g in expected for g in got)
            assert got[:64] == [swapped(f) for f in frames[:64]]
            theirs = second.counters()
            assert (theirs.tx_frames, theirs.rx_frames, theirs.rx_dropped) == (200, len(got), 200 - len(got))


def test_two_queue_pairs_and_the_control_queue_come_back(tmp_path: Path, sock_dir: Path) -> None:
    """Two pairs with the control queue: a new device starts with one pair (virtio 1.2
    §5.1.6.5.5), so VQ_PAIRS_SET is sent again on the control queue (handed over like the
    other rings), and MAC_ADDR_SET too: the new serve-net's config shows the driver's MAC, not
    its own default; both pairs loop frames back after the restart."""
    sock = sock_dir / "net.sock"
    args = [*LOOPBACK, "--queue-pairs", "2"]
    with servers(sock, tmp_path) as start:
        first = start(args)
        with NetClient.connect(sock, queue_pairs=2, control_queue=True, mac="02:aa:bb:cc:dd:ee",
                               reconnect=20.0) as nic:
            for qp in (0, 1):
                f = batch(30, 100 * qp)
                assert exchange(nic, f, queue_pair=qp) == [swapped(x) for x in f]
            kill(first)
            start(args)
            nic.recv(timeout=0, queue_pair=1)  # finds the hang-up, reconnects
            assert nic.sessions == 2 and nic.mac == bytes.fromhex("02aabbccddee")
            assert nic.frontend.get_config(0, 12)[:6] == bytes.fromhex("02aabbccddee")
            for qp in (1, 0):
                exchange_after(nic, batch(30, 100 * qp), batch(30, 1000 + 100 * qp), queue_pair=qp)


def test_disabled_pairs_stay_disabled(tmp_path: Path, sock_dir: Path) -> None:
    """Without the control queue VQ_PAIRS_SET is SET_VRING_ENABLE (as QEMU does): the hand-over
    enables every ring, so the driver disables again the pairs it had disabled; the new
    back-end does not serve pair 1 until the driver asks for two pairs again."""
    sock = sock_dir / "net.sock"
    args = [*LOOPBACK, "--queue-pairs", "2"]
    with servers(sock, tmp_path) as start:
        first = start(args)
        with NetClient.connect(sock, queue_pairs=2, reconnect=20.0) as nic:
            nic.set_queue_pairs(1)
            kill(first)
            start(args)
            nic.recv(timeout=0)  # finds the hang-up, reconnects
            assert nic.sessions == 2
            parked = batch(5, 50)
            assert nic.send(parked, queue_pair=1) == 5
            assert nic.recv(timeout=0.5, queue_pair=1) == []
            exchange_after(nic, [], batch(10, 60), queue_pair=0)
            nic.set_queue_pairs(2)
            exchange_after(nic, parked, batch(10, 70), queue_pair=1)


def test_a_frontend_that_reconnects_by_itself_is_followed(tmp_path: Path, sock_dir: Path) -> None:
    """A Frontend made with reconnect= lends the client its seconds; when it reconnects by
    itself (here in the wait of a control command, which the hand-over gives to the new
    back-end and which completes there), the next data-path call does the driver's part."""
    sock = sock_dir / "net.sock"
    with servers(sock, tmp_path) as start:
        first = start()
        fe = vu.Frontend.connect(sock, reconnect=20.0)
        with NetClient(fe, control_queue=True) as nic:
            assert nic.reconnect == 20.0
            kill(first)
            start()
            nic.set_promisc(True)  # the command's wait reconnects the Frontend
            assert fe.sessions == 2 and nic.sessions == 1
            f = batch(20, 9)
            exchange_after(nic, [], f)
            assert nic.sessions == 2


def test_reconnect_needs_the_socket_path() -> None:
    a, b = socket.socketpair()
    with a, b:
        fe = vu.Frontend.from_socket(a)
        try:
            with pytest.raises(ValueError, match="socket path"):
                NetClient(fe, reconnect=1.0)
        finally:
            fe.close()


def test_no_backend_comes_back_is_a_timeout(tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "net.sock"
    with servers(sock, tmp_path) as start:
        first = start()
        with NetClient.connect(sock, reconnect=1.0) as nic:
            kill(first)
            t = time.monotonic()
            with pytest.raises(vu.VhostUserTimeoutError, match="reconnect=1.0"):
                nic.recv(timeout=None)
            assert time.monotonic() - t < 5
            # The session stays lost; once a back-end is there the next call gets it back.
            start()
            f = batch(5, 7)
            assert exchange(nic, f) == [swapped(x) for x in f]
            assert nic.sessions == 2


def test_without_reconnect_a_hangup_is_still_an_error(tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "net.sock"
    with servers(sock, tmp_path) as start:
        first = start()
        with NetClient.connect(sock) as nic:
            assert nic.reconnect is None
            kill(first)
            start()
            with pytest.raises(vu.ConnectionClosedError):
                nic.recv(timeout=5.0)


def test_close_from_another_thread_ends_a_reconnect(tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "net.sock"
    with servers(sock, tmp_path) as start:
        first = start()
        nic = NetClient.connect(sock, reconnect=60.0)
        kill(first)
        before = time.monotonic()
        with in_thread(lambda: nic.recv(timeout=None)) as out:
            time.sleep(0.5)
            closed_at = time.monotonic()
            nic.close()
        assert isinstance(out[0], vu.ConnectionClosedError), out
        assert time.monotonic() - closed_at < 2, "close() did not end the reconnect promptly"
        assert time.monotonic() - before < 5


def test_close_at_any_point_of_a_reconnect_leaks_nothing(tmp_path: Path, sock_dir: Path) -> None:
    """A back-end is there this time: close() lands before, during or after the reconnect
    (delays spread over its ~20 ms). The waiting thread always ends with ConnectionClosedError
    and no fd is left behind (no session kept on a closed client)."""
    sock = sock_dir / "net.sock"
    with servers(sock, tmp_path) as start:
        server = start()
        base = None
        for i in range(12):
            nic = NetClient.connect(sock, reconnect=20.0)
            if base is None:
                nic.close()
                base = fd_count()
                nic = NetClient.connect(sock, reconnect=20.0)
            kill(server)
            server = start()
            with in_thread(lambda: nic.recv(timeout=None)) as out:
                time.sleep(0.003 * i)
                nic.close()
            assert isinstance(out[0], vu.ConnectionClosedError), (i, out)
            del nic
            assert fd_count() == base, i


def test_fds_are_not_leaked_across_reconnects(tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "net.sock"
    with servers(sock, tmp_path) as start:
        server = start()
        with NetClient.connect(sock, reconnect=20.0) as nic:
            counts = []
            previous: list[bytes] = []
            for i in range(5):
                f = batch(20, 100 * i)
                exchange_after(nic, previous, f)
                previous = f
                counts.append(fd_count())
                kill(server)
                server = start()
            nic.recv(timeout=0.5)
            assert nic.sessions == 6
            counts.append(fd_count())
        # One stable count from the first session on (the log file of each new serve-net is
        # closed by the time it runs).
        assert len(set(counts)) == 1, counts


def test_a_backend_offering_less_is_a_negotiation_error(tmp_path: Path, sock_dir: Path) -> None:
    """The first back-end offers VIRTIO_NET_F_MTU (acknowledged), the one after the restart
    does not: the driver cannot lose a feature, so the reconnect is a NegotiationError and no
    ring starts; a back-end with the features again is taken by the next call."""
    sock = sock_dir / "net.sock"
    with servers(sock, tmp_path) as start:
        first = start([*LOOPBACK, "--mtu", "1500"])
        with NetClient.connect(sock, reconnect=10.0) as nic:
            mtu_bit = 1 << vu._native.VIRTIO_NET["VIRTIO_NET_F_MTU"]
            assert nic.features & mtu_bit
            kill(first)
            second = start()
            with pytest.raises(vu.NegotiationError, match="no longer offers"):
                nic.recv(timeout=5.0)
            kill(second)
            start([*LOOPBACK, "--mtu", "1500"])
            f = batch(10, 3)
            assert exchange(nic, f) == [swapped(x) for x in f]


def test_a_smaller_mtu_after_the_restart_is_a_negotiation_error(tmp_path: Path, sock_dir: Path) -> None:
    """Buffers and send()'s limit were sized for MTU 9000: a back-end that comes back with
    MTU 1500 is refused (every call says so until it is replaced); one with 9000 again is
    taken, and jumbo frames come back whole."""
    sock = sock_dir / "net.sock"
    with servers(sock, tmp_path) as start:
        first = start([*LOOPBACK, "--mtu", "9000"])
        with NetClient.connect(sock, mtu=9000, reconnect=10.0) as nic:
            kill(first)
            second = start([*LOOPBACK, "--mtu", "1500"])
            for _ in range(2):
                with pytest.raises(vu.NegotiationError, match="MTU is 1500"):
                    nic.recv(timeout=0)
            kill(second)
            start([*LOOPBACK, "--mtu", "9000"])
            big = [frame(9014, seed=i) for i in range(8)]
            exchange_after(nic, [], big, window=8)


def test_event_loop_watching_fileno_keeps_working(tmp_path: Path, sock_dir: Path) -> None:
    """A selector registered on fileno() before the restart is woken by frames of the new
    session (the RX call eventfd is the same one, handed to the new back-end)."""
    sock = sock_dir / "net.sock"
    with servers(sock, tmp_path) as start, selectors.DefaultSelector() as sel:
        first = start()
        with NetClient.connect(sock, reconnect=20.0) as nic:
            sel.register(nic.fileno(), selectors.EVENT_READ)
            kill(first)
            start()
            assert nic.recv(timeout=0) == []  # finds the hang-up and reconnects
            assert nic.sessions == 2
            f = batch(10, 5)
            assert nic.send(f) == 10
            got: list[bytes] = []
            deadline = time.monotonic() + 10
            while len(got) < 10:
                assert time.monotonic() < deadline
                if sel.select(1.0):
                    got += [d for _, d in nic.recv(timeout=0)]
            assert got == [swapped(x) for x in f]


def test_async_client_across_a_restart(tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "net.sock"
    with servers(sock, tmp_path) as start:
        first = start()

        async def main() -> None:
            async with await AsyncNetClient.connect(sock, reconnect=20.0) as nic:
                f = batch(20, 0)
                assert await nic.send(f) == 20
                got: list[bytes] = []
                while len(got) < 20:
                    got += [d for _, d in await asyncio.wait_for(nic.recv(), 10)]
                assert got == [swapped(x) for x in f]
                kill(first)
                loop = asyncio.get_running_loop()
                loop.call_later(1.0, start)
                g = batch(20, 500)
                assert await nic.send(g) == 20
                old = {swapped(x) for x in f}
                got = []
                while len(got) < 20:
                    got += [d for _, d in await asyncio.wait_for(nic.recv(), 15) if got or d not in old]
                assert got == [swapped(x) for x in g]
                assert nic.client.sessions == 2

        asyncio.run(main())


def test_async_client_gets_the_timeout_not_a_hang(tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "net.sock"
    with servers(sock, tmp_path) as start:
        first = start()

        async def main() -> None:
            async with await AsyncNetClient.connect(sock, reconnect=1.0) as nic:
                kill(first)
                with pytest.raises(vu.VhostUserTimeoutError):
                    await asyncio.wait_for(nic.recv(), 10)

        asyncio.run(main())


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_dpdk_net_vhost_restarted(tmp_path: Path, sock_dir: Path, packed: bool) -> None:
    """DPDK's vhost library as the peer: testpmd's net_vhost (macswap) quits and a new testpmd
    serves the same socket path; frames after the restart come back byte for byte."""
    sock = sock_dir / "vhost.sock"
    with vhost_pmd(sock, tmp_path, "macswap") as pmd:
        nic = NetClient.connect(sock, reconnect=30.0, packed=packed)
        try:
            dpdk.wait_ready(pmd)
            fd = nic.fileno()
            one = batch(500, 0)
            assert exchange(nic, one) == [swapped(f) for f in one]
            pmd.close()
            (tmp_path / "second").mkdir()
            with vhost_pmd(sock, tmp_path / "second", "macswap") as pmd2:
                assert nic.recv(timeout=0) == []  # finds the hang-up, reconnects
                dpdk.wait_ready(pmd2)
                two = batch(1000, 5000)
                again = exchange_after(nic, one, two, window=128, timeout=60)
                assert nic.sessions == 2 and nic.fileno() == fd
                stats = pmd2.port_stats()
                assert stats.rx_packets == stats.tx_packets == 1000 + again, stats
            assert nic.counters()["rx_frames"] == 1500 + again
        finally:
            nic.close()
