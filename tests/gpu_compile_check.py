"""Compile every Triton launch the ops make on a GPU, for sm_80 and sm_90, without a GPU.

Run by tests/test_gpu_compile.py in a subprocess (TRITON_INTERPRET must be off so the
kernels are real JITFunctions). The custom-op implementations are called with CPU
tensors; `JITFunction.run` is replaced by a recorder that, instead of launching, compiles
the kernel with exactly the arguments, constexprs, num_warps and num_stages the launcher
chose, down to a cubin for each target, and reads ptxas's resource report. This catches
what the interpreter cannot: code the GPU compiler rejects, shared memory over the
limit, register spills.

Prints one JSON line per compiled launch: kernel, target, Triton version, constexprs, shared bytes,
registers, spill bytes, how many dots became wgmma or mma.sync, and how many SASS
instructions the kernel has (an elementwise kernel's cost per element, when it is issue-bound
rather than memory-bound: ops/bias_gelu.py's header).
"""

import json
import os
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") == "0", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
_target = {}  # the one main() compiles for in its current pass
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8", torch.int32: "i32",
         torch.int64: "i64"}
_seen = set()
_only_head_dims = []


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _divisible_by_16(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


def _ptxas(capability: int) -> str:
    """The ptxas Triton itself uses for this architecture (it ships one per PTX generation)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(capability).path
    except TypeError:  # older Triton: one ptxas for all
        return get_ptxas().path


def _ptxas_report(ptx: str, arch: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        gpu = arch + ("a" if arch == "sm_90" else "")
        out = subprocess.run([_ptxas(int(arch[3:])), "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr[-2000:]}")
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill_stores = re.search(r"(\d+) bytes spill stores", text)
    spill_loads = re.search(r"(\d+) bytes spill loads", text)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": (int(spill_stores.group(1)) if spill_stores else 0) + (int(spill_loads.group(1)) if spill_loads else 0),
    }


def _sass_instructions(cubin: bytes):
    """Instructions in the kernel's SASS, by the nvdisasm that Triton ships beside its ptxas;
    None where there is none."""
    nvdisasm = os.path.join(os.path.dirname(_ptxas(90)), "nvdisasm")
    if not os.path.exists(nvdisasm):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True)
    return len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", out.stdout, re.M)) if out.returncode == 0 else None


def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(self.arg_names):
        value = bound[name]
        if i in self.constexprs or value is None:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        else:
            signature[name] = _arg_type(value)
            if _divisible_by_16(value):
                # What a real launch specializes on: 16-byte-aligned pointers and integers divisible
                # by 16. Without it loads stay scalar and unpipelined, and ptxas reports spills that
                # the launched kernel does not have.
                attrs[(i,)] = [["tt.divisibility", 16]]
    (arch, target), = _target.items()
    key = (arch, self.fn.__name__, tuple(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(attrs)), repr(options))
    if key in _seen:
        return None
    _seen.add(key)
    compiled = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target, options=options)
    record = {
        "kernel": self.fn.__name__,
        "target": arch,
        # ptxas allocates registers differently from one Triton release to the next (a config
        # spill-free with 3.9 spilled with 3.6 and 3.8): a failure says which one compiled it.
        "triton": triton.__version__,
        "constexprs": {self.arg_names[i[0]]: v for i, v in constexprs.items() if v is not None},
        "divisible_by_16": sorted(self.arg_names[i[0]] for i in attrs),
        "options": options,
        "shared_bytes": compiled.metadata.shared,
        # Which tensor-core instruction each tl.dot became: Hopper's wgmma needs 64 rows per
        # warpgroup in the dot's M dimension, else Triton falls back to Ampere's mma.sync.
        "wgmma_dots": len(re.findall(r"ttng\.warp_group_dot\b", compiled.asm["ttgir"])),
        "mma_sync_dots": len(re.findall(r"\btt\.dot\b", compiled.asm["ttgir"])),
        **_ptxas_report(compiled.asm["ptx"], arch),
        "sass_instructions": _sass_instructions(compiled.asm["cubin"]),
        # Global loads and stores of one 16-bit element: a tile of bf16 rows read element by
        # element, where the compiler could not prove its rows 16-byte aligned (attention's
        # STRIDES_ALIGNED); vectorized, a thread moves 8 elements per instruction.
        "global_16bit_scalar_accesses": len(re.findall(r"\b(?:ld|st)\.global(?:\.\w+)*\.b16\b", compiled.asm["ptx"])),
    }
    print(json.dumps(record, default=str), flush=True)
    return None


def compile_every_config(self, *args, grid, warmup, **kwargs):
    """An autotuned launch: compile each of its configs (the device would time them all). No
    config is chosen (best_config None), so attention._launch, which launches an autotuner's
    choice itself once made, keeps asking the autotuner: every target's pass compiles every config."""
    for config in self.configs:
        self.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **config.kwargs, num_warps=config.num_warps,
                    num_stages=config.num_stages)
    self.best_config = None


