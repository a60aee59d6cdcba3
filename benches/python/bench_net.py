"""virtio-net back-ends side by side, driven by DPDK testpmd's virtio_user (64-byte frames, 1
queue pair, burst 32, ring 256) in three directions; a fresh back-end per run, interleaved runs,
medians.

- driver → back-end (testpmd `txonly`): testpmd's own net_vhost (rxonly, the reference),
  `vhostuser-rs serve-net --loopback` polling and in eventfd mode, with `--tap` serve-net
  bridged to a TAP (frames to testpmd's default peer MAC 02:00:00:00:00:00, which the kernel
  drops early as not its own, and a second run with frames to the TAP's MAC and an IPv4 address
  the TAP has, which the kernel receives up to UDP: no listener, counted in Udp NoPorts), and with
  `--python-devices` the counting device written in Python (benches/python/net_device.py count).
- round trip (testpmd `flowgen`: transmits continuously and, on the same lcore, receives and
  counts what comes back): testpmd's net_vhost macswap (the reference), serve-net --loopback
  polling and eventfd, with `--python-devices` the Python echo device (net_device.py echo).
  Then closed loop: testpmd macswap after `start tx_first 4` (128 frames circulate, each sent
  again as it comes back), so the back-end is never handed more than it returns.
- TAP → driver (`--tap`; testpmd `rxonly`): benches/c/tap_gen.c, compiled into the temporary
  folder, writes 64-byte frames to testpmd's port MAC out of the TAP (AF_PACKET, sendmmsg, qdisc
  bypassed) as fast as it can; serve-net reads them from the TAP into the driver's RX ring.

Placement (2 CPUs): testpmd's forwarding lcore on CPU 0 (its main lcore, the prompt, on CPU 1),
the back-end's worker on CPU 1 (`--cpus 1`, net_vhost's forwarding lcore); the TAP generator on
`--gen-cpu` (default 1, with serve-net's worker: CPU 0 is testpmd's busy-polling lcore); other
threads (serve-net's accept loop, DPDK's control threads) where the scheduler puts them.

Figures: testpmd TX/RX Mpps = its port's counters over the measured interval (after a warm-up);
back-end Mpps = the back-end's own totals over the whole forwarding time (serve-net's
`tx_frames` = taken from the driver, `rx_frames` = delivered to it, `rx_dropped` = not delivered
because the driver's RX ring had no buffers; net_vhost's RX-/TX-packets); the Python echo device
counts no drops: what `send` did not accept is the difference took − delivered; testpmd drops =
frames its burst could not enqueue because the TX ring was full (the back-end was the slower
side); generator Mpps = frames the kernel took from tap_gen (those the TAP's queue had no room
for are in the TAP's tx_dropped); others' CPU = CPU time of every other process during the
interval (100% = one CPU): on a 2-CPU machine any of it comes out of the processes measured, so
compare runs where it is ~0.

Run: ``python benches/python/bench_net.py [--runs 5] [--time 3] [--tap] [--python-devices]`` as
root (the TAP cases create and delete a TAP). Needs dpdk-testpmd (``apt-get install dpdk-dev
librte-net-vhost23 librte-net-virtio23``), gcc for `--tap`, and the installed package. Writes
what it prints, with every run's raw figures, to benches/results/DATE-bench_net.txt (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from placement import TICK, cpu_seconds

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tests" / "python"))
import dpdk  # noqa: E402  (the testpmd helper the tests use)

FE_CPU, BE_CPU = 0, 1
GEN_SOURCE = HERE.parent / "c" / "tap_gen.c"
#: testpmd txonly's default addresses (198.18.0.1 -> 198.18.0.2); the TAP gets the destination
TAP_ADDR = "198.18.0.2/24"
#: closed-loop round trip: testpmd macswap after `start tx_first 4`, 4 bursts of 32 frames in flight
TX_FIRST = 4


@dataclass
class Backend:
    """A running back-end: its pid (for CPU time), a way to read its totals once testpmd stopped,
    arguments testpmd needs for it, the TAP it serves (if any) and extra figures to record."""

    pid: int
    counters: Callable[[], dpdk.Counters]
    ready: Callable[[], None] = lambda: None
    fe_extra: Sequence[str] = ()
    tap: str | None = None
    extra: Callable[[], dict[str, float]] = dict


BackendFactory = Callable[[Path, Path], AbstractContextManager[Backend]]


@dataclass
class Case:
    direction: str  # "tx" (testpmd txonly), "rt" (flowgen, round trip), "rx" (rxonly, TAP generator)
    backend: BackendFactory
    runs: list[dict[str, float]] = field(default_factory=list)


def reference(mode: str) -> BackendFactory:
    """testpmd's net_vhost in `mode` (rxonly, macswap), its port counters in serve-net's names."""

    @contextmanager
    def run(sock: Path, work: Path) -> Iterator[Backend]:
        with dpdk.net_vhost(sock, work, main_cpu=FE_CPU, fwd_cpu=BE_CPU) as pmd:
            pmd.set_fwd(mode)
            pmd.start()

            def counters() -> dpdk.Counters:
                forward_stats = pmd.stop()
                s = pmd.port_stats(xstats=False)
                m = re.search(r"TX-dropped:\s+(\d+)", forward_stats)
                return dpdk.Counters(rx_frames=s.tx_packets, rx_bytes=s.tx_bytes, tx_frames=s.rx_packets,
                                     tx_bytes=s.rx_bytes, rx_dropped=int(m.group(1)) if m else 0)

            yield Backend(pmd.proc.pid, counters, lambda: dpdk.wait_ready(pmd))

    return run


def serve_net(*args: str) -> BackendFactory:
    @contextmanager
    def run(sock: Path, work: Path) -> Iterator[Backend]:
        with dpdk.serve_net(sock, work, [*args, "--cpus", str(BE_CPU)]) as server:
            yield Backend(server.proc.pid, server.counters)

    return run


def python_device(kind: str, *args: str) -> BackendFactory:
    """benches/python/net_device.py: a net device written in Python, counters line as serve-net's."""

    @contextmanager
    def run(sock: Path, work: Path) -> Iterator[Backend]:
        server = dpdk.ServeNet(sock, work, [], name=f"net_device-{kind}",
                               command=[sys.executable, str(HERE / "net_device.py"), str(sock), kind,
                                        "--cpus", str(BE_CPU), *args])
        try:
            yield Backend(server.proc.pid, server.counters)
        finally:
            server.stop()
            sock.unlink(missing_ok=True)

    return run


