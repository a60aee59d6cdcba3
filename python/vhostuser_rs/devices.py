"""Built-in devices whose data path runs in Rust and never takes the GIL."""

from __future__ import annotations

import os
from collections.abc import Sequence

from . import _native

__all__ = ["BlockDevice"]


class BlockDevice:
    """The built-in virtio-blk device over a raw image file or block device.

    Reads and writes go straight between the file and guest memory (preadv/pwritev on the guest
    buffers); FLUSH, DISCARD, WRITE_ZEROES and GET_ID are supported; malformed requests get the
    IOERR/UNSUPP status instead of a crash.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, num_queues: int = 1) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        self.num_queues = num_queues

    def serve(self, socket_path: str | os.PathLike[str] | None = None, *, fd: int | None = None,
              max_connections: int | None = None, workers: int | None = None,
              cpus: Sequence[int] | None = None, poll: float = 0.0) -> None:
        """Serve front-ends one at a time on `socket_path` (or the connected socket `fd`) until
        Ctrl-C, or until `max_connections` sessions have ended. `workers`: threads shared by the
        rings (ring i on thread i % workers; default one thread per ring); `cpus`: pin worker
        thread t to ``cpus[t % len(cpus)]``; `poll`: after work, keep checking the rings for this
        many seconds before sleeping on the kick eventfds (0: eventfd mode)."""
        _native.serve_blk(
            self.path,
            socket_path=None if socket_path is None else os.fspath(socket_path),
            fd=fd,
            num_queues=self.num_queues,
            readonly=self.readonly,
            max_connections=max_connections,
            workers=workers,
            cpus=None if cpus is None else list(cpus),
            poll=poll,
        )
