"""Not part of the package: a measurement (benchmarks/results/cpu-host-overhead-2026-12-06.md).
Run without TRITON_INTERPRET:  python benchmarks/results/cpu-host-2026-12-06/compare_steps.py [steps]

The harness's tiny ViT-B/16-layout step (scripts/host_overhead.py, Triton's launch path kept),
timm eager against timm swapped with each block as the one C++ node and with every block on the
per-op path. The three take turns step by step, so the machine's drift falls on all alike;
medians and 10th percentiles of the per-step times."""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "scripts"))
torch.set_num_threads(1)
from vit_kernels._fake_launch import stub_out_kernels  # noqa: E402

stub_out_kernels(triton_launch=True)
import host_overhead as h  # noqa: E402
import vit_kernels.nn.block as block_module  # noqa: E402

models, train_step, inference = h.vit_cases()
one_node = block_module.fast_path_spec


def per_op(fn):
    def run():
        block_module.fast_path_spec = lambda *args: None
        try:
            fn()
        finally:
            block_module.fast_path_spec = one_node
    return run


steps = int(sys.argv[1]) if len(sys.argv) > 1 else 400
for mode, make in (("train", train_step), ("inference", inference)):
    runs = {"timm": make(models["timm"]), "one node (C++)": make(models["timm swapped"]),
            "per-op path": per_op(make(models["timm swapped"]))}
    for fn in runs.values():
        for _ in range(10):
            fn()
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for stat, pick in (("median", statistics.median), ("p10", lambda t: statistics.quantiles(t, n=10)[0])):
        ms = {name: pick(t) * 1e3 for name, t in times.items()}
        print(f"{mode:9s} {stat:6s} " + "  ".join(f"{name} {v:.2f} ms ({v / ms['timm']:.3f}x)" for name, v in ms.items()),
              flush=True)
