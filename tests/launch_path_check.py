"""What reaches Triton's JITFunction.run from attention's launches, without a GPU.

Run by tests/test_dispatch.py in a subprocess (TRITON_INTERPRET must be off, so the kernels are
real JITFunctions and the GPU configs and autotuners are used). vit_kernels/_fake_launch.py's
fake_gpu_launches keeps Triton's launch path and fakes the driver, the compile and the C
launcher. Every JITFunction.run call is recorded (kernel, positional arguments, keyword
arguments in order, the grid it computes), with whether an Autotuner called it, and how many
compiled kernels each kernel's cache holds afterwards.

Prints one JSON object: {"rounds": [{"calls": [[kernel, via_autotuner, args, kwargs, grid], ...],
"cache_sizes": {kernel: compiled entries after the round}}, ...]}, a round per flash_attention
forward + backward: three at one shape (the first tunes), then a new N bucket, then a new dtype.
"""

import json
import os

assert os.environ.get("TRITON_INTERPRET", "0") == "0", "run without TRITON_INTERPRET"

import torch  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from vit_kernels._fake_launch import stub_out_kernels  # noqa: E402


def main():
    stub_out_kernels(triton_launch=True)
    from vit_kernels.ops import attention

    rounds, inside_autotuner, kernels = [], [], {}
    jit_run, autotuner_run = JITFunction.run, Autotuner.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        kernels[self.fn.__name__] = self
        bound = dict(zip(self.arg_names, args), **kwargs)
        grid_value = grid(bound) if callable(grid) else grid
        rounds[-1]["calls"].append([self.fn.__name__, bool(inside_autotuner),
                                    [str(a.dtype) if isinstance(a, torch.Tensor) else a for a in args],
                                    [[k, v] for k, v in kwargs.items()], list(grid_value)])
        return jit_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def recording_autotuner_run(self, *args, **kwargs):
        inside_autotuner.append(True)
        try:
            return autotuner_run(self, *args, **kwargs)
        finally:
            inside_autotuner.pop()

    JITFunction.run = recording_run
    Autotuner.run = recording_autotuner_run
    for n, dtype in ((197, torch.bfloat16), (197, torch.bfloat16), (197, torch.bfloat16), (600, torch.bfloat16),
                     (197, torch.float16)):
        rounds.append({"calls": []})
        q, k, v = (torch.randn(2, n, 3, 64, dtype=dtype, requires_grad=True) for _ in range(3))
        out = attention.flash_attention(q, k, v)
        out.backward(torch.randn_like(out))
        rounds[-1]["cache_sizes"] = {name: len(kernel.device_caches[0][0]) for name, kernel in kernels.items()}
    print(json.dumps({"rounds": rounds}, default=str))


if __name__ == "__main__":
    main()
