"""patch_embed against eager (conv2d -> flatten -> transpose -> cat -> add; for uint8 images,
normalize first) and torch.compile of eager, bf16. TFLOP/s of the patch GEMM and % of the
measured bf16 matmul rate in extra_info. Agreement asserted per op and shape before timing.
"""

import pytest
import torch

from vit_kernels.bench import MLP_PROVIDERS, PATCH_EMBED_SHAPES, patch_embed_agreement, patch_embed_case

OPS = ("patch_embed", "patch_embed_uint8")
_AGREEMENT = {op: patch_embed_agreement(op) for op in OPS}
_CASE = {op: patch_embed_case(op) for op in OPS}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", MLP_PROVIDERS)
@pytest.mark.parametrize("shape", list(PATCH_EMBED_SHAPES))
@pytest.mark.parametrize("op", OPS)
def test_patch_embed(measure, assert_agreement_once, op, shape, provider, mode):
    dims = PATCH_EMBED_SHAPES[shape]
    assert_agreement_once(_AGREEMENT[op], shape, dims)
    measure(_CASE[op](provider, shape, dims, mode, torch.bfloat16, torch.device("cuda")))
