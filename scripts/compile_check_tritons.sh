#!/usr/bin/env bash
# tests/test_gpu_compile.py (every launch compiled for sm_80 and sm_90, registers, spills, wgmma,
# SASS counts; no GPU needed), tests/test_launcher.py (bound launches against that release's own
# specialization and launch path) and tests/test_launch_plans.py (plans recorded from that
# release's bound launches, replayed as its bodies launch) against other Triton releases than the
# installed one.
#
#   bash scripts/compile_check_tritons.sh [VERSION ...]        (default: 3.6.0 3.9.0)
#
# Why: each Triton release ships its own ptxas, and they allocate registers differently. On
# 2026-11-28 the attention dK/dV configs compiled spill-free with triton 3.9 (CI's then) but
# spilled 24-88 bytes with 3.6 (the device image's) and 3.8 (what torch 2.14 pins, so a fresh
# install's). CI checks the installed release only; this checks the others before a config
# change lands. Each release is installed once, without its dependencies, into
# $VIT_KERNELS_CACHE/triton-VERSION (default ~/.cache/vit_kernels) and put first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(3.6.0 3.9.0)
CACHE=${VIT_KERNELS_CACHE:-$HOME/.cache/vit_kernels}
status=0
for version in "${VERSIONS[@]}"; do
    target="$CACHE/triton-$version"
    if [ ! -d "$target/triton" ]; then
        python -m pip install -q --no-deps --target "$target" "triton==$version"
    fi
    echo "== triton $version"
    env -u TRITON_INTERPRET PYTHONPATH="$target:$PWD${PYTHONPATH:+:$PYTHONPATH}" \
        python -m pytest -q -p no:cacheprovider tests/test_launcher.py tests/test_launch_plans.py tests/test_gpu_compile.py \
        || status=1
done
exit $status
