"""DPDK's dpdk-testpmd as a network peer: `virtio_user` (a vhost-user front-end, the client) or
`net_vhost` (a vhost-user back-end, the server), driven through its interactive prompt.

Facts this relies on (DPDK 22.11, see shared/peers/dpdk_pair.sh): no hugepages (`--no-huge -m`,
DPDK then backs its memory with a memfd that virtio_user hands to the back-end), a `--file-prefix`
of its own per instance (two instances on one prefix fight over its lock), `--total-num-mbufs`
(the default pool does not fit in `-m 512`), `--no-pci`. `--in-memory` is refused with
`--no-huge`, so the runtime folder /var/run/dpdk/PREFIX is removed after each run instead.

Every process is bounded: each prompt command has a timeout, a context manager ends the process
(`quit`, then SIGTERM, then SIGKILL) on any exit, and the kernel kills testpmd if the Python
process that started it dies first (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

TESTPMD = shutil.which("dpdk-testpmd")
INSTALL_HINT = "apt-get install dpdk-dev librte-net-vhost23 librte-net-virtio23"
PROMPT = "testpmd> "
RUNTIME_DIR = Path("/var/run/dpdk")
_PR_SET_PDEATHSIG = 1
_prefixes = itertools.count()


def need_testpmd() -> str:
    """dpdk-testpmd, or skip with a clear reason (`peers.need`'s rule: CI has every peer, so fails).

    Outside pytest (the benchmarks) it raises TestpmdError instead.
    """
    if TESTPMD is None:
        if "pytest" not in sys.modules:
            raise TestpmdError(f"dpdk-testpmd is not installed ({INSTALL_HINT})")
        import pytest

        if os.environ.get("CI"):
            pytest.fail(f"dpdk-testpmd is required in CI but not installed ({INSTALL_HINT})")
        pytest.skip(f"dpdk-testpmd is not installed ({INSTALL_HINT})")
    return TESTPMD


class TestpmdError(RuntimeError):
    """testpmd exited, refused a command or did not answer in time; carries its log's tail."""

    __test__ = False  # not a pytest test class despite the name


@dataclass(frozen=True)
class PortStats:
    """`show port stats` and `show port xstats` of one port, as numbers (counters since start)."""

    rx_packets: int
    rx_bytes: int
    rx_errors: int
    rx_missed: int
    rx_nombuf: int
    tx_packets: int
    tx_bytes: int
    tx_errors: int
    #: every extended counter by name (virtio and vhost name per-queue ones rx_q0_packets, ...)
    xstats: dict[str, int] = field(default_factory=dict)

    def queue(self, direction: str, index: int) -> tuple[int, int]:
        """(packets, bytes) of queue `index`, `direction` "rx" or "tx", from the xstats."""
        return self.xstats[f"{direction}_q{index}_good_packets"], self.xstats[f"{direction}_q{index}_good_bytes"]

    def __sub__(self, before: PortStats) -> PortStats:
        return PortStats(
            **{k: getattr(self, k) - getattr(before, k) for k in self.__dataclass_fields__ if k != "xstats"},
            xstats={k: v - before.xstats.get(k, 0) for k, v in self.xstats.items()},
        )


_STAT = re.compile(r"([A-Za-z-]+):\s+(\d+)")
_XSTAT = re.compile(r"^\s*(\w+):\s+(\d+)\s*$", re.M)


def parse_port_stats(stats: str, xstats: str = "") -> PortStats:
    """Numbers of one port's `show port stats N` (and `show port xstats N`) output."""
    seen = {name.lower().replace("-", "_"): int(value) for name, value in _STAT.findall(stats)}
    try:
        return PortStats(
            **{k: seen[k] for k in ("rx_packets", "rx_bytes", "rx_errors", "rx_missed", "rx_nombuf",
                                    "tx_packets", "tx_bytes", "tx_errors")},
            xstats={name: int(value) for name, value in _XSTAT.findall(xstats)},
        )
    except KeyError as e:
        raise TestpmdError(f"no {e} in port statistics:\n{stats}") from None


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Testpmd:
    """One dpdk-testpmd process in interactive mode (`-i`), its output kept in memory and in `log`."""

    def __init__(self, eal: Sequence[str], app: Sequence[str], *, log: Path, env: dict[str, str] | None = None) -> None:
        binary = need_testpmd()
        self.prefix = f"vu-{os.getpid()}-{next(_prefixes)}"
        self.args = [binary, *eal, "--file-prefix", self.prefix, "--", "-i", *app]
        self.log_path = log
        self._out: list[str] = []
        self._len = 0
        self._cond = threading.Condition()
        self._log = open(log, "w", encoding="utf-8", errors="replace")  # noqa: SIM115 (closed in close())
        self._log.write("$ " + " ".join(self.args) + "\n")
        # stdbuf: testpmd prints with stdio, buffered in a pipe; the prompt itself is written unbuffered.
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", *self.args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent, env=env,
        )
        self._reader = threading.Thread(target=self._read, name=f"testpmd-{self.prefix}", daemon=True)
        self._reader.start()

    # -- output ---------------------------------------------------------------------------------

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            text = chunk.decode("utf-8", "replace")
            self._log.write(text)
            self._log.flush()
            with self._cond:
                self._out.append(text)
                self._len += len(text)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            if len(self._out) > 1:
                self._out[:] = ["".join(self._out)]
            return self._out[0] if self._out else ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output.splitlines()[-lines:])

    def wait_for(self, pattern: str, timeout: float = 10.0, *, start: int = 0) -> re.Match[str]:
        """The first match of `pattern` in the output past offset `start`, waiting up to `timeout` s."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            if m := regex.search(self.output, start):
                return m
            with self._cond:
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise TestpmdError(f"testpmd exited with {self.proc.returncode} before /{pattern}/:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TestpmdError(f"no /{pattern}/ from testpmd within {timeout} s:\n{self.tail()}")
                self._cond.wait(min(left, 0.2))

    # -- commands -------------------------------------------------------------------------------

    def command(self, line: str, timeout: float = 10.0) -> str:
        """Types `line` at the prompt; returns what testpmd printed before its next prompt."""
        assert self.proc.stdin is not None
        start = len(self.output)
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise TestpmdError(f"testpmd is gone (exit {self.proc.poll()}), cannot run {line!r}:\n{self.tail()}") from None
        end = self.wait_for(re.escape(PROMPT), timeout, start=start + 1)
        return self.output[start:end.start()]

    def port_stats(self, port: int = 0, *, xstats: bool = True) -> PortStats:
        stats = self.command(f"show port stats {port}")
        return parse_port_stats(stats, self.command(f"show port xstats {port}") if xstats else "")

    def set_fwd(self, mode: str) -> None:
        out = self.command(f"set fwd {mode}")
        if "Set " not in out:
            raise TestpmdError(f"set fwd {mode}: {out.strip()}")

    def start(self, *, tx_first: int | None = None) -> None:
        out = self.command("start" if tx_first is None else f"start tx_first {tx_first}")
        if "forwarding" not in out:
            raise TestpmdError(f"start: {out.strip()}")

    def stop(self) -> str:
        """Stops forwarding; returns the forward statistics it printed."""
        return self.command("stop", timeout=15)

    # -- end ------------------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> int:
        """`quit` (then SIGTERM, then SIGKILL); returns the exit status."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                try:
                    self.proc.stdin.write(b"quit\n")
                    self.proc.stdin.close()
                except (BrokenPipeError, ValueError):
                    pass
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.send_signal(signal.SIGTERM)
                    try:
                        self.proc.wait(5)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
            self._reader.join(5)
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except (BrokenPipeError, ValueError):
                        pass
            self._log.close()
            shutil.rmtree(RUNTIME_DIR / self.prefix, ignore_errors=True)
        return self.proc.returncode


