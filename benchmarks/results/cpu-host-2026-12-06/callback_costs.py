"""Not part of the package: a measurement (benchmarks/results/cpu-host-overhead-2026-12-06.md).
Run without TRITON_INTERPRET:  python benchmarks/results/cpu-host-2026-12-06/callback_costs.py

Host time of the Python functions the C++ block step calls back (each op's impl and backward),
timed inside the harness's swapped ViT-B/16-layout training step (Triton's launch path kept),
per call and per step. The timers add about a microsecond a call.

Ran at c81ce21. The bridge it wraps (_C.set_block_step_bridge) went with the per-op nodes
(4541e63): to rerun it, check out c81ce21."""
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "scripts"))
torch.set_num_threads(1)
from vit_kernels._fake_launch import stub_out_kernels  # noqa: E402

stub_out_kernels(triton_launch=True)
import host_overhead as h  # noqa: E402
import vit_kernels.nn.block_step as bs  # noqa: E402

models, train_step, _ = h.vit_cases()
module = bs.cpp_step()
assert module is not None, bs.cpp_step_unavailable()
spent, calls = collections.defaultdict(float), collections.Counter()


def timed(name, fn):
    def run(*args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            spent[name] += time.perf_counter() - start
            calls[name] += 1
    return run


def run_op(op, tape, *inputs):
    return timed(op.impl.__name__.strip("_").replace("_impl", ""), bs._run)(op, tape, *inputs)


module.set_block_step_bridge(run_op, bs._add_layer_norm_fwd, bs._flash_attention_fwd, bs._bias_gelu_linear_fwd,
                             timed("add_layer_norm backward", bs._add_layer_norm_fwd.backward),
                             timed("bias_gelu_linear backward", bs._bias_gelu_linear_fwd.backward),
                             timed("attention backward", bs._attention_backward))
step = train_step(models["timm swapped"])
for _ in range(20):
    step()
spent.clear()
calls.clear()
steps = 100
start = time.perf_counter()
for _ in range(steps):
    step()
print(f"training step {(time.perf_counter() - start) / steps * 1e3:.2f} ms")
for name in spent:
    print(f"{name:28s} {spent[name] / calls[name] * 1e6:7.1f} us a call  {spent[name] / steps * 1e3:5.2f} ms a step")
print(f"{'all':28s} {'':17s}  {sum(spent.values()) / steps * 1e3:5.2f} ms a step")
