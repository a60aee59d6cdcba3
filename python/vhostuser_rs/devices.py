"""Built-in devices whose data path runs in Rust and never takes the GIL."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypedDict

from . import _native

__all__ = ["BlockDevice", "LoopbackNet", "NetCounters", "TapNet", "serve_block_devices"]


class BlockDevice:
    """The built-in virtio-blk device over a raw image file or block device.

    Reads and writes go straight between the file and guest memory (no bounce copy); FLUSH,
    DISCARD, WRITE_ZEROES and GET_ID are supported; malformed requests get the IOERR/UNSUPP
    status instead of a crash.

    `io_engine`: ``"uring"`` submits each batch's transfers and flushes to io_uring with one
    system call and completes them as the kernel finishes them (an error at start without
    io_uring); ``"sync"`` is preadv/pwritev on the worker thread; ``"auto"`` (default) takes
    io_uring for I/O that waits for a device (`direct`, a block device) and preadv/pwritev for
    a buffered image file, whose page cache answers at once (falling back to preadv/pwritev for
    a ring whose io_uring cannot be set up).
    `direct`: open the image with O_DIRECT (for real disks: no host page cache); transfers whose
    guest buffers O_DIRECT refuses go through a buffered descriptor.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, num_queues: int = 1,
                 io_engine: str = "auto", direct: bool = False) -> None:
        if io_engine not in ("auto", "uring", "sync"):
            raise ValueError(f"io_engine must be 'auto', 'uring' or 'sync', not {io_engine!r}")
        self.path = os.fspath(path)
        self.readonly = readonly
        self.num_queues = num_queues
        self.io_engine = io_engine
        self.direct = direct

    def serve(self, socket_path: str | os.PathLike[str] | None = None, *, fd: int | None = None,
              max_connections: int | None = None, workers: int | None = None,
              cpus: Sequence[int] | None = None, poll: float | None = None) -> None:
        """Serve front-ends one at a time on `socket_path` (or the connected socket `fd`) until
        Ctrl-C, or until `max_connections` sessions have ended. `workers`: threads shared by the
        rings (ring i on thread i % workers; default one thread per ring); `cpus`: pin worker
        thread t to ``cpus[t % len(cpus)]``; `poll`: after work, keep checking the rings for this
        many seconds before sleeping on the kick eventfds (0: eventfd mode; None, the default:
        an adaptive window of up to 50 µs that grows while requests keep coming soon after a
        sleep and shrinks to nothing when the device goes idle)."""
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
            io_engine=self.io_engine,
            direct=self.direct,
        )


def serve_block_devices(
    exports: Sequence[tuple[BlockDevice, str | os.PathLike[str]]],
    *,
    workers: int = 2,
    cpus: Sequence[int] | None = None,
    poll: float | None = None,
) -> None:
    """Serve several :class:`BlockDevice` s from this process, each on its own socket (one
    front-end at a time per socket), until Ctrl-C/SIGTERM: an accept loop per device, and the
    rings of every device on `workers` shared worker threads (SPDK's model: the thread count
    stays `workers` however many devices there are), pinned to `cpus`. `poll` as for
    :meth:`BlockDevice.serve`. The devices must share ``io_engine`` and ``direct``."""
    if not exports:
        raise ValueError("give at least one (device, socket_path) pair")
    engines = {(d.io_engine, d.direct) for d, _ in exports}
    if len(engines) > 1:
        raise ValueError("the devices served together must share io_engine and direct")
    ((io_engine, direct),) = engines
    _native.serve_blk_exports(
        [(d.path, os.fspath(sock), d.readonly, d.num_queues) for d, sock in exports],
        workers=workers,
        cpus=None if cpus is None else list(cpus),
        poll=poll,
        io_engine=io_engine,
        direct=direct,
    )


