"""Type stubs of the Rust extension ``vhostuser_rs._native`` (checked by ``mypy.stubtest``)."""

import os
import pathlib
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypedDict, final

from .messages import MemoryRegion, Message
from .proxy import ProxyRecord

__all__ = [
    "BackendRequests",
    "BackendSession",
    "backend_coverage",
    "BlockRequests",
    "BatchQueue",
    "Connection",
    "DeviceServer",
    "Exchange",
    "FrontendCore",
    "SharedRegion",
    "block_io",
    "serve_blk",
    "serve_device",
    "StopFlag",
    "DescriptorChain",
    "DeviceQueue",
    "DirtyLog",
    "DriverQueue",
    "GuestBuffer",
    "GuestMemory",
    "HEADER_SIZE",
    "Listener",
    "MAX_FDS",
    "MAX_PAYLOAD_SIZE",
    "__version__",
    "decode_header",
    "decode_message",
    "dup_cloexec",
    "encode_message",
    "encode_raw",
    "feature_bits",
    "request_codes",
    "request_rules",
    "validate_header",
]
__version__: str
HEADER_SIZE: int
MAX_PAYLOAD_SIZE: int
MAX_FDS: int

# virtio device definitions (src/python/virtio.rs; the values live in src/virtio/)
__all__ += ["VIRTIO_BLK", "VIRTIO_BLK_CONFIG", "VIRTIO_NET", "BuiltinNet", "Frame", "NetHeader", "NetPort", "RingQueue"]
__all__ += ["refresh_logging", "serve_blk_exports"]
__all__ += ["PackedDeviceQueue"]
VIRTIO_BLK: dict[str, int]
VIRTIO_BLK_CONFIG: dict[str, tuple[int, int]]
VIRTIO_NET: dict[str, int]

def refresh_logging() -> None:
    """Make changes to Python's logging configuration visible to the Rust side (it caches loggers
    and their levels after first use)."""