def main(argv):
    """Default: the launches a bf16 ViT makes (every head dim, ViT hidden sizes). --full: every
    dtype, D up to 16384 and fp32 attention too (minutes). --target ARCH: one target only.

    One pass per target, with the launchers told that GPU's architecture, so that each target
    compiles what the ops would launch there (attention's configs and switches differ)."""
    full = "--full" in argv
    if "--head-dims" in argv:  # e.g. --head-dims 72,80: attention alone, at those head dims
        _only_head_dims.extend(int(d) for d in argv[argv.index("--head-dims") + 1].split(","))
    # --target sm_80 (or sm_90): that pass alone, so that the two can run in parallel processes.
    chosen = [argv[argv.index("--target") + 1]] if "--target" in argv else list(TARGETS)
    JITFunction.run = compile_instead_of_launch
    Autotuner.run = compile_every_config
    from vit_kernels.ops import attention, attention_varlen

    for arch, target in ((arch, TARGETS[arch]) for arch in chosen):
        _target.clear()
        _target[arch] = target
        # Both modules ask (varlen imported the name): before it was set on varlen too, varlen's
        # sm_80 pass compiled Hopper's choices (peeled loops).
        for module in (attention, attention_varlen):
            module._arch_major = lambda device, major=target.arch // 10: major
        launch_everything(full, arch)


# The head dims CI compiles (ViT-B/L/H, DeiT, CLIP, SigLIP so400m): one block (64, 128), two whole
# ones (80 = 64 + 16, 96 = 64 + 32) and an overlapping one (72 = 64 + [56, 72)) on sm_90. sm_80 is
# held to compiling and to its shared memory, not to the spill and wgmma checks, so one two-block
# layout serves there. --full: all 16 (32 among them) on both; on sm_90 all are spill-free
# (benchmarks/results/cpu-compile-check-2026-12-05.md).
COMPILED_HEAD_DIMS = {"sm_90": (64, 72, 80, 96, 128), "sm_80": (64, 80, 128)}


def attention_launches(head_dims, dtypes) -> None:
    """Every attention launch at these head dims: forward, both backward paths, with and without
    dropout, and the packed-sequence (varlen) forms."""
    from vit_kernels.ops import attention, attention_varlen

    for head_dim in head_dims:
        for dtype in dtypes:
            if head_dim % 16 == 8:
                # An odd head count too: then no row stride (3 * 3 * d) is a multiple of 16 either,
                # and only the kernels' own promise (_row_stride) keeps the tiles' loads vectors.
                q, k, v = torch.randn(1, 5, 3, 3, head_dim, dtype=dtype).unbind(2)
                out, lse = attention._flash_attention_fwd(q, k, v, 0.1, 0.0, None, True)
                attention._flash_attention_bwd.op(out, q, k, v, out, lse, 0.1, 0.0, None, True)
                q, k, v = q[0], k[0], v[0]  # and packed sequences: [T, 3, d] with rows of 9 * d
                cu = torch.tensor([0, 2, 5], dtype=torch.int32)
                out, lse = attention_varlen._flash_attention_varlen_fwd(q, k, v, cu, cu, 3, 3, 0.1, 0.0, None, True)
                attention_varlen._flash_attention_varlen_bwd.op(out, q, k, v, out, lse, cu, cu, 3, 3, 0.1, 0.0, None,
                                                                True)
            for dropout_p, deterministic in ((0.0, True), (0.0, False), (0.1, True), (0.1, False)):
                seed = torch.tensor(3) if dropout_p else None
                qkv = torch.randn(1, 5, 3, 2, head_dim, dtype=dtype)
                q, k, v = qkv.unbind(2)
                out, lse = attention._flash_attention_fwd(q, k, v, 0.1, dropout_p, seed, deterministic)
                attention._flash_attention_bwd.op(out, q, k, v, out, lse, 0.1, dropout_p, seed, deterministic)
                # Varlen's prologue holds more registers: where the head dim's column blocks
                # overlap it has spilled where the dense kernels did not, so those dims compile both.
                if head_dim not in (64, 80) and not attention.head_blocks_overlap(head_dim):
                    continue
                q, k, v = qkv[0].unbind(1)
                cu = torch.tensor([0, 2, 5], dtype=torch.int32)
                out, lse = attention_varlen._flash_attention_varlen_fwd(q, k, v, cu, cu, 3, 3, 0.1, dropout_p, seed,
                                                                        deterministic)
                attention_varlen._flash_attention_varlen_bwd.op(out, q, k, v, out, lse, cu, cu, 3, 3, 0.1, dropout_p,
                                                                seed, deterministic)