def eal_args(*, main_cpu: int, fwd_cpu: int, mem_mb: int, vdev: str, extra: Sequence[str] = ()) -> list[str]:
    """EAL arguments: lcore 0 (main, the prompt) on `main_cpu`, lcore 1 (forwarding) on `fwd_cpu`."""
    return [f"--lcores=0@{main_cpu},1@{fwd_cpu}", "--no-huge", "-m", str(mem_mb), "--no-pci", "--vdev", vdev, *extra]


def app_args(*, queues: int, burst: int, txpkts: Sequence[int], mbufs: int, extra: Sequence[str]) -> list[str]:
    return [
        "--nb-cores=1", f"--rxq={queues}", f"--txq={queues}", f"--total-num-mbufs={mbufs}", f"--burst={burst}",
        "--txpkts=" + ",".join(map(str, txpkts)), *extra,
    ]


@contextmanager
def virtio_user(
    sock: Path,
    workdir: Path,
    *,
    queues: int = 1,
    queue_size: int = 256,
    mrg_rxbuf: bool = True,
    packed_vq: bool = False,
    in_order: bool = False,
    mac: str | None = None,
    txpkts: Sequence[int] = (64,),
    burst: int = 32,
    main_cpu: int = 1,
    fwd_cpu: int = 0,
    mem_mb: int = 256,
    mbufs: int = 16384,
    extra: Sequence[str] = (),
    eal_extra: Sequence[str] = (),
    connect_timeout: float = 15.0,
    name: str = "virtio_user",
) -> Iterator[Testpmd]:
    """testpmd with a `virtio_user` port (a vhost-user front-end) connected to the back-end on `sock`.

    `queues` > 1 needs the control queue (`cq=1`: the driver sets the number of pairs with
    VIRTIO_NET_CTRL_MQ). `txpkts` are the segment sizes of the frames txonly sends (several make
    chained mbufs; each must fit an mbuf, 2048 bytes by default); `extra` are more testpmd
    arguments, `eal_extra` more EAL ones. Yields at the prompt, forwarding stopped, link up. The
    log is `workdir/NAME.log`.
    """
    vdev = (
        f"net_virtio_user0,path={sock},queues={queues},queue_size={queue_size},mrg_rxbuf={int(mrg_rxbuf)},"
        f"packed_vq={int(packed_vq)},in_order={int(in_order)}" + (",cq=1" if queues > 1 else "")
        + (f",mac={mac}" if mac else "")
    )
    pmd = Testpmd(
        eal_args(main_cpu=main_cpu, fwd_cpu=fwd_cpu, mem_mb=mem_mb, vdev=vdev, extra=eal_extra),
        app_args(queues=queues, burst=burst, txpkts=txpkts, mbufs=mbufs, extra=extra),
        log=workdir / f"{name}.log",
    )
    try:
        pmd.wait_for(re.escape(PROMPT), connect_timeout)
        yield pmd
    finally:
        pmd.close()


