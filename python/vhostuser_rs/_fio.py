"""``vhostuser-rs bench`` results in fio's JSON layout (``--output-format json`` / ``json+``), so
that tools written for fio read them: ``jq '.jobs[0].read.iops'``, fio's own
``fio_jsonplus_clat2csv`` (json+), fio-plot and the like. One job per queue (as fio's
``numjobs``), each with fio's keys: ``read``/``write``/``trim`` with ``io_bytes``, ``bw`` (KiB/s),
``iops``, ``runtime`` (ms), ``clat_ns`` (``min``/``max``/``mean``/``stddev``/``N``/``percentile``,
and ``bins`` with json+), ``lat_ns``, bandwidth and IOPS samples per second; ``usr_cpu`` /
``sys_cpu`` (percent of the job's run time, of the thread that ran its I/O loop), the
latency distribution ``latency_ns``/``_us``/``_ms``...

What vhostuser-rs does not measure is present with fio's zero values: ``slat_ns`` (submission
and completion are one loop, so ``lat_ns`` equals ``clat_ns``), ``trim`` and ``sync``,
``iodepth_submit``/``iodepth_complete``, ``disk_util``. Percentiles are exact (nearest rank over
every request's latency), where fio reports its histogram buckets' values; ``bins`` are fio's
buckets (64 per power of two).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from . import _native

#: fio's latency distribution thresholds (``latency_ns`` / ``latency_us`` / ``latency_ms``).
_LAT_STEPS = (2, 4, 10, 20, 50, 100, 250, 500, 750, 1000)


def _empty_lat() -> dict[str, Any]:
    return {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0}


def _samples(values: Sequence[float]) -> tuple[float, float, float, float, int]:
    """min, max, mean, sample stddev, count of per-second samples."""
    if not values:
        return 0, 0, 0.0, 0.0, 0
    n = len(values)
    mean = sum(values) / n
    dev = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return min(values), max(values), mean, dev, n


def _direction(stats: dict[str, Any], per_second: Sequence[int], bs: int, runtime_ms: int, group_bw: int,
               *, plus: bool) -> dict[str, Any]:
    ios = int(stats["ios"])
    io_bytes = ios * bs
    seconds = runtime_ms / 1000 if ios else 0.0
    bw_bytes = int(io_bytes / seconds) if seconds else 0
    clat: dict[str, Any] = _empty_lat()
    if ios:
        clat = {
            "min": int(stats["min_ns"]), "max": int(stats["max_ns"]), "mean": float(stats["mean_ns"]),
            "stddev": float(stats["stddev_ns"]), "N": ios,
            "percentile": {f"{p:.6f}": int(v) for p, v in stats["percentiles"]},
        }
        if plus:
            clat["bins"] = {str(value): count for value, _low, _high, count in stats["bins"]}
    lat = {k: clat[k] for k in ("min", "max", "mean", "stddev", "N")}
    iops_samples = [float(v) for v in per_second] if ios else []
    bw_samples = [v * bs / 1024 for v in iops_samples]
    bw_min, bw_max, bw_mean, bw_dev, n_bw = _samples(bw_samples)
    iops_min, iops_max, iops_mean, iops_dev, n_iops = _samples(iops_samples)
    return {
        "io_bytes": io_bytes,
        "io_kbytes": io_bytes // 1024,
        "bw_bytes": bw_bytes,
        "bw": bw_bytes // 1024,
        "iops": ios / seconds if seconds else 0.0,
        "runtime": runtime_ms if ios else 0,
        "total_ios": ios,
        "short_ios": 0,
        "drop_ios": 0,
        "slat_ns": _empty_lat(),
        "clat_ns": clat,
        "lat_ns": lat,
        "bw_min": int(bw_min),
        "bw_max": int(bw_max),
        "bw_agg": 100.0 * (bw_bytes // 1024) / group_bw if group_bw else 0.0,
        "bw_mean": bw_mean,
        "bw_dev": bw_dev,
        "bw_samples": n_bw,
        "iops_min": int(iops_min),
        "iops_max": int(iops_max),
        "iops_mean": iops_mean,
        "iops_stddev": iops_dev,
        "iops_samples": n_iops,
    }


def _latency_distribution(stats: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """fio's ``latency_ns`` / ``latency_us`` / ``latency_ms``: percent of the requests whose
    latency falls below each threshold (and at or above the previous one), from the histogram."""
    total = sum(int(s["ios"]) for s in stats)
    tables = {
        "latency_ns": dict.fromkeys(map(str, _LAT_STEPS), 0.0),
        "latency_us": dict.fromkeys(map(str, _LAT_STEPS), 0.0),
        "latency_ms": {**dict.fromkeys(map(str, (*_LAT_STEPS, 2000)), 0.0), ">=2000": 0.0},
    }
    if not total:
        return tables
    for s in stats:
        for _value, low, _high, count in s["bins"]:
            if low < 1000:
                table, v = tables["latency_ns"], low
            elif low < 1_000_000:
                table, v = tables["latency_us"], low // 1000
            else:
                table, v = tables["latency_ms"], low // 1_000_000
            key = next((str(t) for t in (*_LAT_STEPS, 2000) if v < t and str(t) in table), ">=2000")
            table[key] += 100.0 * count / total
    return tables


def _depth_level(iodepth: int) -> dict[str, float]:
    keys = ("1", "2", "4", "8", "16", "32", ">=64")
    limits = (1, 2, 4, 8, 16, 32, 64)
    level = dict.fromkeys(keys, 0.0)
    chosen = max(i for i, limit in enumerate(limits) if iodepth >= limit)
    level[keys[chosen]] = 100.0
    return level


def fio_document(doc: dict[str, Any], per_queue: Sequence[dict[str, Any]], *, name: str = "vhostuser-rs",
                 plus: bool = False, started: float | None = None) -> dict[str, Any]:
    """The fio JSON document of a ``run_bench(..., details=True)`` result: `doc` is its
    summary, `per_queue` the run of each queue (``BlockClient.run_io``'s result plus the
    thread's ``rusage``: user and system seconds, context switches, major and minor faults)."""
    started = time.time() if started is None else started
    bs, iodepth = int(doc["bs"]), int(doc["iodepth"])
    runtimes = [max(1, round(q["elapsed"] * 1000)) for q in per_queue]
    group_bw = {
        d: sum(int(q[d]["ios"]) * bs * 1000 // rt // 1024 for q, rt in zip(per_queue, runtimes))
        for d in ("read", "write")
    }
    jobs = []
    for q, runtime_ms in zip(per_queue, runtimes):
        writes_per_second = q.get("per_second_writes") or [0] * len(q["per_second"])
        per_second = {
            "read": [a - b for a, b in zip(q["per_second"], writes_per_second)],
            "write": list(writes_per_second),
        }
        utime, stime, ctx, majf, minf = q["rusage"]
        seconds = q["elapsed"] or 1.0
        job = {
            "jobname": name,
            "groupid": 0,
            "error": 5 if q["errors"] else 0,  # fio reports the first error's errno: EIO
            "eta": 0,
            "elapsed": max(1, round(q["elapsed"])),
            "job options": {
                "name": name,
                "filename": str(doc["socket"]),
                "rw": str(doc["rw"]),
                "bs": str(bs),
                "iodepth": str(iodepth),
                "ioengine": "vhostuser-rs",
            },
            "read": _direction(q["read"], per_second["read"], bs, runtime_ms, group_bw["read"], plus=plus),
            "write": _direction(q["write"], per_second["write"], bs, runtime_ms, group_bw["write"], plus=plus),
            "trim": _direction({"ios": 0}, [], bs, runtime_ms, 0, plus=False),
            "sync": {"total_ios": 0, "lat_ns": _empty_lat()},
            "job_runtime": runtime_ms,
            "usr_cpu": 100.0 * utime / seconds,
            "sys_cpu": 100.0 * stime / seconds,
            "ctx": int(ctx),
            "majf": int(majf),
            "minf": int(minf),
            "iodepth_level": _depth_level(iodepth),
            "iodepth_submit": dict.fromkeys(("0", "4", "8", "16", "32", "64", ">=64"), 0.0),
            "iodepth_complete": dict.fromkeys(("0", "4", "8", "16", "32", "64", ">=64"), 0.0),
            **_latency_distribution([q["read"], q["write"]]),
            "latency_depth": iodepth,
            "latency_target": 0,
            "latency_percentile": 100.0,
            "latency_window": 0,
        }
        jobs.append(job)
    return {
        "fio version": f"vhostuser-rs-{_native.__version__}",
        "timestamp": int(started),
        "timestamp_ms": int(started * 1000),
        "time": time.ctime(started),
        "jobs": jobs,
        "disk_util": [],
    }


def text_histogram(per_queue: Sequence[dict[str, Any]], *, width: int = 50) -> str:
    """The latency histogram of every request of the run as text: one row per power of two
    (fio's 64 buckets of each merged), with its share and a bar."""
    rows: dict[int, int] = {}
    total = 0
    for q in per_queue:
        for d in ("read", "write"):
            for _value, low, _high, count in q[d]["bins"]:
                rows[max(low, 1).bit_length() - 1] = rows.get(max(low, 1).bit_length() - 1, 0) + count
                total += count
    if not total:
        return "latency histogram: no requests completed\n"
    peak = max(rows.values())

    def fmt(ns: int) -> str:
        for unit, scale in (("s", 10**9), ("ms", 10**6), ("us", 10**3)):
            if ns >= scale:
                return f"{ns / scale:.3g} {unit}"
        return f"{ns} ns"

    lines = [f"latency histogram ({total} requests, from just before submission to completion):"]
    cumulative = 0
    for k in range(min(rows), max(rows) + 1):
        count = rows.get(k, 0)
        cumulative += count
        bar = "#" * round(width * count / peak)
        lines.append(f"  [{fmt(1 << k):>8}, {fmt(1 << (k + 1)):>8})  {count:>10}  {100 * count / total:6.2f}%  "
                     f"{100 * cumulative / total:7.3f}%  {bar}")
    return "\n".join(lines) + "\n"


def histogram_image(per_queue: Sequence[dict[str, Any]], path: str, *, title: str) -> None:
    """The latency histogram as an image (PNG, SVG... by the file name) with matplotlib: fio's
    buckets on a logarithmic latency axis, reads and writes apart. Raises ImportError without
    matplotlib."""
    import importlib

    # Imported by name: matplotlib is optional and may be absent where the types are checked.
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for d in ("read", "write"):
        bins = [b for q in per_queue for b in q[d]["bins"]]
        if not bins:
            continue
        merged: dict[tuple[int, int], int] = {}
        for _value, low, high, count in bins:
            merged[(low, high)] = merged.get((low, high), 0) + count
        edges = sorted(merged)
        ax.bar([lo / 1000 for lo, _ in edges], [merged[e] for e in edges],
               width=[(hi - lo) / 1000 for lo, hi in edges], align="edge", label=d, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("latency (µs, submission to completion)")
    ax.set_ylabel("requests")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
