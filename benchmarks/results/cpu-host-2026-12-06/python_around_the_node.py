"""Not part of the package: a measurement (benchmarks/results/cpu-host-overhead-2026-12-06.md).
Run without TRITON_INTERPRET:  python benchmarks/results/cpu-host-2026-12-06/python_around_the_node.py

The Python each block runs around the C++ node, timed inside the harness's swapped step:
fast_path_spec (may this block take the node?) and _one_node_block_step (its random draws and
parameter reads) against the node's own call (block_step_forward), ms a step."""
import os
import sys, time, collections, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "scripts"))
torch.set_num_threads(1)
from vit_kernels._fake_launch import stub_out_kernels
stub_out_kernels(triton_launch=True)
import host_overhead as h
import vit_kernels.nn.block as bm
import vit_kernels.nn.block_step as bs
models, train_step, inference = h.vit_cases()
acc = collections.defaultdict(float)
def timed(name, fn):
    def w(*a):
        s = time.perf_counter()
        try: return fn(*a)
        finally: acc[name] += time.perf_counter() - s
    return w
bm.fast_path_spec = timed("fast_path_spec", bm.fast_path_spec)
bm._one_node_block_step = timed("one_node_block_step (incl. C++)", bm._one_node_block_step)
real_bsf = bm.block_step_forward
bm.block_step_forward = timed("block_step_forward (C++ call)", real_bsf)
for mode, make in (("train", train_step), ("inference", inference)):
    fn = make(models["timm swapped"])
    for _ in range(20): fn()
    acc.clear()
    N = 100
    s = time.perf_counter()
    for _ in range(N): fn()
    print(mode, f"step {(time.perf_counter()-s)/N*1e3:.2f} ms", {k: round(v / N * 1e3, 3) for k, v in acc.items()})
