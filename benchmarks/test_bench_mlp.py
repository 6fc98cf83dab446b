"""bias + GELU and the MLP against eager (F.linear + F.gelu) and torch.compile of eager, bf16.

- bias_gelu alone: GB/s and % of the measured copy bandwidth.
- fc1 + bias + GELU, and the whole MLP (fc1 -> GELU -> fc2): TFLOP/s and % of the
  measured bf16 matmul rate. Providers: vit_kernels (linear_bias_gelu's per-shape
  dispatch), triton_gemm (its Triton GEMM with the bias + GELU epilogue, forced), eager,
  compile. These two rows are the measurements the dispatch is to be set from.
Agreement (the numerics rule) is asserted per op and shape before timing.
"""

import pytest
import torch

from vit_kernels.bench import FC1_PROVIDERS, MLP_PROVIDERS, MLP_SHAPES, mlp_agreement, mlp_case

OPS = ("bias_gelu", "fc1_bias_gelu", "mlp")
_AGREEMENT = {op: mlp_agreement(op) for op in OPS}
_CASE = {op: mlp_case(op) for op in OPS}


CASES = [(op, provider) for op in OPS for provider in (MLP_PROVIDERS if op == "bias_gelu" else FC1_PROVIDERS)]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(MLP_SHAPES))
@pytest.mark.parametrize("op, provider", CASES)
def test_mlp(measure, assert_agreement_once, op, shape, provider, mode):
    dims = MLP_SHAPES[shape]
    assert_agreement_once(_AGREEMENT[op], shape, dims)
    measure(_CASE[op](provider, shape, dims, mode, torch.bfloat16, torch.device("cuda")))
