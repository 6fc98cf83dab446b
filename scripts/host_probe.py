"""Issue 23's first check on a device, about a minute: what one launch costs this host, and whether
a ViT-B/16 training step waits on it. gpu_check.sh's `probe` stage runs it in three fresh
processes, first in a lease, so the spread between processes (40-57 ms for the same swapped
step) comes back even when a later stage runs out of time.

    python scripts/host_probe.py [--providers P ...] [--stubbed]

launch: the host time per call of one launch, issued without a synchronize inside a batch
  (median over batches of 200; a synchronize between batches keeps the GPU's queue from
  filling, which would time the GPU instead):
  - torch.add into a preallocated output, and torch.add allocating it (a torch op's launch);
  - a 3-argument Triton kernel through Triton's own launch path (`kernel[grid](...)`) and
    through vit_kernels' bound launcher (ops/_launcher.py), the path every op takes;
  - vit_kernels.ops.add_layer_norm (validation, allocations, one 18-argument launch) against
    eager's x + r then F.layer_norm, at ViT-B/16's rows (16 rows on the CPU), autograd off.
step: per provider, the host time to issue one training step from an idle GPU (no synchronize
  inside; median of 5), its wall time (median of 10, each from an idle GPU to a synchronize)
  and their ratio: near 1 the GPU waits on the host; well under 1 it does not. By default timm,
  timm after swap_modules, and the same step captured in one CUDA graph (the wall time with the
  host out of the way: what the kernels alone take).

--stubbed runs the launch part on the CPU with Triton's launch path kept and its C launcher a
no-op (vit_kernels._fake_launch, as scripts/host_overhead.py --triton-launch), for testing
this script without a GPU; the step part needs CUDA.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BATCH_CALLS = 200


@triton.jit
def _copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(Y + offsets, tl.load(X + offsets, mask=mask), mask=mask)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call_us(call, device: torch.device, batches: int = 10) -> float:
    """Median host microseconds per call(), over batches of BATCH_CALLS calls issued back to back."""
    call()
    times = []
    for _ in range(batches):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(BATCH_CALLS):
            call()
        times.append((time.perf_counter() - start) / BATCH_CALLS * 1e6)
    _synchronize(device)
    return statistics.median(times)


def launch_costs(device: torch.device) -> dict:
    """{what: host us per call} for the launches the module docstring lists."""
    from vit_kernels.ops import add_layer_norm
    from vit_kernels.ops._launcher import launcher_for

    n = 4096
    a, b, c = (torch.randn(n, device=device) for _ in range(3))
    grid = (triton.cdiv(n, 1024),)
    # ViT-B/16's tokens at batch 128; on the CPU (--stubbed) a few rows, so that eager's real CPU
    # kernels and the allocations of large blocks do not stand for a launch.
    rows, width = (128 * 197 if device.type == "cuda" else 16), 768
    x, r = (torch.randn(rows, width, device=device, dtype=torch.bfloat16) for _ in range(2))
    weight, bias = torch.randn(width, device=device), torch.randn(width, device=device)
    costs = {}
    with torch.no_grad():
        costs["torch.add(a, b, out=c)"] = per_call_us(lambda: torch.add(a, b, out=c), device)
        costs["torch.add(a, b)"] = per_call_us(lambda: torch.add(a, b), device)
        costs["triton kernel[grid](3 args)"] = per_call_us(lambda: _copy_kernel[grid](a, c, n, BLOCK=1024), device)
        costs["vit_kernels launch(3 args)"] = per_call_us(lambda: launcher_for(_copy_kernel).call(grid, a, c, n, BLOCK=1024),
                                                          device)
        costs["vit_kernels add_layer_norm"] = per_call_us(lambda: add_layer_norm(x, r, weight, bias), device)
        costs["eager x + r, F.layer_norm"] = per_call_us(lambda: F.layer_norm(x + r, (width,), weight, bias), device)
    return costs


def step_times(provider: str, device: torch.device) -> tuple:
    """(host ms to issue a step, wall ms per step) of a ViT-B/16 bf16 training step."""
    from vit_kernels.benchmarking.vit import vit_case

    case = vit_case(provider, "ViT-B/16", "train", device)
    for _ in range(3):
        case.run()
    issue, wall = [], []
    for reps, times, synchronized in ((5, issue, False), (10, wall, True)):
        for _ in range(reps):
            _synchronize(device)
            start = time.perf_counter()
            case.run()
            if synchronized:
                _synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
    _synchronize(device)
    del case
    torch.cuda.empty_cache()
    return statistics.median(issue), statistics.median(wall)


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", nargs="*", default=["timm", "timm_swapped", "timm_swapped_graph"],
                        help="ViT-B/16 training-step providers (vit_kernels.benchmarking.vit.VIT_PROVIDERS)")
    parser.add_argument("--stubbed", action="store_true", help="the launch part on the CPU, launches stubbed")
    args = parser.parse_args(argv)
    if args.stubbed:
        from vit_kernels._fake_launch import stub_out_kernels

        stub_out_kernels(triton_launch=True)
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("host_probe: no CUDA device (--stubbed runs the launch part on the CPU)")
        return 2
    else:
        device = torch.device("cuda")
    from vit_kernels._extension import bound_launch_path

    print(f"host_probe: pid {os.getpid()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, triton {triton.__version__}, bound launches {bound_launch_path()}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ", CPU, launches stubbed"),
          flush=True)
    for what, us in launch_costs(device).items():
        print(f"launch: {what:30s} {us:7.2f} us", flush=True)
    if device.type != "cuda":
        return 0
    for provider in args.providers:
        issue, wall = step_times(provider, device)
        print(f"step: {provider:22s} issue {issue:6.1f} ms  wall {wall:6.1f} ms  issue/wall {issue / wall:.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
