"""close() releases every fd of a front-end object at once — the socket, the back-end request
channel, the rings' eventfds, the inflight buffer, the client's memfd — from any state: just
connected, mid-session with rings and a handler, after the back-end died, after it broke the
protocol, and while another thread waits for a reply. Each test looks at /proc/self/fd right
after close(), with the object still referenced (so nothing is left to the garbage collector)."""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import vhostuser_rs as vu
from vhostuser_rs import FrontendRequest as F
from vhostuser_rs import hazmat
from vhostuser_rs.blk import SECTOR, BlockClient
from vhostuser_rs.netclient import NetClient

from conftest import open_fds
from peers import freeze, peer, serve_blk


def fd_links() -> dict[int, str]:
    out = {}
    for fd in open_fds():
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            pass  # the listing's own fd
    return out


@contextmanager
def nothing_left() -> Iterator[list[str]]:
    """Asserts that every fd opened inside the block is closed at its end; the block appends
    the links of fds that must be gone even if their numbers were open before (sockets, which
    may reuse a number of the snapshot)."""
    gc.collect()
    before = fd_links()
    watched: list[str] = []
    yield watched
    after = fd_links()
    left = sorted((fd, link) for fd, link in after.items() if before.get(fd) != link or link in watched)
    assert left == [], left


def socket_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    return img


class Handler(vu.BuiltinHandler):
    pass


@pytest.mark.parametrize("state", ["connected", "negotiated", "rings", "backend-died", "backend-killed-mid-request"])
def test_frontend_close(sock_dir: Path, image: Path, state: str) -> None:
    sock = sock_dir / "blk.sock"
    with serve_blk(image, sock, num_queues=1) as proc:
        mem = vu.GuestMemory.allocate(1 << 20)
        with nothing_left() as watched:
            # reconnect= makes the front-end own the inflight buffer (a memfd) as well.
            fe = vu.Frontend.connect(sock, reconnect=5)
            watched.append(socket_of(fe.fileno()))
            if state != "connected":
                fe.negotiate(memory=mem, handler=Handler())
                assert fe.backend_channel_running
            if state in ("rings", "backend-died", "backend-killed-mid-request"):
                assert fe.setup_inflight(1, 16) is fe.inflight is not None
                vq = fe.setup_queue(0, 16)
            if state == "backend-died":
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                with pytest.raises(vu.ConnectionClosedError):
                    fe.get_features()
            if state == "backend-killed-mid-request":
                freeze(proc)
                vq.queue.add([(mem.alloc(16), 16)], [(mem.alloc(1), 1)])
                vq.queue.publish()
                vq.kick()
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            fe.close()
            assert fe.closed
            with pytest.raises(vu.ConnectionClosedError):
                fe.fileno()
            with pytest.raises(vu.ConnectionClosedError):
                fe.get_features()
            fe.close()  # idempotent
        del mem


def test_frontend_close_after_a_protocol_violation(sock_dir: Path) -> None:
    """The back-end answers GET_FEATURES with a malformed reply and keeps the socket open."""
    path = sock_dir / "bad.sock"
    listener = vu.Listener.bind(path)
    done = threading.Event()

    def run() -> None:
        with listener.accept(timeout=10) as conn:
            msg, fds = conn.recv(timeout=10)
            hazmat.close_fds(fds)
            conn.send(hazmat.encode_raw(F.GET_FEATURES, b"xx", flags=0x5))
            done.wait(10)

    t = threading.Thread(target=run)
    t.start()
    try:
        with nothing_left() as watched:
            fe = vu.Frontend.connect(path)
            watched.append(socket_of(fe.fileno()))
            with pytest.raises(vu.MalformedMessageError):
                fe.get_features()
            fe.close()
            done.set()
            t.join(10)  # the fake back-end's own socket closes too
    finally:
        done.set()
        t.join(10)
        listener.close()


