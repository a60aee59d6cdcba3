#!/usr/bin/env bash
# Runs every test of vhostuser_rs: Rust unit and integration tests, the Python suite against the
# installed package, and the type-stub check. Used by CI (.ci/run) and by the README.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo test"
cargo test --quiet

echo "== build and install the package"
python3 -m pip install --quiet --disable-pip-version-check ".[test]"

echo "== stubs (mypy.stubtest)"
# Run from outside the source tree so the installed package is the one checked.
(cd /tmp && python3 -m mypy.stubtest vhostuser_rs._native)

echo "== types (mypy --strict)"
python3 -m mypy --strict python/vhostuser_rs

echo "== pytest"
python3 -m pytest -p no:cacheprovider tests/python "$@"