def udp_no_ports() -> int:
    """The kernel's Udp NoPorts counter (datagrams received for a port nobody listens on)."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines() if ln.startswith("Udp:")]
    return int(lines[1][lines[0].index("NoPorts")])


def serve_net_tap(name: str, *args: str, to_tap: bool = False) -> BackendFactory:
    """serve-net --tap on a fresh TAP (up). `to_tap`: the TAP gets testpmd txonly's destination
    IPv4 address and testpmd sends to the TAP's MAC, so the kernel receives the frames (IPv4, UDP)
    instead of dropping them as another host's."""

    @contextmanager
    def run(sock: Path, work: Path) -> Iterator[Backend]:
        subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True, capture_output=True)
        try:
            subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
            fe_extra: list[str] = []
            if to_tap:
                subprocess.run(["ip", "addr", "add", TAP_ADDR, "dev", name], check=True, capture_output=True)
                mac = Path(f"/sys/class/net/{name}/address").read_text().strip()
                fe_extra = [f"--eth-peer=0,{mac}"]
            stats = Path(f"/sys/class/net/{name}/statistics")
            no_ports = udp_no_ports()
            with serve_net("--tap", name, *args)(sock, work) as backend:
                backend.fe_extra, backend.tap = fe_extra, name
                backend.extra = lambda: {
                    "tap_tx_dropped": int((stats / "tx_dropped").read_text()),
                    "tap_rx_dropped": int((stats / "rx_dropped").read_text()),
                    "udp_no_ports": udp_no_ports() - no_ports,
                }
                yield backend
        finally:
            subprocess.run(["ip", "link", "del", name], capture_output=True)

    return run


def tap_tx_dropped(name: str | None) -> int:
    """Frames the TAP had no room for (its queue to the reader, serve-net, was full)."""
    return int(Path(f"/sys/class/net/{name}/statistics/tx_dropped").read_text())


