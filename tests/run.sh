#!/usr/bin/env bash
# Runs every test of vhostuser_rs: Rust unit and integration tests, the Python suite against the
# installed package, and the type-stub check. Used by CI (.ci/run) and by the README.
# VHOSTUSER_RS_WHEEL=path/to.whl installs that wheel instead of building the package here.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo test"
cargo test --quiet

if [ -n "${VHOSTUSER_RS_WHEEL:-}" ]; then
    # CI (.ci/run) built the release wheel once: test that wheel rather than build a second one.
    echo "== install $VHOSTUSER_RS_WHEEL"
    python3 -m pip install --quiet --disable-pip-version-check "$VHOSTUSER_RS_WHEEL[test]"
    # The same version may already be installed (pip would then keep it): replace it.
    python3 -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$VHOSTUSER_RS_WHEEL"
else
    echo "== build and install the package"
    python3 -m pip install --quiet --disable-pip-version-check ".[test]"
fi

echo "== stubs (mypy.stubtest)"
# Run from outside the source tree so the installed package is the one checked.
(cd /tmp && python3 -m mypy.stubtest vhostuser_rs._native)

echo "== types (mypy --strict)"
python3 -m mypy --strict python/vhostuser_rs

echo "== pytest"
python3 -m pytest -p no:cacheprovider tests/python "$@"
