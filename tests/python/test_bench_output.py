"""``vhostuser-rs bench`` reporting: fio's JSON layout (checked key by key against real fio 3.33
output, and read by fio's own ``fio_jsonplus_clat2csv`` and by ``jq``), ``--status-interval``
lines, the latency histogram as text and as an image."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peers import need

CLI = [sys.executable, "-m", "vhostuser_rs", "bench"]
FIO_SAMPLES = Path(__file__).parent / "fio"


def keys(doc: Any, path: str = "") -> set[str]:
    """Every key path of a JSON document (list items as ``[]``). The contents of ``bins`` and
    ``job options`` (data and the options given) and of ``disk_util`` (the host disks fio's file
    was on; a vhost-user device has none, and fio's list is empty too on a filesystem without a
    block device) are not layout: only their presence counts."""
    out: set[str] = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            p = f"{path}.{k}"
            out.add(p)
            if k in ("bins", "job options", "disk_util"):
                continue
            out |= keys(v, p)
    elif isinstance(doc, list):
        for v in doc:
            out |= keys(v, f"{path}[]")
    return out


def types(doc: Any, path: str = "") -> dict[str, type]:
    """The JSON type of the value at each key path (int and float kept apart, as fio's are)."""
    out: dict[str, type] = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            p = f"{path}.{k}"
            out[p] = type(v)
            if k not in ("bins", "job options", "percentile", "disk_util"):
                out.update(types(v, p))
    elif isinstance(doc, list):
        for v in doc:
            out.update(types(v, f"{path}[]"))
    return out


def bench(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "--time", "1.5", *argv], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def randrw_json() -> dict[str, Any]:
    r = bench("--rw", "rw", "--iodepth", "8", "--output-format", "json")
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


@pytest.fixture(scope="module")
def randread_json_plus() -> dict[str, Any]:
    r = bench("--rw", "randread", "--iodepth", "4", "--queues", "2", "--output-format", "json+")
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def test_json_has_fio_layout(randrw_json: dict[str, Any]) -> None:
    fio = json.loads((FIO_SAMPLES / "fio-3.33-randrw.json").read_text())
    assert keys(randrw_json) == keys(fio)
    fio_types, our_types = types(fio), types(randrw_json)
    # Same JSON types where fio's are, except where fio's own type depends on the value
    # (fio prints a whole-number double like bw_mean 24192.0 as a float, and so do we).
    mismatched = {p: (fio_types[p], our_types[p]) for p in fio_types if fio_types[p] is not our_types[p]}
    assert not mismatched, mismatched
    # fio's default percentile list, with fio's key spelling.
    fio_pct = fio["jobs"][0]["read"]["clat_ns"]["percentile"]
    assert list(randrw_json["jobs"][0]["read"]["clat_ns"]["percentile"]) == list(fio_pct)


def test_json_plus_has_fio_layout_and_bins(randread_json_plus: dict[str, Any]) -> None:
    fio = json.loads((FIO_SAMPLES / "fio-3.33-randread-jsonplus.json").read_text())
    ours = randread_json_plus
    # The fio sample ran one job doing reads only; ours are two jobs (queues) of reads.
    assert keys(ours) == keys(fio)
    assert len(ours["jobs"]) == 2
    for job in ours["jobs"]:
        clat = job["read"]["clat_ns"]
        assert sum(clat["bins"].values()) == clat["N"] == job["read"]["total_ios"] > 0
        assert "bins" not in job["write"]["clat_ns"]  # no writes: no histogram, as fio


def test_json_values_are_consistent(randrw_json: dict[str, Any]) -> None:
    job = randrw_json["jobs"][0]
    assert randrw_json["fio version"].startswith("vhostuser-rs-")
    assert job["job options"]["rw"] == "rw" and job["job options"]["iodepth"] == "8"
    for d in ("read", "write"):
        s = job[d]
        assert s["total_ios"] > 0, d  # rw mixes both directions
        assert s["io_bytes"] == s["total_ios"] * 4096
        assert s["bw"] == s["bw_bytes"] // 1024
        assert s["runtime"] == job["job_runtime"] > 1000
        assert s["iops"] == pytest.approx(s["total_ios"] / (s["runtime"] / 1000), rel=1e-3)
        c = s["clat_ns"]
        p = c["percentile"]
        assert c["min"] <= p["1.000000"] <= p["50.000000"] <= p["99.000000"] <= p["99.990000"] <= c["max"]
        assert c["min"] <= c["mean"] <= c["max"] and c["N"] == s["total_ios"]
        assert s["lat_ns"]["N"] == c["N"]
        assert s["iops_samples"] >= 1 and s["iops_min"] <= s["iops_mean"] <= s["iops_max"]
        assert s["bw_agg"] == pytest.approx(100.0)  # one job: all of its group's bandwidth
    assert 0 < job["usr_cpu"] + job["sys_cpu"] <= 100.5  # one thread's share of its run time
    assert job["iodepth_level"]["8"] == 100.0
    total = sum(job["latency_ns"].values()) + sum(job["latency_us"].values()) + sum(job["latency_ms"].values())
    assert total == pytest.approx(100.0)


def test_jq_reads_it(randrw_json: dict[str, Any], tmp_path: Path) -> None:
    jq = need(shutil.which("jq"), "jq")
    out = tmp_path / "bench.json"
    out.write_text(json.dumps(randrw_json))
    r = subprocess.run([jq, ".jobs[0].read.iops", str(out)], capture_output=True, text=True, check=True)
    assert float(r.stdout) == randrw_json["jobs"][0]["read"]["iops"] > 0


def test_fio_jsonplus_clat2csv_reads_it(randread_json_plus: dict[str, Any], tmp_path: Path) -> None:
    """fio's own json+ tool turns our bins into its CSV, and its --validate mode agrees."""
    tool = need(shutil.which("fio_jsonplus_clat2csv"), "fio_jsonplus_clat2csv (package fio)")
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(randread_json_plus))
    dest = tmp_path / "clat.csv"
    subprocess.run([sys.executable, tool, str(src), str(dest)], check=True, capture_output=True, timeout=60)
    csvs = sorted(tmp_path.glob("clat_job*.csv"))
    assert len(csvs) == 2, list(tmp_path.iterdir())
    rows = csvs[0].read_text().splitlines()
    assert rows[0].startswith("nsec, read_slat_ns_count")
    counted = sum(int(r.split(",")[4]) for r in rows[1:] if r.split(",")[4].strip())
    assert counted == randread_json_plus["jobs"][0]["read"]["clat_ns"]["N"]
    r = subprocess.run([sys.executable, tool, str(src), str(dest), "--validate"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_live_fio_has_the_same_layout(tmp_path: Path, randrw_json: dict[str, Any]) -> None:
    """The stored sample is fio 3.33's; the installed fio, whatever its version, agrees."""
    fio = need(shutil.which("fio"), "fio")
    r = subprocess.run(
        [fio, "--name=probe", f"--filename={tmp_path / 'f'}", "--size=4M", "--rw=randrw", "--bs=4k",
         "--ioengine=psync", "--runtime=0.3", "--time_based", "--output-format=json"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    live = json.loads(r.stdout[r.stdout.index("{"):])
    missing = keys(live) - keys(randrw_json)
    assert not missing, sorted(missing)


def test_status_interval_lines_keep_stdout_json() -> None:
    r = bench("--rw", "randread", "--iodepth", "4", "--status-interval", "0.3", "--output-format", "json")
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)  # the status lines went to stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("[")]
    assert 3 <= len(lines) <= 6, r.stderr
    assert all("read: IOPS=" in line and "write" not in line for line in lines), lines
    # After the first interval requests were completing: a rate above zero.
    assert any(not line.split("IOPS=")[1].startswith("0,") and not line.split("IOPS=")[1].startswith("0 ")
               for line in lines[1:])


def test_text_histogram_counts_every_request() -> None:
    r = bench("--rw", "randwrite", "--iodepth", "2", "--histogram", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert "per_queue" not in doc  # the summary JSON keeps its keys
    rows = [line for line in r.stderr.splitlines() if line.startswith("  [")]
    assert rows, r.stderr
    assert sum(int(row.split(")")[1].split()[0]) for row in rows) == doc["ios"]
    assert float(rows[-1].split("%")[1].strip()) == pytest.approx(100.0)


def test_histogram_file_without_matplotlib_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "site"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(fake)}
    r = subprocess.run([*CLI, "--time", "0.2", "--histogram-file", str(tmp_path / "h.png")], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 2
    assert "needs matplotlib" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "h.png").exists()


def test_histogram_file_draws_an_image(tmp_path: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        need(None, "matplotlib")
    out = tmp_path / "h.png"
    r = bench("--rw", "rw", "--iodepth", "4", "--histogram-file", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_output_format_and_json_are_exclusive() -> None:
    r = subprocess.run([*CLI, "--json", "--output-format", "json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "exclusive" in r.stderr
