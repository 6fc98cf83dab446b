"""Where a ViT-B/16 training step's GPU time goes, per provider: torch.profiler's CUDA kernels
grouped by kind (GEMM, attention, norm, GELU, optimizer, other), plus the host time per step.

    python scripts/profile_vit_step.py [provider ...]     (default: timm timm_swapped)
"""

import sys
import time

import torch

from vit_kernels.bench_vit import vit_case

KINDS = [("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul")), ("attention", ("attn", "flash", "fmha", "sdpa")),
         ("norm", ("layer_norm", "layernorm")), ("gelu", ("gelu",)), ("optimizer", ("adam", "foreach", "multi_tensor")),
         ("patch_embed", ("patch", "conv", "im2col", "nchw"))]


def kind_of(name: str) -> str:
    lower = name.lower()
    for kind, keys in KINDS:
        if any(k in lower for k in keys):
            return kind
    return "other"


def main(providers):
    for provider in providers:
        case = vit_case(provider, "ViT-B/16", "train", torch.device("cuda"))
        for _ in range(5):
            case.run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            case.run()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 5 * 1e3
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
        print(f"{provider}: step {wall:.1f} ms wall, {gpu:.1f} ms of kernels; "
              + ", ".join(f"{k} {v:.1f}" for k, v in sorted(totals.items(), key=lambda x: -x[1])))
        for name, ms in sorted(names.items(), key=lambda x: -x[1])[:8]:
            print(f"    {ms:6.2f} ms  {name[:90]}")
        del case
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:] or ["timm", "timm_swapped"])