def launch_everything(full: bool, arch: str) -> None:
    from vit_kernels.ops import attention, layer_norm

    if _only_head_dims:
        attention_launches(_only_head_dims, (torch.bfloat16,))
        return
    from vit_kernels.ops.bias_gelu import _bias_gelu_fwd, bias_gelu_backward_into, bias_gelu_bwd

    hiddens = (192, 768, 1280, 8192, 16384) if full else (768, 1280, 8192)
    variants = [(torch.bfloat16, torch.float32, True), (torch.bfloat16, torch.bfloat16, False)]
    if full:
        variants += [(torch.float16, torch.float16, False), (torch.float32, torch.float32, True)]
    for hidden in hiddens:
        for dtype, param_dtype, everything in variants:
            x = torch.randn(6, hidden, dtype=dtype)
            params = [torch.randn(hidden, dtype=param_dtype) for _ in range(3)]
            residual = torch.randn_like(x) if everything else None
            gamma = params[2] if everything else None
            row_scale = torch.ones(2, dtype=dtype) if everything else None
            res_dtype = torch.float32 if everything else dtype
            layer_norm._add_layer_norm_fwd(x, residual, params[0], params[1], gamma, row_scale, 1e-6, res_dtype, True)
            stats = torch.stack([torch.zeros(6), torch.ones(6)])  # mean, rstd
            layer_norm._add_layer_norm_bwd.op(x, x if everything else None, x if everything else None, x, params[0],
                                           params[1], gamma, row_scale, stats, res_dtype if everything else None)
    # The backward's second stage at a GPU's count of partial rows (an H100's 132 SMs; CPU tensors
    # give 4): the same constexprs, but n_partials now a multiple of 16, which Triton specializes.
    per_device = layer_norm.num_programs_for_reduction
    layer_norm.num_programs_for_reduction = lambda device, per_sm=4: per_sm * 132
    try:
        for param_dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2048, 768, dtype=torch.bfloat16)
            weight, bias = (torch.randn(768, dtype=param_dtype) for _ in range(2))
            stats = torch.stack([torch.zeros(2048), torch.ones(2048)])
            layer_norm._add_layer_norm_bwd.op(x, None, None, x, weight, bias, None, None, stats, None)
    finally:
        layer_norm.num_programs_for_reduction = per_device
    attention_dtypes = (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16,)
    attention_launches(attention.HEAD_DIMS if full else COMPILED_HEAD_DIMS[arch], attention_dtypes)
    attention.attention_dropout_mask(torch.tensor(3), 1, 1, 5, 5, 0.1, torch.device("cpu"))
    for n_cols in (1000, 3072, 5120):
        for approximate in ("none", "tanh", "quick") if n_cols == 3072 else ("none", "tanh"):
            x = torch.randn(6, n_cols, dtype=torch.bfloat16)
            bias = torch.randn(n_cols)
            _bias_gelu_fwd.op(x, bias, approximate)
            bias_gelu_bwd.op(x, x, bias, approximate)
            bias_gelu_backward_into(x, x, bias, approximate, x.clone(), torch.empty_like(x))  # with y recomputed
    # The erf path for a bf16 output too, so that the test can hold POLY_CDF's instruction count against it.
    bias_gelu_module = sys.modules["vit_kernels.ops.bias_gelu"]
    poly_cdf = bias_gelu_module._poly_cdf
    bias_gelu_module._poly_cdf = lambda dtype: False
    try:
        _bias_gelu_fwd.op(torch.randn(6, 3072, dtype=torch.bfloat16), torch.randn(3072), "none")
    finally:
        bias_gelu_module._poly_cdf = poly_cdf


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