def encode_message(message: Message) -> bytes: ...
def encode_raw(code: int, payload: bytes, flags: int, size: int | None = None) -> bytes: ...
def decode_message(data: bytes, channel_value: int, num_fds: int) -> Message: ...
def decode_header(data: bytes) -> tuple[int, int, int]: ...
def validate_header(code: int, flags: int, size: int, channel_value: int) -> None: ...
def request_rules(channel_value: int, code: int) -> tuple[str, bool, str, str]: ...
def request_codes(channel_value: int) -> list[tuple[str, int]]: ...
def feature_bits(kind: str) -> list[tuple[str, int]]: ...
def dup_cloexec(fd: int) -> int: ...
@final
class Connection:
    """One end of a vhost-user channel carrying whole messages with their fds."""

    @staticmethod
    def connect(path: str | os.PathLike[str], *, timeout: float | None = 5.0) -> Connection: ...
    @staticmethod
    def pair() -> tuple[Connection, Connection]: ...
    @staticmethod
    def from_fd(fd: int) -> Connection: ...
    @staticmethod
    def from_socket(sock: socket.socket) -> Connection: ...
    def send(self, data: bytes, fds: list[int] = ..., *, timeout: float | None = None) -> None: ...
    def recv_raw(self, *, timeout: float | None = None, max_payload: int = ...) -> tuple[bytes, list[int]]: ...
    def recv(self, channel_value: int = 0, *, timeout: float | None = None) -> tuple[Message, list[int]]: ...
    def poll(self, timeout: float | None = 0.0) -> bool: ...
    def fileno(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> Connection: ...
    def __exit__(self, *_args: Any) -> bool: ...

@final
class Listener:
    """A listening Unix socket; the socket file is removed on close."""

    @staticmethod
    def bind(path: str | os.PathLike[str], *, replace_existing: bool = False) -> Listener: ...
    def accept(self, *, timeout: float | None = None) -> Connection: ...
    @property
    def path(self) -> pathlib.Path: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> Listener: ...
    def __exit__(self, *_args: Any) -> bool: ...

@final
class GuestBuffer:
    """A window of guest memory exported through the buffer protocol (zero-copy)."""

    def __len__(self) -> int: ...

@final
class GuestMemory:
    """Shareable guest memory (front-end) or a peer's regions mapped from fds (back-end)."""

    @staticmethod
    def allocate(size: int | None = None, *, regions: Sequence[tuple[int, int]] | None = None) -> GuestMemory: ...
    @staticmethod
    def map(regions: Sequence[MemoryRegion], fds: Sequence[int]) -> GuestMemory: ...
    def read(self, addr: int, n: int) -> bytes: ...
    def write(self, addr: int, data: bytes) -> None: ...
    def view(self, addr: int, n: int) -> memoryview: ...
    def alloc(self, size: int, align: int = 8) -> int: ...
    def reset_allocator(self) -> None: ...
    @property
    def regions(self) -> list[MemoryRegion]: ...
    def fds(self) -> list[int]: ...
    @property
    def size(self) -> int: ...
    @property
    def guest_end(self) -> int: ...
    def user_addr(self, addr: int) -> int: ...

@final
class DirtyLog:
    """The dirty-page log of live migration: one bit per 4 KiB guest page."""

    @staticmethod
    def allocate(guest_end: int) -> DirtyLog: ...
    @staticmethod
    def map(fd: int, mmap_size: int, mmap_offset: int = 0) -> DirtyLog: ...
    def mark(self, addr: int, len: int) -> None: ...
    def take_dirty(self) -> list[int]: ...
    @property
    def size(self) -> int: ...
    def fileno(self) -> int | None: ...

@final
class BlockRequests:
    """The request engine of one ring of a virtio-blk front-end (use ``BlockClient``)."""

    def __new__(
        cls,
        queue: DriverQueue,
        memory: GuestMemory,
        kick_fd: int,
        call_fd: int,
        main_fd: int | None = None,
        *,
        index: int = 0,
        indirect: bool = False,
        slot_bytes: int = 131072,
        poll: float = 0.0,
    ) -> BlockRequests: ...
    @property
    def slot_bytes(self) -> int: ...
    def call_fd(self) -> int: ...
    def main_fd(self) -> int | None: ...
    def read(self, offset: int, length: int, timeout: float | None = 5.0) -> bytes: ...
    def readinto(self, offset: int, buffer: Any, timeout: float | None = 5.0) -> int: ...
    def write(self, offset: int, data: Any, timeout: float | None = 5.0) -> None: ...
    def request(
        self, kind: int, sector: int = 0, sectors: int = 0, *, unmap: bool = False, timeout: float | None = 5.0
    ) -> bytes: ...
    def submit(self, requests: Iterable[tuple[Any, ...]]) -> list[int]: ...
    def submit_bytes(self, requests: Iterable[Sequence[Any]]) -> list[int]: ...
    def submit_futures(self, requests: Iterable[tuple[Any, ...]], futures: list[Any]) -> int: ...
    def complete_futures(self) -> list[tuple[int, Any | None, int | None, int, bytes | None]]: ...
    def take_futures(self) -> list[Any]: ...
    def reap(self, max: int = 64, *, timeout: float | None = 0.0) -> list[tuple[int, int, bytes | None]]: ...
    def collect(self, token: int) -> tuple[int, bytes | None] | None: ...
    def poll(self) -> int: ...
    def cancel(self, token: int) -> None: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def hung_up(self) -> bool: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...

@final
class DriverQueue:
    """The driver side of a ring (front-end role): split, or packed with ``packed=True``."""

    def __new__(
        cls,
        memory: GuestMemory,
        size: int,
        *,
        event_idx: bool = False,
        indirect_max: int = 0,
        index: int = 0,
        packed: bool = False,
    ) -> DriverQueue: ...
    def add(
        self, readable: Sequence[tuple[int, int]] = ..., writable: Sequence[tuple[int, int]] = ..., *, indirect: bool = False
    ) -> int: ...
    def add_batch(
        self, chains: Sequence[tuple[Sequence[tuple[int, int]], Sequence[tuple[int, int]]]], *, indirect: bool = False
    ) -> list[int]: ...
    def publish(self) -> None: ...
    def kick_needed(self) -> bool: ...
    def reap(self, max: int | None = None) -> list[tuple[int, int]]: ...
    def set_interrupts(self, enabled: bool) -> None: ...
    def reset_to(self, base: int) -> None: ...
    def hand_over(self) -> int: ...
    @property
    def packed(self) -> bool: ...
    @property
    def size(self) -> int: ...
    @property
    def index(self) -> int: ...
    @property
    def num_free(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def vring_base(self) -> int: ...
    @property
    def avail_idx(self) -> int: ...
    @property
    def used_idx(self) -> int: ...
    @property
    def guest_addrs(self) -> tuple[int, int, int]: ...
    @property
    def user_addrs(self) -> tuple[int, int, int]: ...
    @property
    def log_guest_addr(self) -> int: ...

@final
class DescriptorChain:
    """A chain popped by a DeviceQueue, with zero-copy views of its buffers."""

    @property
    def head(self) -> int: ...
    @property
    def readable_len(self) -> int: ...
    @property
    def writable_len(self) -> int: ...
    @property
    def readable(self) -> list[memoryview]: ...
    @property
    def writable(self) -> list[memoryview]: ...
    def read(self, n: int | None = None) -> bytes: ...
    def write(self, data: bytes, offset: int = 0) -> int: ...

@final
class DeviceQueue:
    """The device side of a split or packed ring (back-end role)."""

    def __new__(
        cls,
        memory: GuestMemory,
        size: int,
        *,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        address_space: str = "guest",
        event_idx: bool = False,
        indirect: bool = False,
        next_avail: int = 0,
        index: int = 0,
        packed: bool = False,
        base: int | None = None,
    ) -> DeviceQueue: ...
    def pop(self, max: int = 32) -> list[DescriptorChain]: ...
    def complete(self, chain: DescriptorChain, written: int) -> None: ...
    def complete_batch(self, done: Sequence[tuple[DescriptorChain, int]]) -> None: ...
    def publish(self) -> bool: ...
    def enable_notifications(self) -> bool: ...
    def disable_notifications(self) -> None: ...
    def process(self, handler: Callable[[list[DescriptorChain]], Sequence[int]], *, max_batch: int = 32) -> bool: ...
    def set_dirty_log(self, log: DirtyLog | None = None, used_log_addr: int | None = None) -> None: ...
    @property
    def index(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def next_avail(self) -> int: ...
    @property
    def next_used(self) -> int: ...
    @property
    def vring_base(self) -> int: ...
    @property
    def packed(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def is_broken(self) -> bool: ...

@final
class Exchange:
    """One request on its way (FrontendCore.begin), stepped without blocking by poll()."""

    def poll(self) -> tuple[Message | None, list[int]] | None: ...
    @property
    def waits_for_reply(self) -> bool: ...
    @property
    def remaining(self) -> float | None: ...
    def cancel(self) -> None: ...
    @property
    def done(self) -> bool: ...

@final
class FrontendCore:
    """The Rust core of a front-end session (use vhostuser_rs.Frontend)."""

    @staticmethod
    def connect(path: str | os.PathLike[str], *, timeout: float | None = 5.0) -> FrontendCore: ...
    @staticmethod
    def from_fd(fd: int) -> FrontendCore: ...
    def request(
        self,
        request: int,
        payload: Any = None,
        fds: list[int] = ...,
        *,
        need_reply: bool | None = None,
        timeout: float | None = 5.0,
        check_gate: bool = True,
    ) -> tuple[Message | None, list[int]]: ...
    def begin(
        self,
        request: int,
        payload: Any = None,
        fds: list[int] = ...,
        *,
        need_reply: bool | None = None,
        timeout: float | None = 5.0,
        check_gate: bool = True,
    ) -> Exchange: ...
    def negotiated(self) -> dict[str, int | None]: ...
    def start_backend_channel(self, handler: Any) -> int: ...
    @property
    def backend_channel_running(self) -> bool: ...
    def fileno(self) -> int: ...
    @property
    def peer_closed(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...

def block_io(
    queue: DriverQueue,
    memory: GuestMemory,
    kick_fd: int,
    call_fd: int,
    *,
    rw: str = "randread",
    bs: int = 4096,
    iodepth: int = 32,
    duration: float = 10.0,
    capacity: int,
    verify: bool = False,
    seed: int = 1,
    progress: bool = False,
    poll: float | None = None,
    status: Callable[[int, int, float], object] | None = None,
    status_interval: float = 1.0,
) -> dict[str, Any]: ...

def serve_blk(
    image: str | os.PathLike[str],
    *,
    socket_path: str | os.PathLike[str] | None = None,
    fd: int | None = None,
    num_queues: int = 1,
    readonly: bool = False,
    max_connections: int | None = None,
    workers: int | None = None,
    cpus: list[int] | None = None,
    poll: float | None = None,
    io_engine: str = "auto",
    direct: bool = False,
) -> None: ...

def backend_coverage() -> list[tuple[int, str, str, str, str]]: ...
def serve_blk_exports(
    exports: list[tuple[str | os.PathLike[str], str | os.PathLike[str], bool, int]],
    *,
    workers: int = 2,
    cpus: list[int] | None = None,
    poll: float | None = None,
    io_engine: str = "auto",
    direct: bool = False,
) -> None: ...

def serve_device(
    device: Any,
    *,
    socket_path: str | os.PathLike[str] | None = None,
    fd: int | None = None,
    connect: str | os.PathLike[str] | None = None,
    max_connections: int | None = None,
    stop: StopFlag | None = None,
    requests: BackendRequests | None = None,
    workers: int | None = None,
    cpus: list[int] | None = None,
    poll: float | None = 0.0,
    listener: Listener | None = None,
) -> None: ...
@final
class BackendRequests:
    """Sends back-end requests to the front-end of the current session."""

    def __new__(cls) -> BackendRequests: ...
    @property
    def is_open(self) -> bool: ...
    def send(
        self,
        code: int,
        payload: Any = None,
        fds: list[int] = ...,
        *,
        need_reply: bool = False,
        timeout: float | None = 5.0,
    ) -> int | None: ...
    def shared_object_lookup(self, uuid: bytes, *, timeout: float | None = 5.0) -> tuple[int, int | None]: ...
    def shmem_map(
        self,
        regions: list[int],
        shmid: int,
        fd: int,
        *,
        fd_offset: int,
        shm_offset: int,
        length: int,
        writable: bool,
        need_reply: bool = False,
        timeout: float | None = 5.0,
    ) -> int | None: ...
    def shmem_unmap(
        self,
        regions: list[int],
        shmid: int,
        *,
        shm_offset: int,
        length: int,
        need_reply: bool = False,
        timeout: float | None = 5.0,
    ) -> int | None: ...

@final
class StopFlag:
    """A flag that ends a background serve_device loop."""

    def __new__(cls) -> StopFlag: ...
    def set(self) -> None: ...
    @property
    def is_set(self) -> bool: ...

@final
class DeviceServer:
    """Serves a Python device one session at a time, each stepped by an event loop."""

    def __new__(
        cls,
        device: Any,
        *,
        requests: BackendRequests | None = None,
        workers: int | None = None,
        cpus: Sequence[int] | None = None,
        poll: float | None = 0.0,
    ) -> DeviceServer: ...
    def session(self, connection: Connection) -> BackendSession: ...

@final
class BackendSession:
    """One front-end session of a DeviceServer."""

    def fileno(self) -> int: ...
    def handle_ready(self) -> bool: ...
    @property
    def finished(self) -> bool: ...
    def close(self) -> None: ...

@final
class BatchQueue:
    """The queue handed to Device.process: completes chains of the current batch."""

    def complete(self, chain: DescriptorChain, written: int) -> None: ...
    def defer(self, chain: DescriptorChain) -> None: ...
    @property
    def index(self) -> int: ...

@final
class RingQueue:
    """The ring handed to Device.on_event: completes chains deferred by earlier batches."""

    def complete(self, chain: DescriptorChain, written: int) -> None: ...
    @property
    def deferred(self) -> int: ...
    @property
    def index(self) -> int: ...

# virtio-net (src/python/net.rs)
class _Counters(TypedDict):
    tx_frames: int
    tx_bytes: int
    tx_errors: int
    rx_frames: int
    rx_bytes: int
    rx_dropped: int

@final
class BuiltinNet:
    """A built-in net device (loopback or tap), served with serve()."""

    @staticmethod
    def loopback(*, queue_pairs: int = 1, mac: str | None = None, mtu: int | None = None) -> BuiltinNet: ...
    @staticmethod
    def tap(
        name: str, *, queue_pairs: int = 1, mac: str | None = None, mtu: int | None = None, offloads: bool = True
    ) -> BuiltinNet: ...
    def serve(
        self,
        *,
        socket_path: str | os.PathLike[str] | None = None,
        fd: int | None = None,
        max_connections: int | None = None,
        workers: int | None = None,
        cpus: list[int] | None = None,
        poll: float | None = 0.0,
    ) -> None: ...
    def counters(self, queue_pair: int | None = None) -> _Counters: ...
    @property
    def queue_pairs(self) -> int: ...
    @property
    def acked_features(self) -> int: ...
    @property
    def mtu(self) -> int: ...

@final
class NetHeader:
    """virtio_net_hdr: the per-frame header in front of every frame."""

    def __new__(
        cls,
        *,
        flags: int = 0,
        gso_type: int = 0,
        hdr_len: int = 0,
        gso_size: int = 0,
        csum_start: int = 0,
        csum_offset: int = 0,
        num_buffers: int = 0,
    ) -> NetHeader: ...
    @staticmethod
    def from_bytes(data: bytes) -> NetHeader: ...
    def to_bytes(self) -> bytes: ...
    @property
    def flags(self) -> int: ...
    @property
    def gso_type(self) -> int: ...
    @property
    def hdr_len(self) -> int: ...
    @property
    def gso_size(self) -> int: ...
    @property
    def csum_start(self) -> int: ...
    @property
    def csum_offset(self) -> int: ...
    @property
    def num_buffers(self) -> int: ...
    def __eq__(self, value: object, /) -> bool: ...

@final
class Frame:
    """A frame the driver transmitted: its header and a zero-copy view of the frame bytes."""

    @property
    def header(self) -> NetHeader: ...
    @property
    def data(self) -> memoryview | bytes: ...
    def __bytes__(self) -> bytes: ...
    def __len__(self) -> int: ...

@final
class NetPort:
    """The native half of a vhostuser_rs.NetDevice."""

    def __new__(
        cls, *, queue_pairs: int = 1, mac: str | None = None, mtu: int | None = None, max_queue_size: int = 1024
    ) -> NetPort: ...
    def send(self, queue_pair: int, frames: Iterable[Any]) -> int: ...
    def counters(self, queue_pair: int | None = None) -> _Counters: ...
    def set_link(self, up: bool) -> None: ...
    def request_announce(self) -> bool: ...
    def config(self) -> bytes: ...
    @property
    def default_features(self) -> int: ...
    @property
    def acked_features(self) -> int: ...
    @property
    def mtu(self) -> int: ...
    @property
    def active_pairs(self) -> int: ...
    def rx_mode(self) -> tuple[tuple[bool, ...], list[bytes], list[bytes]]: ...

# net client (src/python/netclient.rs)
__all__ += ["NetClientCore"]

class _ClientCounters(TypedDict):
    rx_frames: int
    rx_bytes: int
    rx_dropped: int
    tx_frames: int
    tx_bytes: int

class _NetBenchResult(TypedDict):
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

@final
class NetClientCore:
    """The driver data path of a virtio-net client (use vhostuser_rs.netclient.NetClient)."""

    def __new__(
        cls,
        memory: GuestMemory,
        features: int,
        pairs: Sequence[tuple[DriverQueue, int, int, DriverQueue, int]],
        *,
        mtu: int | None = None,
        conn_fd: int | None = None,
    ) -> NetClientCore: ...
    @staticmethod
    def rarp_frame(mac: bytes) -> bytes: ...
    @staticmethod
    def buffer_memory(features: int, queue_size: int, *, mtu: int | None = None) -> int: ...
    def send(self, queue_pair: int, frames: Iterable[Any]) -> int: ...
    def recv(
        self, queue_pair: int, max_frames: int = 64, timeout: float | None = None
    ) -> list[tuple[NetHeader, bytes]]: ...
    def fileno(self, queue_pair: int = 0) -> int: ...
    def set_connection(self, conn_fd: int | None) -> None: ...
    def counters(self, queue_pair: int | None = None) -> _ClientCounters: ...
    def run_bench(
        self,
        mode: str,
        *,
        pktlen: int = 64,
        burst: int = 32,
        seconds: float = 10.0,
        poll: float = 0.0,
        queue_pair: int = 0,
    ) -> _NetBenchResult: ...
    @property
    def queue_pairs(self) -> int: ...
    @property
    def header_len(self) -> int: ...
    @property
    def max_frame_len(self) -> int: ...
    @property
    def rx_buffer_len(self) -> int: ...
    def close(self) -> None: ...

@final
class SharedRegion:
    """A VIRTIO Shared Memory Region held by the front-end (SHMEM)."""

    def __new__(cls, shmid: int, size: int) -> SharedRegion: ...
    @property
    def shmid(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def mappings(self) -> list[tuple[int, int, int, bool]]: ...
    def map(self, fd: int, fd_offset: int, offset: int, length: int, *, writable: bool) -> None: ...
    def unmap(self, offset: int, length: int) -> None: ...
    def unmap_all(self) -> None: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...

# The proxy tracer (src/python/proxy.rs; vhostuser_rs.proxy.Proxy wraps it)
__all__ += ["ProxyCore"]

@final
class ProxyCore:
    """A running proxy: binds `listen`, relays each front-end to the back-end at `connect`."""

    def __new__(
        cls,
        listen: str | os.PathLike[str],
        connect: str | os.PathLike[str],
        *,
        inject: Sequence[str] = ...,
        connect_timeout: float = 5.0,
        io_timeout: float = 5.0,
        once: bool = False,
    ) -> ProxyCore: ...
    def next_records(self, max: int = 256, *, timeout: float | None = None) -> list[ProxyRecord]: ...
    @property
    def finished(self) -> bool: ...
    def close(self) -> None: ...
