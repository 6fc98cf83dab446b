"""GPU diagnostics for one device call (not part of the test suite or the main job).

1. Attention: every forward and backward launch config forced one at a time, per dtype,
   head dim and N, against float64 (error / eager's; the rule passes at <= 2). Finds a
   config that computes wrong on the device although the interpreter runs its tile shape right.
3. The add_layer_norm backward's launch shape, swept at the ViT-B shape.
4. Switches not yet timed on a GPU, each on and off in one process (CUDA-graph replay, the
   GPU's time alone): bias_gelu's polynomial Phi for 16-bit outputs (POLY_CDF) against
   libdevice's erf, and the attention kernels' peeled last block (PEEL_TAIL) and its narrow
   tail tile (NARROW_TAIL), forward and backward.
2. Where the time goes for each op's vit_kernels provider at the ViT-B shape: the median
   between CUDA events (what the benchmarks report), the GPU kernels' own time (torch.profiler),
   and the host time per call (no synchronization: the CPU cost of launching). When the
   event time tracks the host time rather than the kernel time, the op is launch-bound.

    python scripts/gpu_diag.py [attention] [overhead] [layer_norm] [switches]

ATTN_KINDS="dkdv dq" limits the attention sweep to some kernel kinds.
"""

import os
import statistics
import sys
import time

import torch

from vit_kernels import reference
from vit_kernels.ops import attention as attn


def attention_configs():
    from vit_kernels.benchmarking.timing import time_cuda_ms
    from vit_kernels.testing import check_rule, forcing_one_config

    original = attn.launch_configs
    cases = [(2, 50, 2), (2, 197, 2), (1, 4096, 4)]
    print("attention: forced config -> worst error / eager's (out, dq, dk, dv); fwd+bwd ms at (128, 197, 12, d)")
    kinds = os.environ.get("ATTN_KINDS", " ".join(attn.KERNEL_KINDS)).split()
    for kind in kinds:
        for dtype in (torch.bfloat16, torch.float16):
            for head_dim in (64, 128):
                for config in original(kind, head_dim, dtype, attn._attn_fwd_kernel):
                    attn.launch_configs = forcing_one_config(original, kind, config)
                    results, all_ok = [], True
                    try:
                        for batch, n, heads in cases:
                            q, k, v = (torch.randn(batch, n, heads, head_dim, device="cuda", dtype=dtype,
                                                   requires_grad=True) for _ in range(3))
                            dout = torch.randn(batch, n, heads, head_dim, device="cuda", dtype=dtype)
                            out = attn.flash_attention(q, k, v)
                            grads = torch.autograd.grad(out, (q, k, v), dout)
                            qe, ke, ve = (t.detach().requires_grad_() for t in (q, k, v))
                            out_e = reference.attention(qe, ke, ve)
                            grads_e = torch.autograd.grad(out_e, (qe, ke, ve), dout)
                            q6, k6, v6 = (t.detach().double().requires_grad_() for t in (q, k, v))
                            out_6 = reference.attention(q6, k6, v6)
                            grads_6 = torch.autograd.grad(out_6, (q6, k6, v6), dout.double())
                            checks = [check_rule("x", a, o, e)
                                      for a, e, o in zip((out, *grads), (out_e, *grads_e), (out_6, *grads_6))]
                            all_ok = all_ok and all(c.ok for c in checks)
                            results.append(f"N={n}: " + " ".join(f"{c.ratio:.2f}" for c in checks))
                        q, k, v = (torch.randn(128, 197, 12, head_dim, device="cuda", dtype=dtype, requires_grad=True)
                                   for _ in range(3))
                        dout = torch.randn_like(q)
                        ms = time_cuda_ms(lambda: torch.autograd.grad(attn.flash_attention(q, k, v), (q, k, v), dout),
                                          reps=20)
                    finally:
                        attn.launch_configs = original
                    flag = "ok " if all_ok else "BAD"
                    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
                    print(f"  {flag} {kind:4s} ({block_m}, {block_n}, {config.num_warps}, {config.num_stages}) "
                          f"{str(dtype)[6:]} d={head_dim}: {ms:.3f} ms | " + " | ".join(results), flush=True)


