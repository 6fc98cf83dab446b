"""Not part of the package: a measurement (benchmarks/results/cpu-host-overhead-2026-12-05.md, the
sections on the C++ floor). Run from anywhere without TRITON_INTERPRET:
    python benchmarks/results/cpu-host-floor-2026-12-05/run_floor.py
Training step of the harness's swapped ViT with each block's step replaced by a C++ autograd
node doing the one-node step's aten work only (no launch): the floor of a C++ orchestration."""
import os, sys, tempfile, time, torch
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "scripts"))
torch.set_num_threads(1)
from torch.utils.cpp_extension import load
# -O3, as the package's own extension is built (vit_kernels/_build_config.compile_args): cpp_extension.load
# adds no optimization flag of its own, and the first runs of this script, unoptimized, measured 0.75-0.78.
floor = load("block_floor", [os.path.join(HERE, "floor.cpp")], extra_cflags=["-O3"], build_directory=tempfile.mkdtemp(),
             verbose=False)
from vit_kernels._fake_launch import stub_out_kernels
stub_out_kernels(triton_launch=True)
import host_overhead as h
import vit_kernels.nn.block as block_module

python_step = block_module.block_step_forward

def cpp_step(spec, branch, residual, gamma_in, row_scale_in, seed, n1w, n1b, qkvw, qkvb, projw, projb, gamma1,
             row_scale1, n2w, n2b, fc1w, fc1b, fc2w, fc2b):
    if residual is None:
        residual = branch
    return tuple(floor.block_floor(branch, residual, spec.num_heads, n1w, n1b, qkvw, qkvb, projw, projb, n2w, n2b,
                                   fc1w, fc1b, fc2w, fc2b))

models, train_step, inference = h.vit_cases()
runs = {"timm": train_step(models["timm"]), "swapped (Python step)": train_step(models["timm swapped"])}
def floor_run():
    block_module.block_step_forward = cpp_step
    try:
        runs["swapped (Python step)"]()
    finally:
        block_module.block_step_forward = python_step
runs["swapped, C++ floor (no launch)"] = floor_run
for _ in range(3):
    times = {name: h.per_call_seconds(fn, 28) * 1e3 for name, fn in runs.items()}
    print("  ".join(f"{n} {t:.2f}" for n, t in times.items()),
          f" floor/timm {times['swapped, C++ floor (no launch)'] / times['timm']:.2f}"
          f"  python/timm {times['swapped (Python step)'] / times['timm']:.2f}", flush=True)