@contextmanager
def net_vhost(
    sock: Path,
    workdir: Path,
    *,
    queues: int = 1,
    main_cpu: int = 0,
    fwd_cpu: int = 1,
    mem_mb: int = 256,
    mbufs: int = 16384,
    burst: int = 32,
    extra: Sequence[str] = (),
    name: str = "net_vhost",
) -> Iterator[Testpmd]:
    """testpmd with a `net_vhost` port: a vhost-user back-end listening on `sock` (client=0).

    Yields at the prompt once the socket exists; `wait_ready()` waits for a front-end.
    """
    sock.unlink(missing_ok=True)
    pmd = Testpmd(
        eal_args(main_cpu=main_cpu, fwd_cpu=fwd_cpu, mem_mb=mem_mb, vdev=f"net_vhost0,iface={sock},queues={queues},client=0"),
        app_args(queues=queues, burst=burst, txpkts=(64,), mbufs=mbufs, extra=extra),
        log=workdir / f"{name}.log",
    )
    try:
        pmd.wait_for(re.escape(PROMPT), 15)
        if not sock.exists():
            raise TestpmdError(f"net_vhost did not create {sock}:\n{pmd.tail()}")
        yield pmd
    finally:
        pmd.close()
        sock.unlink(missing_ok=True)


def wait_ready(vhost: Testpmd, timeout: float = 10.0) -> None:
    """Waits until net_vhost logs that the front-end started the device."""
    vhost.wait_for(r"virtio is now ready", timeout)


@dataclass(frozen=True)
class Run:
    """What one timed forwarding run measured on the testpmd it drove."""

    mode: str
    seconds: float  # measured interval between the two statistics reads
    before: PortStats
    after: PortStats
    forward_stats: str  # the text `stop` printed

    @property
    def delta(self) -> PortStats:
        return self.after - self.before

    @property
    def tx_mpps(self) -> float:
        return self.delta.tx_packets / self.seconds / 1e6

    @property
    def rx_mpps(self) -> float:
        return self.delta.rx_packets / self.seconds / 1e6


