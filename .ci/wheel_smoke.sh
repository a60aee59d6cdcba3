#!/usr/bin/env bash
# Installs WHEEL into a fresh virtualenv (no system site-packages) and, on a PATH without cargo
# or rustc, runs the main job (`vhostuser-rs bench`) and a few fast test files that exercise
# both roles from that install: what a user of the wheel gets, nothing built on the spot.
# Usage: wheel_smoke.sh WHEEL [VENV]   (VENV defaults to target/wheel-venv; it is recreated)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
wheel="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
venv="${2:-$repo/target/wheel-venv}"

rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel[test]"

# Only the venv, the system's own directories and the peers' (qemu, dpdk-testpmd): no
# ~/.cargo/bin, no pyenv shims.
clean_path="$venv/bin:/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"
for tool in cargo rustc maturin; do
    if PATH="$clean_path" command -v "$tool" >/dev/null; then
        echo "error: $tool is on the smoke test's PATH" >&2
        exit 1
    fi
done

cd "$repo/tests/python"   # not the source tree's root: python/ must not shadow the install
PATH="$clean_path" python - <<'PY'
import sys, vhostuser_rs
assert vhostuser_rs.__file__.startswith(sys.prefix), vhostuser_rs.__file__
print("vhostuser_rs", vhostuser_rs.__version__, "from", vhostuser_rs.__file__)
PY
PATH="$clean_path" vhostuser-rs bench --time 2
PATH="$clean_path" python -m pytest -p no:cacheprovider -q --rootdir "$repo" -c "$repo/pyproject.toml" \
    test_package.py test_blk_fast.py test_backend_python_device.py test_net_client.py
