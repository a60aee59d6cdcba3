"""A real QEMU guest (TCG) as the front-end: Linux's virtio-blk driver on QEMU's
vhost-user-blk-pci against our back-end. The guest's init reads the whole disk, compares its
checksum with the image's, writes a marker, reads it back and powers off; the test then finds
the marker in the image file. QEMU 7.2 uses ADD_MEM_REG and starts the device twice per boot
(firmware, then Linux)."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peers import need, wait_for_socket, stop

QEMU = shutil.which("qemu-system-x86_64")
BUSYBOX = next((p for p in ("/bin/busybox", "/usr/bin/busybox") if os.access(p, os.X_OK)), None)
KERNEL_DIR = Path(os.environ.get("VHOSTUSER_RS_KERNEL_DIR", Path.home() / ".cache" / "vhostuser_rs" / "kernel"))
MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk"]
MARKER_SECTOR = 2048

INIT = textwrap.dedent(
    """\
    #!/bin/busybox sh
    /bin/busybox --install -s /bin
    export PATH=/bin
    mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
    report() { echo "GUEST: $*"; }
    die() { echo "GUEST-RESULT: FAIL $*"; poweroff -f; }
    for m in MODULE_LIST; do insmod /lib/modules/$m.ko || die "insmod $m"; done
    n=0; while [ ! -b /dev/vda ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n+1)); done
    [ -b /dev/vda ] || die "no /dev/vda"
    report "sectors=$(cat /sys/block/vda/size) queues=$(ls /sys/block/vda/mq | wc -l)"
    report "md5=$(dd if=/dev/vda bs=1M 2>/dev/null | md5sum | cut -d' ' -f1)"
    nonce=$(sed -n 's/.*marker=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
    printf 'VHOSTUSER-RS GUEST MARKER %s\\n' "$nonce" | dd of=/dev/vda bs=512 seek=MARKER_SECTOR count=1 conv=sync,fsync 2>/dev/null || die "write"
    echo 3 > /proc/sys/vm/drop_caches
    back=$(dd if=/dev/vda bs=512 skip=MARKER_SECTOR count=1 2>/dev/null | head -1)
    [ "$back" = "VHOSTUSER-RS GUEST MARKER $nonce" ] || die "read back '$back'"
    echo "GUEST-RESULT: OK"
    poweroff -f
    """
)


def kernel() -> tuple[Path, Path]:
    """The guest kernel and its module directory (extracted by .ci/run from Debian's package)."""
    images = sorted(KERNEL_DIR.glob("boot/vmlinuz-*"))
    if not images:
        if os.environ.get("CI"):
            pytest.fail(f"no guest kernel under {KERNEL_DIR} (.ci/run extracts linux-image-amd64 there)")
        pytest.skip(f"no guest kernel under {KERNEL_DIR} (see .ci/run for how to extract one)")
    version = images[-1].name.removeprefix("vmlinuz-")
    return images[-1], KERNEL_DIR / "lib" / "modules" / version


def build_initramfs(work: Path, modules_dir: Path, init_script: str = INIT) -> Path:
    root = work / "root"
    for d in ("bin", "dev", "proc", "sys", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(need(BUSYBOX, "busybox-static"), root / "bin" / "busybox")
    for m in MODULES:
        found = list(modules_dir.rglob(f"{m}.ko"))
        assert found, f"module {m} not found under {modules_dir}"
        shutil.copy(found[0], root / "lib" / "modules" / f"{m}.ko")
    init = root / "init"
    init.write_text(init_script.replace("MODULE_LIST", " ".join(MODULES)).replace("MARKER_SECTOR", str(MARKER_SECTOR)))
    init.chmod(0o755)
    archive = subprocess.run(
        "find . | cpio -o -H newc --quiet", shell=True, cwd=root, capture_output=True, check=True
    ).stdout
    out = work / "initramfs.cpio.gz"
    out.write_bytes(gzip.compress(archive, compresslevel=1))
    return out


PY_DEVICE = textwrap.dedent(
    """
    import os, struct, sys, time
    import vhostuser_rs as vu

    class FileBlock(vu.Device):
        device_type = "block"
        num_queues = 1
        features = int(vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.EVENT_IDX | vu.VirtioFeature.INDIRECT_DESC | vu.VirtioFeature.RING_PACKED) | (1 << 6) | (1 << 9)

        def __init__(self, path, stall_after=None):
            self.fd = os.open(path, os.O_RDWR)
            self.sectors = os.fstat(self.fd).st_size // 512
            self.stall_after = stall_after  # writes served before the device hangs (a test aid)

        def config(self):
            return struct.pack("<QIIHBBI", self.sectors, 0, 126, 0, 0, 0, 512) + bytes(36)

        def process(self, queue, chains):
            for chain in chains:
                rtype, _, sector = struct.unpack("<IIQ", chain.read(16))
                status, written = 0, 0
                if rtype == 0:
                    n = chain.writable_len - 1
                    written = chain.write(os.pread(self.fd, n, sector * 512))
                elif rtype == 1:
                    if self.stall_after is not None:
                        self.stall_after -= 1
                        if self.stall_after < 0:
                            print("STALLED", file=sys.stderr, flush=True)
                            time.sleep(3600)
                    os.pwrite(self.fd, chain.read()[16:], sector * 512)
                elif rtype == 4:
                    os.fdatasync(self.fd)
                elif rtype == 8:
                    written = chain.write(b"pyblk".ljust(20, b"\\0"))
                else:
                    status = 2
                chain.write(bytes([status]), chain.writable_len - 1)
                queue.complete(chain, written + 1)

    if __name__ == "__main__":  # run as a script; `vhostuser-rs serve FILE:FileBlock` imports it
        try:
            stall = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else None
            backend = vu.Backend.listen(sys.argv[2], FileBlock(sys.argv[1], stall))
            if sys.argv[4:] == ["async"]:
                import asyncio
                asyncio.run(backend.serve_async())  # the loop serves: no serving thread
            else:
                backend.serve_forever()
        except KeyboardInterrupt:
            pass
    """
)


RING_PACKED = 1 << 34


def acked_features(trace: str) -> list[int]:
    """The SET_FEATURES values in a back-end's request trace (VHOSTUSER_RS_TRACE=1)."""
    return [int(line.split("U64(")[1].split(")")[0]) for line in trace.splitlines() if "SET_FEATURES U64(" in line]


@pytest.mark.parametrize(
    "device",
    [
        "built-in",
        "python, served by an asyncio loop",
        "python via serve MODULE:CLASS, packed",
        "built-in behind a vIOMMU",
        "built-in, packed",
        "built-in behind a vIOMMU, packed",
    ],
)
def test_linux_guest_reads_and_writes_the_disk(sock_dir: Path, device: str) -> None:
    """With a vIOMMU (intel-iommu, iommu_platform=on) every ring and buffer address is an IOVA
    and the back-end learns translations from QEMU's IOTLB_MSG updates. With ``packed=on`` QEMU
    and the guest's driver use packed rings (VIRTIO_F_RING_PACKED), inflight tracking included."""
    iommu = "vIOMMU" in device
    packed = "packed" in device
    # iommu.strict=1: in the default lazy mode the guest's batched IOTLB flushes do not reach a
    # vhost-user back-end through QEMU 7.2's intel-iommu (measured: no INVALIDATE at all), so
    # the back-end keeps stale entries and the guest reuses their IOVAs: memory corruption.
    qemu = need(QEMU, "qemu-system-x86_64")
    vmlinuz, modules = kernel()
    work = sock_dir
    initrd = build_initramfs(work, modules)
    image = work / "disk.img"
    with open(image, "wb") as f:
        for i in range(8 << 20 >> 12):  # 8 MiB of varied content
            f.write(hashlib.sha256(i.to_bytes(4, "little")).digest() * 128)
    expected = hashlib.md5(image.read_bytes()).hexdigest()
    sock = work / "blk.sock"
    if device.startswith("built-in"):
        args = [sys.executable, "-m", "vhostuser_rs", "serve-blk", str(image), "--socket-path", str(sock)]
    elif "MODULE:CLASS" in device:
        module = work / "pyblk.py"
        module.write_text(PY_DEVICE)
        args = [sys.executable, "-m", "vhostuser_rs", "serve", f"{module}:FileBlock", f"path={str(image)!r}",
                "--socket-path", str(sock)]
    else:
        # Backend.serve_async (the sync serve loop runs the same per-message step, and the
        # restart test below serves this device with serve_forever).
        args = [sys.executable, "-c", PY_DEVICE, str(image), str(sock), "", "async"]
    env = dict(os.environ, VHOSTUSER_RS_TRACE="1")
    # The trace goes to a file: a pipe nobody reads during the boot would fill up and stall the
    # back-end (and with it the guest).
    trace_file = work / "backend.log"
    with open(trace_file, "wb") as log_out:
        backend = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log_out, env=env)
    nonce = os.urandom(6).hex()
    serial = work / "serial.log"
    try:
        wait_for_socket(sock, backend)
        cmd = [
            qemu, "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "1", "-m", "512M",
            "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{serial}", "-kernel", str(vmlinuz), "-initrd", str(initrd),
            *(["-device", "intel-iommu,intremap=off,device-iotlb=on"] if iommu else []),
            "-chardev", f"socket,id=c0,path={sock}",
            "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1" + (",iommu_platform=on,ats=on,disable-legacy=on" if iommu else "") + (",packed=on" if packed else ""),
            "-append", f"console=ttyS0 panic=-1 quiet rdinit=/init marker={nonce}" + (" intel_iommu=on iommu.strict=1" if iommu else ""),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        log = serial.read_text(errors="replace")
        assert "GUEST-RESULT: OK" in log, f"guest failed:\n{log[-3000:]}\nQEMU: {result.stderr[-2000:]}"
        assert f"md5={expected}" in log, "the guest read different bytes than the image holds"
        assert backend.poll() is None, "the back-end died"
    finally:
        stop(backend)
    trace = trace_file.read_text(errors="replace")
    # What QEMU sent, as the back-end saw it: inflight tracking always (vhost-user-blk uses it
    # when offered), IOTLB updates only behind the vIOMMU.
    assert "SET_INFLIGHT_FD" in trace
    assert ("IOTLB_MSG" in trace) == iommu, trace[-3000:]
    # The ring format really was the one asked for: Linux's driver acks RING_PACKED with
    # packed=on (the firmware's virtio-blk driver, which starts the device first, does not).
    features = acked_features(trace)
    assert features and bool(features[-1] & RING_PACKED) == packed, features
    assert packed or not any(f & RING_PACKED for f in features), features
    with open(image, "rb") as f:
        f.seek(MARKER_SECTOR * 512)
        assert f.read(64).startswith(f"VHOSTUSER-RS GUEST MARKER {nonce}".encode())


RECONNECT_INIT = textwrap.dedent(
    """\
    #!/bin/busybox sh
    /bin/busybox --install -s /bin
    export PATH=/bin
    mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
    die() { echo "GUEST-RESULT: FAIL $*"; poweroff -f; }
    for m in MODULE_LIST; do insmod /lib/modules/$m.ko || die "insmod $m"; done
    n=0; while [ ! -b /dev/vda ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n+1)); done
    [ -b /dev/vda ] || die "no /dev/vda"
    half=$(( $(cat /sys/block/vda/size) / 128 / 2 ))
    echo "GUEST: copy start"
    # The host kills the back-end and starts another one while this runs.
    dd if=/dev/vda of=/dev/vda bs=65536 count=$half seek=$half iflag=direct oflag=direct 2>/dev/null || die "copy"
    a=$(dd if=/dev/vda bs=65536 count=$half iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    b=$(dd if=/dev/vda bs=65536 skip=$half count=$half iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$a" = "$b" ] || die "halves differ: $a $b"
    echo "GUEST-RESULT: OK"
    poweroff -f
    """
)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_guest_io_survives_a_backend_restart(sock_dir: Path, packed: bool) -> None:
    """QEMU reconnects (chardev reconnect=1) to a new back-end after the first one hangs with
    guest writes in flight and is killed; QEMU hands the new one (serve-blk) the inflight buffer
    of the dead one, which resubmits the requests it had taken, and the guest's copy completes
    intact. The first back-end is the Python device, made to hang after 40 writes. Packed: the
    inflight buffer has the packed layout and the restarted ring's positions come from it."""
    import signal
    import time

    qemu = need(QEMU, "qemu-system-x86_64")
    vmlinuz, modules = kernel()
    work = sock_dir
    initrd = build_initramfs(work, modules, RECONNECT_INIT)
    image = work / "disk.img"
    with open(image, "wb") as f:
        for i in range(32 << 20 >> 12):  # 32 MiB: two 16 MiB halves
            f.write(hashlib.sha256(i.to_bytes(4, "little")).digest() * 128)
    sock = work / "blk.sock"
    args = [sys.executable, "-m", "vhostuser_rs", "serve-blk", str(image), "--socket-path", str(sock)]
    env = dict(os.environ, VHOSTUSER_RS_TRACE="1")
    logs = [work / "backend1.log", work / "backend2.log"]
    with open(logs[0], "wb") as out:
        first = subprocess.Popen([sys.executable, "-c", PY_DEVICE, str(image), str(sock), "40"],
                                 stdout=subprocess.DEVNULL, stderr=out, env=env)
    second = None
    serial = work / "serial.log"
    vm = None
    try:
        wait_for_socket(sock, first)
        vm = subprocess.Popen(
            [
                qemu, "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "1", "-m", "512M",
                "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", f"file:{serial}", "-kernel", str(vmlinuz), "-initrd", str(initrd),
                "-chardev", f"socket,id=c0,path={sock},reconnect=1",
                "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1" + (",packed=on" if packed else ""),
                "-append", "console=ttyS0 panic=-1 quiet rdinit=/init",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 40
        while "STALLED" not in logs[0].read_text(errors="replace"):
            assert vm.poll() is None and time.monotonic() < deadline, "the first back-end never hung"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        with open(logs[1], "wb") as out:
            second = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=out, env=env)
        _, qemu_err = vm.communicate(timeout=45)
        log = serial.read_text(errors="replace")
        assert "GUEST-RESULT: OK" in log, f"guest failed:\n{log[-3000:]}\nQEMU: {qemu_err.decode(errors='replace')[-2000:]}"
    finally:
        if vm is not None and vm.poll() is None:
            vm.kill()
            vm.communicate()
        stop(first)
        if second is not None:
            stop(second)
    trace = logs[1].read_text(errors="replace")
    assert "SET_INFLIGHT_FD" in trace and "GET_INFLIGHT_FD" not in trace, trace[-2000:]
    resubmitted = [int(line.split(": ")[2].split()[0]) for line in trace.splitlines() if "resubmitted from" in line]
    assert resubmitted and resubmitted[0] > 0, trace[-2000:]
    features = acked_features(trace)
    assert features and all(bool(f & RING_PACKED) == packed for f in features), features
    data = image.read_bytes()
    assert data[: 16 << 20] == data[16 << 20 :]
