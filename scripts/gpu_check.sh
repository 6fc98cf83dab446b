#!/usr/bin/env bash
# One device call: build the extension, run the test suite on CUDA, run the benchmarks and
# the main job, and leave logs, JSON and a markdown table in $OUT.
#
#   OUT=/some/dir bash scripts/gpu_check.sh [STAGE ...]     ($OUT defaults to ./gpu_out)
#
# STAGE is one or more of probe, tests, sanitize, bench, vit, main, diag, profile, spread; `all`
# (the default) is every stage in that order, and `lease` the plan for one call of a 15-minute
# lease (below), `bash scripts/gpu_check.sh lease` under the device tool's timeout_s 600. The
# stages:
#   probe     scripts/host_probe.py in three fresh processes (probe.txt): the host time of one
#             launch (a torch op's, a Triton kernel's through Triton's path and through ours,
#             add_layer_norm's against eager's) and, for timm, timm after swap_modules and the
#             latter captured in a CUDA graph, the time to issue a ViT-B/16 training step against
#             its wall time (issue 23's first check)
#   tests     the test suite on CUDA (TEST_FILES: which files, default all of tests/; in parallel
#             with pytest-xdist where it is installed: compiling Triton kernels is CPU-bound, and
#             the tests are not timed)
#   sanitize  scripts/sanitize_kernels.py (every kernel forward and backward at small shapes,
#             every attention config forced; SANITIZE_ATTN_CONFIGS=first for each kind's first)
#             under compute-sanitizer's memcheck, racecheck and initcheck, then the
#             patch-embedding tests (the csrc/ CUDA kernels, every odd size and layout they
#             cover) under memcheck; sanitize.txt has each tool's ERROR SUMMARY (compute-sanitizer
#             does not run under gVisor; the H200 machines are Firecracker, where it does)
#   bench     `pytest benchmarks/ --benchmark-only` for the per-op benchmarks; with BENCH_K, the
#             pytest -k selection of all of benchmarks/ (end to end included) instead
#   vit       the end-to-end benchmarks and the training job's fused/eager throughput ratio
#   main      the main job (`python -m vit_kernels.bench`): bench-main.json, .md and .png;
#             MAIN_OPS and MAIN_VIT_MODELS (space-separated) narrow it to some ops and models
#   diag      scripts/gpu_diag.py $DIAG_PARTS (default: switches attention overhead): switches
#             not yet timed on a GPU on and off, every attention config forced (rule and time
#             each; ATTN_KINDS narrows it) and where each op's time goes (diag.txt)
#   profile   scripts/profile_vit_step.py: a ViT-B/16 training step's kernels by kind, its wall
#             time (median, min, max) and the host side (garbage collections, time to issue a
#             step, synchronizing calls, cProfile); then scripts/host_overhead.py on this host's
#             CPU, launches stubbed and with Triton's launch path kept (seconds; no GPU work), to
#             set against the same numbers from the 2-core CI CPU in README
#   spread    the ViT-B/16 training step's wall time (SPREAD_PROVIDERS, default timm_swapped) in
#             three fresh processes (spread.txt): how far one process is from another
#
# Time. A device call may run 10 minutes, and a lease is 15 minutes of device time, the
# machine's start included. Each stage may be capped in seconds by <STAGE>_TIMEOUT_S (e.g.
# TESTS_TIMEOUT_S=300), and the whole script by GPU_CHECK_BUDGET_S (counted from its start):
# a stage gets at most what the budget has left less 30 s, and is skipped when that is under
# 30 s, so the script ends, packed, inside the budget. A capped stage is interrupted (SIGINT,
# so pytest reports what it has; killed 20 s later), and the script goes on to the next.
#
# `lease` = probe tests sanitize bench main profile diag, for one call under the 600-s limit: the
# budget 560 s unless GPU_CHECK_BUDGET_S says otherwise; the probe first, capped at 100 s (the
# question at the centre of issue 23, answered even when a later stage runs out of time; its
# three processes time the swapped step's wall, as the spread stage would); the kernels' tests on CUDA (TEST_FILES:
# attention, bias_gelu, bias_gelu_linear, layer_norm, patch_embed, cuda_graph, host_sync;
# test_gpu_compile needs no GPU) capped at 150 s; the sanitizers over each kernel with each
# attention kind's first config (SANITIZE_ATTN_CONFIGS=first; the kernels compiled by the tests
# before are cached) at 90 s; `pytest benchmarks/` in short (BENCH_K: one shape per op and the
# ViT-B/16 training step) at 90 s; the main job for the ops of the open issues (MAIN_OPS:
# flash_attention, bias_gelu, bias_gelu_linear, vit) and ViT-B/16 capped at 150 s; the step
# profile at 60 s; then the switches and the dK/dV configs in what is left. A variable
# that is set wins over its default here. These caps are estimates, not yet run on a device:
# each stage keeps what it measured when stopped (the main job writes its tables and chart).
#
# Output. A device call returns at most 8 files from $OUT, so at the end everything but
# summary.txt (this script's output), bench-main.json, bench-main.md and bench-main.png is
# packed into gpu_check_logs.tar.gz.
#
# The device machine has no network: dependencies come from its image, so the install uses
# --no-build-isolation --no-deps (which also makes setup.py compile csrc/, CUDA sources
# included, ahead of time). SKIP_BUILD=1 skips it (a second call on a warm machine that has
# the build already).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] || [ "${STAGES[0]}" = all ] && STAGES=(probe tests sanitize bench vit main diag profile spread)
if [ "${STAGES[0]}" = lease ]; then
    STAGES=(probe tests sanitize bench main profile diag)
    : "${GPU_CHECK_BUDGET_S:=560}" "${PROBE_TIMEOUT_S:=100}" "${TESTS_TIMEOUT_S:=150}" "${MAIN_TIMEOUT_S:=150}"
    : "${PROFILE_TIMEOUT_S:=60}"
    : "${SANITIZE_TIMEOUT_S:=90}" "${SANITIZE_ATTN_CONFIGS:=first}"
    # pytest benchmarks/ in short: one shape per op (ViT-B's), fwd+bwd, ours and eager, and the
    # ViT-B/16 training step of timm and timm after swap_modules, graphed and not.
    : "${BENCH_TIMEOUT_S:=90}" "${BENCH_K:=ViT-B and ((fwd+bwd and (vit_kernels or eager)) or (train and timm and not compile))}"
    : "${TEST_FILES:=tests/test_attention.py tests/test_bias_gelu.py tests/test_bias_gelu_linear.py tests/test_layer_norm.py tests/test_patch_embed.py tests/test_cuda_graph.py tests/test_host_sync.py tests/test_block_step.py tests/test_op_nodes.py tests/test_compile.py}"
    : "${MAIN_OPS:=flash_attention bias_gelu bias_gelu_linear vit}" "${MAIN_VIT_MODELS:=ViT-B/16}"
    : "${DIAG_PARTS:=switches attention}" "${ATTN_KINDS:=dkdv}"
    export ATTN_KINDS
