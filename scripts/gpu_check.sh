#!/usr/bin/env bash
# One device call: build the extension, run the whole test suite on CUDA, run the
# benchmarks and the main job, and leave logs, JSON and a markdown table in $OUT.
#
#   OUT=/some/dir bash scripts/gpu_check.sh [all|tests|sanitize|bench|vit]     ($OUT defaults to ./gpu_out)
#
# The stage argument splits the work over several device calls when one would run past
# the 10-minute limit (the first run compiles every kernel variant the tests use):
# `tests` builds and runs the test suite; `sanitize` runs the patch-embedding tests (the
# csrc/ CUDA kernels, every odd size and layout they cover) under compute-sanitizer's
# memcheck; `bench` the per-op benchmarks and the main
# job's per-op rows; `vit` the end-to-end benchmarks, the main job's end-to-end rows and
# the training job's fused/eager throughput ratio; `all` (the default) does everything.
# The main job leaves bench-<stage>.json, .md and .png (its speedup chart) in $OUT.
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

if [ "$STAGE" = all ] || [ "$STAGE" = sanitize ]; then
echo "== compute-sanitizer memcheck: csrc/ CUDA kernels"
if ! compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
        python -m pytest tests/test_patch_embed.py -q -x -p no:cacheprovider > "$OUT/memcheck.log" 2>&1; then
    status=1
fi
tail -8 "$OUT/memcheck.log"
fi
[ "$STAGE" = sanitize ] && exit $status

if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
echo "== op benchmarks"
if ! python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider --ignore=benchmarks/test_bench_vit.py \
        --benchmark-json="$OUT/benchmarks-ops.json" --benchmark-columns=median,iqr,rounds > "$OUT/benchmarks-ops.log" 2>&1; then
    status=1
fi
tail -40 "$OUT/benchmarks-ops.log"
fi

if [ "$STAGE" = all ] || [ "$STAGE" = vit ]; then
echo "== end-to-end benchmarks"
if ! python -m pytest benchmarks/test_bench_vit.py --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$OUT/benchmarks-vit.json" --benchmark-columns=median,iqr,rounds > "$OUT/benchmarks-vit.log" 2>&1; then
    status=1
fi
tail -30 "$OUT/benchmarks-vit.log"
echo "== training job: fused vs eager throughput (ViT-B/16, synthetic data, bf16)"
python -m vit_kernels.train --compare --model vit_base_patch16_224 --data synthetic --batch-size 128 \
    --synthetic-images 4096 --compare-steps 20 --no-save 2>&1 | tee "$OUT/train_compare.txt" | tail -3 || status=1
fi

echo "== main job"
case "$STAGE" in
    bench) ops=(--ops add_layer_norm flash_attention bias_gelu fc1_bias_gelu mlp patch_embed patch_embed_uint8) ;;
    vit) ops=(--ops vit) ;;
    *) ops=() ;;
esac
python -m vit_kernels.bench --quick "${ops[@]}" --json "$OUT/bench-$STAGE.json" --markdown "$OUT/bench-$STAGE.md" \
    --plot "$OUT/bench-$STAGE.png" > "$OUT/bench-$STAGE.log" 2>&1 || status=1
cat "$OUT/bench-$STAGE.md"
exit $status
