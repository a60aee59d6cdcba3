"""The back-end programs follow the spec's conventions (vhost-user.rst "Back-end program
conventions", vhost-user.json): `--print-capabilities` names only options the command takes, and
those options (`--blk-file`, `--read-only`, `--fd`) do what they say."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vhostuser_rs import Frontend
from vhostuser_rs.blk import BlockClient, BlockError, BlockFeature

CLI = [sys.executable, "-m", "vhostuser_rs"]


def capabilities(command: str) -> dict[str, object]:
    out = subprocess.run([*CLI, command, "--print-capabilities"], check=True, capture_output=True, text=True, timeout=30)
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


def test_serve_blk_capabilities_are_options_it_accepts() -> None:
    doc = capabilities("serve-blk")
    assert doc["type"] == "block"
    features = doc["features"]
    assert isinstance(features, list) and set(features) == {"read-only", "blk-file"}
    helptext = subprocess.run([*CLI, "serve-blk", "--help"], check=True, capture_output=True, text=True, timeout=30).stdout
    for feature in features:
        # vhost-user.json: each block feature is "the --FEATURE command line option is supported".
        assert f"--{feature}" in helptext


def test_serve_net_capabilities_claim_no_undefined_features() -> None:
    # vhost-user.json defines no feature list for "net": the type is the whole answer.
    assert capabilities("serve-net") == {"type": "net"}


@pytest.mark.parametrize("argv", [[], ["IMG", "--blk-file", "IMG"]], ids=["no image", "image twice"])
def test_serve_blk_wants_exactly_one_image(tmp_path: Path, argv: list[str]) -> None:
    argv = [str(tmp_path / "i.img") if a == "IMG" else a for a in argv]
    r = subprocess.run([*CLI, "serve-blk", *argv, "--socket-path", str(tmp_path / "s")], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2
    assert "--blk-file" in r.stderr
    assert not (tmp_path / "s").exists()


def test_blk_file_read_only_over_an_inherited_fd(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    content = os.urandom(64 << 10)
    image.write_bytes(content)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [*CLI, "serve-blk", "--blk-file", str(image), "--read-only", "--fd", str(theirs.fileno())],
        pass_fds=[theirs.fileno()], stderr=subprocess.PIPE,
    )
    theirs.close()
    try:
        with BlockClient(Frontend.from_socket(ours, timeout=10), timeout=10) as disk:
            assert int(disk.features) & BlockFeature.RO, "--read-only offers VIRTIO_BLK_F_RO"
            assert disk.capacity == len(content)
            assert disk.read(4096, 8192) == content[4096:12288]
            with pytest.raises(BlockError):
                disk.write(0, b"\xff" * 512)
        ours.close()
        # --fd serves that one connection: the program ends when the front-end goes.
        assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert image.read_bytes() == content, "a read-only device wrote the image"
