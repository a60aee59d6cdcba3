"""Logging: every logger of the package lives under ``vhostuser_rs.*`` and the request trace is
the logger ``vhostuser_rs.trace`` (the front-end's its child ``vhostuser_rs.trace.frontend``),
enabled with Python's ``logging`` alone (no environment variable)."""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import vhostuser_rs as vu
from vhostuser_rs.blk import BlockClient

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "python" / "vhostuser_rs"
RAM_BLOCK = Path(__file__).parent / "devices" / "ram_block.py"


def test_python_modules_log_under_their_module_name() -> None:
    """``logging.getLogger(__name__)`` (or a literal ``vhostuser_rs.`` name) everywhere."""
    calls = 0
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "getLogger":
                calls += 1
                assert len(node.args) == 1, f"{path.name}:{node.lineno}: getLogger() without a name (the root logger)"
                arg = node.args[0]
                ok = (isinstance(arg, ast.Name) and arg.id == "__name__") or (
                    isinstance(arg, ast.Constant) and str(arg.value).startswith("vhostuser_rs.")
                )
                assert ok, f"{path.name}:{node.lineno}: logger outside vhostuser_rs.*"
    assert calls >= 3


def test_rust_log_targets_are_under_the_crate() -> None:
    """Explicit `log` targets start with ``vhostuser_rs::`` (pyo3-log maps them to logger names);
    records without a target use the module path, which starts with the crate name."""
    targets = 0
    for path in sorted((ROOT / "src").rglob("*.rs")):
        for m in re.finditer(r'target:\s*"([^"]*)"', path.read_text()):
            targets += 1
            assert m.group(1).startswith("vhostuser_rs::"), f"{path}: log target {m.group(1)!r}"
        for m in re.finditer(r'const TRACE: &str = "([^"]*)"', path.read_text()):
            assert m.group(1).startswith("vhostuser_rs::trace"), f"{path}: trace target {m.group(1)!r}"
    assert targets >= 3


