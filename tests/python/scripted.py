"""A scripted back-end (built on hazmat) for the requests no real back-end sends: it serves the
main channel on a thread of its own — answering the negotiation, recording every message and
acking NEED_REPLY — and hands the test the back-end request channel, so the test sends
back-end requests exactly as it likes and reads the front-end's answers."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import vhostuser_rs as vu
from vhostuser_rs import Channel
from vhostuser_rs import FrontendRequest as F
from vhostuser_rs import hazmat
from vhostuser_rs import messages as m

FEATURES = vu.VirtioFeature.PROTOCOL_FEATURES | vu.VirtioFeature.VERSION_1


class ScriptedBackend:
    """One front-end session; `protocol_features` offered; `shmem_sizes` answered to
    GET_SHMEM_CONFIG; `shared` maps UUIDs to fds answered to GET_SHARED_OBJECT."""

    def __init__(
        self,
        listener: vu.Listener,
        *,
        features: int = int(FEATURES),
        protocol_features: int,
        num_queues: int = 2,
        shmem_sizes: dict[int, int] | None = None,
        shared: dict[bytes, int] | None = None,
    ) -> None:
        self.listener = listener
        self.features = features
        self.protocol_features = protocol_features
        self.num_queues = num_queues
        self.shmem_sizes = shmem_sizes or {}
        self.shared = shared or {}
        #: (request, payload, number of fds) of every main-channel message, in order.
        self.seen: list[tuple[F, object, int]] = []
        self.channel: vu.Connection | None = None
        self.has_channel = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with self.listener.accept(timeout=10) as conn:
                self._serve(conn)
        except vu.ConnectionClosedError:
            pass
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.has_channel.set()

    def _serve(self, conn: vu.Connection) -> None:
        while True:
            msg, fds = conn.recv(timeout=30)
            req = msg.request
            assert isinstance(req, F), msg
            self.seen.append((req, msg.payload, len(fds)))
            reply: m.Payload = None
            reply_fds: list[int] = []
            if req is F.SET_BACKEND_REQ_FD:
                self.channel = vu.Connection.from_fd(fds[0])
                self.has_channel.set()
            hazmat.close_fds(fds)
            if req is F.GET_FEATURES:
                reply = self.features
            elif req is F.GET_PROTOCOL_FEATURES:
                reply = self.protocol_features
            elif req is F.GET_QUEUE_NUM:
                reply = self.num_queues
            elif req is F.GET_MAX_MEM_SLOTS:
                reply = 8
            elif req is F.GET_SHMEM_CONFIG:
                sizes = [0] * 256
                for shmid, size in self.shmem_sizes.items():
                    sizes[shmid] = size
                reply = m.ShmemConfig(tuple(sizes))
            elif req is F.GET_CONFIG:
                assert isinstance(msg.payload, m.DeviceConfig)
                reply = m.DeviceConfig(msg.payload.offset, bytes(len(msg.payload.data)))
            elif req in (F.GET_VRING_BASE, F.GET_VRING_BASE_SKIP_DRAIN):
                assert isinstance(msg.payload, m.VringState)
                reply = m.VringState(msg.payload.index, 0)
            elif req is F.GET_SHARED_OBJECT:
                assert isinstance(msg.payload, m.SharedObject)
                fd = self.shared.get(msg.payload.uuid)
                reply = 0 if fd is not None else 1
                reply_fds = [] if fd is None else [fd]
            elif msg.flags & hazmat.FLAG_NEED_REPLY:
                reply = 0
            else:
                continue
            hazmat.send(conn, hazmat.reply(req, reply), reply_fds)

    def ask(self, request: vu.BackendRequest, payload: m.Payload = None, fds: list[int] | None = None,
            *, need_reply: bool = True) -> tuple[int, list[int]]:
        """Send a back-end request; with `need_reply` return the front-end's (status, fds)."""
        assert self.has_channel.wait(10) and self.channel is not None, "no back-end request channel"
        hazmat.send(self.channel, hazmat.request(request, payload, need_reply=need_reply), fds or [])
        if not need_reply and request is not vu.BackendRequest.SHARED_OBJECT_LOOKUP:
            return 0, []
        reply, got = self.channel.recv(Channel.BACKEND, timeout=10)
        assert reply.request is request and isinstance(reply.payload, int), reply
        return reply.payload, got

    def requests(self, request: F) -> list[tuple[object, int]]:
        """Payload and fd count of each `request` seen so far."""
        return [(p, n) for r, p, n in list(self.seen) if r is request]

    def finish(self) -> None:
        self._thread.join(10)
        if self.channel is not None:
            self.channel.close()
        if self.error is not None:
            raise self.error


@contextmanager
def scripted_backend(sock_dir: Path, name: str = "fake.sock", **kw: object) -> Iterator[ScriptedBackend]:
    path = sock_dir / name
    listener = vu.Listener.bind(path)
    fake = ScriptedBackend(listener, **kw)  # type: ignore[arg-type]
    fake.path = path  # type: ignore[attr-defined]
    try:
        yield fake
    finally:
        listener.close()
        fake.finish()


def memfd(content: bytes, size: int) -> int:
    fd = os.memfd_create("scripted", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    os.pwrite(fd, content, 0)
    return fd
