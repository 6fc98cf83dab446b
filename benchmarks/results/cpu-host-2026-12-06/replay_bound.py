"""Not part of the package: a measurement (benchmarks/results/cpu-host-overhead-2026-12-06.md).
Run without TRITON_INTERPRET:  python benchmarks/results/cpu-host-2026-12-06/replay_bound.py [steps]

The bound of launching each op from C++ out of a per-signature plan (docs/design.md): the C++
block step with every Python op body it calls back replaced by a stand-in that returns the
outputs of an earlier real call at once, keeping only the GEMMs those bodies run (the MLP's fc2
forward and its two backward GEMMs, work timm does too). A real plan replay would add its
allocations and its launches in C to this. Interleaved with timm eager and the real C++ step.

Ran at 53e724c. The function it patches (nn/block_step._run) went when the launch plans came
(effb00f): to rerun it, check out 53e724c."""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "scripts"))
torch.set_num_threads(1)
from vit_kernels._fake_launch import stub_out_kernels  # noqa: E402

stub_out_kernels(triton_launch=True)
import host_overhead as h  # noqa: E402
import vit_kernels.nn.block_step as bs  # noqa: E402

models, train_step, _ = h.vit_cases()
module = bs.cpp_step()
assert module is not None, bs.cpp_step_unavailable()
real = (bs._run, bs._add_layer_norm_fwd, bs._flash_attention_fwd, bs._bias_gelu_linear_fwd,
        bs._add_layer_norm_fwd.backward, bs._bias_gelu_linear_fwd.backward, bs._attention_backward)
recorded = {}  # (callback, call index within a step) -> what the real call returned


class Context:
    def __init__(self, ctx):
        self.__dict__.update(ctx.__dict__)


def recording(name, fn):
    def run(*args):
        out = fn(*args)
        key = (name, len([k for k in recorded if k[0] == name]))
        recorded[key] = out
        return out
    return run


def record_run(op, tape, *inputs):
    out = bs._run(op, tape, *inputs)
    n = len([k for k in recorded if k[0] == "run"])
    recorded[("run", n)] = (out, None if tape is None else dict(tape[-1].__dict__))
    return out


counter = {}


def nth(name):
    i = counter.get(name, 0)
    counter[name] = i + 1
    return recorded[(name, i)]


def replay_run(op, tape, *inputs):
    out, ctx_state = nth("run")
    if tape is not None:
        ctx = bs._OpContext()
        ctx.__dict__.update(ctx_state)
        tape.append(ctx)
    if op is bs._bias_gelu_linear_fwd:  # keep its fc2 GEMM
        hidden, weight, linear_bias = inputs[0], inputs[2], inputs[3]
        F.linear(hidden, weight, linear_bias)
    return out


def replay_mlp_backward(ctx, dout):
    x, bias, weight = ctx.saved_tensors  # keep its two GEMMs
    dout2 = dout.reshape(-1, dout.shape[-1])
    dout2 @ weight
    dout2.t() @ x.reshape(-1, x.shape[-1])
    return nth("mlp")


step = train_step(models["timm swapped"])
module.set_block_step_bridge(record_run, *real[1:4], recording("ln", real[4]), recording("mlp", real[5]),
                             recording("attn", real[6]))
step()
module.set_block_step_bridge(replay_run, *real[1:4], lambda *a: nth("ln"), replay_mlp_backward, lambda *a: nth("attn"))


def replayed():
    counter.clear()
    step()


def real_step():
    module.set_block_step_bridge(*real)
    try:
        step()
    finally:
        module.set_block_step_bridge(replay_run, *real[1:4], lambda *a: nth("ln"), replay_mlp_backward,
                                     lambda *a: nth("attn"))


runs = {"timm": train_step(models["timm"]), "C++ step": real_step, "C++ step, op bodies free": replayed}
for fn in runs.values():
    for _ in range(10):
        fn()
times = {name: [] for name in runs}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 300):
    for name, fn in runs.items():
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
print("training step, median: " + "  ".join(f"{n} {v:.2f} ms ({v / med['timm']:.3f}x)" for n, v in med.items()))
