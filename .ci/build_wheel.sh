#!/usr/bin/env bash
# Builds the release artefacts into OUTDIR (default target/dist): the sdist, then the wheel FROM
# that sdist (so a wheel that builds proves the sdist is complete, at no extra compile), as a
# manylinux wheel whose tag names the oldest glibc the extension really needs.
#
# Linking against the build machine's glibc (2.36 on Debian 12) would bind pthread_create & co.
# to their GLIBC_2.34 versions; zig (PyPI's ziglang, pinned) links against glibc 2.27's symbol
# versions instead. 2.27 is the floor because of memfd_create (guest memory is memfd-backed).
# .ci/check_wheel.py then checks the tag against the module's ELF version references.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$repo/target/dist}" && cd "${1:-$repo/target/dist}" && pwd)"
glibc=2_27
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"

python3 -m pip install --quiet --disable-pip-version-check "ziglang==0.17.1" "maturin>=1.9,<2"
PATH="$(python3 -c 'import os, ziglang; print(os.path.dirname(ziglang.__file__))'):$PATH"
export PATH

rm -f "$out"/vhostuser_rs-*
(cd "$repo" && maturin sdist --out "$out")
sdist=$(ls "$out"/vhostuser_rs-*.tar.gz)

# Unpack with fresh mtimes (tar -m): cargo's fingerprints would otherwise take the sources for
# the ones already compiled in this target directory and skip compiling the sdist's own.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar -xzmf "$sdist" -C "$src"
(cd "$src"/vhostuser_rs-* && maturin build --release --zig --compatibility "manylinux_$glibc" --out "$out")
wheel=$(ls "$out"/vhostuser_rs-*.whl)
python3 "$repo/.ci/check_wheel.py" "$wheel" "$repo"
