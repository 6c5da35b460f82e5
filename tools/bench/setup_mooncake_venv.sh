#!/usr/bin/env bash
# Build a throwaway virtualenv holding the real Mooncake store (non-CUDA wheel) so that
# tools/bench/mooncake_baseline.py can measure it next to mooncakefs. Idempotent: re-running
# only installs what is missing. Usage: setup_mooncake_venv.sh [VENV] (default /tmp/mooncake-venv).
set -euo pipefail

VENV="${1:-/tmp/mooncake-venv}"
PYTHON="${PYTHON:-python3}"

# The wheel's native libraries link against libibverbs even when no RDMA device exists.
if ! ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1'; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y libibverbs1
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi

if ! "$VENV/bin/python" -c 'import numpy, mooncake.store' >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
        mooncake-transfer-engine-non-cuda numpy
fi

"$VENV/bin/python" -c 'import numpy, mooncake.store' >/dev/null
echo "$VENV"
