"""bias_gelu (`gelu(x + bias)` on fc1's bias-free output) against eager and torch.compile of
eager, bf16. Agreement asserted per shape before timing. extra_info: GB/s and % of the
measured copy bandwidth.
"""

import pytest

from vit_kernels.benchmarking.bias_gelu import BENCH


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", BENCH.providers)
@pytest.mark.parametrize("shape", list(BENCH.shapes))
def test_bias_gelu(bench_op, shape, provider, mode):
    bench_op(BENCH, shape, provider, mode)