def busy_seconds() -> float:
    """CPU time spent by everything on the machine (all CPUs) so far, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / TICK


class Generator:
    """tap_gen writing frames out of `tap` to `dst`; `sent()` asks it for its total so far."""

    def __init__(self, binary: Path, tap: str, dst: str, cpu: int | None) -> None:
        self.proc = subprocess.Popen([str(binary), tap, dst], stdout=subprocess.PIPE, text=True,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None)

    def _line(self) -> int:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.match(r"tap_gen: sent=(\d+)", line)
        if not m:
            raise RuntimeError(f"tap_gen said {line!r} (exit {self.proc.poll()})")
        return int(m.group(1))

    def sent(self) -> int:
        self.proc.send_signal(signal.SIGUSR1)
        return self._line()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self._line()
        finally:
            self.proc.wait(10)


def one_run(case: Case, work: Path, seconds: float, warmup: float, gen_binary: Path | None,
            gen_cpu: int | None) -> dict[str, float]:
    sock = work / "net.sock"
    mode = {"tx": "txonly", "rt": "flowgen", "rtc": "macswap", "rx": "rxonly"}[case.direction]
    gen: Generator | None = None
    with case.backend(sock, work) as be, dpdk.virtio_user(sock, work, fwd_cpu=FE_CPU, main_cpu=BE_CPU,
                                                          extra=be.fe_extra) as fe:
        be.ready()
        fe.set_fwd(mode)
        t_start = time.monotonic()
        fe.start(tx_first=TX_FIRST if case.direction == "rtc" else None)
        try:
            if case.direction == "rx":
                assert gen_binary is not None and be.tap is not None
                gen = Generator(gen_binary, be.tap, dpdk.port_mac(fe), gen_cpu)
            time.sleep(warmup)
            g0 = gen.sent() if gen else 0
            d0 = tap_tx_dropped(be.tap) if gen else 0
            before, t0 = fe.port_stats(xstats=False), time.monotonic()
            c0, f0, b0 = cpu_seconds(be.pid), cpu_seconds(fe.proc.pid), busy_seconds()
            gc0 = cpu_seconds(gen.proc.pid) if gen else 0.0
            time.sleep(seconds)
            after, t1 = fe.port_stats(xstats=False), time.monotonic()
            c1, f1, b1 = cpu_seconds(be.pid), cpu_seconds(fe.proc.pid), busy_seconds()
            gc1 = cpu_seconds(gen.proc.pid) if gen else 0.0
            g1 = gen.sent() if gen else 0
            d1 = tap_tx_dropped(be.tap) if gen else 0
            gen_total = gen.stop() if gen else 0
            if gen:
                time.sleep(0.2)  # testpmd takes what serve-net still delivers
        finally:
            if gen and gen.proc.poll() is None:
                gen.proc.kill()
                gen.proc.wait()
            forward_stats = fe.stop()
        t_stop = time.monotonic()
        end = fe.port_stats(xstats=False)
        time.sleep(0.2)  # the back-end takes what is still on the ring
        extra = be.extra()
        counters = be.counters()
    m = re.search(r"TX-dropped:\s+(\d+)", forward_stats)
    dt = t1 - t0
    return {
        "testpmd_tx_mpps": (after.tx_packets - before.tx_packets) / dt / 1e6,
        "testpmd_rx_mpps": (after.rx_packets - before.rx_packets) / dt / 1e6,
        "backend_tx_mpps": counters.tx_frames / (t_stop - t_start) / 1e6,
        "backend_rx_mpps": counters.rx_frames / (t_stop - t_start) / 1e6,
        "gen_mpps": (g1 - g0) / dt / 1e6,
        "gen_offered_mpps": (g1 - g0 + d1 - d0) / dt / 1e6,
        "testpmd_tx": end.tx_packets,
        "testpmd_rx": end.rx_packets,
        "testpmd_dropped": int(m.group(1)) if m else -1,
        "tx_frames": counters.tx_frames,
        "rx_frames": counters.rx_frames,
        "rx_dropped": counters.rx_dropped,
        "gen_total": gen_total,
        "backend_cpu": (c1 - c0) / dt,
        "gen_cpu": (gc1 - gc0) / dt,
        # CPU time of everything but testpmd, the back-end and the generator: other load skews the figures
        "others_cpu": max(0.0, (b1 - b0) - (c1 - c0) - (f1 - f0) - (gc1 - gc0)) / dt,
        **extra,
    }


def cpu(r: dict[str, float], *keys: str) -> str:
    return "  ".join(f"{label} {100 * r[key]:.0f}%" for key, label in
                     (("gen_cpu", "generator CPU"), ("backend_cpu", "back-end CPU"), ("others_cpu", "others' CPU"))
                     if key in keys)


def raw_line(direction: str, r: dict[str, float]) -> str:
    if direction == "tx":
        s = (f"testpmd {r['testpmd_tx_mpps']:6.2f} Mpps  back-end {r['backend_tx_mpps']:6.2f} Mpps"
             f"  totals testpmd {r['testpmd_tx']:.0f} back-end {r['tx_frames']:.0f}"
             f"  testpmd drops {r['testpmd_dropped']:.0f}")
        if "udp_no_ports" in r:
            s += f"  kernel Udp NoPorts {r['udp_no_ports']:.0f}"
        return s + "  " + cpu(r, "backend_cpu", "others_cpu")
    if direction in ("rt", "rtc"):
        return (f"testpmd TX {r['testpmd_tx_mpps']:6.2f} RX {r['testpmd_rx_mpps']:6.2f} Mpps  back-end took "
                f"{r['backend_tx_mpps']:6.2f} delivered {r['backend_rx_mpps']:6.2f} Mpps  totals testpmd tx "
                f"{r['testpmd_tx']:.0f} rx {r['testpmd_rx']:.0f} back-end took {r['tx_frames']:.0f} delivered "
                f"{r['rx_frames']:.0f} rx_dropped {r['rx_dropped']:.0f}  testpmd drops {r['testpmd_dropped']:.0f}  "
                + cpu(r, "backend_cpu", "others_cpu"))
    return (f"generator {r['gen_mpps']:6.2f} Mpps (offered {r['gen_offered_mpps']:.2f})  testpmd RX "
            f"{r['testpmd_rx_mpps']:6.2f} Mpps  serve-net delivered {r['backend_rx_mpps']:6.2f} Mpps"
            f"  totals generator {r['gen_total']:.0f} TAP tx_dropped "
            f"{r['tap_tx_dropped']:.0f} serve-net rx_frames {r['rx_frames']:.0f} rx_dropped {r['rx_dropped']:.0f} "
            f"testpmd rx {r['testpmd_rx']:.0f}  " + cpu(r, "gen_cpu", "backend_cpu", "others_cpu"))


def median_line(direction: str, runs: list[dict[str, float]]) -> str:
    def med(key: str) -> str:
        xs = [r[key] for r in runs]
        return f"{statistics.median(xs):6.2f} ({min(xs):.2f}..{max(xs):.2f})"

    def pct(key: str, label: str) -> str:
        return f"{label} {100 * statistics.median(r[key] for r in runs):.0f}%"

    def total(key: str) -> str:
        return f"{statistics.median(r[key] for r in runs):.0f}"

    cpus = pct("backend_cpu", "back-end CPU") + "  " + pct("others_cpu", "others' CPU")
    if direction == "tx":
        mismatch = sum(r["testpmd_tx"] != r["tx_frames"] for r in runs)
        return (f"testpmd {med('testpmd_tx_mpps')} Mpps  back-end {med('backend_tx_mpps')} Mpps  {cpus}"
                + (f"  kernel Udp NoPorts {total('udp_no_ports')}" if "udp_no_ports" in runs[0] else "")
                + (f"  TOTALS DIFFER in {mismatch} of {len(runs)} runs" if mismatch else ""))
    if direction in ("rt", "rtc"):
        return (f"testpmd TX {med('testpmd_tx_mpps')} RX (came back) {med('testpmd_rx_mpps')} Mpps  back-end took "
                f"{med('backend_tx_mpps')} delivered {med('backend_rx_mpps')} Mpps  rx_dropped {total('rx_dropped')}"
                f"  {cpus}")
    return (f"generator {med('gen_mpps')} Mpps (offered {med('gen_offered_mpps')})  testpmd RX "
            f"{med('testpmd_rx_mpps')} Mpps  serve-net delivered {med('backend_rx_mpps')} Mpps"
            f"  TAP tx_dropped {total('tap_tx_dropped')} serve-net rx_dropped "
            f"{total('rx_dropped')}  {pct('gen_cpu', 'generator CPU')}  {cpus}")


SECTIONS = {
    "tx": "driver -> back-end: testpmd txonly; testpmd = frames its TX queue took (interval), back-end = frames it "
          "took (whole forwarding time)",
    "rt": "round trip: testpmd flowgen (transmits and, on the same lcore, receives and counts); RX (came back) = "
          "frames testpmd received (interval); back-end took / delivered = its tx_frames / rx_frames (whole time)",
    "rtc": f"round trip, closed loop: testpmd macswap after start tx_first {TX_FIRST} ({TX_FIRST * 32} frames "
           "circulate: every frame that comes back is sent again); columns as above",
    "rx": "TAP -> driver: tap_gen out of the TAP, serve-net --tap, testpmd rxonly; generator = frames the kernel took "
          "from tap_gen (interval), testpmd RX (interval), serve-net delivered = rx_frames (whole time)",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--time", type=float, default=3.0, help="measured seconds per run (after --warmup)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--only", help="comma-separated case names to run (default: all)")
    p.add_argument("--tap", action="store_true",
                   help="also serve-net --tap, both directions (root: creates a TAP; gcc builds the generator)")
    p.add_argument("--gen-cpu", type=int, default=BE_CPU, help="CPU of the TAP generator (-1: not pinned)")
    p.add_argument("--python-devices", action="store_true",
                   help="also the net devices written in Python (benches/python/net_device.py count, echo)")
    p.add_argument("--out", type=Path, help="results file (default benches/results/DATE-bench_net.txt)")
    a = p.parse_args()
    if dpdk.TESTPMD is None:
        sys.exit(f"dpdk-testpmd not found ({dpdk.INSTALL_HINT})")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs 2 CPUs (testpmd's forwarding lcore and the back-end's worker apart)")
    tap = f"vubench{os.getpid() % 100000}"
    cases: dict[str, Case] = {
        "testpmd net_vhost rxonly": Case("tx", reference("rxonly")),
        "serve-net --loopback --poll-us 50": Case("tx", serve_net("--loopback", "--poll-us", "50")),
        "serve-net --loopback": Case("tx", serve_net("--loopback")),
    }
    if a.tap:
        cases["serve-net --tap"] = Case("tx", serve_net_tap(tap))
        cases["serve-net --tap, to the TAP's MAC+IP"] = Case("tx", serve_net_tap(tap, to_tap=True))
    if a.python_devices:
        cases["python count --poll-us 50"] = Case("tx", python_device("count", "--poll-us", "50"))
        cases["python count"] = Case("tx", python_device("count"))
    cases["testpmd net_vhost macswap"] = Case("rt", reference("macswap"))
    cases["round trip serve-net --loopback --poll-us 50"] = Case("rt", serve_net("--loopback", "--poll-us", "50"))
    cases["round trip serve-net --loopback"] = Case("rt", serve_net("--loopback"))
    if a.python_devices:
        cases["python echo --poll-us 50"] = Case("rt", python_device("echo", "--poll-us", "50"))
        cases["python echo"] = Case("rt", python_device("echo"))
    cases["closed loop testpmd net_vhost macswap"] = Case("rtc", reference("macswap"))
    cases["closed loop serve-net --loopback --poll-us 50"] = Case("rtc", serve_net("--loopback", "--poll-us", "50"))
    cases["closed loop serve-net --loopback"] = Case("rtc", serve_net("--loopback"))
    if a.python_devices:
        cases["closed loop python echo --poll-us 50"] = Case("rtc", python_device("echo", "--poll-us", "50"))
        cases["closed loop python echo"] = Case("rtc", python_device("echo"))
    if a.tap:
        cases["TAP -> driver serve-net --tap --poll-us 50"] = Case("rx", serve_net_tap(tap, "--poll-us", "50"))
        cases["TAP -> driver serve-net --tap"] = Case("rx", serve_net_tap(tap))
    if a.only:
        cases = {k: v for k, v in cases.items() if k in a.only.split(",")}
    out = a.out or HERE.parent / "results" / f"{datetime.date.today()}-bench_net.txt"
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    gen_cpu = None if a.gen_cpu < 0 else a.gen_cpu
    say(f"$ python benches/python/bench_net.py {' '.join(sys.argv[1:])}")
    say(f"testpmd virtio_user, 64-byte frames, burst 32, 1 queue pair, ring 256; {a.warmup:g} s warm-up + "
        f"{a.time:g} s measured; median of {a.runs} (min..max)")
    say(f"placement: testpmd forwarding lcore CPU {FE_CPU} (main lcore CPU {BE_CPU}); back-end worker CPU {BE_CPU} "
        f"(serve-net --cpus {BE_CPU}; net_vhost forwarding lcore {BE_CPU}, main lcore {FE_CPU}); TAP generator "
        + (f"CPU {gen_cpu}" if gen_cpu is not None else "not pinned"))
    say(f"machine: {os.cpu_count()} CPUs, load average at start {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    work = Path(tempfile.mkdtemp(prefix="vu-bench-net-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    gen_binary: Path | None = None
    try:
        if any(c.direction == "rx" for c in cases.values()):
            gen_binary = work / "tap_gen"
            subprocess.run(["gcc", "-O2", "-o", str(gen_binary), str(GEN_SOURCE)], check=True)
        say("raw runs:")
        for i in range(a.runs):
            for name, case in cases.items():
                r = one_run(case, work, a.time, a.warmup, gen_binary, gen_cpu)
                case.runs.append(r)
                say(f"  run {i + 1} {name:<44} {raw_line(case.direction, r)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"machine: load average at end {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    say("medians:")
    for direction, title in SECTIONS.items():
        chosen = {name: case for name, case in cases.items() if case.direction == direction and case.runs}
        if not chosen:
            continue
        say(f" {title}")
        for name, case in chosen.items():
            say(f"  {name:<44} {median_line(direction, case.runs)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