def forward(pmd: Testpmd, mode: str, seconds: float, *, tx_first: int | None = None, warmup: float = 0.0) -> Run:
    """Forwards in `mode` (txonly, rxonly, io, macswap, ...) for `seconds` after `warmup`; stops.

    `before` is read after the warm-up, `after` right at the end (before `stop`), so rates cover
    steady state; `after` is the total since the port started.
    """
    pmd.set_fwd(mode)
    pmd.start(tx_first=tx_first)
    try:
        time.sleep(warmup)
        before, t0 = pmd.port_stats(xstats=False), time.monotonic()
        time.sleep(seconds)
        t1 = time.monotonic()
        after = pmd.port_stats()
    finally:
        forward_stats = pmd.stop()
    return Run(mode, t1 - t0, before, after, forward_stats)


_PACKET = re.compile(r"src=([0-9A-Fa-f:]{17}) - dst=([0-9A-Fa-f:]{17}) .*?type=(0x[0-9a-fA-F]+) - length=(\d+) - nb_segs=(\d+)")


@dataclass(frozen=True)
class Received:
    """One frame as testpmd's `set verbose 1` describes it (headers only: testpmd prints no payload)."""

    queue: int
    src: str
    dst: str
    ethertype: int
    length: int
    nb_segs: int
    sw_ptype: str


def received_frames(text: str) -> list[Received]:
    """Frames listed in `set verbose 1` output (`port P/queue Q: received N packets`, one line each)."""
    frames = []
    queue = 0
    for line in text.splitlines():
        if m := re.search(r"port \d+/queue (\d+): received", line):
            queue = int(m.group(1))
        elif m := _PACKET.search(line):
            ptype = re.search(r"sw ptype: ([A-Z0-9_ ]+?)\s+-", line)
            frames.append(Received(queue, m.group(1).upper(), m.group(2).upper(), int(m.group(3), 16),
                                   int(m.group(4)), int(m.group(5)), ptype.group(1) if ptype else ""))
    return frames


def port_mac(pmd: Testpmd, port: int = 0) -> str:
    """The port's MAC address as testpmd prints it (upper case)."""
    out = pmd.command(f"show port info {port}")
    m = re.search(r"MAC address: ([0-9A-Fa-f:]{17})", out)
    if not m:
        raise TestpmdError(f"no MAC address in show port info:\n{out}")
    return m.group(1).upper()


# -- the back-ends testpmd's virtio_user is paired with -------------------------------------------


@dataclass(frozen=True)
class Counters:
    """A loopback back-end's totals, serve-net's names: tx = frames the driver transmitted (the
    back-end took them from TX queues), rx = frames delivered into the driver's RX queues."""

    rx_frames: int
    rx_bytes: int
    tx_frames: int
    tx_bytes: int
    rx_dropped: int


_COUNTERS = re.compile(r"^serve-net: ((?:\w+=\d+ ?)+)$", re.M)


def parse_serve_net_counters(stderr: str) -> Counters:
    """The last `serve-net: rx_frames=N rx_bytes=N ...` line of serve-net's stderr (any order;
    counters this class does not name, such as tx_errors, are ignored)."""
    for line in reversed(_COUNTERS.findall(stderr)):
        found = {k: int(v) for k, v in (kv.split("=") for kv in line.split())}
        if all(name in found for name in Counters.__dataclass_fields__):
            return Counters(**{name: found[name] for name in Counters.__dataclass_fields__})
    raise AssertionError(f"no 'serve-net: rx_frames=N rx_bytes=N tx_frames=N tx_bytes=N rx_dropped=N' line on stderr:\n{stderr[-3000:]}")


