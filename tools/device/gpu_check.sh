#!/usr/bin/env bash
# The VRAM tier's check on a GPU machine with python3 and no network, in about 8 minutes at most:
#   1. what the machine is (python, GPU, driver, nvidia-fs);
#   2. install the [cuda] extra from wheelhouse/ (tools/device/make_wheelhouse.sh fills it) into a
#      private target dir, put first on PYTHONPATH;
#   3. build the Cython extension (or, if that fails, run on the pure-Python engine, saying so);
#   4. tests/test_vram.py, the tier contract (VramTier included) and tests/test_gpu_buffers.py;
#   5. tools/bench/vram_bench.py with JSON.
# Everything lands in OUTDIR (default $OUT, else ./gpu-check-out): gpu_check.log, junit.xml,
# vram_bench.json, summary.json.  Each step has its own timeout.  Without a GPU it installs, builds,
# and reports the tests skipped ("no CUDA device: ...") and the benchmark skipped: exit 0.
#   tools/device/gpu_check.sh [OUTDIR]
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 2
OUTDIR=${1:-${OUT:-$ROOT/gpu-check-out}}
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
WHEELS=${WHEELHOUSE:-$ROOT/wheelhouse}
SITE=${SITE:-/tmp/mooncakefs-cuda-site}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
export PYTHONUNBUFFERED=1
declare -A status
step() { echo; echo "== $(date -u +%H:%M:%S) $*"; }
summary() {
    {
        echo "{"
        first=1
        for k in "${!status[@]}"; do
            [ $first -eq 1 ] || echo ","
            first=0
            printf '  "%s": "%s"' "$k" "${status[$k]}"
        done
        echo; echo "}"
    } > "$OUTDIR/summary.json"
    cat "$OUTDIR/summary.json"
}

step "machine"
$PY --version
uname -srm
tag=$($PY -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
if command -v nvidia-smi > /dev/null; then
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
else
    echo "nvidia-smi: not found"
fi
if [ -d /sys/module/nvidia_fs ]; then echo "nvidia-fs: loaded"; else echo "nvidia-fs: not loaded (cuFile runs in compatibility mode)"; fi
df -T "$BENCH_DIR" | tail -1

step "install the [cuda] extra from $WHEELS (python tag $tag)"
if [ ! -d "$WHEELS/$tag" ]; then
    echo "no wheels for $tag in $WHEELS: run tools/device/make_wheelhouse.sh ${tag:2:1}.${tag:3} where pip works, and carry wheelhouse/"
    status[install]="no wheels for $tag"
    summary
    exit 3
fi
rm -rf "$SITE"
if timeout 180 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/any/*.whl "$WHEELS/$tag"/*.whl; then
    status[install]=ok
else
    status[install]=failed
    summary
    exit 4
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export LD_LIBRARY_PATH="$SITE/nvidia/cufile/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
timeout 60 $PY - << 'EOF'
import importlib
missing = []
for name in ("cuda.bindings.driver", "cuda.bindings.cufile", "numpy", "pytest", "msgpack", "click", "grpc"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}")
    except Exception as exc:  # say what is missing: it must travel as a wheel
        missing.append(f"{name} ({exc})")
import cuda.bindings
print("cuda-bindings", cuda.bindings.__version__)
if missing:
    raise SystemExit("missing: " + ", ".join(missing))
EOF
if [ $? -ne 0 ]; then
    status[imports]=missing
    summary
    exit 5
fi
status[imports]=ok

step "build the extension"
# built for this python, in this tree (not another install's, which would not match this source)
if timeout 30 $PY -c "import sys, mooncakefs._engine as e; sys.exit(not e.__file__.startswith('$ROOT/'))" 2> /dev/null; then
    echo "mooncakefs._engine imports as carried"
    status[build]=carried
elif timeout 240 $PY setup.py build_ext --inplace -q; then
    status[build]=built
else
    echo "build failed: the tests run on the pure-Python engine (MOONCAKEFS_ENGINE=python)"
    export MOONCAKEFS_ENGINE=python
    status[build]="failed: pure-Python engine"
fi

step "tests: VRAM tier, tier contract, GPU buffers"
timeout 300 $PY -m pytest -q -rs -p no:cacheprovider --junitxml="$OUTDIR/junit.xml" \
    tests/test_vram.py tests/test_tier_contract.py tests/test_gpu_buffers.py
rc=$?
status[tests]=$([ $rc -eq 0 ] && echo passed || echo "failed (rc $rc)")

step "benchmark"
mkdir -p "$BENCH_DIR"
timeout 150 $PY tools/bench/vram_bench.py --data "$BENCH_DIR" --json "$OUTDIR/vram_bench.json"
brc=$?
status[bench]=$([ $brc -eq 0 ] && echo ok || echo "failed (rc $brc)")

step "summary"
summary
[ $rc -eq 0 ] && [ $brc -eq 0 ]
