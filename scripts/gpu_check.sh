#!/usr/bin/env bash
# One device call: build the extension, run the whole test suite on CUDA, run the
# benchmarks and the main job, and leave logs, JSON and a markdown table in $OUT.
#
#   OUT=/some/dir bash scripts/gpu_check.sh [all|tests|bench]     ($OUT defaults to ./gpu_out)
#
# The stage argument splits the work over several device calls when one would run past
# the 10-minute limit (the first run compiles every kernel variant the tests use):
# `tests` builds and runs the test suite, `bench` builds and runs the benchmarks and
# the main job; `all` (the default) does both.
#
# The device machine has no network: dependencies come from its image, so the
# install uses --no-build-isolation --no-deps (which also makes setup.py compile
# csrc/, CUDA sources included, ahead of time).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
STAGE=${1:-all}
mkdir -p "$OUT"
status=0

{
    nvidia-smi
    python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
    nvcc --version | tail -2
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tail -3

echo "== build"
if ! python -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1; then
    echo "pip install failed (see install.log); using the tree on PYTHONPATH and the first-use JIT build"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
python -c "from vit_kernels import _extension; print('extension:', _extension.load(), 'cuda', _extension.cuda_version())" 2>&1 | tee "$OUT/extension.txt" || status=1

if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then
echo "== tests"
if ! python -m pytest tests -q -rs -p no:cacheprovider --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1; then
    status=1
fi
tail -15 "$OUT/tests.log"
fi
[ "$STAGE" = tests ] && exit $status

echo "== benchmarks"
if ! python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$OUT/benchmarks.json" --benchmark-columns=median,iqr,rounds > "$OUT/benchmarks.log" 2>&1; then
    status=1
fi
tail -40 "$OUT/benchmarks.log"

echo "== main job"
python -m vit_kernels.bench --quick --json "$OUT/bench.json" --markdown "$OUT/bench.md" > "$OUT/bench.log" 2>&1 || status=1
cat "$OUT/bench.md"
exit $status
