"""`vhostuser-rs proxy` / `vu.Proxy` between real peers: our front-end (BlockClient) and
qemu-storage-daemon or serve-blk, a Python device sending back-end requests, QEMU booting a
guest. The session behind the proxy behaves as without it; the trace shows what crossed; each
inject action has its effect on a real peer; the proxy leaks no fd and serves the next
front-end after a session ends (it runs until stopped; `--once` exits after one session)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import vhostuser_rs as vu
from peers import qemu_storage_daemon, serve_blk, stop, wait_for_socket
from vhostuser_rs import BackendRequest as B
from vhostuser_rs import FrontendRequest as F
from vhostuser_rs.blk import CONFIG_SIZE, SECTOR, BlockClient

MIB = 1 << 20


@pytest.fixture
def image(sock_dir: Path) -> Path:
    path = sock_dir / "disk.img"
    with open(path, "wb") as f:
        for sector in range(4 * MIB // SECTOR):
            f.write(struct.pack("<Q", sector) + bytes(SECTOR - 8))
    return path


@contextmanager
def proxy_cli(listen: Path, connect: Path, out: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """`vhostuser-rs proxy` in its own process, its trace going to `out` (a file: a pipe that
    nobody reads during a guest boot would fill up and stall the session)."""
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vhostuser_rs", "proxy", "--listen", str(listen), "--connect", str(connect), *extra],
            stdout=f, stderr=subprocess.PIPE,
        )
    try:
        wait_for_socket(listen, proc)
        yield proc
    finally:
        stop(proc)


def json_lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def wait_json(out: Path, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        text = out.read_text()
        # Only whole lines: the writer may be in the middle of one.
        lines = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]
        if done(lines):
            return lines
        assert time.monotonic() < deadline, f"trace incomplete: {text[-2000:]}"
        time.sleep(0.02)


def closed_sessions(lines: list[dict[str, Any]]) -> int:
    return sum(1 for line in lines if line["event"] == "closed")


def open_fds(pid: int) -> list[str]:
    fds = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:
            pass
    return sorted(fds)


def requests_sent(proxy: vu.Proxy, session: int = 1) -> list[str]:
    return [r.name for r in proxy.messages(session=session) if r.direction == "F>B" and not r.is_reply]


def check_every_need_reply_answered(records: list[vu.ProxyRecord]) -> None:
    """Each request with NEED_REPLY (or a mandatory reply) on the main channel is followed by
    its reply: nothing was lost or reordered."""
    pending: list[str] = []
    for r in records:
        if r.channel != vu.Channel.MAIN:
            continue
        if not r.is_reply and (r.flags & 0x8 or r.name.startswith("GET_")):
            pending.append(r.name)
        elif r.is_reply:
            assert pending and pending.pop(0) + " reply" == r.name, (pending, r.text)
    assert not pending, pending


# -- the session behind the proxy behaves as without it -------------------------------------------


def test_block_client_through_the_proxy_to_qemu_storage_daemon(sock_dir: Path, image: Path) -> None:
    backend_sock, sock = sock_dir / "qsd.sock", sock_dir / "proxy.sock"
    with qemu_storage_daemon(image, backend_sock, num_queues=2), vu.Proxy(listen=sock, connect=backend_sock) as proxy:
        with BlockClient.connect(sock, num_queues=2) as disk:
            assert disk.read(5 * SECTOR, SECTOR)[:8] == struct.pack("<Q", 5)
            payload = os.urandom(64 << 10)
            disk.write(MIB, payload)
            disk.flush()
            assert disk.read(MIB, len(payload)) == payload
            for q in range(2):
                assert disk.read(7 * SECTOR, SECTOR, queue=q)[:8] == struct.pack("<Q", 7)
        proxy.wait_for(lambda r: r.event == "closed")
    with open(image, "rb") as f:
        f.seek(MIB)
        assert f.read(len(payload)) == payload, "the write reached the image through the proxy"
    sent = requests_sent(proxy)
    # The negotiation of vu.Frontend.negotiate + setup_queue, in order (protocol.md §6.1).
    assert sent[:4] == ["GET_FEATURES", "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES"], sent
    assert "SET_OWNER" in sent and "SET_FEATURES" in sent and "GET_CONFIG" in sent
    assert sent.index("SET_OWNER") < sent.index("SET_FEATURES")
    assert "SET_MEM_TABLE" in sent or "ADD_MEM_REG" in sent
    ring = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_CALL"]
    for name in ring:
        assert sent.count(name) == 2, (name, sent)
    assert sent.count("SET_VRING_ENABLE") == 2
    check_every_need_reply_answered(proxy.messages())
    kicks = [r for r in proxy.messages() if r.name == "SET_VRING_KICK"]
    assert all(r.num_fds == 1 and isinstance(r.payload, vu.messages.VringFd) for r in kicks)
    assert all(r.error is None for r in proxy.messages()), [r.text for r in proxy.messages() if r.error]
    closed = proxy.records[-1]
    assert closed.event == "closed" and closed.clean and "front-end closed" in (closed.reason or "")


def test_serve_blk_sees_the_same_session_with_and_without_the_proxy(sock_dir: Path, image: Path) -> None:
    """The back-end's own trace (VHOSTUSER_RS_TRACE) of a BlockClient session, direct and then
    through the proxy: the same requests, payloads and fd counts, in the same order (the
    front-end's memory addresses differ between any two sessions, so large numbers are masked)."""
    import re

    backend_sock, sock, log = sock_dir / "blk.sock", sock_dir / "proxy.sock", sock_dir / "backend.log"
    args = [sys.executable, "-m", "vhostuser_rs", "serve-blk", str(image), "--socket-path", str(backend_sock)]
    with open(log, "wb") as err:
        backend = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err,
                                   env=dict(os.environ, VHOSTUSER_RS_TRACE="1"))
    sessions: list[list[str]] = []
    try:
        wait_for_socket(backend_sock, backend)
        with vu.Proxy(listen=sock, connect=backend_sock) as proxy:
            for path in (backend_sock, sock):
                before = log.read_text().count("\n")
                with BlockClient.connect(path, num_queues=1) as disk:
                    disk.write(0, b"same" * 1024)
                    assert disk.read(0, 4096) == b"same" * 1024
                # The back-end logs each request before answering it and the client waits for
                # every answer; the pause only lets the other process's last write land.
                time.sleep(0.2)
                lines = log.read_text().splitlines()[before:]
                sessions.append([re.sub(r"\d{6,}", "N", line) for line in lines if "vhost-user back-end:" in line])
    finally:
        stop(backend)
    direct, proxied = sessions
    assert len(direct) > 15 and direct == proxied
    assert len([r for r in proxy.messages() if r.direction == "F>B" and not r.is_reply]) >= len(proxied)


