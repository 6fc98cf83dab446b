"""What reaches Triton's launch path and its C launcher from the ops, without a GPU.

Run by tests/test_launcher.py in a subprocess (TRITON_INTERPRET must be off, so the kernels are
real JITFunctions and the GPU configs and autotuners are used). vit_kernels/_fake_launch.py's
fake_gpu_launches keeps Triton's launch path and fakes the driver, the compile and the C launcher,
whose calls it records. Each round records its JITFunction.run calls (kernel, whether an Autotuner
made it), its autotuner benchmark calls, its C-launcher calls (kernel, grid, every argument in the
kernel's parameter order: a tensor as its dtype, shape and strides), and how many compiled kernels
each kernel's cache holds afterwards.

    python tests/launch_path_check.py attention [--triton-path]
        a round per flash_attention forward + backward: three at one shape (the first tunes),
        then a new N bucket, then a new dtype
    python tests/launch_path_check.py vit-step [--triton-path]
        a round per training step (forward under bf16 autocast, backward) of a timm ViT after
        swap_modules, with layer scale, drop path and attention dropout, then of our reference ViT

--triton-path sends every launch through Triton's own `kernel[grid](...)` (ops/_launcher.py's
Launcher bypassed), for comparing what the C launcher gets both ways. Prints one JSON object:
{"rounds": [{"name", "runs": [[kernel, via_autotuner], ...], "benchmarks": n,
"launches": [[kernel, grid, args], ...], "cache_sizes": {kernel: n}, "bound_in_c": [kernel, ...]}, ...]}
(bound_in_c: the kernels whose Launcher hands its launches to csrc/bound_launch.c by then;
VIT_KERNELS_C_LAUNCH=0 keeps them in Python).
"""

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") == "0", "run without TRITON_INTERPRET"

import torch  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from vit_kernels import _fake_launch  # noqa: E402
from vit_kernels.ops import _launcher  # noqa: E402


def _describe(value):
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype), list(value.shape), list(value.stride())]
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


def attention_rounds():
    from vit_kernels.ops import attention

    for n, dtype in ((197, torch.bfloat16), (197, torch.bfloat16), (197, torch.bfloat16), (600, torch.bfloat16),
                     (197, torch.float16)):
        q, k, v = (torch.randn(2, n, 3, 64, dtype=dtype, requires_grad=True) for _ in range(3))
        yield f"N={n} {dtype}", lambda: attention.flash_attention(q, k, v).backward(torch.randn(2, n, 3, 64, dtype=dtype))


def vit_step_rounds():
    import timm

    import vit_kernels
    from vit_kernels.models import VisionTransformer

    timm_model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, embed_dim=64, depth=2,
                                   num_heads=2, num_classes=10, init_values=1e-5, drop_path_rate=0.1,
                                   attn_drop_rate=0.1)
    models = {"timm swapped": vit_kernels.swap_modules(timm_model)[0].train(),
              "reference": VisionTransformer(img_size=32, patch_size=16, num_classes=10, embed_dim=64, depth=2,
                                             num_heads=2, init_values=1e-5, drop_path_rate=0.1,
                                             attn_drop_rate=0.1).train()}
    images = torch.randn(2, 3, 32, 32)
    for name, model in models.items():
        def step(model=model):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(images).float().square().mean()
            loss.backward()
        for i in range(3):
            yield f"{name} step {i + 1}", step


def main():
    scenario = sys.argv[1]
    _fake_launch.stub_out_kernels(triton_launch=True)
    if "--triton-path" in sys.argv:
        from vit_kernels.ops._launcher import Launcher

        Launcher.__call__ = lambda self, grid, *args, **kwargs: self.kernel[grid](*args, **kwargs)
    rounds, inside_autotuner, kernels = [], [], {}
    jit_run, autotuner_run, autotuner_bench = JITFunction.run, Autotuner.run, Autotuner._bench

    def recording_run(self, *args, grid, warmup, **kwargs):
        kernels[self.fn.__name__] = self
        rounds[-1]["runs"].append([self.fn.__name__, bool(inside_autotuner)])
        return jit_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def recording_autotuner_run(self, *args, **kwargs):
        inside_autotuner.append(True)
        try:
            return autotuner_run(self, *args, **kwargs)
        finally:
            inside_autotuner.pop()

    def counting_bench(self, *args, **kwargs):
        rounds[-1]["benchmarks"] += 1
        return autotuner_bench(self, *args, **kwargs)

    JITFunction.run = recording_run
    Autotuner.run = recording_autotuner_run
    Autotuner._bench = counting_bench
    scenarios = {"attention": attention_rounds, "vit-step": vit_step_rounds}
    torch.manual_seed(0)
    for name, run in scenarios[scenario]():
        launches = _fake_launch.KernelStandIn.launches = []
        rounds.append({"name": name, "runs": [], "benchmarks": 0})
        run()
        rounds[-1]["launches"] = [[kernel, list(grid), [_describe(a) for a in args]] for kernel, grid, args in launches]
        rounds[-1]["cache_sizes"] = {name: len(kernel.device_caches[0][0]) for name, kernel in kernels.items()}
        rounds[-1]["bound_in_c"] = sorted(launcher.kernel.fn.__name__ for _, launcher in _launcher._LAUNCHERS.values()
                                          if launcher.call is not launcher)
    print(json.dumps({"rounds": rounds}, default=str))


if __name__ == "__main__":
    main()