class ServeNet:
    """`vhostuser-rs serve-net` in its own process; `counters()` ends it and reads its totals.

    `command` replaces the whole command line (another program printing the same counters line).
    """

    def __init__(self, sock: Path, workdir: Path, args: Sequence[str], *, name: str = "serve-net",
                 command: Sequence[str] | None = None) -> None:
        self.sock = sock
        self.args = list(command) if command else [
            sys.executable, "-m", "vhostuser_rs", "serve-net", "--socket-path", str(sock), *args]
        self.stderr_path = workdir / f"{name}.stderr"
        self.signals_needed = 1  # SIGTERMs counters() had to send
        sock.unlink(missing_ok=True)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 15
        while not sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve-net exited with {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"serve-net did not create {sock} in 15 s: {self.stderr()}")
            time.sleep(0.01)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Sends `sig` (once) and waits up to `timeout` s, then SIGKILL; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def counters(self) -> Counters:
        """Ends serve-net and returns the counters line it printed; exit status 0 expected.

        SIGTERM; if it is still running 5 s later, one more SIGTERM (`test_net_dpdk` checks
        separately that one signal is enough: this is for reading the counters either way).
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.signals_needed = 2
        status = self.stop()
        if status != 0:
            raise AssertionError(f"serve-net exited with {status} on SIGTERM (0 expected):\n{self.stderr()[-3000:]}")
        return parse_serve_net_counters(self.stderr())


@contextmanager
def serve_net(sock: Path, workdir: Path, args: Sequence[str], *, name: str = "serve-net") -> Iterator[ServeNet]:
    """Runs serve-net until its socket exists; ends it (SIGTERM, then SIGKILL) at exit."""
    server = ServeNet(sock, workdir, args, name=name)
    try:
        yield server
    finally:
        server.stop()
        sock.unlink(missing_ok=True)


class TestpmdLoopback:
    """testpmd's net_vhost in macswap mode: the reference for serve-net --loopback (it swaps the
    MAC addresses too and counts, in its port statistics, what serve-net counts)."""

    __test__ = False

    def __init__(self, pmd: Testpmd) -> None:
        self.pmd = pmd

    def counters(self) -> Counters:
        forward_stats = self.pmd.stop()
        stats = self.pmd.port_stats()
        dropped = re.search(r"TX-dropped:\s+(\d+)", forward_stats)
        return Counters(
            rx_frames=stats.tx_packets, rx_bytes=stats.tx_bytes, tx_frames=stats.rx_packets, tx_bytes=stats.rx_bytes,
            rx_dropped=int(dropped.group(1)) if dropped else 0,
        )


@contextmanager
def testpmd_loopback(sock: Path, workdir: Path, *, queues: int = 1, extra: Sequence[str] = ()) -> Iterator[TestpmdLoopback]:
    with net_vhost(sock, workdir, queues=queues, extra=extra, name="net_vhost-loopback") as pmd:
        pmd.set_fwd("macswap")
        pmd.start()
        yield TestpmdLoopback(pmd)


# -- pcap files, for byte-for-byte checks through testpmd's net_pcap port -------------------------

_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")


def write_pcap(path: Path, frames: Sequence[bytes]) -> None:
    """A classic pcap file (microseconds, LINKTYPE_ETHERNET) holding `frames`, for net_pcap's rx_pcap."""
    with open(path, "wb") as f:
        f.write(_PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, frame in enumerate(frames):
            f.write(_PCAP_RECORD.pack(0, i, len(frame), len(frame)))
            f.write(frame)


def read_pcap(path: Path) -> list[bytes]:
    """The frames of a classic pcap file (what net_pcap's tx_pcap wrote)."""
    data = path.read_bytes()
    magic = struct.unpack_from("<I", data)[0]
    if magic not in (0xA1B2C3D4, 0xA1B23C4D):
        raise ValueError(f"{path}: not a little-endian pcap file (magic {magic:#x})")
    frames, offset = [], _PCAP_HEADER.size
    while offset + _PCAP_RECORD.size <= len(data):
        _, _, caplen, _ = _PCAP_RECORD.unpack_from(data, offset)
        offset += _PCAP_RECORD.size
        frames.append(data[offset:offset + caplen])
        offset += caplen
    return frames


def pcap_port(rx_pcap: Path, tx_pcap: Path) -> list[str]:
    """EAL arguments adding a net_pcap port (port 1 after the virtio_user port 0) that replays
    `rx_pcap` once and writes what it is given to `tx_pcap` (written out when testpmd quits).
    Forward in io mode with testpmd's `--no-flush-rx` (else `start` discards the replayed frames)."""
    return ["--vdev", f"net_pcap0,rx_pcap={rx_pcap},tx_pcap={tx_pcap}"]
