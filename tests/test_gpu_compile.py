"""Every Triton launch a bf16 ViT makes compiles for sm_80 and sm_90, without a GPU.

tests/gpu_compile_check.py compiles the kernels with the exact arguments and launch
configurations the ops choose on a GPU, down to cubins, and reports ptxas's resources.
The interpreter runs none of that code path, so this is what guards it in CI.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_MEMORY_LIMIT = {"sm_80": 166912, "sm_90": 232448}  # bytes a block may use (A100, H100)


class _CheckRun:
    def __init__(self, stdout: str, stderr: str):
        self.stdout, self.stderr = stdout, stderr


@pytest.fixture(scope="module")
def check_run():
    """Both targets' passes, in two processes at once (ptxas is single-threaded and the compile
    check is the longest test on a cold cache)."""
    script = Path(__file__).with_name("gpu_compile_check.py")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    passes = [subprocess.Popen([sys.executable, str(script), "--target", arch], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for arch in ("sm_80", "sm_90")]
    outputs = [p.communicate(timeout=1200) for p in passes]
    for p, (_, stderr) in zip(passes, outputs):
        assert p.returncode == 0, stderr[-4000:]
    return _CheckRun("".join(stdout for stdout, _ in outputs), "".join(stderr for _, stderr in outputs))


@pytest.fixture(scope="module")
def launches(check_run):
    return [json.loads(line) for line in check_run.stdout.splitlines() if line.startswith("{")]


def test_every_launch_says_whether_to_fuse_multiply_adds(check_run, launches):
    """Every launch passes enable_fp_fusion (ops/_triton_helpers.LAUNCH_OPTIONS): Triton 3.9
    warns at a compile that does not, and from 3.10 would compile it without FMA contraction.
    The attention forward alone turns it off: contracted, the row max's exp2 argument becomes
    the rounding error of its scaled score, which overflows for scores past 2^31
    (attention._NO_FP_FUSION; pytorch/pytorch#121558). The backward clamps its exponent."""
    assert "TRITON_DEFAULT_FP_FUSION" not in check_run.stderr
    for r in launches:
        assert r["options"].get("enable_fp_fusion") is (r["kernel"] != "_attn_fwd_kernel"), r


def test_every_kernel_compiles_for_both_targets(launches):
    kernels = {r["kernel"] for r in launches}
    assert kernels >= {
        "_add_layer_norm_fwd_kernel", "_add_layer_norm_bwd_kernel", "_attn_fwd_kernel",
        "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
        "_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel",
    }
    for kernel in kernels:
        assert {r["target"] for r in launches if r["kernel"] == kernel} == {"sm_80", "sm_90"}


def test_shared_memory_fits(launches):
    for r in launches:
        assert r["shared_bytes"] <= SHARED_MEMORY_LIMIT[r["target"]], r


def test_no_register_spills_on_hopper(launches):
    """Spills to local memory cost bandwidth the memory-bound kernels do not have. Exempt:
    add_layer_norm's D = 8192 backward, where one row no longer fits a program's registers."""
    for r in launches:
        if r["target"] != "sm_90" or r["constexprs"].get("BLOCK_N", 0) >= 8192:
            continue
        assert r["spill_bytes"] == 0, (f"{r['kernel']} spills {r['spill_bytes']} bytes on {r['target']} (triton "
                                       f"{r['triton']}) at {r['constexprs']}, {r['options']}")


def test_attention_dots_run_on_wgmma_on_hopper(launches):
    """Each 16-bit attention dot becomes a wgmma on sm_90 (Triton falls back to mma.sync when
    the dot's M block is under 64 rows per warpgroup: the backward before its dK/dV tile was
    transposed ran all its dots that way at d > 64). Exempt: the atomic-dQ dot (M = the Q step),
    once per copy of the loop body: three when peeled (whole blocks, narrow and full-width tail);
    and each kernel's copy of its body for a narrow last block (16 rows cannot use wgmma)."""
    checked = 0
    for r in launches:
        constexprs = r["constexprs"]
        if r["target"] != "sm_90" or not r["kernel"].startswith("_attn_") or constexprs.get("DOT_PRECISION") != "tf32":
            continue
        if r["kernel"] == "_attn_bwd_preprocess_kernel":
            continue
        atomic_dq_dots = (3 if constexprs.get("PEEL_TAIL") else 1) if constexprs.get("ATOMIC_DQ") else 0
        if constexprs.get("BLOCK_DB"):  # a head dim in two column blocks: each atomic dot twice
            atomic_dq_dots *= 2
        if constexprs.get("NARROW_TAIL"):  # a second copy of the body, for a 16-row last block
            allowed_mma_sync = r["wgmma_dots"] + 2 * atomic_dq_dots
        else:
            allowed_mma_sync = atomic_dq_dots
        assert r["wgmma_dots"] > 0 and r["mma_sync_dots"] <= allowed_mma_sync, r
        checked += 1
    assert checked > 0


def test_attention_moves_16bit_tiles_as_vectors(launches):
    """With STRIDES_ALIGNED (every stride a multiple of 8 elements, which the host checked) the
    attention kernels load and store 16-bit tiles as vectors: at head dims that are odd multiples
    of 8 (24-120, SigLIP's 72) the compiler could not prove a head's offset aligned without that
    promise and moved every tile element by element (ops/attention_kernels.py's header; sm_90,
    triton 3.8: 76-400 such accesses a kernel at d = 24 and 72 without it). Likewise each row
    stride, which at an odd head count (3 x 72: 216) is not a multiple of 16 either (_row_stride;
    190-460 accesses a kernel at d = 72 and three heads without it, and the dK/dV kernel spilled).
    At most 16 remain: a 16 x 16 block on 8 warps, in the copy of the body for a 16-row last
    block, holds one element a thread."""
    checked = odd_heads = 0
    for r in launches:
        constexprs = r["constexprs"]
        if not (r["kernel"].startswith("_attn_") and constexprs.get("STRIDES_ALIGNED")
                and constexprs.get("DOT_PRECISION") == "tf32" and constexprs["HEAD_DIM"] >= 16):
            continue
        assert r["global_16bit_scalar_accesses"] <= 16, r
        checked += constexprs["HEAD_DIM"] % 16 == 8
        odd_heads += r["kernel"] == "_attn_fwd_kernel" and "stride_qn" not in r["divisible_by_16"]
    assert checked > 0  # some head dim that is an odd multiple of 8 was compiled
    assert odd_heads > 0  # and with a row stride that is not a multiple of 16


def test_polynomial_gelu_cuts_the_forwards_instructions(launches):
    """bias_gelu's 16-bit outputs take Phi from a polynomial because the erf forward needs 93% of
    an H100's issue rate to keep up with copy bandwidth (its header: 656 -> 520 SASS
    instructions for a thread's 16 elements, sm_90, ViT-B's 3072 columns, triton 3.9)."""
    counts = {}
    for r in launches:
        constexprs = r["constexprs"]
        if (r["kernel"] == "_bias_gelu_fwd_kernel" and r["target"] == "sm_90" and constexprs["FORM"] == 0
                and "stride_x_row" in r["divisible_by_16"]):
            counts[constexprs["POLY_CDF"]] = r["sass_instructions"]
    if None in counts.values():
        pytest.skip("no nvdisasm beside Triton's ptxas")
    assert counts[True] <= 0.85 * counts[False], counts
