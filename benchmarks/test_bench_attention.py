"""flash_attention against eager attention (materialized softmax, timm's fused_attn=False
path), SDPA's default backend, and SDPA's flash and cuDNN backends where available; bf16.
Every provider starts from the packed qkv [B, N, 3, H, d] and ends with [B, N, H*d], as
inside a ViT block. Agreement (the numerics rule) is asserted per shape before timing.
extra_info: TFLOP/s (fwd 4*B*H*N^2*d, fwd+bwd 3.5x that) and % of the measured bf16
matmul rate.
"""

import pytest

from vit_kernels.benchmarking.attention import BENCH


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", BENCH.providers)
@pytest.mark.parametrize("shape", list(BENCH.shapes))
def test_flash_attention(bench_op, shape, provider, mode):
    bench_op(BENCH, shape, provider, mode)
