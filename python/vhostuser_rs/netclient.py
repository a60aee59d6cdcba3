"""A virtio-net driver over the vhost-user front-end: put frames into a vhost-user net back-end
(DPDK's vhost PMD, OVS-DPDK, VPP, ``vhostuser-rs serve-net``...) and read what comes out,
from Python, without a VM.

Example::

    from vhostuser_rs.netclient import NetClient

    with NetClient.connect("/tmp/vhost-net.sock") as nic:
        nic.send([frame1, frame2])              # one call per burst; returns how many were queued
        for header, data in nic.recv(timeout=1.0):
            print(header.num_buffers, data.hex())

The rings, the RX buffers (posted at start, reposted as used, merged with MRG_RXBUF) and the TX
slots are driven in Rust (``_native.NetClientCore``, ``src/frontend/netio.rs``); each ``send`` or
``recv`` crosses into Rust once per burst. Received frames are copies (``bytes``): they stay
valid. The constants come from ``src/virtio/net.rs``.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypedDict, Union

from . import _native
from ._native import GuestMemory, NetClientCore, NetHeader
from .enums import DeviceStatus, ProtocolFeature, VirtioFeature
from .exceptions import (
    ConnectionClosedError,
    NegotiationError,
    RequestRejectedError,
    VhostUserError,
    VhostUserTimeoutError,
)
from .frontend import BackendRequestHandler, Frontend, Steps, Virtqueue

__all__ = ["ControlCommandError", "NetBenchResult", "NetClient", "NetClientCounters", "NetConfig"]

log = logging.getLogger(__name__)

_N: dict[str, int] = dict(_native.VIRTIO_NET)
CONFIG_SIZE = _N["CONFIG_SIZE"]
_OK = _N["VIRTIO_NET_OK"]
_S_LINK_UP = _N["VIRTIO_NET_S_LINK_UP"]
_S_ANNOUNCE = _N["VIRTIO_NET_S_ANNOUNCE"]


def _f(name: str) -> int:
    return 1 << _N[f"VIRTIO_NET_F_{name}"]


_MAC, _MTU, _STATUS, _MRG = _f("MAC"), _f("MTU"), _f("STATUS"), _f("MRG_RXBUF")
_CTRL_VQ, _MQ, _CTRL_RX, _CTRL_MAC_ADDR = _f("CTRL_VQ"), _f("MQ"), _f("CTRL_RX"), _f("CTRL_MAC_ADDR")
_GUEST_ANNOUNCE = _f("GUEST_ANNOUNCE")
_DRIVER_OK = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK
#: A reconnect waits for the back-end in slices this long, so that close() ends it promptly.
_RECONNECT_SLICE = 0.1

#: What :meth:`NetClient.connect` asks for by default (acknowledged when offered). Transport bits
#: are further limited by :data:`vhostuser_rs.frontend.DRIVER_TRANSPORT_FEATURES`.
DEFAULT_FEATURES = (
    _MRG
    | _MAC
    | _MTU
    | _STATUS
    | _MQ
    | _CTRL_VQ
    | _CTRL_RX
    | _CTRL_MAC_ADDR
    | _GUEST_ANNOUNCE
    | int(VirtioFeature.VERSION_1 | VirtioFeature.EVENT_IDX | VirtioFeature.INDIRECT_DESC)
)

#: A frame for :meth:`NetClient.send`: bytes-like, or a ``(NetHeader, frame)`` pair for offloads.
TxFrame = Union[bytes, bytearray, memoryview, tuple[NetHeader, Union[bytes, bytearray, memoryview]]]


class NetClientCounters(TypedDict):
    """What :meth:`NetClient.counters` returns (frames and bytes without headers)."""

    rx_frames: int
    rx_bytes: int
    rx_dropped: int
    tx_frames: int
    tx_bytes: int


class NetBenchResult(TypedDict):
    """What :meth:`NetClient.run_bench` returns (bytes without headers, times in seconds)."""

    mode: str
    tx_frames: int
    tx_bytes: int
    rx_frames: int
    rx_bytes: int
    rx_dropped: int
    tx_full: int
    in_flight: int
    waits: int
    elapsed: float
    cpu: float


class ControlCommandError(VhostUserError):
    """The device answered a control-queue command with VIRTIO_NET_ERR (or not at all)."""


@dataclass(frozen=True)
class NetConfig:
    """``struct virtio_net_config`` up to ``mtu`` (fields valid only with their feature bits)."""

    mac: bytes
    status: int
    max_virtqueue_pairs: int
    mtu: int

    @classmethod
    def parse(cls, data: bytes) -> NetConfig:
        """Decode the little-endian config bytes (at least 12)."""
        if len(data) < CONFIG_SIZE:
            raise ValueError(f"virtio-net config needs {CONFIG_SIZE} bytes, got {len(data)}")
        return cls(
            bytes(data[0:6]),
            int.from_bytes(data[6:8], "little"),
            int.from_bytes(data[8:10], "little"),
            int.from_bytes(data[10:12], "little"),
        )

    @property
    def link_up(self) -> bool:
        """VIRTIO_NET_S_LINK_UP."""
        return bool(self.status & _S_LINK_UP)


def _mac_bytes(mac: str | bytes) -> bytes:
    b = bytes.fromhex(mac.replace(":", "").replace("-", "")) if isinstance(mac, str) else bytes(mac)
    if len(b) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {mac!r}")
    return b


class _ConfigWatch(BackendRequestHandler):
    """Back-end request channel: a config change marks the cached config stale (it is re-read
    on the main channel by the next :attr:`NetClient.config`, never from this thread)."""

    def __init__(self) -> None:
        self.changed = threading.Event()

    def config_change_msg(self) -> int | None:
        self.changed.set()
        return 0


class NetClient:
    """A virtio-net driver on a vhost-user front-end. Thread-safety: ``send`` and ``recv`` may
    run on different threads; control commands from one thread at a time."""

    def __init__(
        self,
        frontend: Frontend,
        *,
        queue_pairs: int = 1,
        mac: str | bytes | None = None,
        mtu: int | None = None,
        features: int | None = None,
        queue_size: int = 256,
        timeout: float | None = 5.0,
        control_queue: bool = False,
        packed: bool = False,
        reconnect: float | None = None,
    ) -> None:
        steps = self._setup(
            frontend, queue_pairs=queue_pairs, mac=mac, mtu=mtu, features=features, queue_size=queue_size,
            timeout=timeout, control_queue=control_queue, packed=packed, reconnect=reconnect,
        )
        frontend._run(steps)

    def _setup(
        self,
        frontend: Frontend,
        *,
        queue_pairs: int = 1,
        mac: str | bytes | None = None,
        mtu: int | None = None,
        features: int | None = None,
        queue_size: int = 256,
        timeout: float | None = 5.0,
        control_queue: bool = False,
        packed: bool = False,
        reconnect: float | None = None,
    ) -> Steps[None]:
        """The set-up as steps (run blocking by the constructor, by the loop in
        :meth:`AsyncNetClient.connect <vhostuser_rs.aio.AsyncNetClient.connect>`). The
        control-queue commands it may send (``control_queue=True`` with several pairs or a
        MAC to set) wait on their ring, bounded by `timeout`."""
        if queue_pairs < 1:
            raise ValueError("queue_pairs must be at least 1")
        if reconnect is None:
            # A Frontend made with reconnect= may reconnect by itself (in a control command's
            # wait): the driver then follows it, with the same seconds.
            reconnect = frontend.reconnect
        if reconnect is not None and (frontend.path is None or reconnect < 0):
            raise ValueError("reconnect= needs the socket path (NetClient.connect) and seconds >= 0")
        self._frontend: Frontend | None = frontend
        self.timeout = timeout
        #: Seconds a hang-up of the back-end is given to come back (None: no reconnecting).
        self.reconnect = reconnect
        self._reconnect_lock = threading.Lock()
        #: Sessions this client has run on (1 + reconnects).
        self.sessions = 1
        # The Frontend's session count when this client last (re)started the data path.
        self._session = frontend.sessions
        self._closed = False
        self._core: NetClientCore | None = None
        self._status_sent = False
        self._rx_modes: dict[str, bool] = {}
        self._mac_set = False
        offered = int((yield from frontend.get_features.steps()))
        wanted = DEFAULT_FEATURES if features is None else int(features) | int(VirtioFeature.VERSION_1)
        self.control_queue = control_queue
        if not control_queue:
            # Without the ring, only what the front-end can do itself is acknowledged: MQ
            # (VQ_PAIRS_SET becomes SET_VRING_ENABLE, as QEMU does), and CTRL_VQ that MQ needs.
            wanted &= ~(_CTRL_RX | _CTRL_MAC_ADDR | _f("CTRL_VLAN") | _f("CTRL_GUEST_OFFLOADS") | _f("GUEST_ANNOUNCE"))
        if not offered & int(VirtioFeature.VERSION_1):
            raise NegotiationError("the device does not offer VERSION_1")
        if queue_pairs > 1 and not (offered & _MQ and offered & _CTRL_VQ):
            raise NegotiationError(f"{queue_pairs} queue pairs need MQ and CTRL_VQ, which the device does not offer")
        if queue_pairs > 1:
            wanted |= _MQ | _CTRL_VQ
        # Size the memory before the device's MTU is known: for the largest MTU (an upper bound
        # is cheap, the memfd's pages are only allocated when touched).
        room = NetClientCore.buffer_memory(offered & wanted, queue_size, mtu=0xFFFF) + 64 * queue_size + (64 << 10)
        size = queue_pairs * room + (1 << 20)
        self._memory: GuestMemory | None = GuestMemory.allocate(-(-size // (1 << 20)) * (1 << 20))
        self._watch = _ConfigWatch()
        result = yield from frontend.negotiate.steps(
            features=wanted, memory=self.memory, handler=self._watch, packed=packed
        )
        self.features = int(result.features)
        #: Whether the rings are packed (VIRTIO_F_RING_PACKED negotiated).
        self.packed = bool(self.features & int(VirtioFeature.RING_PACKED))
        self._config: NetConfig | None = None
        if ProtocolFeature.CONFIG in frontend.protocol_features:
            try:
                self._config = NetConfig.parse((yield from frontend.get_config.steps(0, CONFIG_SIZE)))
            except RequestRejectedError:
                log.info("the back-end does not answer GET_CONFIG: no MAC, status or MTU from it")
        max_pairs = 1
        if self.features & _MQ:
            max_pairs = self._config.max_virtqueue_pairs if self._config else result.num_queues
        if queue_pairs > max_pairs:
            raise NegotiationError(f"the device has {max_pairs} queue pairs, {queue_pairs} requested")
        device_mtu = self._config.mtu if self._config and self.features & _MTU else None
        if mtu is not None and device_mtu is not None and mtu > device_mtu:
            raise NegotiationError(f"the device's MTU is {device_mtu}, {mtu} requested")
        self.mtu: int = mtu if mtu is not None else (device_mtu or 1500)
        # The MTU last sent with NET_SET_MTU (sent again after a reconnect).
        self._mtu_sent: int | None = None
        if mtu is not None and ProtocolFeature.MTU in frontend.protocol_features:
            yield from frontend.net_set_mtu.steps(mtu)
            self._mtu_sent = mtu
        self.queue_pairs = queue_pairs
        self._active_pairs = queue_pairs
        rings: list[tuple[Virtqueue, Virtqueue]] = []
        for p in range(queue_pairs):
            rx = yield from frontend.setup_queue.steps(2 * p, queue_size, self.memory)
            tx = yield from frontend.setup_queue.steps(2 * p + 1, queue_size, self.memory)
            # The native data path holds these eventfds, and fileno() hands the RX call one
            # out: a reconnect gives the new back-end the same ones.
            rx.keep_fds = tx.keep_fds = True
            rings.append((rx, tx))
        self._ctrl: Virtqueue | None = None
        if self.features & _CTRL_VQ and control_queue:
            # The control queue is the last ring of the device (after all its pairs).
            self._ctrl = yield from frontend.setup_queue.steps(2 * max_pairs, 64, self.memory)
            self._ctrl.keep_fds = True
            self._ctrl_buf = self.memory.alloc(64, 64)
        self._core = NetClientCore(
            self.memory,
            self.features,
            [(rx.queue, rx.kick_fd, rx.call_fd, tx.queue, tx.kick_fd) for rx, tx in rings],
            mtu=self.mtu,
            conn_fd=frontend.fileno(),
        )
        try:
            if ProtocolFeature.STATUS in frontend.protocol_features:
                # DPDK's vhost starts the device only after DRIVER_OK (QEMU sends it at start too).
                yield from frontend.set_status.steps(_DRIVER_OK)
                self._status_sent = True
            if self.features & _MQ and queue_pairs > 1 and control_queue:
                self.set_queue_pairs(queue_pairs)  # a control-queue command (waits on the ring)
            if self.features & _MAC and self._config is not None:
                self.mac = self._config.mac
            else:
                self.mac = bytes([0x02]) + secrets.token_bytes(5)  # locally administered, unicast
            if mac is not None:
                wanted_mac = _mac_bytes(mac)
                if wanted_mac != self.mac and self.features & _CTRL_MAC_ADDR:
                    self.set_mac(wanted_mac)
                self.mac = wanted_mac
        except BaseException:
            self._core.close()
            raise

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        queue_pairs: int = 1,
        mac: str | bytes | None = None,
        mtu: int | None = None,
        features: int | None = None,
        queue_size: int = 256,
        timeout: float | None = 5.0,
        control_queue: bool = False,
        packed: bool = False,
        reconnect: float | None = None,
    ) -> NetClient:
        """Connect to a vhost-user net back-end, negotiate (MRG_RXBUF, MAC, MTU, STATUS, MQ,
        CTRL_VQ, CTRL_RX, CTRL_MAC_ADDR, EVENT_IDX, INDIRECT_DESC, VERSION_1 when offered, or
        `features`), set up `queue_pairs` pairs of rings (and the control queue) and post the
        receive buffers. `mtu` sizes the buffers (default: the device's MTU, else 1500) and is
        sent with NET_SET_MTU when the back-end has the MTU protocol feature.

        The control queue: vhost-user net back-ends written for QEMU (DPDK's vhost PMD, OVS,
        VPP) never see it — QEMU handles it and turns VQ_PAIRS_SET into SET_VRING_ENABLE — and
        drop the session if it is set up. So by default it is not: :meth:`set_queue_pairs`
        enables and disables rings, and only the bits this makes true are acknowledged (MQ,
        CTRL_VQ; not CTRL_RX, CTRL_MAC_ADDR). ``control_queue=True`` gives the ring (the last
        one) to a back-end that serves it, such as ``vhostuser-rs serve-net``, and the
        commands go through it.

        `packed`: every ring (RX, TX, control) is a packed ring (VIRTIO_F_RING_PACKED); a
        back-end that does not offer it raises NegotiationError (no silent fall-back).

        `reconnect` (seconds; None, the default: a hang-up raises ConnectionClosedError): a
        back-end that hangs up (crash, restart) is replaced by a new session on the same path,
        as QEMU's ``-chardev socket,reconnect=N`` does for vhost-user-net (spec: a new
        connection starts from scratch, protocol.md §6.16). The next :meth:`send` or
        :meth:`recv` that meets the hang-up connects again (retrying up to `reconnect`
        seconds, whatever its own `timeout`; VhostUserTimeoutError if no back-end answered:
        the next call tries again), negotiates the same features (NegotiationError, before any
        ring starts, if the new back-end no longer offers one that was acknowledged), shares
        the same guest memory, hands every ring over (SET_VRING_BASE: split, the used index
        the old back-end last published; packed, :meth:`DriverQueue.hand_over
        <vhostuser_rs.DriverQueue.hand_over>`) with the same kick and call eventfds, and sends
        SET_STATUS (DRIVER_OK), NET_SET_MTU, the queue-pair enables, the MAC and the RX modes
        as set up (NegotiationError if the new device's MTU is below the one in use).
        The same object keeps working: :meth:`fileno` stays the same fd, counters go on.

        What a reconnect means for frames: RX, every buffer not used by the old back-end is
        offered to the new one (the avail ring is read again from the used index), a frame the
        old back-end published as used is still received, and a frame it was writing when it
        died is lost (as on a NIC that resets). TX, every frame the old back-end had not
        marked used is read again by the new one: it goes out once if the old one never took
        it, twice if the old one had put it on the wire but not completed it yet: at least
        once (QEMU too restores a crashed back-end's rings from the used index, and DPDK's
        vhost, starting a ring whose used index differs from its own, warns that packets may
        be resent for TX). Frames sent while no back-end is there wait in the ring for the
        next one. (:meth:`run_bench` does not reconnect: it runs its
        `seconds` whatever the back-end does.) A :class:`Frontend` made with ``reconnect=``
        and given to the constructor lends the client its seconds."""
        fe = Frontend.connect(path, timeout=timeout)
        try:
            return cls(
                fe, queue_pairs=queue_pairs, mac=mac, mtu=mtu, features=features, queue_size=queue_size,
                timeout=timeout, control_queue=control_queue, packed=packed, reconnect=reconnect,
            )
        except BaseException:
            fe.close()
            raise

    def __enter__(self) -> NetClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the session and every fd it holds (the socket and the memory's memfd too, as
        soon as nothing else refers to them). Idempotent. A reconnect under way on another
        thread ends (ConnectionClosedError) within a fraction of a second."""
        if self._closed:
            return
        self._closed = True
        if self._core is not None:
            self._core.close()
        if self._frontend is not None:
            self._frontend.close()
        # The Frontend's core owns the socket and the rings own the memory: let them go now.
        self._frontend = None
        self._memory = None
        self._ctrl = None

    @property
    def frontend(self) -> Frontend:
        """The vhost-user session (for requests of your own); ConnectionClosedError once closed."""
        if self._frontend is None:
            raise ConnectionClosedError("the NetClient is closed")
        return self._frontend

    @property
    def memory(self) -> GuestMemory:
        """The guest memory shared with the back-end (rings, buffers)."""
        if self._memory is None:
            raise ConnectionClosedError("the NetClient is closed")
        return self._memory

    @property
    def core(self) -> NetClientCore:
        """The native data path."""
        if self._core is None:
            raise NegotiationError("the client is not set up")
        return self._core

    # -- data path -------------------------------------------------------------------------------
    def send(self, frames: Iterable[TxFrame], *, queue_pair: int = 0) -> int:
        """Queue a burst of frames (Ethernet header onwards) for transmission; returns how many
        were queued (fewer when the TX ring is full: send the rest later). ``ValueError`` if a
        frame is shorter than 14 bytes or longer than the MTU allows (nothing is queued).
        ConnectionClosedError when the ring is full and the back-end has hung up; with
        ``reconnect=`` the client reconnects instead and queues the burst on the new
        session."""
        if self.reconnect is None:
            return self.core.send(queue_pair, frames)
        burst = frames if isinstance(frames, (list, tuple)) else list(frames)
        session = self._follow()
        try:
            return self.core.send(queue_pair, burst)
        except ConnectionClosedError:
            self._recover(session)
        return self.core.send(queue_pair, burst)

    def recv(
        self, *, max_frames: int = 64, timeout: float | None = None, queue_pair: int = 0
    ) -> list[tuple[NetHeader, bytes]]:
        """Up to `max_frames` received frames with their headers (copies). Waits for the first
        up to `timeout` seconds (``None``: forever, ``0``: not at all) with the GIL released;
        returns an empty list when nothing came. A wait ends with ConnectionClosedError when
        the back-end closes the session; with ``reconnect=`` the client reconnects instead
        (:meth:`connect`; the reconnect takes up to `reconnect` seconds whatever `timeout`)
        and goes on waiting on the new session for what is left of `timeout`. With
        ``reconnect=`` a call that gets nothing also looks for a hang-up (one ``poll`` of the
        main channel), so that ``recv(timeout=0)`` after an event loop woke on
        :meth:`fileno` reconnects too."""
        if self.reconnect is None:
            return self.core.recv(queue_pair, max_frames, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        left = timeout
        while True:
            session = self._follow()
            try:
                frames = self.core.recv(queue_pair, max_frames, left)
                # Nothing came: look for a hang-up (the native wait sees one only while it
                # waits, not with timeout=0). Never when frames came: no cost on a busy ring.
                if frames or not self.frontend.peer_closed:
                    return frames
            except ConnectionClosedError:
                pass
            self._recover(session)
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())

    # -- reconnecting ----------------------------------------------------------------------------
    def _follow(self) -> int:
        """The session the data path is on, after catching up with a reconnect the Frontend
        made by itself (one attribute read when it did not)."""
        fe = self._frontend
        if fe is not None and fe.sessions != self._session:
            self._recover(self._session)
        return self._session

    def _recover(self, seen: int) -> None:
        """Replace a back-end that hung up (``reconnect=``): once per hang-up whatever the
        number of threads that met it (`seen`: the session the caller was using)."""
        with self._reconnect_lock:
            if self._closed:
                raise ConnectionClosedError("the NetClient is closed")
            fe = self.frontend
            if self._session != seen:
                return  # another thread reconnected meanwhile
            if not fe.peer_closed:
                if fe.sessions != self._session:
                    # The Frontend reconnected by itself (made with reconnect=, in a control
                    # command's wait): the driver's part is left to do.
                    self._resume_driver(fe)
                    self._restarted(fe)
                return
            limit = self.reconnect
            assert limit is not None
            deadline = time.monotonic() + limit
            last: BaseException | None = None
            while True:
                if self._closed:
                    raise ConnectionClosedError("the NetClient was closed while reconnecting")
                left = deadline - time.monotonic()
                if left <= 0 and last is not None:
                    raise VhostUserTimeoutError(
                        f"no back-end came back at {fe.path} within reconnect={limit} s: {last}"
                    ) from last
                try:
                    # In short slices: close() from another thread ends the wait between them.
                    fe.reconnect_now(max(0.0, min(left, _RECONNECT_SLICE)))
                    self._resume_driver(fe)
                    break
                except (VhostUserTimeoutError, ConnectionClosedError) as e:
                    # Nobody there yet, or the new back-end went away during set-up.
                    if self._closed:
                        raise ConnectionClosedError("the NetClient was closed while reconnecting") from None
                    last = e
                    log.debug("reconnect attempt: %r", e)
                    if left <= 0:
                        raise VhostUserTimeoutError(
                            f"no back-end came back at {fe.path} within reconnect={limit} s: {e}"
                        ) from e
                except Exception:
                    if self._closed:  # whatever close() cut short (a ring's fds, a request)
                        raise ConnectionClosedError("the NetClient was closed while reconnecting") from None
                    raise
            self._restarted(fe)

    def _restarted(self, fe: Frontend) -> None:
        self.sessions += 1
        # Published last: a thread that reads the new session also finds the new connection.
        self._session = fe.sessions
        log.info("NetClient reconnected to %s (session %d)", fe.path, self.sessions)

    def _resume_driver(self, fe: Frontend) -> None:
        """What the driver does again on a new session after :meth:`Frontend.reconnect_now`
        negotiated and handed the rings over: DRIVER_OK, queue pairs, MAC, RX modes, config."""
        self.core.set_connection(fe.fileno())
        if self._status_sent and ProtocolFeature.STATUS in fe.protocol_features:
            fe.set_status(_DRIVER_OK)
        if self._config is not None and ProtocolFeature.CONFIG in fe.protocol_features:
            self._config = NetConfig.parse(fe.get_config(0, CONFIG_SIZE))
            if self.features & _MTU and self._config.mtu < self.mtu:
                # The buffers and what send() accepts were sized for the MTU of connect.
                raise NegotiationError(f"the new back-end's MTU is {self._config.mtu}, the driver uses {self.mtu}")
        if self._mtu_sent is not None and ProtocolFeature.MTU in fe.protocol_features:
            fe.net_set_mtu(self._mtu_sent)
        if self.features & _MQ and self.queue_pairs > 1:
            # The new device starts with one pair (control queue) or every ring enabled (the
            # hand-over): what set_queue_pairs chose is chosen again.
            if self._ctrl is not None or self._active_pairs < self.queue_pairs:
                self.set_queue_pairs(self._active_pairs)
        if self._mac_set:
            self.set_mac(self.mac)
        for cmd, on in self._rx_modes.items():
            self._rx_mode(cmd, on)

    def fileno(self, queue_pair: int = 0) -> int:
        """The RX call eventfd of `queue_pair`: readable when frames may have arrived (for
        ``selectors``/``asyncio``; :meth:`recv` clears it). The same fd for the client's
        whole life: a reconnect hands it to the new back-end (and signals it once, so that a
        waiter looks at the ring again). The fd says nothing about a hang-up: a loop that
        must notice one while no frame comes also watches ``frontend.fileno()`` (the main
        channel; a new fd after each reconnect) or calls :meth:`recv` now and then, as
        :class:`~vhostuser_rs.aio.AsyncNetClient` does."""
        return self.core.fileno(queue_pair)

    def counters(self, queue_pair: int | None = None) -> NetClientCounters:
        """rx_frames, rx_bytes, rx_dropped (malformed deliveries), tx_frames, tx_bytes of one
        pair or summed over all."""
        return self.core.counters(queue_pair)

    def run_bench(
        self,
        mode: str = "txonly",
        *,
        pktlen: int = 64,
        burst: int = 32,
        seconds: float = 10.0,
        poll: float = 0.0,
        queue_pair: int = 0,
    ) -> NetBenchResult:
        """Run a timed burst loop on `queue_pair` in Rust (one call, the GIL released):
        ``"txonly"`` keeps sending `burst`-frame bursts of `pktlen`-byte frames, ``"rxonly"``
        receives and reposts, ``"loopback"`` does both with at most one RX ring of frames out
        (against a device that sends every frame back). `poll` seconds of hybrid polling before
        sleeping on the RX notification. Returns tx/rx frames and bytes, ``rx_dropped``,
        ``tx_full`` (sends the ring was too full for), ``in_flight`` at the end (loopback: frames
        that did not come back), ``elapsed`` and ``cpu`` (seconds of this thread). ``send`` and
        ``recv`` on the pair raise RuntimeError while it runs."""
        return self.core.run_bench(
            mode, pktlen=pktlen, burst=burst, seconds=seconds, poll=poll, queue_pair=queue_pair
        )

    @property
    def max_frame_len(self) -> int:
        """Largest frame :meth:`send` accepts."""
        return self.core.max_frame_len

    # -- config and control ----------------------------------------------------------------------
    @property
    def config(self) -> NetConfig | None:
        """The device's config space (re-read after the back-end signalled a change, see
        :meth:`handle_config_change`), or None when the back-end does not serve GET_CONFIG."""
        self.handle_config_change()
        return self._config

    def handle_config_change(self) -> bool:
        """If the back-end signalled a config change (CONFIG_CHANGE_MSG): re-read the config
        and, when it asks for an announcement (status ANNOUNCE, GUEST_ANNOUNCE negotiated),
        send a gratuitous RARP for our MAC on pair 0 and ANNOUNCE_ACK on the control queue.
        Returns whether there was a change. (The back-end request channel's thread only marks
        the change: requests on the main channel from it could deadlock.)"""
        if not self._watch.changed.is_set() or self._config is None:
            return False
        self._watch.changed.clear()
        self._config = NetConfig.parse(self.frontend.get_config(0, CONFIG_SIZE))
        if self._config.status & _S_ANNOUNCE and self.features & _GUEST_ANNOUNCE and self._ctrl is not None:
            self.send([NetClientCore.rarp_frame(self.mac)])
            self.command(_N["VIRTIO_NET_CTRL_ANNOUNCE"], _N["VIRTIO_NET_CTRL_ANNOUNCE_ACK"])
        return True

    @property
    def link_up(self) -> bool:
        """Link status (always up without the STATUS feature)."""
        cfg = self.config
        return not (self.features & _STATUS) or cfg is None or cfg.link_up

    def command(self, cls: int, cmd: int, data: bytes = b"") -> None:
        """Send one control-queue command and wait for its ack; raises ControlCommandError on
        VIRTIO_NET_ERR or no answer, NegotiationError without CTRL_VQ."""
        vq = self._ctrl
        if vq is None:
            raise NegotiationError("no control queue (CTRL_VQ not negotiated, or control_queue=False)")
        if len(data) > 60:
            raise ValueError("control command data is limited to 60 bytes here")
        out, ack = self._ctrl_buf, self._ctrl_buf + 63
        self.memory.write(out, bytes([cls, cmd]) + bytes(data))
        self.memory.write(ack, b"\xff")
        head = vq.queue.add([(out, 2 + len(data))], [(ack, 1)])
        vq.queue.publish()
        vq.kick_if_needed()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            done = {h: n for h, n in vq.queue.reap()}
            if head in done:
                status = self.memory.read(ack, 1)[0] if done[head] else None
                if status != _OK:
                    raise ControlCommandError(f"control command class {cls} command {cmd}: answer {status}")
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise VhostUserTimeoutError(f"control command class {cls} command {cmd} got no answer")
            if not vq.wait(0.05 if left is None else min(left, 0.05)) and self.frontend.peer_closed:
                # The chain stays in the ring: a reconnect hands it to the next back-end.
                raise ConnectionClosedError(
                    f"the back-end hung up with control command class {cls} command {cmd} in flight"
                )

    def set_queue_pairs(self, n: int) -> None:
        """VQ_PAIRS_SET: use `n` of the pairs set up (needs MQ): on the control queue, or
        without it SET_VRING_ENABLE of each pair's rings, as QEMU does."""
        if not self.features & _MQ:
            raise NegotiationError("MQ was not negotiated")
        if not 1 <= n <= self.queue_pairs:
            raise ValueError(f"{n} queue pairs: 1..{self.queue_pairs} were set up")
        if self._ctrl is not None:
            self.command(_N["VIRTIO_NET_CTRL_MQ"], _N["VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET"], n.to_bytes(2, "little"))
        else:
            for p in range(self.queue_pairs):
                for ring in (2 * p, 2 * p + 1):
                    self.frontend.set_vring_enable(ring, p < n)
        self._active_pairs = n

    def set_mac(self, mac: str | bytes) -> None:
        """MAC_ADDR_SET (needs CTRL_MAC_ADDR)."""
        if not self.features & _CTRL_MAC_ADDR:
            raise NegotiationError("CTRL_MAC_ADDR was not negotiated")
        b = _mac_bytes(mac)
        self.command(_N["VIRTIO_NET_CTRL_MAC"], _N["VIRTIO_NET_CTRL_MAC_ADDR_SET"], b)
        self.mac = b
        self._mac_set = True

    def _rx_mode(self, cmd: str, on: bool) -> None:
        if not self.features & _CTRL_RX:
            raise NegotiationError("CTRL_RX was not negotiated")
        self.command(_N["VIRTIO_NET_CTRL_RX"], _N[f"VIRTIO_NET_CTRL_RX_{cmd}"], bytes([1 if on else 0]))
        self._rx_modes[cmd] = on

    def set_promisc(self, on: bool) -> None:
        """RX mode PROMISC (needs CTRL_RX)."""
        self._rx_mode("PROMISC", on)

    def set_allmulti(self, on: bool) -> None:
        """RX mode ALLMULTI (needs CTRL_RX)."""
        self._rx_mode("ALLMULTI", on)

    def send_rarp(self, mac: str | bytes | None = None) -> None:
        """SEND_RARP: ask the back-end to announce `mac` (default: ours); needs the RARP
        protocol feature."""
        self.frontend.send_rarp(_mac_bytes(mac) if mac is not None else self.mac)

    def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (needs the MTU protocol feature). Buffers keep their size: frames larger
        than the MTU given at connect time are still refused by :meth:`send`. Sent again after
        a reconnect."""
        self.frontend.net_set_mtu(mtu)
        self._mtu_sent = mtu

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.queue_pairs} pair(s), mtu {self.mtu}"
        return f"<NetClient {self.mac.hex(':')} {state}>"
