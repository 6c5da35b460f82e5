#!/usr/bin/env bash
# Fill wheelhouse/ (git-ignored) with what tools/device/gpu_check.sh installs on a GPU machine that has
# python3 but no network: the [cuda] extra, pinned as in pyproject.toml.  Pure-Python wheels go to
# wheelhouse/any, the others to wheelhouse/cpXY for each Python version asked for (default: 3.12, the
# GPU machines' python3, and this machine's own, so the script can be tried here up to "no GPU").
# The GPU image already holds numpy, pytest, hypothesis, msgpack, click, grpcio, Cython and setuptools
# (see the README's GPU section); gpu_check.sh checks and names any that is missing.
#   tools/device/make_wheelhouse.sh [PYVER ...]      e.g. tools/device/make_wheelhouse.sh 3.12 3.11
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WHEELS=${WHEELHOUSE:-$ROOT/wheelhouse}
CUDA_BINDINGS=cuda-bindings==12.9.4
CUFILE=nvidia-cufile-cu12==1.14.1.1
PATHFINDER=cuda-pathfinder==1.9.1
versions=("$@")
if [ ${#versions[@]} -eq 0 ]; then
    versions=(3.12 "$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')")
fi
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
mkdir -p "$WHEELS/any"
python3 -m pip download -q --no-deps --only-binary=:all: "${platforms[@]}" --python-version 3.12 \
    -d "$WHEELS/any" "$CUFILE" "$PATHFINDER"
for v in $(printf '%s\n' "${versions[@]}" | sort -u); do
    tag=cp${v/./}
    mkdir -p "$WHEELS/$tag"
    python3 -m pip download -q --no-deps --only-binary=:all: "${platforms[@]}" --python-version "$v" \
        --implementation cp -d "$WHEELS/$tag" "$CUDA_BINDINGS"
done
ls -l "$WHEELS"/*/
du -sh "$WHEELS"
