"""Shared fixtures: every test runs under an fd-leak check."""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def open_fds() -> set[int]:
    """The descriptors open in this process right now."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Fail a test that leaves descriptors open (the listing fd itself comes and goes)."""
    gc.collect()
    before = open_fds()
    yield
    gc.collect()
    leaked = open_fds() - before
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"leaked fds: {sorted((fd, os.readlink(f'/proc/self/fd/{fd}')) for fd in leaked)}"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A private directory for socket files (Unix socket paths must stay short)."""
    with tempfile.TemporaryDirectory(prefix="vu-") as d:
        yield Path(d)
