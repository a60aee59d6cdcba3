"""``vhostuser-rs serve MODULE:CLASS [ARGS...]``: a Python device class served as a back-end
program following the spec's conventions (vhost-user.rst "Backend program conventions"):
``--print-capabilities`` (checked against vhost-user.json), ``--socket-path``, ``--fd`` (connected
or listening), SIGTERM, and clear errors for whatever is wrong with MODULE:CLASS or ARGS."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostuser_rs import Frontend
from vhostuser_rs.blk import BlockClient, BlockError, BlockFeature

CLI = [sys.executable, "-m", "vhostuser_rs", "serve"]
DEVICES = Path(__file__).parent / "devices"
RAM_BLOCK = str(DEVICES / "ram_block.py")

# vhost-user.json (QEMU docs/interop): VHostUserBackendCapabilities is a union on "type"
# (VHostUserBackendType); "input", "gpu" and (since 5.0) "block" carry "features" from their
# own enums; other types have no other member.
SCHEMA_TYPES = {"9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net", "rng", "rpmsg",
                "rproc-serial", "scsi", "vsock", "fs"}
SCHEMA_FEATURES = {"block": {"read-only", "blk-file"}, "input": {"evdev-path", "no-grab"},
                   "gpu": {"render-node", "virgl"}}


def check_schema(doc: object) -> None:
    """`doc` is a valid VHostUserBackendCapabilities."""
    assert isinstance(doc, dict) and doc.get("type") in SCHEMA_TYPES, doc
    kind = doc["type"]
    if kind in SCHEMA_FEATURES:
        assert set(doc) == {"type", "features"}, doc
        assert isinstance(doc["features"], list) and len(set(doc["features"])) == len(doc["features"])
        assert set(doc["features"]) <= SCHEMA_FEATURES[kind], doc
    else:
        assert set(doc) == {"type"}, doc


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("RamBlock", {"type": "block", "features": ["read-only", "blk-file"]}),
        # from_args(argv, *, read_only): only --read-only reaches it.
        ("ArgvBlock", {"type": "block", "features": ["read-only"]}),
        ("Echo", {"type": "net"}),
    ],
)
def test_print_capabilities_follows_the_schema(target: str, expected: dict[str, object]) -> None:
    # The spec: other options and arguments are ignored, nothing is served.
    r = run(f"{RAM_BLOCK}:{target}", "bogus-arg", "--socket-path", "/nonexistent/dir/s", "--print-capabilities")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    check_schema(doc)
    assert doc == expected


def test_print_capabilities_of_an_importable_module() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(DEVICES), os.environ.get("PYTHONPATH", "")]))
    r = run("ram_block:RamBlock", "--print-capabilities", env=env)
    assert r.returncode == 0, r.stderr
    check_schema(json.loads(r.stdout))


@pytest.fixture
def bad_module(tmp_path: Path) -> Path:
    path = tmp_path / "broken_device.py"
    path.write_text("import vhostuser_rs\nraise RuntimeError('the module is broken')\n")
    return path


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (["ram_block.py"], 2, "MODULE:CLASS"),
        (["no_such_module_xyz:Dev"], 2, "no module named 'no_such_module_xyz'"),
        (["/nonexistent/dev.py:Dev"], 2, "no such file"),
        (["RAM:Missing"], 2, "has no 'Missing'"),
        (["RAM:NotADevice"], 2, "not a vhostuser_rs.Device"),
        (["RAM:Untyped", "--print-capabilities"], 2, "does not declare its device type"),
        (["BROKEN:Dev"], 1, "RuntimeError: the module is broken"),
        (["RAM:RamBlock", "size=1000", "--socket-path", "SOCK"], 1, "ValueError: size must be a positive multiple of 512"),
        (["RAM:RamBlock", "sise=1M", "--socket-path", "SOCK"], 1, "TypeError"),
        (["RAM:RamBlock", "1M", "--socket-path", "SOCK"], 2, "NAME=VALUE"),
        (["RAM:RamBlock", "size=1M", "size=2M", "--socket-path", "SOCK"], 2, "size given twice"),
                # from_args's own parser refuses it: its message and status 2.
        (["RAM:ArgvBlock", "--socket-path", "SOCK", "--", "--no-such-option"], 2, "unrecognized arguments: --no-such-option"),
        (["RAM:Echo", "--read-only", "--socket-path", "SOCK"], 2, "--read-only"),
        (["RAM:ArgvBlock", "--blk-file", "/x", "--socket-path", "SOCK"], 2, "--blk-file"),
        (["RAM:RamBlock", "--socket-path", "SOCK", "--fd", "0"], 2, "exactly one of"),
        (["RAM:RamBlock"], 2, "exactly one of"),
        (["RAM:RamBlock", "--fd", "99"], 1, "Bad file descriptor"),
    ],
)
def test_clear_errors(argv: list[str], code: int, words: str, bad_module: Path, sock_dir: Path) -> None:
    subst = {"RAM": RAM_BLOCK, "BROKEN": str(bad_module), "SOCK": str(sock_dir / "s")}
    argv = [a.replace(a.split(":")[0], subst[a.split(":")[0]]) if a.split(":")[0] in subst else a for a in argv]
    argv = [subst.get(a, a) for a in argv]
    r = run(*argv)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("vhostuser-rs serve: ") or r.stderr.startswith("usage:"), r.stderr
    assert not (sock_dir / "s").exists()


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the back-end did not listen"
        time.sleep(0.02)


@pytest.fixture
def served(sock_dir: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """`serve` started with the test's parameters (``RAM:CLASS`` then ARGS and options)."""
    sock = sock_dir / "blk.sock"
    argv = [a.replace("RAM:", f"{RAM_BLOCK}:") for a in request.param]
    proc = subprocess.Popen([*CLI, "--socket-path", str(sock), *argv], stderr=subprocess.PIPE)
    try:
        _wait_for(sock, proc)
        yield sock, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def _terminate(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> tuple[int, float]:
    t0 = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(timeout=10)
    return code, time.monotonic() - t0


@pytest.mark.parametrize("served", [["RAM:RamBlock", "size=2M", "serial='disk-42'", "num_queues=2"]],
                         indirect=True)
def test_keyword_args_serve_a_python_block_device(served: tuple[Path, subprocess.Popen[bytes]]) -> None:
    sock, proc = served
    data = os.urandom(64 << 10)
    with BlockClient.connect(sock, num_queues=2, timeout=10) as disk:
        assert disk.capacity == 2 << 20
        assert disk.config is not None and disk.config.num_queues == 2
        assert not int(disk.features) & BlockFeature.RO
        disk.write(8192, data)
        disk.flush()
        assert disk.read(8192, len(data)) == data
        assert disk.get_id() == b"disk-42"
    # One front-end after the other (the spec's listening back-end).
    with BlockClient.connect(sock, timeout=10) as disk:
        assert disk.read(8192, 4096) == data[:4096]
    code, took = _terminate(proc)
    # SIGTERM: end quickly and cleanly (the spec), status 0, the socket file removed.
    assert code == 0 and took < 5, (code, took)
    assert not sock.exists()


@pytest.mark.parametrize("served", [["RAM:ArgvBlock", "--read-only", "--", "--size", "512k", "--queues", "2"]],
                         indirect=True)
def test_from_args_and_a_spec_option(served: tuple[Path, subprocess.Popen[bytes]]) -> None:
    sock, proc = served
    with BlockClient.connect(sock, num_queues=2, timeout=10) as disk:
        assert disk.capacity == 512 << 10
        assert int(disk.features) & BlockFeature.RO, "--read-only reached from_args as read_only=True"
        with pytest.raises(BlockError):
            disk.write(0, b"x" * 512)
    code, _ = _terminate(proc, signal.SIGINT)
    assert code == 0


def test_blk_file_option_reaches_the_constructor(sock_dir: Path) -> None:
    image = sock_dir / "disk.img"
    content = os.urandom(128 << 10)
    image.write_bytes(content)
    sock = sock_dir / "b.sock"
    proc = subprocess.Popen([*CLI, f"{RAM_BLOCK}:RamBlock", "--blk-file", str(image), "--socket-path", str(sock)])
    try:
        _wait_for(sock, proc)
        with BlockClient.connect(sock, timeout=10) as disk:
            assert disk.capacity == len(content)
            assert disk.read(4096, 8192) == content[4096:12288]
    finally:
        code, _ = _terminate(proc)
    assert code == 0


def test_connected_fd_serves_one_front_end_and_exits() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen([*CLI, f"{RAM_BLOCK}:RamBlock", "size=1M", "--fd", str(theirs.fileno())],
                            pass_fds=[theirs.fileno()], stderr=subprocess.PIPE)
    theirs.close()
    try:
        with BlockClient(Frontend.from_socket(ours, timeout=10), timeout=10) as disk:
            assert disk.capacity == 1 << 20
            disk.write(0, b"a" * 4096)
            assert disk.read(0, 4096) == b"a" * 4096
        ours.close()
        assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_listening_fd_serves_front_ends_until_sigterm(sock_dir: Path) -> None:
    """A socket the management layer bound and listens on: served like --socket-path, and its
    file is left to the management layer."""
    path = sock_dir / "mgmt.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    proc = subprocess.Popen([*CLI, f"{RAM_BLOCK}:RamBlock", "--fd", str(listener.fileno())],
                            pass_fds=[listener.fileno()], stderr=subprocess.PIPE)
    listener.close()
    try:
        for round_ in range(2):
            with BlockClient.connect(path, timeout=10) as disk:
                disk.write(512 * round_, bytes([round_ + 1]) * 512)
                assert disk.read(0, 1024)[: 512 * (round_ + 1)] == b"".join(bytes([i + 1]) * 512 for i in range(round_ + 1))
        code, took = _terminate(proc)
        assert code == 0 and took < 5
        assert path.exists(), "the back-end removed a socket file it did not create"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_sigterm_while_a_front_end_is_connected(sock_dir: Path) -> None:
    sock = sock_dir / "busy.sock"
    proc = subprocess.Popen([*CLI, f"{RAM_BLOCK}:RamBlock", "--socket-path", str(sock), "--workers", "1",
                             "--poll-us", "adaptive"], stderr=subprocess.PIPE)
    try:
        _wait_for(sock, proc)
        with BlockClient.connect(sock, timeout=10) as disk:
            disk.read(0, 4096)
            code, took = _terminate(proc)
            assert code == 0 and took < 5, (code, took)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_ctrl_c_inside_a_device_callback_still_ends_serving(sock_dir: Path) -> None:
    """Ctrl-C that arrives while a device callback runs on the serving thread (rings stop there
    at the end of a session) is not the callback's failure: ``serve_forever`` raises it."""
    sock = sock_dir / "slow.sock"
    code = f"""
import importlib.util, sys, time
import vhostuser_rs as vu
spec = importlib.util.spec_from_file_location("rb", {RAM_BLOCK!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
class Slow(m.RamBlock):
    def queue_stopped(self, index):
        print("stopping", flush=True)
        time.sleep(1.5)
try:
    vu.Backend.listen({str(sock)!r}, Slow()).serve_forever()
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock, proc)  # type: ignore[arg-type]
        with BlockClient.connect(sock, timeout=10) as disk:
            disk.read(0, 512)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "stopping"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert "interrupted" in out, (out, err)
        assert "KeyboardInterrupt" not in err, err  # not logged as the device's failure
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_net_device_class(sock_dir: Path) -> None:
    """A vu.NetDevice subclass serves as well: frames sent by our front-end come back."""
    from vhostuser_rs.net import NetClient

    sock = sock_dir / "net.sock"
    proc = subprocess.Popen([*CLI, f"{RAM_BLOCK}:Echo", "--socket-path", str(sock)], stderr=subprocess.PIPE)
    try:
        _wait_for(sock, proc)  # type: ignore[arg-type]
        with NetClient.connect(sock, timeout=10) as nic:
            frame = bytes(range(14)) + b"payload" * 8
            assert nic.send([frame]) == 1
            got = nic.recv(timeout=10)
            assert [bytes(f) for _, f in got] == [frame]
        code, _ = _terminate(proc)  # type: ignore[arg-type]
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_a_py_file_named_like_a_loaded_module_does_not_shadow_it(sock_dir: Path) -> None:
    path = sock_dir / "json.py"
    # The file imports the standard library's json: it must get that one, not itself.
    path.write_text((DEVICES / "ram_block.py").read_text() + "\nimport json as _json\nassert hasattr(_json, 'dumps')\n")
    r = run(f"{path}:RamBlock", "--print-capabilities")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["type"] == "block"
