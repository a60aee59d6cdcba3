from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import vhostuser_rs


def test_version_has_one_source() -> None:
    assert vhostuser_rs.__version__ == importlib.metadata.version("vhostuser-rs")


def test_public_api_is_exported() -> None:
    for name in vhostuser_rs.__all__:
        assert hasattr(vhostuser_rs, name), name
    assert vhostuser_rs.Connection.__module__ == "vhostuser_rs"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostuser_rs", *args], capture_output=True, text=True, timeout=60)


def test_cli_decodes_a_captured_reply() -> None:
    out = run_cli("decode", "01000000 05000000 08000000 467e0075 01000000")
    assert out.returncode == 0, out.stderr
    assert "GET_FEATURES reply" in out.stdout
    assert "0x175007e46" in out.stdout
    assert "VERSION_1" in out.stdout and "PROTOCOL_FEATURES" in out.stdout


def test_cli_decode_reports_malformed_input() -> None:
    # GET_FEATURES request with a 4-byte payload: the request has none.
    out = run_cli("decode", "010000000100000004000000deadbeef")
    assert out.returncode == 1
    assert "GET_FEATURES" in out.stderr and "payload is 4 bytes" in out.stderr
    assert run_cli("decode", "zz").returncode == 2


def test_cli_decode_json_and_requests_table() -> None:
    import json

    out = run_cli("decode", "--json", "0f00000005000000080000002b8f000000000000")
    doc = json.loads(out.stdout)
    assert doc["request"] == "GET_PROTOCOL_FEATURES" and doc["payload"] == 0x8F2B and doc["is_reply"]
    rows = json.loads(run_cli("requests", "--json").stdout)
    assert len(rows) == 45 and rows[4]["name"] == "SET_MEM_TABLE" and rows[4]["fds"] == "one per region"
    rows = json.loads(run_cli("requests", "--channel", "backend", "--json").stdout)
    assert [r["name"] for r in rows][-1] == "SHMEM_UNMAP"
    out = run_cli("features", "--protocol", "0x8f2b")
    assert "REPLY_ACK" in out.stdout and "CONFIGURE_MEM_SLOTS" in out.stdout


def test_cli_bench_starts_the_builtin_backend_by_itself() -> None:
    """The README's main job: `vhostuser-rs bench` with nothing else installed."""
    import json

    out = run_cli("bench", "--time", "0.5", "--iodepth", "8", "--verify", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["backend"].startswith("built-in") and doc["ios"] > 100
    assert doc["errors"] == 0 and doc["verify_failures"] == 0