def test_frontend_close_from_another_thread_wakes_a_blocked_request(sock_dir: Path) -> None:
    """A back-end that never answers: close() from another thread ends the wait at once with
    ConnectionClosedError, and the fds are gone when close() returns."""
    path = sock_dir / "silent.sock"
    listener = vu.Listener.bind(path)
    done = threading.Event()

    def run() -> None:
        with listener.accept(timeout=10) as conn:
            conn.recv(timeout=10)
            done.wait(10)

    t = threading.Thread(target=run)
    t.start()
    errors: list[BaseException] = []
    try:
        with nothing_left() as watched:
            fe = vu.Frontend.connect(path, timeout=30)
            watched.append(socket_of(fe.fileno()))

            def ask() -> None:
                try:
                    fe.get_features()
                except BaseException as e:  # noqa: BLE001 - checked below
                    errors.append(e)

            waiter = threading.Thread(target=ask)
            waiter.start()
            time.sleep(0.2)
            t0 = time.monotonic()
            fe.close()
            waiter.join(5)
            assert not waiter.is_alive() and time.monotonic() - t0 < 2
            done.set()
            t.join(10)  # the fake back-end's own socket closes too
        assert len(errors) == 1 and isinstance(errors[0], vu.ConnectionClosedError), errors
    finally:
        done.set()
        t.join(10)
        listener.close()


@pytest.mark.parametrize("backend_died", [False, True])
def test_block_client_close(sock_dir: Path, image: Path, backend_died: bool) -> None:
    sock = sock_dir / "blk.sock"
    with serve_blk(image, sock, num_queues=1) as proc:
        with nothing_left() as watched:
            disk = BlockClient.connect(sock, reconnect=None)
            watched.append(socket_of(disk.frontend.fileno()))
            disk.write(0, b"x" * 512)
            if backend_died:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                with pytest.raises(vu.ConnectionClosedError):
                    disk.read(0, 512)
            disk.close()
            with pytest.raises(vu.ConnectionClosedError):
                disk.memory  # noqa: B018 - the property raises
            disk.close()


def test_block_client_with_reconnect_close(sock_dir: Path, image: Path) -> None:
    """A reconnecting client also owns an inflight buffer (a memfd): gone at close too."""
    sock = sock_dir / "blk.sock"
    with serve_blk(image, sock, num_queues=1):
        with nothing_left() as watched:
            disk = BlockClient.connect(sock, reconnect=5)
            assert disk.frontend.inflight is not None
            watched.append(socket_of(disk.frontend.fileno()))
            disk.write(0, b"y" * 512)
            disk.close()


@pytest.mark.parametrize("backend_died", [False, True])
def test_net_client_close(sock_dir: Path, backend_died: bool) -> None:
    sock = sock_dir / "net.sock"
    args = [sys.executable, "-m", "vhostuser_rs", "serve-net", "--loopback", "--socket-path", str(sock)]
    with peer(args, sock) as proc:
        with nothing_left() as watched:
            nic = NetClient.connect(sock, timeout=5.0)
            watched.append(socket_of(nic.frontend.fileno()))
            if backend_died:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                time.sleep(0.1)
            nic.close()