def overhead():
    from vit_kernels.benchmarking.runner import OPS
    from vit_kernels.benchmarking.timing import time_cuda_ms

    print("\nwhere the time goes, ViT-B shapes, bf16: event median / GPU kernel time / host time per call (ms)")
    device = torch.device("cuda")
    for op in OPS:
        shape, dims = next(iter(op.shapes.items()))
        for mode in ("fwd", "fwd+bwd"):
            for provider in ("vit_kernels", "eager"):
                case = op.case(provider, shape, dims, mode, torch.bfloat16, device)
                event_ms = time_cuda_ms(case.run, reps=30)
                torch.cuda.synchronize()
                host = []
                for _ in range(20):
                    start = time.perf_counter()
                    case.run()
                    host.append((time.perf_counter() - start) * 1e3)
                    torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        case.run()
                    torch.cuda.synchronize()
                kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                gpu_ms = sum(e.device_time for e in kernels) / 1e3 / 10
                names = {}
                for e in kernels:
                    names[e.name] = names.get(e.name, 0.0) + e.device_time / 1e3 / 10
                top = ", ".join(f"{n[:40]} {t:.3f}" for n, t in sorted(names.items(), key=lambda x: -x[1])[:4])
                print(f"  {op.name:18s} {mode:8s} {provider:12s} event {event_ms:.3f}  kernels {gpu_ms:.3f}  "
                      f"host {statistics.median(host):.3f}  [{top}]", flush=True)