fi
PACKED_LOGS=gpu_check_logs.tar.gz
KEEP=(summary.txt bench-main.json bench-main.md bench-main.png "$PACKED_LOGS")
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee "$OUT/summary.txt") 2>&1
status=0

pack_out() {  # everything in $OUT but KEEP into one archive (a device call returns at most 8 files)
    local name others=()
    while IFS= read -r name; do
        [[ " ${KEEP[*]} " == *" $name "* ]] || others+=("$name")
    done < <(find "$OUT" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort)
    [ ${#others[@]} -eq 0 ] || tar -czf "$OUT/$PACKED_LOGS" -C "$OUT" --remove-files "${others[@]}"
    echo "== $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
}
trap pack_out EXIT

stage_deadline=  # SECONDS at which the running stage's cap ends; empty: uncapped

start_stage() {  # start_stage NAME: sets stage_deadline; fails when the budget has no room left
    local var cap left
    var="$(echo "$1" | tr a-z A-Z)_TIMEOUT_S"
    cap=${!var:-}
    if [ -n "${GPU_CHECK_BUDGET_S:-}" ]; then
        left=$((GPU_CHECK_BUDGET_S - SECONDS - 30))
        if [ "$left" -lt 30 ]; then
            echo "== $1 skipped: the budget (GPU_CHECK_BUDGET_S=$GPU_CHECK_BUDGET_S) has ${left} s left"
            return 1
        fi
        { [ -z "$cap" ] || [ "$left" -lt "$cap" ]; } && cap=$left
    fi
    stage_deadline=${cap:+$((SECONDS + cap))}
    echo "== $1 (load average $(cut -d' ' -f1 /proc/loadavg)${cap:+, capped at $cap s})"
}

capped() {  # capped command...: run until the stage's deadline (SIGINT first, so pytest reports)
    [ -z "$stage_deadline" ] && { "$@"; return; }
    local left=$((stage_deadline - SECONDS))
    if [ "$left" -le 0 ]; then
        echo "not run (the stage's cap is spent): $*"
        return 1
    fi
    timeout -s INT -k 20 "$left" "$@"
}

{
    nvidia-smi
    python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
    nvcc --version | tail -2
} > "$OUT/env.txt" 2>&1
tail -3 "$OUT/env.txt"

if [ "${SKIP_BUILD:-0}" = 1 ]; then
    echo "== build skipped (SKIP_BUILD=1): the tree on PYTHONPATH"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    echo "== build"
    if ! python -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1; then
        echo "pip install failed (see install.log); using the tree on PYTHONPATH and the first-use JIT build"
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
    python -c "from vit_kernels import _extension; print('extension:', _extension.load(), 'cuda', _extension.cuda_version())" 2>&1 | tee "$OUT/extension.txt" || status=1
fi

for stage in "${STAGES[@]}"; do
    start=$SECONDS
    # The load says whether leftovers of a capped stage still share the CPU (host-bound timings).
    case "$stage" in
    probe | tests | sanitize | bench | vit | main | diag | profile | spread) start_stage "$stage" || continue ;;
    *)
        echo "unknown stage $stage (probe, tests, sanitize, bench, vit, main, diag, profile, spread; all or lease alone)"
        exit 2
        ;;
    esac
    case "$stage" in
    probe)
        for run in 1 2 3; do
            capped python scripts/host_probe.py >> "$OUT/probe.txt" 2>&1 || status=1
        done
        grep -E "^(launch|step):" "$OUT/probe.txt"
        ;;
    tests)
        workers=()
        python -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-8}")  # TEST_WORKERS=0: one process
        # shellcheck disable=SC2086  # TEST_FILES is a list of paths
        capped python -m pytest ${TEST_FILES:-tests} -q -rfEs "${workers[@]}" --durations=20 -p no:cacheprovider \
            --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
        grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
        tail -4 "$OUT/tests.log"
        ;;
    sanitize)
        # Without the caching allocator an access past a tensor's end is past its allocation too.
        for tool in memcheck racecheck initcheck; do
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 capped compute-sanitizer --tool "$tool" --error-exitcode 1 \
                --print-limit 20 python scripts/sanitize_kernels.py \
                --attention-configs "${SANITIZE_ATTN_CONFIGS:-all}" > "$OUT/sanitize-$tool.log" 2>&1 || status=1
            echo "$tool: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize-$tool.log" | tail -1)" \
                "$(grep -E "^sanitize_kernels:" "$OUT/sanitize-$tool.log")" | tee -a "$OUT/sanitize.txt"
        done
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 capped compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
            python -m pytest tests/test_patch_embed.py -q -x -p no:cacheprovider > "$OUT/memcheck.log" 2>&1 || status=1
        echo "memcheck, tests/test_patch_embed.py: $(grep -E "ERROR SUMMARY" "$OUT/memcheck.log" | tail -1)" \
            "$(tail -1 "$OUT/memcheck.log")" | tee -a "$OUT/sanitize.txt"
        ;;
    bench)
        if [ -n "${BENCH_K:-}" ]; then select=(-k "$BENCH_K"); else select=(--ignore=benchmarks/test_bench_vit.py); fi
        capped python -m pytest benchmarks/ --benchmark-only -q -rfEs -p no:cacheprovider "${select[@]}" \
            --benchmark-json="$OUT/benchmarks-ops.json" \
            --benchmark-columns=median,iqr,rounds > "$OUT/benchmarks-ops.log" 2>&1 || status=1
        grep -E "^(FAILED|ERROR)" "$OUT/benchmarks-ops.log" | head -20
        tail -3 "$OUT/benchmarks-ops.log"
        ;;
    vit)
        capped python -m pytest benchmarks/test_bench_vit.py --benchmark-only -q -rfEs -p no:cacheprovider \
            --benchmark-json="$OUT/benchmarks-vit.json" --benchmark-columns=median,iqr,rounds \
            > "$OUT/benchmarks-vit.log" 2>&1 || status=1
        grep -E "^(FAILED|ERROR)" "$OUT/benchmarks-vit.log" | head -20
        tail -3 "$OUT/benchmarks-vit.log"
        echo "-- training job: fused vs eager throughput (ViT-B/16, synthetic data, bf16)"
        capped python -m vit_kernels.train --compare --model vit_base_patch16_224 --data synthetic --batch-size 128 \
            --synthetic-images 4096 --compare-steps 20 --no-save > "$OUT/train_compare.txt" 2>&1 || status=1
        tail -3 "$OUT/train_compare.txt"
        ;;
    main)
        # shellcheck disable=SC2086  # MAIN_OPS and MAIN_VIT_MODELS are lists of names
        capped python -m vit_kernels.bench --quick ${MAIN_OPS:+--ops $MAIN_OPS} \
            ${MAIN_VIT_MODELS:+--vit-models $MAIN_VIT_MODELS} --json "$OUT/bench-main.json" \
            --markdown "$OUT/bench-main.md" --plot "$OUT/bench-main.png" > "$OUT/bench-main.log" 2>&1 || status=1
        grep -E "FAIL" "$OUT/bench-main.log" | head -20
        tail -2 "$OUT/bench-main.log"
        ;;
    diag)
        # shellcheck disable=SC2086  # DIAG_PARTS is a list of gpu_diag.py parts
        capped python scripts/gpu_diag.py ${DIAG_PARTS:-switches attention overhead} > "$OUT/diag.txt" 2>&1 || status=1
        grep -E "BAD" "$OUT/diag.txt" | head -20
        tail -3 "$OUT/diag.txt"
        ;;
    profile)
        capped python scripts/profile_vit_step.py timm timm_swapped reference_fused > "$OUT/profile.txt" 2>&1 || status=1
        grep -E "step|host:" "$OUT/profile.txt"
        for mode in "" --triton-launch; do
            capped python scripts/host_overhead.py $mode >> "$OUT/host_overhead.txt" 2>&1 || status=1
        done
        grep -E "launch|train step" "$OUT/host_overhead.txt"
        ;;
    spread)
        for run in 1 2 3; do
            # shellcheck disable=SC2086  # SPREAD_PROVIDERS is a list of providers
            capped python scripts/profile_vit_step.py --wall-only ${SPREAD_PROVIDERS:-timm_swapped} \
                >> "$OUT/spread.txt" 2>&1 || status=1
        done
        grep -E "ms wall" "$OUT/spread.txt"
        ;;
    esac
    echo "-- $stage took $((SECONDS - start)) s"
done
exit $status