def test_a_handler_may_close_its_own_session(sock_dir: Path) -> None:
    """close() called on the back-end request channel's own thread (a config-change callback
    giving up on the session) returns, and every fd is released by then — the channel's own end
    included, although its serving thread is still inside the handler (it used to close only
    once the handler had returned and the thread had gone round its loop: under load, after the
    test had looked)."""
    from scripted import scripted_backend

    with scripted_backend(sock_dir, "cb.sock", protocol_features=int(vu.ProtocolFeature.REPLY_ACK
                                                                    | vu.ProtocolFeature.BACKEND_REQ
                                                                    | vu.ProtocolFeature.CONFIG)) as fake:
        with nothing_left() as watched:
            fe = vu.Frontend.connect(fake.path)
            main = socket_of(fe.fileno())
            watched.append(main)
            closed = threading.Event()
            left_in_handler: list[dict[int, str]] = []

            def give_up(frontend: vu.Frontend) -> None:
                frontend.close()
                # Looked at before returning: nothing may wait for this thread to move on.
                left_in_handler.append(fd_links())
                closed.set()

            # Once answered, the scripted back-end's accepted connection is in the table too.
            fe.get_features()
            before_negotiate = set(fd_links().values())
            fe.negotiate(handler=vu.BuiltinHandler(on_config_change=give_up))
            assert fe.backend_channel_running and fake.has_channel.wait(10) and fake.channel is not None
            # The sockets negotiate opened: the front-end's end of the channel, and the
            # back-end's end as the scripted back-end received it.
            ours = set(fd_links().values()) - before_negotiate - {socket_of(fake.channel.fileno())}
            assert len(ours) == 1 and next(iter(ours)).startswith("socket:"), ours
            watched.extend(ours)
            fake.ask(vu.BackendRequest.CONFIG_CHANGE_MSG, need_reply=False)
            assert closed.wait(10) and fe.closed
            assert not fe.backend_channel_running
            # Both of the front-end's sockets were gone when close() returned in the handler.
            assert not (ours | {main}) & set(left_in_handler[0].values()), left_in_handler
            # The back-end reads end-of-file on the channel.
            with pytest.raises(vu.ConnectionClosedError):
                fake.channel.recv(vu.Channel.BACKEND, timeout=5)
            fake.channel.close()  # (the scripted back-end's own ends, opened in this block)
            # Its accepted connection closes when its thread sees the front-end gone.
            fake._thread.join(30)
            assert not fake._thread.is_alive()


def test_block_client_close_from_another_thread_ends_a_waiting_request(sock_dir: Path, image: Path) -> None:
    sock = sock_dir / "blk.sock"
    with serve_blk(image, sock, num_queues=1) as proc:
        with nothing_left() as watched:
            disk = BlockClient.connect(sock, timeout=30)
            watched.append(socket_of(disk.frontend.fileno()))
            freeze(proc)
            errors: list[BaseException] = []

            def read() -> None:
                try:
                    disk.read(0, SECTOR)
                except BaseException as e:  # noqa: BLE001 - checked below
                    errors.append(e)

            reader = threading.Thread(target=read)
            reader.start()
            time.sleep(0.3)
            t0 = time.monotonic()
            disk.close()
            reader.join(5)
            assert not reader.is_alive() and time.monotonic() - t0 < 2
            assert len(errors) == 1 and isinstance(errors[0], vu.ConnectionClosedError), errors
            errors.clear()
        proc.send_signal(signal.SIGCONT)


def test_a_failing_handler_leaves_nothing_alive_in_the_log(sock_dir: Path) -> None:
    """A handler that raises is logged with its traceback as text: a record holding the
    traceback itself would keep the failing frames' locals (here a guest memory and its memfd)
    open for as long as a logging handler keeps the record (pytest's does until teardown)."""
    from scripted import scripted_backend

    with scripted_backend(sock_dir, "cb.sock", protocol_features=int(vu.ProtocolFeature.REPLY_ACK
                                                                    | vu.ProtocolFeature.BACKEND_REQ
                                                                    | vu.ProtocolFeature.CONFIG)) as fake:
        links: list[str] = []

        def fails(frontend: vu.Frontend) -> None:
            mem = vu.GuestMemory.allocate(1 << 16)
            links.append(os.readlink(f"/proc/self/fd/{mem.fds()[0]}"))
            raise RuntimeError("handler bug")

        with vu.Frontend.connect(fake.path) as fe:
            fe.negotiate(handler=vu.BuiltinHandler(on_config_change=fails))
            assert fake.ask(vu.BackendRequest.CONFIG_CHANGE_MSG) != 0
        gc.collect()
        assert links and links[0] not in fd_links().values()
