#!/usr/bin/env bash
# One device call: build the extension, run the whole test suite on CUDA, run the
# benchmarks and the main job, and leave logs, JSON and a markdown table in $OUT.
#
#   OUT=/some/dir bash scripts/gpu_check.sh [STAGE ...]     ($OUT defaults to ./gpu_out)
#
# STAGE is one or more of tests, sanitize, bench, vit, main, diag, profile, or all (the default,
# every stage in that order). The stages split the work over several device calls when one
# would run past the 10-minute limit (the first run compiles every kernel variant):
#   tests     the test suite on CUDA (in parallel with pytest-xdist where it is installed:
#             compiling Triton kernels is CPU-bound, and the tests are not timed)
#   sanitize  the patch-embedding tests (the csrc/ CUDA kernels, every odd size and layout
#             they cover) under compute-sanitizer's memcheck
#   bench     `pytest benchmarks/ --benchmark-only` for the per-op benchmarks
#   vit       the end-to-end benchmarks and the training job's fused/eager throughput ratio
#   main      the main job (`python -m vit_kernels.bench`): bench-main.json, .md and .png
#   diag      scripts/gpu_diag.py switches attention overhead: switches not yet timed on a GPU
#             on and off, every attention config forced (rule and time each) and where each
#             op's time goes (diag.txt)
#   profile   scripts/profile_vit_step.py: a ViT-B/16 training step's kernels by kind, its wall
#             time (median, min, max) and the host side (garbage collections, time to issue a
#             step, synchronizing calls, cProfile); then scripts/host_overhead.py on this host's
#             CPU, launches stubbed and with Triton's launch path kept (seconds; no GPU work), to
#             set against the same numbers from the 2-core CI CPU in README
# Each stage may be capped in seconds by <STAGE>_TIMEOUT_S (e.g. TESTS_TIMEOUT_S=300); a
# capped stage is interrupted, prints what it has, and the script goes on to the next.
#
# The device machine has no network: dependencies come from its image, so the
# install uses --no-build-isolation --no-deps (which also makes setup.py compile
# csrc/, CUDA sources included, ahead of time).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] || [ "${STAGES[0]}" = all ] && STAGES=(tests sanitize bench vit main diag profile)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
status=0

capped() {  # capped STAGE command...: run under the stage's time cap (SIGINT first, so pytest reports)
    local var
    var="$(echo "$1" | tr a-z A-Z)_TIMEOUT_S"
    shift
    if [ -n "${!var:-}" ]; then
        timeout -s INT -k 30 "${!var}" "$@"
    else
        "$@"
    fi
}

{
    nvidia-smi
    python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
    nvcc --version | tail -2
} > "$OUT/env.txt" 2>&1
tail -3 "$OUT/env.txt"

echo "== build"
if ! python -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1; then
    echo "pip install failed (see install.log); using the tree on PYTHONPATH and the first-use JIT build"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
python -c "from vit_kernels import _extension; print('extension:', _extension.load(), 'cuda', _extension.cuda_version())" 2>&1 | tee "$OUT/extension.txt" || status=1

for stage in "${STAGES[@]}"; do
    start=$SECONDS
    # The load says whether leftovers of a capped stage still share the CPU (host-bound timings).
    echo "== $stage (load average $(cut -d' ' -f1 /proc/loadavg))"
    case "$stage" in
    tests)
        workers=()
        python -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-8}")
        capped tests python -m pytest tests -q -rfEs "${workers[@]}" --durations=20 -p no:cacheprovider \
            --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
        grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
        tail -4 "$OUT/tests.log"
        ;;
    sanitize)
        capped sanitize compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
            python -m pytest tests/test_patch_embed.py -q -x -p no:cacheprovider > "$OUT/memcheck.log" 2>&1 || status=1
        grep -E "ERROR SUMMARY|Invalid|FAILED" "$OUT/memcheck.log" | head -10
        tail -3 "$OUT/memcheck.log"
        ;;
    bench)
        capped bench python -m pytest benchmarks/ --benchmark-only -q -rfEs -p no:cacheprovider \
            --ignore=benchmarks/test_bench_vit.py --benchmark-json="$OUT/benchmarks-ops.json" \
            --benchmark-columns=median,iqr,rounds > "$OUT/benchmarks-ops.log" 2>&1 || status=1
        grep -E "^(FAILED|ERROR)" "$OUT/benchmarks-ops.log" | head -20
        tail -3 "$OUT/benchmarks-ops.log"
        ;;
    vit)
        capped vit python -m pytest benchmarks/test_bench_vit.py --benchmark-only -q -rfEs -p no:cacheprovider \
            --benchmark-json="$OUT/benchmarks-vit.json" --benchmark-columns=median,iqr,rounds \
            > "$OUT/benchmarks-vit.log" 2>&1 || status=1
        grep -E "^(FAILED|ERROR)" "$OUT/benchmarks-vit.log" | head -20
        tail -3 "$OUT/benchmarks-vit.log"
        echo "-- training job: fused vs eager throughput (ViT-B/16, synthetic data, bf16)"
        python -m vit_kernels.train --compare --model vit_base_patch16_224 --data synthetic --batch-size 128 \
            --synthetic-images 4096 --compare-steps 20 --no-save > "$OUT/train_compare.txt" 2>&1 || status=1
        tail -3 "$OUT/train_compare.txt"
        ;;
    main)
        # MAIN_OPS (space-separated) limits the main job to some ops, e.g. MAIN_OPS="flash_attention vit".
        capped main python -m vit_kernels.bench --quick ${MAIN_OPS:+--ops $MAIN_OPS} --json "$OUT/bench-main.json" \
            --markdown "$OUT/bench-main.md" --plot "$OUT/bench-main.png" > "$OUT/bench-main.log" 2>&1 || status=1
        grep -E "FAIL" "$OUT/bench-main.log" | head -20
        tail -2 "$OUT/bench-main.log"
        ;;
    diag)
        capped diag python scripts/gpu_diag.py switches attention overhead > "$OUT/diag.txt" 2>&1 || status=1
        grep -E "BAD" "$OUT/diag.txt" | head -20
        tail -3 "$OUT/diag.txt"
        ;;
    profile)
        capped profile python scripts/profile_vit_step.py timm timm_swapped reference_fused > "$OUT/profile.txt" 2>&1 || status=1
        grep -E "step|host:" "$OUT/profile.txt"
        for mode in "" --triton-launch; do
            python scripts/host_overhead.py $mode >> "$OUT/host_overhead.txt" 2>&1 || status=1
        done
        grep -E "launch|train step" "$OUT/host_overhead.txt"
        ;;
    *)
        echo "unknown stage $stage (tests, sanitize, bench, vit, main, diag, profile, all)"
        exit 2
        ;;
    esac
    echo "-- $stage took $((SECONDS - start)) s"
done
exit $status
