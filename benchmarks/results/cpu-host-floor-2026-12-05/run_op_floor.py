"""Not part of the package: a measurement (benchmarks/results/cpu-host-overhead-2026-12-05.md, "The floor
of one op as a C++ autograd node"). Run from anywhere without TRITON_INTERPRET:
    python benchmarks/results/cpu-host-floor-2026-12-05/run_op_floor.py
Host time of add + LayerNorm on scripts/host_overhead.py's inputs and modes (no_grad forward; forward
and backward with ones as the gradients): eager; vit_kernels.add_layer_norm with Triton's launch path
kept and its C launcher a no-op; a do-nothing Python autograd.Function with the op's allocations; and
op_floor.cpp's C++ autograd node with the same allocations (no launch, no check)."""
import os, sys, tempfile, time
import torch
import torch.nn.functional as F
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "scripts"))
torch.set_num_threads(1)
from torch.utils.cpp_extension import load
floor = load("op_floor", [os.path.join(HERE, "op_floor.cpp")], extra_cflags=["-O3"], build_directory=tempfile.mkdtemp(),
             verbose=False)
from vit_kernels._fake_launch import stub_out_kernels
stub_out_kernels(triton_launch=True)
import host_overhead as h
from vit_kernels.ops import add_layer_norm


class PythonFloor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias):
        y, h_new = torch.empty_like(x), torch.empty_like(x)
        stats = torch.empty((2, x.numel() // x.shape[-1]), dtype=torch.float32)
        ctx.save_for_backward(h_new, weight, bias, stats)
        ctx.set_materialize_grads(False)
        return y, h_new

    @staticmethod
    def backward(ctx, dy, dh):
        ctx.saved_tensors
        dx = torch.empty_like(dy)
        dweight, dbias = torch.empty((2, 8, dy.shape[-1]), dtype=torch.float32).sum(1).unbind(0)
        return dx, dx, dweight, dbias


torch.manual_seed(0)
x, residual = (torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
weight, bias = (torch.randn(64, requires_grad=True) for _ in range(2))


def eager():
    h_new = x + residual
    return F.layer_norm(h_new, (64,), weight, bias, 1e-6), h_new


cases = {"eager": eager, "vit_kernels": lambda: add_layer_norm(x, residual, weight, bias),
         "Python floor": lambda: PythonFloor.apply(x, residual, weight, bias),
         "C++ floor": lambda: floor.add_layer_norm_floor(x, residual, weight, bias)}
for _ in range(3):
    with torch.no_grad():
        fwd = {name: h.per_call_seconds(fn, 1400) * 1e6 for name, fn in cases.items()}
    both = {name: h.per_call_seconds(h.forward_and_backward(fn), 700) * 1e6 for name, fn in cases.items()}
    print("fwd     " + "  ".join(f"{n} {t:.1f}" for n, t in fwd.items()), flush=True)
    print("fwd+bwd " + "  ".join(f"{n} {t:.1f} ({t / both['eager']:.2f}x)" for n, t in both.items()), flush=True)
