"""bias_gelu_linear: the whole MLP (fc1 -> GELU -> fc2) as FusedMlp runs it, against eager and
torch.compile of eager, bf16. Agreement asserted per shape before timing. extra_info:
TFLOP/s and % of the measured bf16 matmul rate.
"""

import pytest

from vit_kernels.benchmarking.bias_gelu_linear import BENCH


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", BENCH.providers)
@pytest.mark.parametrize("shape", list(BENCH.shapes))
def test_bias_gelu_linear(bench_op, shape, provider, mode):
    bench_op(BENCH, shape, provider, mode)
