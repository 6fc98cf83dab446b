"""Where a ViT-B/16 training step's time goes, per provider: torch.profiler's CUDA kernels
grouped by kind (GEMM, attention, norm, GELU, optimizer, other), the wall time per step, and
the host side: garbage collections during the timed steps, how long Python takes to issue one
step (perf_counter around a step started on an idle GPU, no synchronize inside), how many calls
in a step synchronize with the GPU (torch.cuda's sync debug mode), and the functions the host
spends that time in (cProfile).
When the wall time tracks the host's issue time rather than the kernels, the step is
host-bound, and the cProfile lines say whose Python it is (ours, Triton's launcher, torch's).

    python scripts/profile_vit_step.py [--warmup N] [--wall-only] [provider ...]     (default: timm timm_swapped)

--wall-only prints the wall time per step alone (no profiler, no cProfile): gpu_check.sh's
spread stage runs it in three fresh processes, to see how far one process's step time is from
another's (issue 27: within 5%, or say where the spread comes from).
"""

import argparse
import cProfile
import gc
import io
import pstats
import statistics
import sys
import time
import warnings

import torch

from vit_kernels.benchmarking.timing import host_load
from vit_kernels.benchmarking.vit import vit_case

KINDS = [("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul")), ("attention", ("attn", "flash", "fmha", "sdpa")),
         ("norm", ("layer_norm", "layernorm")), ("gelu", ("gelu",)), ("optimizer", ("adam", "foreach", "multi_tensor")),
         ("patch_embed", ("patch", "conv", "im2col", "nchw"))]


def kind_of(name: str) -> str:
    lower = name.lower()
    for kind, keys in KINDS:
        if any(k in lower for k in keys):
            return kind
    return "other"


def timed_steps(case, n: int) -> tuple:
    """Wall ms of `n` steps, each from an idle GPU to a synchronize, and what Python's garbage
    collector did meanwhile (count and ms per generation): a full collection walks every object
    of a process that imported timm and torch: a slow step that a mean would hide."""
    gc_ms = {}
    started = []

    def on_gc(phase, info):
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            count, ms = gc_ms.get(info["generation"], (0, 0.0))
            gc_ms[info["generation"]] = (count + 1, ms + (time.perf_counter() - started.pop()) * 1e3)

    steps = []
    gc.callbacks.append(on_gc)
    try:
        for _ in range(n):
            torch.cuda.synchronize()
            start = time.perf_counter()
            case.run()
            torch.cuda.synchronize()
            steps.append((time.perf_counter() - start) * 1e3)
    finally:
        gc.callbacks.remove(on_gc)
    collections = ", ".join(f"generation {g}: {c} ({ms:.1f} ms)" for g, (c, ms) in sorted(gc_ms.items()))
    return steps, collections or "none"


def host_side(case) -> str:
    issue = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        case.run()
        issue.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            case.run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(3):
        case.run()
    torch.cuda.synchronize()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(15)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    site = torch.__file__.rsplit("torch/", 1)[0]
    table = lines[next(i for i, line in enumerate(lines) if "tottime" in line):]
    return (f"  host: {statistics.median(issue):.1f} ms to issue a step (median of 5), "
            f"{len(syncs)} synchronizing calls in a step" + "".join(f"\n    sync: {m[:110]}" for m in syncs[:5])
            + "\n  cProfile, 3 steps, by own time (seconds; profiling slows what it profiles):\n    "
            + "\n    ".join(line.replace(site, "")[:150] for line in table))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=5, help="steps run before anything is timed")
    parser.add_argument("--wall-only", action="store_true", help="the wall time per step alone")
    parser.add_argument("providers", nargs="*", default=["timm", "timm_swapped"])
    args = parser.parse_args(argv)
    # A host-bound step slows down when other processes share the CPU (a capped stage's
    # leftovers, Triton compiles): say how busy it was before and after each provider.
    print(f"host {host_load()}", flush=True)
    for provider in args.providers:
        case = vit_case(provider, "ViT-B/16", "train", torch.device("cuda"))
        for _ in range(args.warmup):
            case.run()
        steps, collections = timed_steps(case, 10)
        if args.wall_only:
            print(f"{provider}: step {statistics.median(steps):.1f} ms wall (median of {len(steps)}, "
                  f"min {min(steps):.1f}, max {max(steps):.1f}); garbage collections: {collections}", flush=True)
            del case
            torch.cuda.empty_cache()
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                case.run()
            torch.cuda.synchronize()
        totals, names = {}, {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                ms, kind = e.device_time / 1e3 / 3, kind_of(e.name)
                totals[kind] = totals.get(kind, 0.0) + ms
                names[e.name] = names.get(e.name, 0.0) + ms
        gpu = sum(totals.values())
        print(f"{provider}: step {statistics.median(steps):.1f} ms wall (median of {len(steps)}, "
              f"min {min(steps):.1f}, max {max(steps):.1f}), {gpu:.1f} ms of kernels; "
              + ", ".join(f"{k} {v:.1f}" for k, v in sorted(totals.items(), key=lambda x: -x[1])))
        print(f"  garbage collections in those steps: {collections}")
        for name, ms in sorted(names.items(), key=lambda x: -x[1])[:8]:
            print(f"    {ms:6.2f} ms  {name[:90]}")
        print(host_side(case), flush=True)
        print(f"  host {host_load()}", flush=True)
        del case
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
