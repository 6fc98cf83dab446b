"""How a call is timed: CUDA events around each call after warm-up, the median of the calls;
each call takes the next of several input sets whose total size is at least twice the L2
cache, so no call finds its inputs in cache; inputs are random normal, never zeros."""

import math
import os
import statistics
from typing import Callable

import torch

DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2; used when the device does not report its own


def time_cuda_ms(fn: Callable[[], object], *, warmup: int = 10, reps: int = 50) -> float:
    """Median milliseconds of fn() on the current CUDA stream, each call between two events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_cuda_graph_ms(fn: Callable[[], object], *, reps: int = 50) -> float:
    """Median milliseconds of one replay of fn() captured in a CUDA graph: the GPU's time
    for the work, without the host's cost of launching it (Python, dispatch, Triton's
    launcher). Where the host takes longer per call than the GPU, time_cuda_ms reports the
    host; a ViT hides most of that behind its GEMMs, so both are reported. The graph
    replays one input set (no rotation), so operands that fit in L2 may stay there."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: autotuning, allocator
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_cuda_ms(graph.replay, warmup=3, reps=reps)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 2**30) -> float:
    """Measured device-to-device copy bandwidth: (bytes read + bytes written) / median time."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_cuda_ms(lambda: dst.copy_(src), warmup=5, reps=30)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """Measured bf16 matmul rate (cuBLAS through torch.matmul, n x n x n), TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_cuda_ms(lambda: a @ b, warmup=5, reps=30)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def n_input_sets(set_bytes: int, device: torch.device) -> int:
    """Enough input sets that cycling through them moves at least twice the L2 cache."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES
    return max(2, math.ceil(2 * l2 / max(set_bytes, 1)))


class Rotation:
    """Hands out input sets round-robin."""

    def __init__(self, make_set: Callable[[], tuple], set_bytes: int, device: torch.device):
        self.sets = [make_set() for _ in range(n_input_sets(set_bytes, device))]
        self.i = 0

    def next(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s


def randn(*shape, device, dtype, scale=1.0, shift=0.0, requires_grad=False):
    """Random normal `scale * N(0, 1) + shift`, drawn in float32 and rounded to `dtype`."""
    t = (torch.randn(*shape, device=device) * scale + shift).to(dtype)
    return t.requires_grad_() if requires_grad else t


def compile_fresh(fn, **kwargs):
    """torch.compile(fn) after dropping dynamo's caches: one eager function is compiled for
    every shape, mode and op that shares it (patch_embed and its uint8 variant), which would
    pass dynamo's recompile limit and, with fullgraph=True, fail instead of falling back."""
    torch._dynamo.reset()
    return torch.compile(fn, **kwargs)


def host_load() -> str:
    """The host's CPU load when the run starts. Host-bound timings (a launch-bound op, a ViT
    step whose GPU waits for Python) slow down when other processes share the CPU, so a
    report says how busy it was."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