def _ram_block_class() -> type[vu.Device]:
    spec = importlib.util.spec_from_file_location("ram_block_for_logging", RAM_BLOCK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls: type[vu.Device] = module.RamBlock
    return cls


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def trace() -> Iterator[_Records]:
    """``vhostuser_rs.trace`` at DEBUG, as an application would set it; restored afterwards."""
    logger = logging.getLogger("vhostuser_rs.trace")
    handler = _Records()
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    # The Rust side caches levels after first use: a change at run time is published this way.
    vu.refresh_logging()
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
        vu.refresh_logging()


def test_trace_logger_shows_the_decoded_requests_of_a_session(trace: _Records, sock_dir: Path) -> None:
    sock = sock_dir / "trace.sock"
    backend = vu.Backend.listen(sock, _ram_block_class()(size=1 << 20))
    t = threading.Thread(target=backend.serve_forever, kwargs={"max_connections": 1}, daemon=True)
    t.start()
    with BlockClient.connect(sock, num_queues=1, timeout=5.0) as disk:
        disk.write(4096, b"t" * 512)
        assert disk.read(4096, 512) == b"t" * 512
    t.join(10)
    backend.close()
    assert not t.is_alive()

    by_logger: dict[str, list[str]] = {}
    for r in trace.records:
        by_logger.setdefault(r.name, []).append(r.getMessage())
    backend_lines = by_logger.get("vhostuser_rs.trace", [])
    frontend_lines = by_logger.get("vhostuser_rs.trace.frontend", [])
    # The back-end's session, one decoded line per request received.
    names = [line.split()[0] for line in backend_lines]
    for request in ("GET_FEATURES", "SET_OWNER", "ADD_MEM_REG", "SET_VRING_NUM", "SET_VRING_ADDR",
                    "SET_VRING_KICK", "SET_VRING_ENABLE"):
        assert request in names, (request, backend_lines)
    # Payloads are decoded (field names and values), with the number of fds that came along.
    mem = next(line for line in backend_lines if line.startswith("ADD_MEM_REG"))
    assert "guest_addr: 0" in mem and f"size: {64 << 20}" in mem and mem.endswith("(1 fds)"), mem
    addr = next(line for line in backend_lines if line.startswith("SET_VRING_ADDR"))
    assert "index: 0" in addr, addr
    # The front-end's side of the same session: what it sent and the replies it got.
    assert any(line.startswith("GET_FEATURES reply") for line in frontend_lines), frontend_lines
    assert any(line.startswith("SET_VRING_ADDR ") for line in frontend_lines), frontend_lines
    assert all(r.levelno == logging.DEBUG for r in trace.records)


def test_trace_is_silent_unless_enabled(sock_dir: Path) -> None:
    """Without configuration (the default WARNING level) the trace emits nothing: a program that
    configures ``logging.basicConfig(level=INFO)`` sees no per-request lines."""
    code = f"""
import logging, threading, importlib.util, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")
import vhostuser_rs as vu
from vhostuser_rs.blk import BlockClient
spec = importlib.util.spec_from_file_location("rb", {str(RAM_BLOCK)!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
b = vu.Backend.listen({str(sock_dir / 'quiet.sock')!r}, m.RamBlock())
t = threading.Thread(target=b.serve_forever, kwargs={{"max_connections": 1}}, daemon=True); t.start()
with BlockClient.connect({str(sock_dir / 'quiet.sock')!r}) as d:
    d.read(0, 512)
t.join(10); b.close()
logging.getLogger("vhostuser_rs.trace").setLevel(logging.DEBUG)
print("enabled")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "enabled", out.stdout


def test_trace_enabled_by_basic_config_in_a_fresh_process(sock_dir: Path) -> None:
    """The usual way: ``logging.basicConfig(level=DEBUG)`` at program start, nothing else."""
    code = f"""
import logging, threading, importlib.util, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(name)s|%(message)s")
import vhostuser_rs as vu
from vhostuser_rs.blk import BlockClient
spec = importlib.util.spec_from_file_location("rb", {str(RAM_BLOCK)!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
b = vu.Backend.listen({str(sock_dir / 'dbg.sock')!r}, m.RamBlock())
t = threading.Thread(target=b.serve_forever, kwargs={{"max_connections": 1}}, daemon=True); t.start()
with BlockClient.connect({str(sock_dir / 'dbg.sock')!r}) as d:
    d.read(0, 512)
t.join(10); b.close()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [line.split("|", 1) for line in out.stdout.splitlines() if "|" in line]
    assert any(n == "vhostuser_rs.trace" and msg.startswith("ADD_MEM_REG") for n, msg in lines), out.stdout
    assert any(n == "vhostuser_rs.trace.frontend" and msg.startswith("ADD_MEM_REG") for n, msg in lines)
    assert all(n.startswith("vhostuser_rs.") for n, _ in lines), {n for n, _ in lines}


def test_environment_variable_prints_both_roles(sock_dir: Path) -> None:
    """VHOSTUSER_RS_TRACE=1 (no logging code) prints the same trace on stderr, each line
    prefixed with the role that traced it."""
    code = f"""
import threading, importlib.util
import vhostuser_rs as vu
from vhostuser_rs.blk import BlockClient
spec = importlib.util.spec_from_file_location("rb", {str(RAM_BLOCK)!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
b = vu.Backend.listen({str(sock_dir / 'env.sock')!r}, m.RamBlock())
t = threading.Thread(target=b.serve_forever, kwargs={{"max_connections": 1}}, daemon=True); t.start()
with BlockClient.connect({str(sock_dir / 'env.sock')!r}) as d:
    d.read(0, 512)
t.join(10); b.close()
"""
    env = dict(os.environ, VHOSTUSER_RS_TRACE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert any(line.startswith("vhost-user back-end: ADD_MEM_REG ") for line in lines), out.stderr
    assert any(line.startswith("vhost-user front-end: ADD_MEM_REG ") for line in lines), out.stderr
    assert any(line.startswith("vhost-user front-end: GET_FEATURES reply U64(") for line in lines), out.stderr