import test_qemu_guest as KERNEL_TEST  # noqa: E402  (the guest recipe: kernel, initramfs, init script)


@pytest.mark.timeout(300)
def test_qemu_guest_boots_through_the_proxy_to_serve_blk(sock_dir: Path) -> None:
    """QEMU (vhost-user-blk-pci) → `vhostuser-rs proxy --json` → serve-blk: the guest reads the
    whole disk, writes and reads back a marker; the JSON trace holds QEMU's sequence; the
    proxy's fds are back to where they were after the session."""
    qemu = KERNEL_TEST.need(KERNEL_TEST.QEMU, "qemu-system-x86_64")
    vmlinuz, modules = KERNEL_TEST.kernel()
    initrd = KERNEL_TEST.build_initramfs(sock_dir, modules)
    image = sock_dir / "guest.img"
    with open(image, "wb") as f:
        for i in range(8 * MIB >> 12):
            f.write(hashlib.sha256(i.to_bytes(4, "little")).digest() * 128)
    expected = hashlib.md5(image.read_bytes()).hexdigest()
    backend_sock, sock, out = sock_dir / "blk.sock", sock_dir / "proxy.sock", sock_dir / "trace.jsonl"
    serial = sock_dir / "serial.log"
    nonce = os.urandom(6).hex()
    with serve_blk(image, backend_sock, num_queues=1), proxy_cli(sock, backend_sock, out, "--json") as proxy:
        baseline = open_fds(proxy.pid)
        cmd = [
            qemu, "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "1", "-m", "512M",
            "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{serial}", "-kernel", str(vmlinuz), "-initrd", str(initrd),
            "-chardev", f"socket,id=c0,path={sock}",
            "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1",
            "-append", f"console=ttyS0 panic=-1 quiet rdinit=/init marker={nonce}",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        log = serial.read_text(errors="replace")
        assert "GUEST-RESULT: OK" in log, f"guest failed:\n{log[-3000:]}\nQEMU: {result.stderr[-2000:]}"
        assert f"md5={expected}" in log, "the guest read different bytes than the image holds"
        lines = wait_json(out, lambda ls: closed_sessions(ls) == 1)
        assert proxy.poll() is None, "the proxy serves on after a session"
        assert open_fds(proxy.pid) == baseline, "the proxy leaked fds"
    with open(image, "rb") as f:
        f.seek(KERNEL_TEST.MARKER_SECTOR * SECTOR)
        assert f.read(64).startswith(f"VHOSTUSER-RS GUEST MARKER {nonce}".encode())
    messages = [line for line in lines if line["event"] == "message"]
    keys = {"time", "elapsed", "session", "event", "channel", "direction", "request", "code", "reply", "need_reply",
            "flags", "size", "fds", "payload", "action"}
    assert all(keys <= line.keys() for line in messages)
    assert all("error" not in line for line in messages), [line for line in messages if "error" in line]
    sent = [line["request"] for line in messages if line["direction"] == "F>B" and not line["reply"]]
    # QEMU 7.2: inflight tracking, memory by ADD_MEM_REG, the ring started twice (firmware, Linux).
    for name in ("GET_FEATURES", "SET_OWNER", "SET_BACKEND_REQ_FD", "GET_INFLIGHT_FD", "SET_INFLIGHT_FD",
                 "ADD_MEM_REG", "SET_VRING_ADDR", "SET_VRING_KICK", "GET_VRING_BASE"):
        assert name in sent, (name, sent)
    backend_req = next(line for line in messages if line["request"] == "SET_BACKEND_REQ_FD" and not line["reply"])
    assert backend_req["substituted"] is True and backend_req["fds"] == 1
    inflight = next(line for line in messages if line["request"] == "SET_INFLIGHT_FD")
    assert inflight["fds"] == 1 and inflight["payload"]["num_queues"] == 1
    features = next(line for line in messages if line["request"] == "SET_FEATURES")
    assert "VERSION_1" in features["names"] and features["payload"] & (1 << 32)


# -- the CLI: JSON lines, text lines, fds, next session, --once --------------------------------------


def test_cli_json_lines_fds_and_next_sessions(sock_dir: Path, image: Path) -> None:
    backend_sock, sock, out = sock_dir / "blk.sock", sock_dir / "proxy.sock", sock_dir / "trace.jsonl"
    with serve_blk(image, backend_sock, num_queues=1), proxy_cli(sock, backend_sock, out, "--json") as proxy:
        baseline = open_fds(proxy.pid)
        for session in range(1, 4):
            with BlockClient.connect(sock) as disk:
                disk.write(0, bytes([session]) * 4096)
                assert disk.read(0, 4096) == bytes([session]) * 4096
            lines = wait_json(out, lambda ls, n=session: closed_sessions(ls) == n)
            assert open_fds(proxy.pid) == baseline, f"fds leaked by session {session}"
    assert proxy.returncode == 0, "SIGTERM ends the proxy as Ctrl-C does"
    for line in lines:
        assert isinstance(line["time"], float) and line["session"] in (1, 2, 3)
    by_session = [[line for line in lines if line["session"] == s] for s in (1, 2, 3)]
    for records in by_session:
        assert records[0]["event"] == "connected" and records[-1]["event"] == "closed"
        assert records[-1]["clean"] is True
        addr = next(line for line in records if line.get("request") == "SET_VRING_ADDR" and not line["reply"])
        assert addr["channel"] == "main" and addr["direction"] == "F>B" and addr["size"] == 40
        assert set(addr["payload"]) == {"index", "flags", "desc_user_addr", "used_user_addr", "avail_user_addr",
                                        "log_guest_addr"}
        feat = next(line for line in records if line.get("request") == "GET_FEATURES" and line["reply"])
        assert feat["direction"] == "B>F" and feat["flags"] == 5 and isinstance(feat["payload"], int)
        assert "VERSION_1" in feat["names"]
        kick = next(line for line in records if line.get("request") == "SET_VRING_KICK" and not line["reply"])
        assert kick["fds"] == 1 and kick["payload"] == {"index": 0, "nofd": False} and kick["need_reply"]


def test_cli_leaks_no_fd_on_hostile_or_injected_traffic(sock_dir: Path, image: Path) -> None:
    """Fds the proxy drops (a dropped message, a stripped one), fds of messages still queued
    when a peer hangs up, a substituted channel, nine fds on one message, a size it will not
    read: after each session the proxy process holds exactly the fds it started with."""
    import socket

    from vhostuser_rs import hazmat

    backend_sock, sock, out = sock_dir / "blk.sock", sock_dir / "proxy.sock", sock_dir / "trace.jsonl"
    rules = ["drop:SET_VRING_KICK", "corrupt:SET_VRING_CALL:fds", "delay:SET_VRING_ERR:300ms"]
    inject = [arg for rule in rules for arg in ("--inject", rule)]

    def front_end() -> socket.socket:
        # The socket file appears at bind(), before the proxy listens: a connect in between is
        # refused (seen under load). Retried as Frontend.connect does, within a bound.
        deadline = time.monotonic() + 10
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(sock))
                return s
            except ConnectionRefusedError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def msg(request: F, payload: object = None) -> bytes:
        return hazmat.encode(hazmat.request(request, payload))  # type: ignore[arg-type]

    efd = os.eventfd(0, os.EFD_CLOEXEC)
    a, b = socket.socketpair()
    try:
        with serve_blk(image, backend_sock, num_queues=1), \
                proxy_cli(sock, backend_sock, out, "--json", "--timeout", "1", *inject) as proxy:
            baseline = open_fds(proxy.pid)
            sessions = [
                [(msg(F.SET_OWNER), []), (msg(F.SET_VRING_KICK, vu.messages.VringFd(0)), [efd]),
                 (msg(F.SET_VRING_CALL, vu.messages.VringFd(0)), [efd])],
                [(msg(F.SET_BACKEND_REQ_FD), [b.fileno()]), (msg(F.SET_VRING_ERR, vu.messages.VringFd(0)), [efd])],
                [(msg(F.GET_FEATURES), [efd] * 9)],
                [(hazmat.encode_raw(1, b"", size=1 << 30), [])],
            ]
            for n, messages in enumerate(sessions, 1):
                with front_end() as s:
                    for data, fds in messages:
                        socket.send_fds(s, [data], fds)
                lines = wait_json(out, lambda ls, n=n: closed_sessions(ls) == n)
                assert open_fds(proxy.pid) == baseline, f"session {n}: {lines[-1]}"
    finally:
        os.close(efd)
        a.close()
        b.close()
    closed = [line for line in lines if line["event"] == "closed"]
    assert "9 file descriptors" in closed[2]["reason"] and "exceeds the limit" in closed[3]["reason"]
    assert [line["action"] for line in lines if line.get("request") == "SET_VRING_KICK"] == ["dropped"]


