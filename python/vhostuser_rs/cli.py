"""The ``vhostuser-rs`` command-line tool.

Subcommands:

- ``decode HEX`` — decode a captured message (hex, as a sniffer or ``strace -x`` shows it);
- ``requests`` — the request table of the spec with each request's reply, fd and gate rules;
- ``features VALUE`` — name the bits of a feature mask (virtio or ``--protocol``);
- ``probe SOCKET`` — what a back-end offers;
- ``bench`` — block benchmark (``--output-format json``/``json+``: fio's JSON layout) or
  packet generator;
- ``serve-blk`` / ``serve-net`` — the built-in devices; ``serve MODULE:CLASS [ARGS...]`` — a
  Python device class; all three follow the spec's back-end program conventions.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import _native, hazmat
from .enums import Channel, ProtocolFeature, VirtioFeature
from .exceptions import VhostUserError


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _flag_names(flag: enum.Flag) -> str:
    names = [m.name for m in type(flag) if m in flag and m.name]
    known = 0
    for m in type(flag):
        if m in flag:
            known |= m.value
    rest = int(flag.value) & ~known
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names) or "0"


def _cmd_decode(args: argparse.Namespace) -> int:
    text = "".join(args.hex).replace(" ", "").replace(":", "")
    try:
        data = bytes.fromhex(text)
    except ValueError as e:
        print(f"vhostuser-rs decode: not hex: {e}", file=sys.stderr)
        return 2
    channel = Channel.BACKEND if args.channel == "backend" else Channel.MAIN
    try:
        msg = hazmat.decode(data, channel=channel, num_fds=args.fds)
    except VhostUserError as e:
        print(f"vhostuser-rs decode: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**_jsonable(msg), "is_reply": msg.is_reply, "need_reply": msg.need_reply}))
        return 0
    name = msg.request.name if isinstance(msg.request, enum.Enum) else f"unknown({msg.request})"
    kind = "reply" if msg.is_reply else "request"
    print(f"{name} {kind} on the {channel.name.lower()} channel, flags {msg.flags:#x}, {len(data) - 12} payload bytes")
    payload = msg.payload
    if isinstance(payload, int) and not isinstance(payload, bool):
        print(f"  u64: {payload:#x}")
        if getattr(msg.request, "name", "") in ("GET_FEATURES", "SET_FEATURES"):
            print(f"  features: {_flag_names(VirtioFeature(payload))}")
        if getattr(msg.request, "name", "") in ("GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES"):
            print(f"  protocol features: {_flag_names(ProtocolFeature(payload))}")
    elif payload is not None:
        for key, value in _jsonable(payload).items() if isinstance(_jsonable(payload), dict) else [("bytes", _jsonable(payload))]:
            shown = f"{value:#x}" if isinstance(value, int) and not isinstance(value, bool) else value
            print(f"  {key}: {shown}")
    return 0


def _cmd_requests(args: argparse.Namespace) -> int:
    channel = Channel.BACKEND if args.channel == "backend" else Channel.MAIN
    # What our back-end does with each front-end request (generated from the Rust code, whose
    # tests check every row against what a session answers).
    backend = {c: rest for c, *rest in _native.backend_coverage()} if channel == Channel.MAIN else {}
    rows: list[dict[str, object]] = []
    for name, code in _native.request_codes(int(channel)):
        _, has_reply, fds, gate = _native.request_rules(int(channel), code)
        row: dict[str, object] = {
            "code": code, "name": name, "reply": "always" if has_reply else "ack only", "fds": fds, "gate": gate,
        }
        if code in backend:
            handling, offer, refusal, note = backend[code]
            row.update(backend=handling, offer=offer, refusal=refusal, note=note)
        rows.append(row)
    if args.json:
        print(json.dumps(rows))
        return 0
    extra = f"  {'back-end':<13} {'offered':<26} when refused" if backend else ""
    print(f"{'code':>4}  {'request':<26} {'reply':<9} {'fds':<19} {'gate':<34}{extra}".rstrip())
    for r in rows:
        line = f"{r['code']:>4}  {r['name']:<26} {r['reply']:<9} {r['fds']:<19} {r['gate']!s:<34}"
        if "backend" in r:
            line += f"  {r['backend']!s:<13} {r['offer']!s:<26} {r['refusal']}"
        print(line.rstrip())
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    value = int(args.value, 0)
    flag: enum.Flag = ProtocolFeature(value) if args.protocol else VirtioFeature(value)
    print(f"{value:#x}: {_flag_names(flag)}")
    return 0


def _probe(path: str, timeout: float, device: str) -> dict[str, Any]:
    from .blk import CONFIG_SIZE, BlockConfig
    from .frontend import Frontend

    with Frontend.connect(path, timeout=timeout) as fe:
        features = fe.get_features()
        doc: dict[str, Any] = {
            "socket": path,
            "features": int(features),
            "feature_names": _flag_names(features).split("|"),
        }
        if VirtioFeature.PROTOCOL_FEATURES in features:
            proto = fe.get_protocol_features()
            doc["protocol_features"] = int(proto)
            doc["protocol_feature_names"] = _flag_names(proto).split("|")
            usable = proto & (
                ProtocolFeature.MQ | ProtocolFeature.CONFIG | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.REPLY_ACK
            )
            fe.set_protocol_features(usable)
            if ProtocolFeature.MQ in usable:
                doc["queues"] = fe.get_queue_num()
            if ProtocolFeature.CONFIGURE_MEM_SLOTS in usable:
                doc["max_mem_slots"] = fe.get_max_mem_slots()
            if ProtocolFeature.CONFIG in usable and device == "blk":
                try:
                    cfg = BlockConfig.parse(fe.get_config(0, CONFIG_SIZE))
                    doc["block"] = dataclasses.asdict(cfg)
                except VhostUserError as e:
                    doc["config_error"] = str(e)
    return doc


def _cmd_probe(args: argparse.Namespace) -> int:
    try:
        doc = _probe(args.socket, args.timeout, args.device)
    except (VhostUserError, OSError) as e:
        print(f"vhostuser-rs probe: {args.socket}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"back-end at {doc['socket']}")
    print(f"  features          {doc['features']:#x}: {'|'.join(doc['feature_names'])}")
    if "protocol_features" in doc:
        print(f"  protocol features {doc['protocol_features']:#x}: {'|'.join(doc['protocol_feature_names'])}")
    for key in ("queues", "max_mem_slots"):
        if key in doc:
            print(f"  {key.replace('_', ' '):<17} {doc[key]}")
    if "block" in doc:
        blk = doc["block"]
        print(f"  virtio-blk config capacity {blk['capacity']} sectors ({blk['capacity'] * 512} bytes), "
              f"blk_size {blk['blk_size']}, seg_max {blk['seg_max']}, num_queues {blk['num_queues']}")
    return 0


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    if t and t[-1] in units:
        return int(t[:-1]) * units[t[-1]]
    return int(t)


def run_bench(
    socket_path: str,
    *,
    rw: str = "randread",
    bs: int = 4096,
    iodepth: int = 32,
    queues: int = 1,
    duration: float = 10.0,
    verify: bool = False,
    progress: bool = False,
    timeout: float = 5.0,
    poll_us: float | None = None,
    cpus: list[int] | None = None,
    details: bool = False,
    status_interval: float | None = None,
    status_file: Any = None,
    packed: bool = False,
) -> dict[str, Any]:
    """Connect to a vhost-user-blk back-end and run the Rust I/O loop on `queues` rings.

    `poll_us` is the hybrid-polling window (None: 50 us at iodepth <= 4, else polling or
    sleeping by which costs less CPU per I/O times time per I/O); `cpus` pins the I/O thread of queue i to ``cpus[i % len(cpus)]``. `details`: add ``per_queue``, each
    queue's ``run_io`` result with its thread's ``rusage`` (user s, system s, context switches,
    major and minor faults), for the fio JSON layout. `status_interval`: print a status line
    (the interval's IOPS and bandwidth per direction) every so many seconds to `status_file`
    (default stderr). `packed` drives packed rings (VIRTIO_F_RING_PACKED; NegotiationError if
    the back-end does not offer it).
    """
    import resource
    import threading
    import time

    from .blk import BlockClient

    t0 = time.perf_counter()
    disk = BlockClient.connect(
        socket_path,
        num_queues=queues,
        queue_size=max(64, 1 << (3 * iodepth - 1).bit_length()),
        memory_size=max(64 << 20, 4 * queues * iodepth * bs + (16 << 20)),
        timeout=timeout,
        packed=packed,
    )
    handshake = time.perf_counter() - t0
    try:
        if verify:
            _stamp(disk, bs, iodepth)  # untimed, so that reads can be checked
        results: list[dict[str, Any]] = [{} for _ in range(queues)]
        errors: list[BaseException] = []
        # Reads and writes completed so far by each queue, as its status callback last saw them.
        so_far: list[tuple[int, int]] = [(0, 0)] * queues

        def one(i: int) -> None:
            if cpus:
                # Pins this thread only (pid 0 is the calling thread on Linux).
                os.sched_setaffinity(0, {cpus[i % len(cpus)]})

            def status(reads: int, writes: int, _elapsed: float) -> None:
                so_far[i] = (reads, writes)

            try:
                before = resource.getrusage(resource.RUSAGE_THREAD)
                results[i] = disk.run_io(
                    rw=rw, bs=bs, iodepth=iodepth, duration=duration, queue=i, verify=verify, seed=i + 1,
                    progress=progress and i == 0, poll=_poll_seconds(poll_us),
                    status=status if status_interval else None,
                    # Fresh counts for the status lines: the callback costs one GIL take per call.
                    status_interval=min((status_interval or 1.0) / 4, 0.1),
                )
                after = resource.getrusage(resource.RUSAGE_THREAD)
                results[i]["rusage"] = (
                    after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
                    (after.ru_nvcsw - before.ru_nvcsw) + (after.ru_nivcsw - before.ru_nivcsw),
                    after.ru_majflt - before.ru_majflt, after.ru_minflt - before.ru_minflt,
                )
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(queues)]
        for t in threads:
            t.start()
        if status_interval:
            _print_status(threads, so_far, bs, status_interval, duration, status_file or sys.stderr)
        for t in threads:
            t.join()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        if errors:
            raise errors[0]
    finally:
        disk.close()
    ios = sum(r["ios"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    lat = results[0]
    return {
        "socket": socket_path,
        "rw": rw,
        "bs": bs,
        "iodepth": iodepth,
        "queues": queues,
        "packed": packed,
        "ios": ios,
        "elapsed_s": elapsed,
        "iops": ios / elapsed if elapsed else 0.0,
        "mib_s": ios * bs / elapsed / (1 << 20) if elapsed else 0.0,
        "p50_us": lat["p50_ns"] / 1000,
        "p99_us": lat["p99_ns"] / 1000,
        "p999_us": lat["p999_ns"] / 1000,
        "cpu_us_per_io": cpu / ios * 1e6 if ios else 0.0,
        "handshake_ms": handshake * 1000,
        "poll_us": poll_us,
        "errors": sum(r["errors"] for r in results),
        "verify_failures": sum(r["verify_failures"] for r in results),
        **({"per_queue": results} if details else {}),
    }


def _print_status(threads: list[Any], so_far: list[tuple[int, int]], bs: int, interval: float, duration: float,
                  out: Any) -> None:
    """While `threads` run, one line per `interval` with the interval's rates (as fio's
    ``--status-interval`` gives a report per interval)."""
    import time

    t0 = last_t = time.monotonic()
    last = (0, 0)
    while any(t.is_alive() for t in threads):
        threads[0].join(timeout=max(0.0, last_t + interval - time.monotonic()))
        now = time.monotonic()
        if not any(t.is_alive() for t in threads):
            break  # the summary follows; a last partial interval would show stale counts
        if now - last_t < interval:
            continue
        total = (sum(r for r, _ in so_far), sum(w for _, w in so_far))
        span = now - last_t
        parts = []
        for name, done, before in (("read", total[0], last[0]), ("write", total[1], last[1])):
            if done or before:
                iops = (done - before) / span
                parts.append(f"{name}: IOPS={iops:,.0f}, BW={iops * bs / (1 << 20):.1f}MiB/s")
        print(f"[{now - t0:6.1f}s/{duration:.0f}s] " + ("; ".join(parts) or "no completions yet"), file=out,
              flush=True)
        last, last_t = total, now


def _stamp(disk: Any, bs: int, iodepth: int) -> None:
    """Write every block once with its sector stamps (what --verify later checks)."""
    import struct

    chunk = 1 << 16
    for offset in range(0, disk.capacity, chunk):
        n = min(chunk, disk.capacity - offset)
        data = b"".join(struct.pack("<Q", (offset + k) // 512) + bytes(504) for k in range(0, n, 512))
        disk.write(offset, data)


def _cpu_list(text: str) -> list[int]:
    """Parses taskset-style CPU lists: ``0``, ``0,2``, ``0-3``."""
    cpus: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list: {text!r}") from None
    if not cpus or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"not a CPU list: {text!r}")
    return cpus


def _spawn_backend(cmd: list[str], sock: Any, work: Any, *, quiet: bool = False,
                   cpus: list[int] | None = None) -> Any:
    """Starts a built-in back-end (`cmd`) and waits up to 10 s for its socket `sock`; on failure
    ends it, removes `work` and raises OSError."""
    import subprocess
    import time

    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if quiet else None,
        # Runs in the child before exec, so every thread of the back-end inherits the mask.
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            work.cleanup()
            raise OSError(f"the built-in back-end did not start: {' '.join(cmd[2:4])}")
        time.sleep(0.01)
    return proc


def _builtin_backend(queues: int, cpus: list[int] | None = None) -> tuple[Any, str, Any]:
    """Starts `serve-blk` on a temporary 256 MiB image (on tmpfs when there is one)."""
    import tempfile
    from pathlib import Path

    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    work = tempfile.TemporaryDirectory(prefix="vhostuser-rs-bench-", dir=base)
    image, sock = Path(work.name) / "disk.img", Path(work.name) / "blk.sock"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    cmd = [sys.executable, "-m", "vhostuser_rs", "serve-blk", str(image), "--socket-path", str(sock),
           "--num-queues", str(queues)]
    return _spawn_backend(cmd, sock, work, cpus=cpus), str(sock), work


def run_net_bench(
    socket_path: str,
    *,
    mode: str = "txonly",
    pktlen: int = 64,
    queue_pairs: int = 1,
    burst: int = 32,
    duration: float = 10.0,
    poll_us: float = 50.0,
    cpus: list[int] | None = None,
    timeout: float = 5.0,
    packed: bool = False,
) -> dict[str, Any]:
    """Connect a :class:`~vhostuser_rs.netclient.NetClient` to a vhost-user net back-end and run
    the Rust burst loop (:meth:`NetClient.run_bench`) on each of `queue_pairs` pairs, one thread
    each (pinned to ``cpus[i % len(cpus)]``). Rates count frames sent (txonly) or received
    (rxonly, loopback); Gbit/s is frame bytes (no preamble, gap or CRC); CPU is the loop
    threads' own. Drops: malformed deliveries, plus in loopback the frames that never came back.
    """
    import threading
    import time

    from .netclient import NetBenchResult, NetClient

    t0 = time.perf_counter()
    client = NetClient.connect(socket_path, queue_pairs=queue_pairs, timeout=timeout, packed=packed)
    handshake = time.perf_counter() - t0
    try:
        results: list[NetBenchResult | None] = [None] * queue_pairs
        errors: list[BaseException] = []

        def one(i: int) -> None:
            if cpus:
                os.sched_setaffinity(0, {cpus[i % len(cpus)]})
            try:
                results[i] = client.run_bench(
                    mode, pktlen=pktlen, burst=burst, seconds=duration, poll=poll_us / 1e6, queue_pair=i
                )
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(queue_pairs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    finally:
        client.close()
    done: list[dict[str, Any]] = [dict(r) for r in results if r is not None]

    def total(key: str) -> int:
        return sum(int(r[key]) for r in done)

    elapsed = max(r["elapsed"] for r in done)
    cpu = sum(r["cpu"] for r in done)
    counted = "tx" if mode == "txonly" else "rx"
    frames, nbytes = total(f"{counted}_frames"), total(f"{counted}_bytes")
    lost = total("in_flight") if mode == "loopback" else 0
    return {
        "socket": socket_path,
        "device": "net",
        "mode": mode,
        "pktlen": pktlen,
        "burst": burst,
        "queue_pairs": queue_pairs,
        "packed": packed,
        "frames": frames,
        "tx_frames": total("tx_frames"),
        "rx_frames": total("rx_frames"),
        "tx_bytes": total("tx_bytes"),
        "rx_bytes": total("rx_bytes"),
        "rx_dropped": total("rx_dropped"),
        "tx_full": total("tx_full"),
        "in_flight": total("in_flight"),
        "drops": total("rx_dropped") + lost,
        "waits": total("waits"),
        "elapsed_s": elapsed,
        "mpps": frames / elapsed / 1e6 if elapsed else 0.0,
        "gbit_s": nbytes * 8 / elapsed / 1e9 if elapsed else 0.0,
        "cpu_s": cpu,
        "cpu_ns_per_frame": cpu / frames * 1e9 if frames else 0.0,
        "handshake_ms": handshake * 1000,
        "poll_us": poll_us,
        "errors": 0,
    }


def _builtin_net_backend(queue_pairs: int, cpus: list[int] | None = None) -> tuple[Any, str, Any]:
    """Starts `serve-net --loopback` on a socket in a temporary folder."""
    import tempfile
    from pathlib import Path

    work = tempfile.TemporaryDirectory(prefix="vhostuser-rs-bench-")
    sock = Path(work.name) / "net.sock"
    cmd = [sys.executable, "-m", "vhostuser_rs", "serve-net", "--loopback", "--socket-path", str(sock),
           "--queue-pairs", str(queue_pairs)]
    if cpus:
        cmd += ["--cpus", ",".join(map(str, cpus))]
    return _spawn_backend(cmd, sock, work, quiet=True), str(sock), work


def _cmd_bench_net(args: argparse.Namespace) -> int:
    backend = None
    socket_path = args.socket
    if socket_path is None and args.mode == "rxonly":
        print("vhostuser-rs bench: serve-net --loopback sends nothing by itself: rxonly needs --socket of a "
              "back-end that generates traffic (e.g. testpmd's net_vhost in txonly)", file=sys.stderr)
        return 2
    try:
        if socket_path is None:
            backend = _builtin_net_backend(args.queue_pairs, args.backend_cpus)
            socket_path = backend[1]
        doc = run_net_bench(
            socket_path, mode=args.mode, pktlen=args.pktlen, queue_pairs=args.queue_pairs, burst=args.burst,
            duration=args.time, poll_us=50.0 if args.poll_us is None else args.poll_us, cpus=args.cpus,
            packed=args.packed,
        )
        if backend is not None:
            doc["backend"] = "built-in serve-net --loopback"
    except (VhostUserError, OSError, ValueError, RuntimeError) as e:
        print(f"vhostuser-rs bench: {e}", file=sys.stderr)
        return 1
    finally:
        if backend is not None:
            proc, _, work = backend
            proc.terminate()
            try:
                proc.wait(10)
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
                proc.kill()
                proc.wait()
            work.cleanup()
    if args.json:
        print(json.dumps(doc))
    else:
        print(
            f"net {doc['mode']} pktlen={doc['pktlen']} burst={doc['burst']} queue_pairs={doc['queue_pairs']}: "
            f"{doc['mpps']:.2f} Mpps, {doc['gbit_s']:.2f} Gbit/s, CPU {doc['cpu_ns_per_frame']:.0f} ns/frame, "
            f"drops {doc['drops']}"
        )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.device == "net":
        return _cmd_bench_net(args)
    import time

    backend = None
    socket_path = args.socket
    fio_format = args.output_format in ("json", "json+")
    if args.json and args.output_format != "normal":
        print("vhostuser-rs bench: --json and --output-format are exclusive", file=sys.stderr)
        return 2
    if args.status_interval is not None and args.status_interval <= 0:
        print("vhostuser-rs bench: --status-interval must be > 0", file=sys.stderr)
        return 2
    if args.histogram_file is not None:
        # Checked before the run, not after it: a missing plotting library must not cost a run.
        import importlib

        try:
            importlib.import_module("matplotlib")
        except ImportError:
            print("vhostuser-rs bench: --histogram-file needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
    started = time.time()
    try:
        if socket_path is None:
            backend = _builtin_backend(args.queues, args.backend_cpus)
            socket_path = backend[1]
        doc = run_bench(
            socket_path, rw=args.rw, bs=_size(args.bs), iodepth=args.iodepth, queues=args.queues,
            duration=args.time, verify=args.verify,
            progress=not (args.json or fio_format) and args.status_interval is None and sys.stderr.isatty(),
            poll_us=args.poll_us, cpus=args.cpus,
            details=fio_format or args.histogram or args.histogram_file is not None,
            status_interval=args.status_interval, packed=args.packed,
        )
        if backend is not None:
            doc["backend"] = "built-in serve-blk on a temporary image"
    except (VhostUserError, OSError, ValueError) as e:
        print(f"vhostuser-rs bench: {e}", file=sys.stderr)
        return 1
    finally:
        if backend is not None:
            proc, _, work = backend
            proc.terminate()
            proc.wait()
            work.cleanup()
    per_queue = doc.pop("per_queue", [])
    if args.histogram_file is not None:
        from ._fio import histogram_image

        try:
            histogram_image(per_queue, args.histogram_file,
                            title=f"{doc['rw']} bs={doc['bs']} iodepth={doc['iodepth']} queues={doc['queues']}")
        except (OSError, ValueError) as e:
            print(f"vhostuser-rs bench: {args.histogram_file}: {e}", file=sys.stderr)
            return 1
    # The histogram goes to stderr when stdout carries JSON, so that the JSON stays parseable.
    histogram_out = sys.stderr if (args.json or fio_format) else sys.stdout
    if fio_format:
        from ._fio import fio_document

        print(json.dumps(fio_document(doc, per_queue, plus=args.output_format == "json+", started=started), indent=2))
    elif args.json:
        print(json.dumps(doc))
    else:
        print(
            f"{doc['rw']} bs={doc['bs']} iodepth={doc['iodepth']} queues={doc['queues']}: "
            f"{doc['iops']:,.0f} IOPS, {doc['mib_s']:.1f} MiB/s, "
            f"lat p50 {doc['p50_us']:.1f} us p99 {doc['p99_us']:.1f} us p99.9 {doc['p999_us']:.1f} us, "
            f"CPU {doc['cpu_us_per_io']:.2f} us/IO, handshake {doc['handshake_ms']:.1f} ms"
        )
        if doc["errors"] or doc["verify_failures"]:
            print(f"  errors {doc['errors']}, verify failures {doc['verify_failures']}")
    if args.histogram:
        from ._fio import text_histogram

        print(text_histogram(per_queue), end="", file=histogram_out)
    return 1 if doc["errors"] or doc["verify_failures"] else 0


def _sigterm_interrupts() -> None:
    """SIGTERM ends a serving command as Ctrl-C does (the spec's back-end program conventions)."""
    import signal

    def terminate(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)


def _poll_us(text: str) -> float | None:
    """`--poll-us`: microseconds, or ``adaptive`` (None)."""
    if text == "adaptive":
        return None
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("--poll-us must be >= 0 or 'adaptive'")
    return value


def _poll_seconds(poll_us: float | None) -> float | None:
    return None if poll_us is None else poll_us / 1e6


def _parse_export(text: str) -> tuple[str, str, bool]:
    """`--export IMAGE,SOCKET[,ro]`."""
    parts = text.split(",")
    if len(parts) not in (2, 3) or not all(parts[:2]) or (len(parts) == 3 and parts[2] != "ro"):
        raise argparse.ArgumentTypeError(f"--export wants IMAGE,SOCKET or IMAGE,SOCKET,ro, not {text!r}")
    return parts[0], parts[1], len(parts) == 3


def _serve_blk_exports(args: argparse.Namespace) -> int:
    from .devices import BlockDevice, serve_block_devices

    if args.image is not None or args.blk_file is not None or args.socket_path is not None or args.fd is not None:
        print("vhostuser-rs serve-blk: --export replaces IMAGE/--blk-file and --socket-path/--fd", file=sys.stderr)
        return 2

    _sigterm_interrupts()
    try:
        exports = [
            (BlockDevice(image, readonly=ro or args.read_only, num_queues=args.num_queues, io_engine=args.io_engine,
                         direct=args.direct), sock)
            for image, sock, ro in args.export
        ]
        serve_block_devices(exports, workers=args.workers or 2, cpus=args.cpus, poll=_poll_seconds(args.poll_us))
    except KeyboardInterrupt:
        return 0
    except (VhostUserError, OSError, ValueError) as e:
        print(f"vhostuser-rs serve-blk: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_serve_blk(args: argparse.Namespace) -> int:
    from .devices import BlockDevice

    if args.print_capabilities:
        # The spec's back-end program conventions: vhost-user.json's "block" capabilities name
        # options this command accepts (--read-only, --blk-file).
        print(json.dumps({"type": "block", "features": ["read-only", "blk-file"]}))
        return 0
    if args.export:
        return _serve_blk_exports(args)
    image = args.image if args.blk_file is None else args.blk_file
    if (args.image is None) == (args.blk_file is None) or (args.socket_path is None) == (args.fd is None):
        print("vhostuser-rs serve-blk: give the image (IMAGE or --blk-file PATH) and exactly one of "
              "--socket-path / --fd", file=sys.stderr)
        return 2

    _sigterm_interrupts()
    try:
        BlockDevice(image, readonly=args.read_only, num_queues=args.num_queues, io_engine=args.io_engine,
                    direct=args.direct).serve(
            args.socket_path, fd=args.fd, workers=args.workers, cpus=args.cpus, poll=_poll_seconds(args.poll_us)
        )
    except KeyboardInterrupt:
        return 0
    except (VhostUserError, OSError) as e:
        print(f"vhostuser-rs serve-blk: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_serve_net(args: argparse.Namespace) -> int:
    from .devices import LoopbackNet, TapNet

    if args.print_capabilities:
        # The spec's back-end program conventions: vhost-user.json defines no "net" features, so
        # the type is all there is to say.
        print(json.dumps({"type": "net"}))
        return 0
    if (args.tap is None) == (not args.loopback) or (args.socket_path is None) == (args.fd is None):
        print("vhostuser-rs serve-net: give exactly one of --tap NAME / --loopback and one of --socket-path / --fd",
              file=sys.stderr)
        return 2

    _sigterm_interrupts()
    device: LoopbackNet | TapNet
    try:
        if args.loopback:
            device = LoopbackNet(queue_pairs=args.queue_pairs, mac=args.mac, mtu=args.mtu)
        else:
            device = TapNet(args.tap, queue_pairs=args.queue_pairs, mac=args.mac, mtu=args.mtu,
                            offloads=not args.no_offloads)
    except (ValueError, OSError) as e:
        print(f"vhostuser-rs serve-net: {e}", file=sys.stderr)
        return 1
    code = 0
    try:
        device.serve(args.socket_path, fd=args.fd, workers=args.workers, cpus=args.cpus,
                     poll=_poll_seconds(args.poll_us))
    except KeyboardInterrupt:
        pass
    except (VhostUserError, OSError) as e:
        print(f"vhostuser-rs serve-net: {e}", file=sys.stderr)
        code = 1
    c = device.counters()
    print("serve-net: " + " ".join(f"{k}={v}" for k, v in c.items()), file=sys.stderr, flush=True)
    return code


def _cmd_proxy(args: argparse.Namespace) -> int:
    """Relay front-ends on --listen to the back-end on --connect, printing every message."""
    from .proxy import Proxy, ProxyRecord

    def show(record: ProxyRecord) -> None:
        print(record.json if args.json else record.text, flush=True)

    _sigterm_interrupts()
    try:
        with Proxy(listen=args.listen, connect=args.connect, inject=args.inject, connect_timeout=args.timeout,
                   io_timeout=args.timeout, once=args.once, callback=show, keep_records=False) as proxy:
            print(f"vhostuser-rs proxy: {args.listen} -> {args.connect}", file=sys.stderr, flush=True)
            while not proxy.wait(0.5):
                pass
    except KeyboardInterrupt:
        pass
    except ValueError as e:
        print(f"vhostuser-rs proxy: {e}", file=sys.stderr)
        return 2
    except (VhostUserError, OSError) as e:
        print(f"vhostuser-rs proxy: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """``serve MODULE:CLASS [ARGS...]`` (see ``_serve``). Exit status: 0 when ended by
    SIGTERM/SIGINT or when the front-end of a connected ``--fd`` hangs up; 1 when the module
    fails to import, the class to build or the socket to serve; 2 for a wrong command line."""
    from . import _serve
    from .backend import Backend

    def fail(code: int, text: str) -> int:
        print(f"vhostuser-rs serve: {text}", file=sys.stderr)
        return code

    try:
        cls = _serve.load_class(args.target)
        if args.print_capabilities:
            # The spec: print the JSON and exit successfully, ignoring the other options.
            print(json.dumps(_serve.capabilities(cls)))
            return 0
        if (args.socket_path is None) == (args.fd is None):
            return fail(2, "give exactly one of --socket-path PATH / --fd N")
        given = {
            feature: getattr(args, feature.replace("-", "_"))
            for options in _serve.SPEC_OPTIONS.values()
            for feature, takes_value in options.items()
            if getattr(args, feature.replace("-", "_")) not in (None, False)
        }
        options = _serve.spec_options(cls, given)
        _sigterm_interrupts()
        device = _serve.build(cls, args.args, options)
    except _serve.UsageError as e:
        return fail(2, str(e))
    except _serve.LoadError as e:
        return fail(1, str(e))
    except KeyboardInterrupt:
        return 0
    try:
        backend = Backend(device, socket_path=args.socket_path, fd=args.fd, workers=args.workers, cpus=args.cpus,
                          poll=_poll_seconds(args.poll_us))
    except (VhostUserError, OSError, ValueError) as e:
        return fail(1, str(e))
    except KeyboardInterrupt:
        return 0

    def terminate(_sig: int, _frame: object) -> None:
        # The stop flag ends serving within 200 ms even if the KeyboardInterrupt lands in Python
        # code that swallows it (a logging handler, the device's own code on the main thread).
        backend.stop()
        raise KeyboardInterrupt

    import signal

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    try:
        backend.serve_forever()
    except KeyboardInterrupt:
        pass
    except (VhostUserError, OSError, ValueError) as e:
        return fail(1, str(e))
    finally:
        backend.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="vhostuser-rs", description="vhost-user tools (front-end and back-end).")
    parser.add_argument("--version", action="version", version=f"vhostuser-rs {_native.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("decode", help="decode a captured message given in hex")
    p.add_argument("hex", nargs="+", help="header + payload bytes in hex (spaces and colons allowed)")
    p.add_argument("--channel", choices=("main", "backend"), default="main", help="channel it travelled on")
    p.add_argument("--fds", type=int, default=0, help="number of fds that came with it")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_decode)

    p = sub.add_parser("requests", help="list the requests of the spec, their rules and what our back-end does")
    p.add_argument("--channel", choices=("main", "backend"), default="main")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_requests)

    p = sub.add_parser("probe", help="connect as a front-end and print what a back-end offers")
    p.add_argument("socket", help="the back-end's Unix socket")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the back-end")
    p.add_argument("--device", choices=("blk", "none"), default="blk", help="decode the config space as")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("bench", help="fio-like block benchmark (or --device net: a packet generator) against a "
                       "vhost-user back-end")
    p.add_argument("--socket", help="the back-end's Unix socket (default: start the built-in one)")
    p.add_argument("--device", choices=("blk", "net"), default="blk",
                   help="blk: I/O loop on a virtio-blk device; net: burst loop on a virtio-net device")
    p.add_argument("--rw", choices=("randread", "randwrite", "read", "write", "rw"), default="randread")
    p.add_argument("--bs", default="4k", help="block size (e.g. 512, 4k, 64k)")
    p.add_argument("--iodepth", type=int, default=32)
    p.add_argument("--queues", type=int, default=1)
    p.add_argument("--time", type=float, default=10.0, help="seconds")
    p.add_argument("--verify", action="store_true", help="stamp the device, then check every read")
    p.add_argument("--poll-us", type=float, default=None,
                   help="hybrid polling: yield and re-check the used ring this long before sleeping on the call "
                   "eventfd (default: blk 50 at iodepth <= 4 or while the device polls its ring, else 0; net 50)")
    p.add_argument("--cpus", type=_cpu_list, help="pin the I/O threads to these CPUs (e.g. 0 or 0,1 or 0-3)")
    p.add_argument("--packed", action="store_true",
                   help="drive packed rings (VIRTIO_F_RING_PACKED); fails if the back-end does not offer them")
    net = p.add_argument_group("--device net")
    net.add_argument("--mode", choices=("txonly", "rxonly", "loopback"), default="txonly",
                     help="send only, receive only, or send and count what comes back")
    net.add_argument("--pktlen", type=int, default=64, help="frame length in bytes (Ethernet header onwards, no CRC)")
    net.add_argument("--queue-pairs", type=int, default=1, help="queue pairs, one thread each")
    net.add_argument("--burst", type=int, default=32, help="frames per send / most frames per receive")
    p.add_argument("--backend-cpus", type=_cpu_list,
                   help="pin the built-in back-end started without --socket to these CPUs")
    p.add_argument("--json", action="store_true", help="print this tool's JSON summary")
    report = p.add_argument_group("reporting (--device blk)")
    report.add_argument("--output-format", choices=("normal", "json", "json+"), default="normal",
                        help="normal: the summary line; json: fio's JSON layout (one job per queue: read/write with "
                             "io_bytes, bw in KiB/s, iops, runtime in ms, clat_ns with percentiles, usr_cpu/sys_cpu...); "
                             "json+: also the clat_ns histogram bins, as fio's json+")
    report.add_argument("--status-interval", type=float, metavar="SECONDS",
                        help="print a status line (the interval's IOPS and bandwidth per direction) to stderr every "
                             "SECONDS during the run")
    report.add_argument("--histogram", action="store_true",
                        help="print the latency histogram as text (stdout, or stderr with JSON output)")
    report.add_argument("--histogram-file", metavar="PATH",
                        help="draw the latency histogram into PATH (.png, .svg, .pdf: needs matplotlib)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("serve-blk", help="serve a disk image with the built-in virtio-blk back-end")
    p.add_argument("image", nargs="?", help="raw image file or block device (or --blk-file)")
    p.add_argument("--blk-file", metavar="PATH", help="the image, as the spec's back-end conventions name it")
    p.add_argument("--export", metavar="IMAGE,SOCKET[,ro]", action="append", type=_parse_export,
                   help="serve this image on this socket; repeat to serve many devices from one process, their "
                        "rings on --workers shared threads (default 2)")
    p.add_argument("--socket-path", help="listen on this Unix socket")
    p.add_argument("--fd", type=int, help="serve the connected socket inherited as this fd")
    p.add_argument("--num-queues", type=int, default=1)
    p.add_argument("--read-only", action="store_true", help="offer VIRTIO_BLK_F_RO and refuse writes")
    p.add_argument("--io-engine", choices=("auto", "uring", "sync"), default="auto",
                   help="io_uring with batched submission, or preadv/pwritev (auto: io_uring with --direct or a "
                        "block device, preadv/pwritev for a buffered image file)")
    p.add_argument("--direct", action="store_true", help="open the image with O_DIRECT (no host page cache)")
    p.add_argument("--workers", type=int, help="worker threads shared by the rings (default: one per ring)")
    p.add_argument("--cpus", type=_cpu_list, help="pin worker thread t to the t-th of these CPUs (e.g. 0 or 0-3)")
    p.add_argument("--poll-us", type=_poll_us, default=None,
                   help="after work, keep checking the rings this long before sleeping on the kicks (0: eventfd mode; "
                        "default 'adaptive': up to 50 us, growing while requests come soon after a sleep, shrinking "
                        "to nothing when idle)")
    p.add_argument("--print-capabilities", action="store_true", help="print the capabilities JSON and exit")
    p.set_defaults(func=_cmd_serve_blk)

    p = sub.add_parser("serve-net", help="serve a virtio-net port: a TAP bridge or a loopback")
    p.add_argument("--socket-path", help="listen on this Unix socket")
    p.add_argument("--fd", type=int, help="serve the connected socket inherited as this fd")
    p.add_argument("--tap", metavar="NAME", help="bridge to TAP NAME (created if absent)")
    p.add_argument("--loopback", action="store_true", help="send every transmitted frame back, MACs swapped")
    p.add_argument("--queue-pairs", type=int, default=1)
    p.add_argument("--mtu", type=int, help="offer this MTU (VIRTIO_NET_F_MTU)")
    p.add_argument("--mac", help="offer this MAC address (default 52:54:00:12:34:56)")
    p.add_argument("--no-offloads", action="store_true",
                   help="TAP: do not offer checksum/TSO offloads (the guest then sends complete frames)")
    p.add_argument("--workers", type=int, help="worker threads shared by the queue pairs (default: one per pair)")
    p.add_argument("--cpus", type=_cpu_list, help="pin worker thread t to the t-th of these CPUs (e.g. 0 or 0-3)")
    p.add_argument("--poll-us", type=_poll_us, default=0.0,
                   help="after work, keep checking the rings this long before sleeping on the kicks (0, the default: "
                        "eventfd mode; 'adaptive': up to 50 us, following the load)")
    p.add_argument("--print-capabilities", action="store_true", help="print the capabilities JSON and exit")
    p.set_defaults(func=_cmd_serve_net)

    p = sub.add_parser("proxy", help="relay a front-end to a back-end and trace every message (man in the middle)",
                       description="Listen on --listen; for each front-end that connects, connect to the back-end on "
                       "--connect and relay every message both ways with its fds (the back-end request channel too), "
                       "printing each one decoded. Messages are relayed unchanged unless --inject says otherwise. "
                       "Runs until Ctrl-C/SIGTERM (or, with --once, until the first session ends).",
                       epilog="--inject RULE: ACTION:MESSAGE[:ARG][@N] with ACTION drop, delay (ARG: 200ms, 1.5s) or "
                       "corrupt (ARG: flags (default), size, fds, byte=OFFSET); MESSAGE a request name as the spec "
                       "spells it (back-end requests BACKEND_...), with .reply for its reply; @N only the N-th "
                       "occurrence over the proxy's lifetime. E.g. drop:GET_FEATURES.reply@1, "
                       "delay:SET_MEM_TABLE:200ms, corrupt:SET_VRING_ADDR.")
    p.add_argument("--listen", required=True, metavar="PATH", help="socket the front-end connects to")
    p.add_argument("--connect", required=True, metavar="PATH", help="the back-end's socket")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--inject", action="append", default=[], metavar="RULE",
                   help="drop, delay or corrupt a message (repeatable; syntax below)")
    p.add_argument("--once", action="store_true", help="exit when the first session ends")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to reach the back-end, and for one message to be read or written")
    p.set_defaults(func=_cmd_proxy)

    p = sub.add_parser(
        "serve", help="serve a Python device class (MODULE:CLASS) with the spec's back-end program conventions",
        description="Serve a vhostuser_rs.Device or vhostuser_rs.NetDevice subclass. MODULE is an importable module "
        "or a path to a .py file. ARGS are NAME=VALUE keyword arguments of the class (VALUE a Python literal, else a "
        "string), or, if the class defines a from_args(argv) classmethod, its own command line (after --). Exit "
        "status: 0 after SIGTERM/SIGINT (or when the front-end of a connected --fd leaves), 1 if the class fails to "
        "import or build or the socket to serve, 2 for a wrong command line.",
    )
    p.add_argument("target", metavar="MODULE:CLASS", help="e.g. mydevices:RamDisk or ./ramdisk.py:RamDisk")
    p.add_argument("args", nargs="*", metavar="ARGS", help="NAME=VALUE ... (or the class's from_args command line)")
    p.add_argument("--socket-path", help="listen on this Unix socket")
    p.add_argument("--fd", type=int, help="serve the inherited socket N: connected (that one front-end) or listening")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the capabilities JSON (vhost-user.json) derived from the class and exit")
    p.add_argument("--workers", type=int, help="worker threads shared by the rings (default: one per ring)")
    p.add_argument("--cpus", type=_cpu_list, help="pin worker thread t to the t-th of these CPUs (e.g. 0 or 0-3)")
    p.add_argument("--poll-us", type=_poll_us, default=0.0,
                   help="after work, keep checking the rings this long before sleeping on the kicks (0, the default: "
                        "eventfd mode; 'adaptive': up to 50 us, following the load)")
    spec = p.add_argument_group("the spec's per-type options (passed to the class as keyword arguments; "
                                "--print-capabilities lists those it takes)")
    spec.add_argument("--read-only", action="store_true", help="block: read_only=True")
    spec.add_argument("--blk-file", metavar="PATH", help="block: blk_file=PATH")
    spec.add_argument("--evdev-path", metavar="PATH", help="input: evdev_path=PATH")
    spec.add_argument("--no-grab", action="store_true", help="input: no_grab=True")
    spec.add_argument("--render-node", metavar="PATH", help="gpu: render_node=PATH")
    spec.add_argument("--virgl", action="store_true", help="gpu: virgl=True")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("features", help="name the bits of a feature mask")
    p.add_argument("value", help="mask, e.g. 0x175007e46")
    p.add_argument("--protocol", action="store_true", help="protocol features instead of virtio features")
    p.set_defaults(func=_cmd_features)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vhostuser-rs`` and ``python -m vhostuser_rs``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] = []
    if argv[:1] == ["serve"] and "--" in argv:
        # Everything after `--` is the class's ARGS (argparse would not give them to the ARGS
        # positional once it matched the arguments before the options).
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if tail:
        args.args = [*args.args, *tail]
    try:
        result: int = args.func(args)
    except BrokenPipeError:
        # Output piped into `head` and friends: not an error of ours.
        sys.stderr.close()
        return 0
    return result
