"""virtio-net for Python: feature bits, the per-frame header, and :class:`NetDevice`, the base
class of net devices written in Python.

A net device moves Ethernet frames; everything else is done in Rust: the receive and transmit
rings of each queue pair (both on one worker thread), the control queue, the RX buffers (picked,
filled and merged with MRG_RXBUF), counters and the config space::

    class Echo(vu.NetDevice):
        queue_pairs = 1
        def receive(self, queue_pair, frames):         # one call per burst the driver sent
            self.send(queue_pair, frames)              # straight back into its RX buffers

    vu.Backend.listen("/run/echo-net.sock", Echo()).serve_forever()

The constants come from ``src/virtio/net.rs`` (one definition for the device and the driver).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import BinaryIO, Union

from . import _native
from ._native import Frame, NetHeader, NetPort
from .devices import NetCounters
from .enums import VirtioFeature
from .netclient import NetClient

__all__ = ["Frame", "NetClient", "NetDevice", "NetFeature", "NetHeader", "OutgoingFrame", "VIRTIO_NET"]

#: Every virtio-net constant by its spec name (feature bit numbers, header flags, GSO types,
#: status bits, control-queue classes and commands, sizes).
VIRTIO_NET: dict[str, int] = dict(_native.VIRTIO_NET)


def _bit(name: str) -> int:
    return 1 << VIRTIO_NET[f"VIRTIO_NET_F_{name}"]


class NetFeature(enum.IntFlag, boundary=enum.KEEP):
    """virtio-net feature bits (device-specific range; combine with :class:`VirtioFeature`)."""

    CSUM = _bit("CSUM")
    GUEST_CSUM = _bit("GUEST_CSUM")
    CTRL_GUEST_OFFLOADS = _bit("CTRL_GUEST_OFFLOADS")
    MTU = _bit("MTU")
    MAC = _bit("MAC")
    GUEST_TSO4 = _bit("GUEST_TSO4")
    GUEST_TSO6 = _bit("GUEST_TSO6")
    GUEST_ECN = _bit("GUEST_ECN")
    GUEST_UFO = _bit("GUEST_UFO")
    HOST_TSO4 = _bit("HOST_TSO4")
    HOST_TSO6 = _bit("HOST_TSO6")
    HOST_ECN = _bit("HOST_ECN")
    HOST_UFO = _bit("HOST_UFO")
    MRG_RXBUF = _bit("MRG_RXBUF")
    STATUS = _bit("STATUS")
    CTRL_VQ = _bit("CTRL_VQ")
    CTRL_RX = _bit("CTRL_RX")
    CTRL_VLAN = _bit("CTRL_VLAN")
    GUEST_ANNOUNCE = _bit("GUEST_ANNOUNCE")
    MQ = _bit("MQ")
    CTRL_MAC_ADDR = _bit("CTRL_MAC_ADDR")


#: What :meth:`NetDevice.send` takes per frame: the frame's bytes (any bytes-like object, or a
#: :class:`Frame` received earlier), or a ``(NetHeader, frame)`` pair to set offload metadata.
OutgoingFrame = Union[bytes, bytearray, memoryview, Frame, tuple[NetHeader, Union[bytes, bytearray, memoryview, Frame]]]


class NetDevice:
    """Base class of virtio-net devices written in Python. Set the class attributes, implement
    :meth:`receive`, and serve it with :class:`vhostuser_rs.Backend`.

    Queue layout (VIRTIO 1.2 §5.1.2): pair ``p`` is receiveq ``2p`` and transmitq ``2p + 1``,
    the control queue comes last; GET_QUEUE_NUM answers the number of pairs. Offered by
    default: VERSION_1, MRG_RXBUF, MAC, STATUS, CTRL_VQ with CTRL_RX / CTRL_MAC_ADDR /
    GUEST_ANNOUNCE, MQ with several pairs, MTU when :attr:`mtu` is set, EVENT_IDX,
    INDIRECT_DESC; the NET_SET_MTU request (through :meth:`set_mtu`); SEND_RARP when the class
    overrides :meth:`send_rarp`.
    """

    #: The back-end type of the vhost-user conventions (``--print-capabilities``).
    device_type: str | None = "net"
    #: Queue pairs (receiveq + transmitq each).
    queue_pairs: int = 1
    #: MAC address in the config space.
    mac: str = "52:54:00:12:34:56"
    #: MTU offered (VIRTIO_NET_F_MTU); None: the MTU feature is not offered.
    mtu: int | None = None
    #: Largest ring size accepted.
    max_queue_size: int = 1024
    #: Virtio feature bits offered; None: the defaults above. Offload bits (CSUM, TSO...) mean
    #: the device handles partial checksums and GSO frames itself.
    features: int | None = None
    #: The :class:`Backend` serving this device (set by its constructor).
    backend: object | None = None

    def _net_port(self) -> NetPort:
        port: NetPort | None = self.__dict__.get("_port")
        if port is None:
            port = NetPort(queue_pairs=self.queue_pairs, mac=self.mac, mtu=self.mtu,
                           max_queue_size=self.max_queue_size)
            self.__dict__["_port"] = port
        return port

    # -- what a device implements --------------------------------------------------------------

    def receive(self, queue_pair: int, frames: list[Frame]) -> None:
        """A burst of frames the driver transmitted on `queue_pair` (one call per burst, on the
        pair's worker thread with the GIL). ``frame.header`` is the parsed virtio-net header,
        ``frame.data`` a read-only zero-copy view; the driver reuses the buffers once this
        returns, so copy what you keep (``bytes(frame)``). Default: drop them."""

    def event_fds(self, queue_pair: int) -> Sequence[int]:
        """Fds to watch on the worker of `queue_pair` next to its kicks (a socket feeding RX,
        a timerfd...); :meth:`on_event` runs when one is readable. Asked when the pair's receive
        queue starts; keep them open while it runs."""
        return ()

    def on_event(self, queue_pair: int, fd: int) -> bool:
        """`fd` is readable (level-triggered). Call :meth:`send` here to feed the driver's RX
        directly. Return False to stop watching the pair's fds until the driver adds receive
        buffers (e.g. :meth:`send` accepted fewer frames than you had)."""
        return True

    def control(self, class_: int, command: int, data: bytes) -> bool | None:
        """A control-queue command (``VIRTIO_NET_CTRL_*``): return True (OK) or False (ERR) to
        answer it, None for the default handling (RX mode, MAC table and address, ANNOUNCE ack,
        VQ_PAIRS_SET within :attr:`queue_pairs`; anything else ERR)."""
        return None

    def set_mtu(self, mtu: int) -> bool:
        """NET_SET_MTU from the front-end (already checked to be within 68..=65535): return
        False to refuse it (the front-end sees a failure with REPLY_ACK)."""
        return True

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP (offered only if overridden): announce `mac` (6 bytes) to the network,
        e.g. by sending a RARP frame out of the device's uplink."""
        raise NotImplementedError

    def save_state(self, stream: BinaryIO) -> None:
        """DEVICE_STATE, source side (offered only if this and :meth:`load_state` are
        overridden): write this device's own state to `stream` (in memory; your format). The
        library saves what it keeps itself — the config space (MAC, status), the MTU, the queue
        pairs in use and the RX filters — in front of it. Called with every ring stopped; an
        exception fails the transfer (the session goes on)."""
        raise NotImplementedError

    def load_state(self, stream: BinaryIO) -> None:
        """DEVICE_STATE, destination side: restore what :meth:`save_state` wrote (the library's
        part is restored first). An exception fails CHECK_DEVICE_STATE."""
        raise NotImplementedError

    def queue_started(self, index: int) -> None:
        """Ring `index` started."""

    def queue_stopped(self, index: int) -> None:
        """Ring `index` stopped."""

    def reset(self) -> None:
        """The front-end went away or reset the device."""

    # -- what a device calls --------------------------------------------------------------------

    def send(self, queue_pair: int, frames: Iterable[OutgoingFrame]) -> int:
        """Deliver `frames` to the driver's receive queue of `queue_pair` and return how many
        were accepted: Rust picks the RX buffers, merges them with MRG_RXBUF and writes the
        header. Fewer than given means the driver has no buffers now (back-pressure: nothing is
        lost silently; send the rest later, e.g. from :meth:`on_event`). Called from
        :meth:`receive` or :meth:`on_event` the frames go straight into the ring; from any other
        thread they are queued (up to 1024 per pair) for the pair's worker. A frame that can
        never fit the driver's buffers is dropped and counted in ``rx_dropped``."""
        return self._net_port().send(queue_pair, frames)

    def counters(self, queue_pair: int | None = None) -> NetCounters:
        """Frames and bytes moved (``tx_*``: transmitted by the driver, ``rx_*``: delivered to
        it), summed over the pairs or for `queue_pair`."""
        c = self._net_port().counters(queue_pair)
        return NetCounters(tx_frames=c["tx_frames"], tx_bytes=c["tx_bytes"], tx_errors=c["tx_errors"],
                           rx_frames=c["rx_frames"], rx_bytes=c["rx_bytes"], rx_dropped=c["rx_dropped"])

    @property
    def acked_features(self) -> int:
        """Virtio feature bits the driver acknowledged (0 before SET_FEATURES)."""
        return self._net_port().acked_features

    @property
    def active_pairs(self) -> int:
        """Queue pairs the driver uses (its last VQ_PAIRS_SET; 1 before)."""
        return self._net_port().active_pairs

    def link_up(self) -> None:
        """Set the link up (``status`` LINK_UP) and tell the driver (CONFIG_CHANGE_MSG when the
        front-end set up the back-end request channel)."""
        self._net_port().set_link(True)
        self._config_changed()

    def link_down(self) -> None:
        """Set the link down and tell the driver."""
        self._net_port().set_link(False)
        self._config_changed()

    def announce(self) -> bool:
        """Ask the driver to announce itself (``status`` ANNOUNCE, then CONFIG_CHANGE_MSG; the
        driver sends gratuitous packets and acks on the control queue). False when the driver
        did not negotiate GUEST_ANNOUNCE."""
        if not self._net_port().request_announce():
            return False
        self._config_changed()
        return True

    def _config_changed(self) -> None:
        backend = self.backend
        requests = getattr(backend, "requests", None)
        if backend is not None and requests is not None and requests.is_open:
            backend.config_changed()  # type: ignore[attr-defined]


_ = VirtioFeature  # re-exported for users combining feature sets
