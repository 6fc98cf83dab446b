"""flash_attention_varlen on a packed batch of 64 images of mixed sizes (~400 tokens each, a fixed
draw) against eager per-image attention, SDPA on jagged nested tensors (PyTorch's varlen path)
and SDPA over the padded batch with a key mask; bf16. Every provider starts from the packed
q, k, v [T, H, d] and ends with [T, H*d]. Agreement (the numerics rule) is asserted per shape
before timing. extra_info: TFLOP/s (fwd 4*H*d*sum(n_i^2), fwd+bwd 3.5x that) and % of the
measured bf16 matmul rate.
"""

import pytest

from vit_kernels.benchmarking.attention_varlen import BENCH


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", BENCH.providers)
@pytest.mark.parametrize("shape", list(BENCH.shapes))
def test_flash_attention_varlen(bench_op, shape, provider, mode):
    bench_op(BENCH, shape, provider, mode)