def test_cli_text_lines_and_once(sock_dir: Path, image: Path) -> None:
    backend_sock, sock, out = sock_dir / "blk.sock", sock_dir / "proxy.sock", sock_dir / "trace.txt"
    with serve_blk(image, backend_sock, num_queues=1), proxy_cli(sock, backend_sock, out, "--once") as proxy:
        with vu.Frontend.connect(sock) as fe:
            fe.get_features()
            fe.set_owner()
        assert proxy.wait(10) == 0, "--once: exit 0 after the first session"
    text = out.read_text()
    assert "session open" in text and "session closed: the front-end closed the connection" in text
    assert " main F>B GET_FEATURES " in text and " main B>F GET_FEATURES reply " in text
    assert "(PROTOCOL_FEATURES|VERSION_1" in text or "|VERSION_1" in text
    assert not sock.exists(), "the listening socket is removed at exit"


def test_python_api_callback_and_once(sock_dir: Path, image: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`once=True` finishes after the first session; the callback sees every record in order,
    and one that raises is logged without stopping the trace."""
    backend_sock, sock = sock_dir / "blk.sock", sock_dir / "proxy.sock"
    seen: list[vu.ProxyRecord] = []

    def callback(record: vu.ProxyRecord) -> None:
        seen.append(record)
        if record.name == "GET_FEATURES":
            raise RuntimeError("a broken callback")

    with serve_blk(image, backend_sock, num_queues=1), \
            vu.Proxy(listen=sock, connect=backend_sock, once=True, callback=callback) as proxy:
        with vu.Frontend.connect(sock) as fe:
            fe.get_features()
            fe.get_protocol_features()
        assert proxy.wait(10) and proxy.finished
        with pytest.raises(vu.VhostUserTimeoutError, match="finished"):
            proxy.wait_for(lambda r: r.session == 2)
        with pytest.raises(FileNotFoundError):
            vu.Frontend.connect(sock, timeout=0)  # the listening socket is gone
    assert seen == proxy.records
    assert [r.name for r in seen if r.event == "message"] == [
        "GET_FEATURES", "GET_FEATURES reply", "GET_PROTOCOL_FEATURES", "GET_PROTOCOL_FEATURES reply"]
    assert "proxy record callback failed" in caplog.text


def test_bad_rule_and_unreachable_back_end(sock_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown request"):
        vu.Proxy(listen=sock_dir / "p.sock", connect=sock_dir / "none.sock", inject=["drop:GET_FEATRUES"])
    cli = subprocess.run([sys.executable, "-m", "vhostuser_rs", "proxy", "--listen", str(sock_dir / "p.sock"),
                          "--connect", "x", "--inject", "delay:GET_FEATURES"], capture_output=True, text=True)
    assert cli.returncode == 2 and "delay needs a duration" in cli.stderr
    with pytest.raises(OSError, match="its own socket"):
        vu.Proxy(listen=sock_dir / "p.sock", connect=sock_dir / "p.sock")
    with vu.Proxy(listen=sock_dir / "p.sock", connect=sock_dir / "none.sock", connect_timeout=0.2) as proxy:
        with vu.Frontend.connect(sock_dir / "p.sock", timeout=5) as fe:
            with pytest.raises(vu.ConnectionClosedError):
                fe.get_features()
        closed = proxy.wait_for(lambda r: r.event == "closed")
        assert not closed.clean and "could not reach the back-end" in (closed.reason or "")


# -- inject: each action on a real peer ------------------------------------------------------------


@pytest.mark.parametrize("rule", ["drop:GET_FEATURES.reply@1", "drop:GET_FEATURES@1"])
def test_drop_makes_our_front_end_time_out(sock_dir: Path, image: Path, rule: str) -> None:
    backend_sock, sock = sock_dir / "blk.sock", sock_dir / "proxy.sock"
    with serve_blk(image, backend_sock, num_queues=1), \
            vu.Proxy(listen=sock, connect=backend_sock, inject=[rule]) as proxy:
        with vu.Frontend.connect(sock, timeout=0.5) as fe:
            with pytest.raises(vu.VhostUserTimeoutError, match="timed out waiting for the back-end's reply"):
                fe.get_features()
        dropped = proxy.wait_for(lambda r: r.dropped)
        assert dropped.injected == (rule,) and dropped.name.startswith("GET_FEATURES")
        assert dropped.is_reply == rule.endswith(".reply@1")
        # @1: the next session (the proxy serves it) is left alone.
        with BlockClient.connect(sock) as disk:
            assert disk.read(3 * SECTOR, SECTOR)[:8] == struct.pack("<Q", 3)
        proxy.wait_for(lambda r: r.event == "closed" and r.session == 2)
    assert [r.session for r in proxy.records if r.event == "connected"] == [1, 2]


def test_delay_holds_a_request_back(sock_dir: Path, image: Path) -> None:
    backend_sock, sock = sock_dir / "qsd.sock", sock_dir / "proxy.sock"
    with qemu_storage_daemon(image, backend_sock, num_queues=1), \
            vu.Proxy(listen=sock, connect=backend_sock, inject=["delay:SET_FEATURES:300ms"]) as proxy:
        t0 = time.monotonic()
        with BlockClient.connect(sock) as disk:
            handshake = time.monotonic() - t0
            disk.write(0, b"late" * 1024)
            assert disk.read(0, 4096) == b"late" * 1024
    assert handshake >= 0.3
    msgs = proxy.messages()
    request = next(i for i, r in enumerate(msgs) if r.name == "SET_FEATURES")
    reply = next(i for i, r in enumerate(msgs) if r.name == "SET_FEATURES reply")
    assert msgs[request].injected == ("delay:SET_FEATURES:300ms",)
    # The request was traced on arrival; the back-end answered only once it was relayed.
    assert msgs[reply].elapsed - msgs[request].elapsed >= 0.3
    check_every_need_reply_answered(msgs)


@pytest.mark.parametrize(
    ("peer", "rule", "error"),
    [
        # Reserved header flag: serve-blk refuses the message and closes the session.
        ("serve-blk", "corrupt:SET_VRING_ADDR", vu.ConnectionClosedError),
        # Ring index 0 -> 255: refused with a failure ack (REPLY_ACK status -EINVAL).
        ("serve-blk", "corrupt:SET_VRING_ADDR:byte=0", vu.RequestRejectedError),
        # The kick eventfd withheld: qemu-storage-daemon closes the session.
        ("qemu-storage-daemon", "corrupt:SET_VRING_KICK:fds", vu.ConnectionClosedError),
        # A reply one byte short: our front-end refuses it.
        ("qemu-storage-daemon", "corrupt:GET_FEATURES.reply:size@1", vu.MalformedMessageError),
    ],
)
def test_corrupt_is_refused(sock_dir: Path, image: Path, peer: str, rule: str, error: type[Exception]) -> None:
    backend_sock, sock = sock_dir / "blk.sock", sock_dir / "proxy.sock"
    start = serve_blk if peer == "serve-blk" else qemu_storage_daemon
    with start(image, backend_sock, num_queues=1), vu.Proxy(listen=sock, connect=backend_sock, inject=[rule]) as proxy:
        with pytest.raises(error):
            BlockClient.connect(sock, timeout=2).close()
        corrupted = proxy.wait_for(lambda r: bool(r.injected))
        assert corrupted.injected == (rule,) and not corrupted.dropped
        assert corrupted.error is None, "the record shows the message as it arrived, before the damage"
        proxy.wait_for(lambda r: r.event == "closed")


# -- the back-end request channel ------------------------------------------------------------------


class ResizableBlock(vu.Device):
    """A virtio-blk config space that our back-end announces changes of (CONFIG_CHANGE_MSG)."""

    num_queues = 1
    features = int(vu.VirtioFeature.VERSION_1)

    def __init__(self, sectors: int) -> None:
        self.space = bytearray(CONFIG_SIZE)
        self.space[0:8] = sectors.to_bytes(8, "little")

    def config(self) -> bytes:
        return bytes(self.space)


def test_config_change_msg_crosses_the_proxy(sock_dir: Path) -> None:
    """A Python device's CONFIG_CHANGE_MSG goes through the proxy's channel pair to
    BlockClient's handler, which re-reads the config on the main channel before its ack comes
    back the same way."""
    backend_sock, sock = sock_dir / "dev.sock", sock_dir / "proxy.sock"
    device = ResizableBlock(2048)
    with vu.Backend.listen(backend_sock, device) as backend:
        backend.start()
        with vu.Proxy(listen=sock, connect=backend_sock) as proxy, BlockClient.connect(sock) as disk:
            assert disk.capacity == 2048 * SECTOR
            device.space[0:8] = (4096).to_bytes(8, "little")
            backend.config_changed(need_reply=True)  # returns once the front-end acked
            assert disk.capacity == 4096 * SECTOR
            ack = proxy.wait_for(lambda r: r.name == "BACKEND_CONFIG_CHANGE_MSG reply")
    assert backend.error is None
    msgs = proxy.messages()
    change = next(i for i, r in enumerate(msgs) if r.name == "BACKEND_CONFIG_CHANGE_MSG")
    assert msgs[change].channel == vu.Channel.BACKEND and msgs[change].direction == "B>F"
    assert msgs[change].flags & 0x8, "NEED_REPLY"
    assert ack.direction == "F>B" and ack.payload == 0
    # Between the two, the handler's GET_CONFIG on the main channel.
    between = [r.name for r in msgs[change:msgs.index(ack)]]
    assert "GET_CONFIG" in between and "GET_CONFIG reply" in between
    assert next(r for r in msgs if r.name == "SET_BACKEND_REQ_FD").substituted


def test_iotlb_misses_cross_the_proxy(sock_dir: Path, image: Path) -> None:
    """serve-blk under ACCESS_PLATFORM asks for translations on the back-end request channel;
    our front-end answers through the proxy with an IOTLB_MSG UPDATE on the main channel."""
    backend_sock, sock = sock_dir / "blk.sock", sock_dir / "proxy.sock"
    iova = 0x7_0000_0000
    with serve_blk(image, backend_sock, num_queues=1), vu.Proxy(listen=sock, connect=backend_sock) as proxy:
        iommu = vu.IommuTable()
        iommu.map(iova, 64 << 20, 0)
        with BlockClient.connect(sock, iommu=iommu) as disk:
            disk.write(4096, b"via iommu".ljust(SECTOR, b"."))
            assert disk.read(4096, SECTOR).startswith(b"via iommu")
    assert iommu.misses
    msgs = proxy.messages()
    misses = [r for r in msgs if r.request is B.IOTLB_MSG and not r.is_reply]
    acks = [r for r in msgs if r.request is B.IOTLB_MSG and r.is_reply]
    assert len(misses) == len(iommu.misses)
    assert all(r.channel == vu.Channel.BACKEND and r.payload.iova >= iova for r in misses)
    # No MISS asks for REPLY_ACK (a back-end waiting for that ack deadlocks against a front-end
    # that sends a main-channel request before reading the back-end request channel): the
    # UPDATE itself is the answer, and no ack crosses the proxy.
    assert not any(r.flags & 0x8 for r in misses) and acks == []
    assert [r for r in msgs if r.request is F.IOTLB_MSG and not r.is_reply], "UPDATEs on the main channel"


# -- hang-ups --------------------------------------------------------------------------------------


def test_back_end_hang_up_ends_the_session_and_the_next_is_served(sock_dir: Path, image: Path) -> None:
    backend_sock, sock = sock_dir / "qsd.sock", sock_dir / "proxy.sock"
    with vu.Proxy(listen=sock, connect=backend_sock) as proxy:
        with qemu_storage_daemon(image, backend_sock, num_queues=1) as qsd:
            disk = BlockClient.connect(sock, timeout=2)
            assert disk.read(0, SECTOR)[:8] == struct.pack("<Q", 0)
            qsd.send_signal(signal.SIGKILL)
            with pytest.raises(vu.ConnectionClosedError):
                for _ in range(100):
                    disk.read(0, SECTOR)
                    time.sleep(0.02)
            disk.close()
        closed = proxy.wait_for(lambda r: r.event == "closed")
        assert closed.clean and "back-end closed" in (closed.reason or ""), closed
        # A new back-end on the same path: the next front-end gets a new session.
        with qemu_storage_daemon(image, backend_sock, num_queues=1), BlockClient.connect(sock) as disk:
            assert disk.read(SECTOR, SECTOR)[:8] == struct.pack("<Q", 1)
        proxy.wait_for(lambda r: r.event == "closed" and r.session == 2)