def layer_norm_backward():
    """The add_layer_norm backward kernel at the ViT-B shape, per (rows per iteration, warps,
    programs per SM): median ms between CUDA events, GB/s over dy, h_new, dresidual read and
    dx written, and the worst error of dx/dweight/dbias against the default config's."""
    from vit_kernels.benchmarking.timing import time_cuda_ms
    from vit_kernels.ops import layer_norm as ln

    rows, hidden = 256 * 197, 768
    x, res = (torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w, b = (torch.randn(hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dy, dres = (torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    _, h, stats = torch.ops.vit_kernels.add_layer_norm_fwd(x, res, w, b, None, None, 1e-6, torch.bfloat16, True)

    def backward():
        return torch.ops.vit_kernels.add_layer_norm_bwd(dy, dres, None, h, w, b, None, None, stats, None)

    want = backward()
    original_config, original_per_sm = ln._block_config, ln._BWD_PROGRAMS_PER_SM
    print("\nadd_layer_norm backward, ViT-B (50432 x 768) bf16: BLOCK_M, warps, programs/SM -> ms, GB/s, max |diff|")
    for block_m, warps, per_sm in [(1, 4, 8), (1, 4, 4), (1, 4, 16), (1, 8, 8), (1, 2, 16), (2, 4, 8), (4, 16, 4)]:
        ln._block_config = lambda n, k, backward=False, _c=(block_m, 1024, warps): (
            _c if backward else original_config(n, k))
        ln._BWD_PROGRAMS_PER_SM = per_sm
        try:
            got = backward()
            diff = max((g.float() - w_.float()).abs().max().item() for g, w_ in zip(got, want) if g.numel())
            ms = time_cuda_ms(backward, reps=30)
            print(f"  {block_m:2d} {warps:2d} {per_sm:2d}: {ms:.3f} ms  {4 * rows * hidden * 2 / ms / 1e6:.0f} GB/s  "
                  f"diff {diff:.2e}", flush=True)
        finally:
            ln._block_config, ln._BWD_PROGRAMS_PER_SM = original_config, original_per_sm


SWITCH_GELU_SHAPE = (256 * 197, 3072)  # ViT-B's fc1 output at batch 256
SWITCH_ATTENTION_SHAPES = [(256, 197, 12, 64), (64, 577, 16, 64), (64, 257, 16, 80), (4, 4096, 16, 128)]


def switches(device=torch.device("cuda")):
    import importlib

    from vit_kernels.benchmarking import timing

    gelu = importlib.import_module("vit_kernels.ops.bias_gelu")
    copy = timing.copy_bandwidth_gbps(device)
    rows, hidden = SWITCH_GELU_SHAPE
    x, dy = (torch.randn(rows, hidden, device=device, dtype=torch.bfloat16) for _ in range(2))
    bias = torch.randn(hidden, device=device)
    dx, y = torch.empty_like(x), torch.empty_like(x)
    print(f"\nswitches, bf16, CUDA-graph replay ms (copy bandwidth {copy:.0f} GB/s)")
    original = gelu._poly_cdf
    for label, poly in (("erf", False), ("polynomial", True)):
        gelu._poly_cdf = lambda dtype, _poly=poly: _poly
        try:
            fwd = timing.time_cuda_graph_ms(lambda: gelu._bias_gelu_fwd_impl(x, bias, "none"))
            bwd = timing.time_cuda_graph_ms(lambda: gelu.bias_gelu_backward_into(dy, x, bias, "none", dx, y))
        finally:
            gelu._poly_cdf = original
        fwd_gbps, bwd_gbps = 2 * x.numel() * 2 / fwd / 1e6, 4 * x.numel() * 2 / bwd / 1e6
        print(f"  bias_gelu {label:10s} ({rows}, {hidden}): fwd {fwd:.3f} ms {fwd_gbps:.0f} GB/s "
              f"({100 * fwd_gbps / copy:.0f}% of copy) | bwd with y {bwd:.3f} ms {bwd_gbps:.0f} GB/s "
              f"({100 * bwd_gbps / copy:.0f}%)", flush=True)
    original = attn._peel_tail, attn._narrow_tail
    variants = {"masked loop": (False, 0), "peeled": (True, 0), "peeled, narrow tail": (True, 16)}
    for batch, n, heads, head_dim in SWITCH_ATTENTION_SHAPES:
        qkv = torch.randn(batch, n, 3, heads, head_dim, device=device, dtype=torch.bfloat16)
        q, k, v = qkv.unbind(2)
        scale = head_dim ** -0.5
        out, lse = attn._flash_attention_fwd_impl(q, k, v, scale, 0.0, None, True)
        dout = torch.randn_like(out)
        flops = 4 * batch * heads * n * n * head_dim
        timings = {}
        for label, (peel, narrow) in variants.items():
            attn._peel_tail = lambda arch_major, dropout_p, _peel=peel: _peel
            attn._narrow_tail = lambda _narrow=narrow: _narrow
            try:
                timings[label] = (
                    timing.time_cuda_graph_ms(lambda: attn._flash_attention_fwd_impl(q, k, v, scale, 0.0, None, True)),
                    timing.time_cuda_graph_ms(
                        lambda: attn._flash_attention_bwd_impl(dout, q, k, v, out, lse, scale, 0.0, None, True)),
                )
            finally:
                attn._peel_tail, attn._narrow_tail = original
        print(f"  attention ({batch}, {n}, {heads}, {head_dim}), fwd | bwd: " + " || ".join(
            f"{label} {fwd:.3f} ms {flops / fwd / 1e9:.0f} TFLOP/s | {bwd:.3f} ms {2.5 * flops / bwd / 1e9:.0f} TFLOP/s"
            for label, (fwd, bwd) in timings.items()), flush=True)

if __name__ == "__main__":
    parts = sys.argv[1:] or ["attention", "overhead", "layer_norm", "switches"]
    if "switches" in parts:
        switches()
    if "layer_norm" in parts:
        layer_norm_backward()
    if "overhead" in parts:
        overhead()
    if "attention" in parts:
        attention_configs()
