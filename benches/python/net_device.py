"""Python net devices for the net benchmark (`benches/python/bench_net.py`), served on a socket.

Run: ``python benches/python/net_device.py SOCKET count|echo [--cpus 0] [--poll-us 50]``, then
drive it with testpmd's virtio_user (see bench_net.py). ``count`` counts the frames the driver
transmits (what a capture or a sink written in Python costs); ``echo`` sends each burst back into
the driver's receive queue, MAC addresses swapped (a reflector written in Python). On SIGTERM
it prints the same counters line as ``vhostuser-rs serve-net``.
"""

from __future__ import annotations

import argparse
import signal
import sys

import vhostuser_rs as vu


class Count(vu.NetDevice):
    frames = 0

    def receive(self, queue_pair: int, frames: list[vu.net.Frame]) -> None:
        self.frames += len(frames)


class Echo(vu.NetDevice):
    def receive(self, queue_pair: int, frames: list[vu.net.Frame]) -> None:
        out = []
        for f in frames:
            b = bytearray(f.data)
            b[0:12] = b[6:12] + b[0:6]
            out.append(b)
        self.send(queue_pair, out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("socket")
    p.add_argument("device", choices=("count", "echo"))
    p.add_argument("--cpus", default=None, help="pin the pair's worker to these CPUs (e.g. 0)")
    p.add_argument("--poll-us", type=float, default=0.0)
    p.add_argument("--queue-pairs", type=int, default=1)
    args = p.parse_args()
    device: vu.NetDevice = Count() if args.device == "count" else Echo()
    device.queue_pairs = args.queue_pairs
    cpus = [int(c) for c in args.cpus.split(",")] if args.cpus else None

    def terminate(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    with vu.Backend.listen(args.socket, device, cpus=cpus, poll=args.poll_us / 1e6) as backend:
        try:
            backend.serve_forever()
        except KeyboardInterrupt:
            pass
    print("serve-net: " + " ".join(f"{k}={v}" for k, v in device.counters().items()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
