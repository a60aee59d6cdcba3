"""A real QEMU guest (TCG) as the vhost-user-net front-end: Linux's virtio_net on QEMU's
virtio-net-pci with `-netdev vhost-user`, against our back-end (`vhostuser-rs serve-net --tap`).

The recipe (shared/peers/net_guest.sh) creates a TAP, starts the back-end on it, boots a busybox
guest that pings the host side of the TAP and moves data both ways (checked by sha256), and exits
0 only if the guest printed GUEST-RESULT: OK and the host received and sent its data intact. Each
test then reads what the back-end saw (VHOSTUSER_RS_TRACE=1: one line per request in
WORKDIR/backend.log). QEMU 7.2 + TCG needs the NIC without MSI-X (the recipe's default)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers import need

QEMU = shutil.which("qemu-system-x86_64")
IP = shutil.which("ip")
# shared/ lies beside the repository (CI clones main next to a copy of it).
NET_GUEST = Path(
    os.environ.get("VHOSTUSER_RS_NET_GUEST", Path(__file__).resolve().parents[3] / "shared" / "peers" / "net_guest.sh")
)
KERNEL_DIR = Path(os.environ.get("VHOSTUSER_RS_KERNEL_DIR", Path.home() / ".cache" / "vhostuser_rs" / "kernel"))
# MiB moved each way: with the boot (about 8 s under TCG) a test takes 15-20 s on 2 cores.
MIB = 4


def require(ok: bool, reason: str) -> None:
    """Skip with `reason` unless `ok`; in CI (which installs every peer) fail instead, as need() does."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (required in CI)")
        pytest.skip(reason)


def preflight() -> None:
    need(QEMU, "qemu-system-x86_64")
    need(IP, "ip (iproute2)")
    need(str(NET_GUEST) if os.access(NET_GUEST, os.X_OK) else None, f"the guest recipe {NET_GUEST} (env VHOSTUSER_RS_NET_GUEST)")
    require(os.geteuid() == 0 and os.path.exists("/dev/net/tun"), "creating a TAP needs root and /dev/net/tun")
    require(
        any(KERNEL_DIR.glob("boot/vmlinuz-*")) and any(KERNEL_DIR.glob("lib/modules/*/kernel/drivers/net/virtio_net.ko*")),
        f"no guest kernel with virtio_net under {KERNEL_DIR} (.ci/run extracts linux-image-amd64 there; "
        "an older extraction without virtio_net is refreshed by it)",
    )


def serve_net(queue_pairs: int, mtu: int | None) -> list[str]:
    """The recipe's --backend: our back-end on the TAP the recipe created, tracing requests."""
    cmd = [sys.executable, "-m", "vhostuser_rs", "serve-net", "--socket-path", "$NET_GUEST_SOCKET", "--tap", "$NET_GUEST_TAP"]
    cmd += ["--queue-pairs", str(queue_pairs)] + (["--mtu", str(mtu)] if mtu else [])
    # shlex.quote would keep the variables from expanding: quote them by hand.
    line = " ".join(f'"{a}"' if a.startswith("$") else shlex.quote(a) for a in cmd)
    return ["--backend", f"exec {line}"]


@dataclass
class Run:
    returncode: int
    output: str  # the recipe's own report (HOST:/GUEST: lines)
    serial: str  # the guest console
    backend: str  # the back-end's stderr: its request trace

    def explain(self) -> str:
        return (
            f"net_guest.sh exited {self.returncode}\n--- its report (tail):\n{self.output[-4000:]}"
            f"\n--- guest serial (tail):\n{self.serial[-2500:]}\n--- backend.log (tail):\n{self.backend[-3000:]}"
        )

    def enabled_rings(self) -> set[int]:
        """Rings the front-end enabled (SET_VRING_ENABLE num=1), from the trace."""
        return {
            int(m.group(1))
            for m in re.finditer(r"SET_VRING_ENABLE\b.*?index: (\d+), num: 1\b", self.backend)
        }