class NetCounters(TypedDict):
    """Counters of a net device (summed over its queue pairs, or of one pair). ``tx_*`` is what
    the driver transmitted, ``rx_*`` what was delivered into its receive queues."""

    tx_frames: int
    tx_bytes: int
    tx_errors: int
    rx_frames: int
    rx_bytes: int
    rx_dropped: int


class _BuiltinNet:
    _native: _native.BuiltinNet

    def serve(self, socket_path: str | os.PathLike[str] | None = None, *, fd: int | None = None,
              max_connections: int | None = None, workers: int | None = None,
              cpus: Sequence[int] | None = None, poll: float | None = 0.0) -> None:
        """Serve front-ends one at a time on `socket_path` (or the connected socket `fd`) until
        Ctrl-C, or until `max_connections` sessions have ended. Both rings of a queue pair run on
        one worker thread (`workers` threads shared by the pairs, default one per pair), pinned
        to ``cpus[t % len(cpus)]``; `poll`: seconds of polling after work (0: eventfd mode; None: adaptive, up to 50 µs)."""
        self._native.serve(
            socket_path=None if socket_path is None else os.fspath(socket_path), fd=fd,
            max_connections=max_connections, workers=workers, cpus=None if cpus is None else list(cpus),
            poll=poll,
        )

    def counters(self, queue_pair: int | None = None) -> NetCounters:
        """Frames and bytes moved so far, summed over the pairs or for `queue_pair`."""
        c = self._native.counters(queue_pair)
        return NetCounters(tx_frames=c["tx_frames"], tx_bytes=c["tx_bytes"], tx_errors=c["tx_errors"],
                           rx_frames=c["rx_frames"], rx_bytes=c["rx_bytes"], rx_dropped=c["rx_dropped"])

    @property
    def queue_pairs(self) -> int:
        """Queue pairs (GET_QUEUE_NUM's answer)."""
        return self._native.queue_pairs

    @property
    def acked_features(self) -> int:
        """Virtio feature bits the current (or last) driver acknowledged."""
        return self._native.acked_features

    @property
    def mtu(self) -> int:
        """The MTU in force: the one offered, or the front-end's NET_SET_MTU."""
        return self._native.mtu


class LoopbackNet(_BuiltinNet):
    """A virtio-net device that sends every frame the driver transmits back on the receive queue
    of the same pair, Ethernet source and destination swapped; frames that find no receive
    buffer are dropped and counted (``rx_dropped``). Data path in Rust; the self-contained peer
    for net tests and benchmarks. Offers VERSION_1, MRG_RXBUF, MAC, STATUS, CTRL_VQ (RX mode,
    MAC table and address, VQ_PAIRS_SET, ANNOUNCE), MQ with several pairs, MTU when `mtu` is
    given, EVENT_IDX and INDIRECT_DESC; NET_SET_MTU is honoured."""

    def __init__(self, *, queue_pairs: int = 1, mac: str | None = None, mtu: int | None = None) -> None:
        self._native = _native.BuiltinNet.loopback(queue_pairs=queue_pairs, mac=mac, mtu=mtu)


class TapNet(_BuiltinNet):
    """A virtio-net port bridged to the Linux TAP device `name` (the user-space counterpart of
    vhost-net). Attaches to an existing TAP — created with ``multi_queue`` when `queue_pairs` > 1
    — or creates it (up, with `mtu`), in which case it disappears with this object. The
    virtio-net header passes through (IFF_VNET_HDR), so with `offloads` the checksum and TSO
    offloads are offered and done by the kernel. SEND_RARP sends a RARP frame out of the TAP.
    Needs CAP_NET_ADMIN to create a TAP."""

    def __init__(self, name: str, *, queue_pairs: int = 1, mac: str | None = None, mtu: int | None = None,
                 offloads: bool = True) -> None:
        self.name = name
        self._native = _native.BuiltinNet.tap(name, queue_pairs=queue_pairs, mac=mac, mtu=mtu, offloads=offloads)
