"""linear_bias_gelu (fc1 + bias + GELU) against eager (F.linear + F.gelu) and torch.compile of
eager, bf16; triton_gemm forces its Triton GEMM with the bias + GELU epilogue. Agreement
asserted per shape before timing. extra_info: TFLOP/s and % of the measured bf16 matmul rate.
"""

import pytest

from vit_kernels.benchmarking.linear_bias_gelu import BENCH


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", BENCH.providers)
@pytest.mark.parametrize("shape", list(BENCH.shapes))
def test_linear_bias_gelu(bench_op, shape, provider, mode):
    bench_op(BENCH, shape, provider, mode)