def run_net_guest(
    work: Path,
    sock: Path,
    n: int,
    *,
    queue_pairs: int = 1,
    mtu: int | None = None,
    backend: list[str] | None = None,
    packed: bool = False,
) -> Run:
    """One boot of the recipe; `n` makes the TAP name, subnet and ports unique to the test."""
    preflight()
    tap = f"vurs{n}p{os.getpid()}"[:15]
    args = [
        str(NET_GUEST), "--tap", tap, "--kernel-dir", str(KERNEL_DIR),
        "--host-ip", f"10.77.{40 + n}.1", "--guest-ip", f"10.77.{40 + n}.2", "--port", str(7740 + 2 * n),
        "--mib", str(MIB), "--pings", "3", "--queues", str(queue_pairs), "--smp", str(queue_pairs),
        "--wait", "20", "--timeout", "100", "--guest-timeout", "40",
        *(["--mtu", str(mtu)] if mtu else []),
        *(["--packed"] if packed else []),
        *(backend if backend is not None else serve_net(queue_pairs, mtu)),
        str(work), str(sock),
    ]
    env = dict(os.environ, VHOSTUSER_RS_TRACE="1", RUST_BACKTRACE="1")
    with open(work / "net_guest.out", "wb") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        returncode = proc.wait(timeout=160)
    finally:
        if proc.poll() is None:
            # SIGTERM, not SIGKILL: the recipe's exit trap stops QEMU and the back-end and deletes the TAP.
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

    def read(name: str) -> str:
        path = work / name
        return path.read_text(errors="replace").replace("\r", "") if path.exists() else ""

    return Run(returncode, read("net_guest.out"), read("serial.log"), read("backend.log"))


def check_traffic(run: Run) -> None:
    """What every test asserts: guest and host checks passed, the back-end neither panicked nor failed."""
    assert "GUEST-RESULT: OK" in run.serial, run.explain()
    assert run.returncode == 0, run.explain()
    assert "HOST: RESULT OK" in run.output, run.explain()
    assert "panicked" not in run.backend, run.explain()
    assert "SET_MEM_TABLE" in run.backend or "ADD_MEM_REG" in run.backend, f"no request trace?\n{run.explain()}"


@pytest.mark.timeout(180)
def test_guest_pings_and_transfers_over_one_queue_pair(tmp_path: Path, sock_dir: Path) -> None:
    run = run_net_guest(tmp_path, sock_dir / "net.sock", 1)
    check_traffic(run)
    assert "eth0 queues: rx-0 tx-0 \n" in run.serial, run.explain()
    assert {0, 1} <= run.enabled_rings(), run.explain()


@pytest.mark.timeout(180)
def test_guest_uses_two_queue_pairs_on_a_multiqueue_tap(tmp_path: Path, sock_dir: Path) -> None:
    """Two vCPUs: Linux asks for both pairs (VIRTIO_NET_CTRL_MQ, handled by QEMU), and QEMU
    enables rings 2 and 3 with SET_VRING_ENABLE; the back-end opens the TAP with IFF_MULTI_QUEUE."""
    run = run_net_guest(tmp_path, sock_dir / "net.sock", 2, queue_pairs=2)
    check_traffic(run)
    assert "eth0 queues: rx-0 rx-1 tx-0 tx-1 \n" in run.serial, run.explain()
    assert "GET_QUEUE_NUM" in run.backend, run.explain()
    assert {0, 1, 2, 3} <= run.enabled_rings(), run.explain()


@pytest.mark.timeout(180)
def test_guest_sees_the_mtu_and_jumbo_frames_pass(tmp_path: Path, sock_dir: Path) -> None:
    """host_mtu=9000 offers VIRTIO_NET_F_MTU with config mtu 9000; QEMU tells the back-end with
    NET_SET_MTU (only if it offered the NET_MTU protocol feature); the TAP has MTU 9000 too."""
    mtu = 9000
    run = run_net_guest(tmp_path, sock_dir / "net.sock", 3, mtu=mtu)
    check_traffic(run)
    assert f" mtu {mtu}\n" in run.serial, run.explain()
    features = re.search(r"eth0 virtio features=([01]+)", run.serial)
    assert features and features.group(1)[3] == "1", f"the guest did not negotiate VIRTIO_NET_F_MTU\n{run.explain()}"
    assert re.search(rf"NET_SET_MTU\b.*\b{mtu}\b", run.backend), f"no NET_SET_MTU {mtu} in the trace\n{run.explain()}"


@pytest.mark.timeout(180)
def test_guest_on_packed_rings(tmp_path: Path, sock_dir: Path) -> None:
    """virtio-net-pci packed=on: Linux's virtio_net and QEMU ack VIRTIO_F_RING_PACKED (bit 34,
    in the guest's feature string and in the back-end's SET_FEATURES), and the TAP traffic of
    the other tests passes over packed RX and TX rings."""
    run = run_net_guest(tmp_path, sock_dir / "net.sock", 4, packed=True)
    check_traffic(run)
    features = re.search(r"eth0 virtio features=([01]+)", run.serial)
    assert features and features.group(1)[34] == "1", f"the guest did not negotiate RING_PACKED\n{run.explain()}"
    acked = [int(v) for v in re.findall(r"SET_FEATURES U64\((\d+)\)", run.backend)]
    assert acked and all(f >> 34 & 1 for f in acked), f"{acked}\n{run.explain()}"
