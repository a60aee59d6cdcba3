"""What a back-end restart costs a BlockClient made with ``reconnect=``: the time of
``Frontend.reconnect_now()`` (close the session, connect again, negotiate, hand over the
inflight buffer and the ring, kick) plus one 512-byte write through the new session, against
our serve-blk and qemu-storage-daemon (each started here, on a temporary 1 MiB image).

Run: ``python benches/python/bench_reconnect.py [--rounds 30]``.
Prints the median and the maximum per back-end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vhostuser_rs.blk import BlockClient


def start(args: list[str], sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{args[0]} did not start")
        time.sleep(0.01)
    return proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vu-reconnect-") as d:
        img = Path(d) / "disk.img"
        img.write_bytes(bytes(1 << 20))
        peers = {"serve-blk": [sys.executable, "-m", "vhostuser_rs", "serve-blk", str(img), "--socket-path"]}
        qsd = shutil.which("qemu-storage-daemon")
        if qsd:
            peers["qemu-storage-daemon"] = [
                qsd, "--blockdev", f"driver=file,node-name=f0,filename={img}",
                "--blockdev", "driver=raw,node-name=d0,file=f0", "--export",
            ]
        for name, prefix in peers.items():
            sock = Path(d) / f"{name}.sock"
            if name == "serve-blk":
                args = prefix + [str(sock)]
            else:
                args = prefix + [f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={sock},writable=on"]
            proc = start(args, sock)
            try:
                with BlockClient.connect(sock, reconnect=5) as disk:
                    times = []
                    for _ in range(a.rounds):
                        t0 = time.perf_counter()
                        disk.frontend.reconnect_now()
                        disk.write(0, b"x" * 512)
                        times.append(time.perf_counter() - t0)
                print(f"{name:20s} reconnect + one write: median {statistics.median(times) * 1e3:.2f} ms, "
                      f"max {max(times) * 1e3:.2f} ms ({a.rounds} rounds)")
            finally:
                proc.terminate()
                proc.wait(5)


if __name__ == "__main__":
    main()
