#!/usr/bin/env python3
"""Checks that a built wheel's platform tag is honest and that it ships the whole package.

- The manylinux tag must name the newest glibc symbol version the extension requires (its ELF
  version references, which is what the dynamic loader checks), no older and no newer: a newer
  tag needlessly refuses older distributions, an older one installs where the module cannot load.
- The Python tag must be ``cp311-abi3`` (one wheel for CPython 3.11 and later).
- Every module of python/vhostuser_rs, the stubs and py.typed must be inside, and the console
  script declared.

Usage: check_wheel.py WHEEL [SOURCE_DIR]
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def glibc_needed(so: Path) -> tuple[int, int]:
    """The newest GLIBC_x.y in the object's version references (all libraries of glibc)."""
    out = subprocess.run(["objdump", "-p", str(so)], check=True, capture_output=True, text=True).stdout
    refs = out.split("Version References:", 1)[-1]
    versions = {tuple(int(p) for p in m.group(1).split(".")[:2]) for m in re.finditer(r"\bGLIBC_(\d+(?:\.\d+)+)\b", refs)}
    if not versions:
        raise SystemExit(f"{so.name}: no GLIBC version references found")
    return max(versions)  # type: ignore[return-value]


def main() -> int:
    wheel = Path(sys.argv[1])
    source = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parent.parent
    errors: list[str] = []
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
        names = set(zf.namelist())
        wheel_meta = next(n for n in names if n.endswith(".dist-info/WHEEL"))
        tags = [line.split(":", 1)[1].strip() for line in zf.read(wheel_meta).decode().splitlines() if line.startswith("Tag:")]
        sos = [n for n in names if n.endswith(".so")]
        if len(sos) != 1:
            errors.append(f"expected one extension module, found {sos}")
        so = Path(zf.extract(sos[0], tmp))
        major, minor = glibc_needed(so)
        print(f"{wheel.name}: tags {tags}; {sos[0]} requires glibc {major}.{minor}")
        for tag in tags:
            python, abi, platform = tag.split("-")
            if (python, abi) != ("cp311", "abi3"):
                errors.append(f"tag {tag}: expected cp311-abi3")
            m = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", platform)
            if not m:
                errors.append(f"tag {tag}: expected a PEP 600 manylinux_X_Y_x86_64 platform")
            elif (int(m.group(1)), int(m.group(2))) != (major, minor):
                errors.append(
                    f"tag {tag} claims glibc {m.group(1)}.{m.group(2)} but the module requires {major}.{minor}: "
                    f"build with --compatibility manylinux_{major}_{minor} (.ci/build_wheel.sh)"
                )
        expected = {f"vhostuser_rs/{p.name}" for p in (source / "python/vhostuser_rs").iterdir() if p.suffix in {".py", ".pyi"} or p.name == "py.typed"}
        missing = sorted(expected - names)
        if missing:
            errors.append(f"missing from the wheel: {missing}")
        entry_points = next((n for n in names if n.endswith(".dist-info/entry_points.txt")), None)
        scripts = zf.read(entry_points).decode().replace(" ", "") if entry_points else ""
        if "vhostuser-rs=vhostuser_rs.cli:main" not in scripts:
            errors.append("console script vhostuser-rs not declared")
    for e in errors:
        print("error:", e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
