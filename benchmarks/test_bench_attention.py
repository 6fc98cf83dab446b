"""flash_attention against eager attention (materialized softmax, timm's fused_attn=False
path), SDPA's default backend, and SDPA's flash and cuDNN backends where available; bf16.

Every provider starts from the packed qkv [B, N, 3, H, d] and ends with [B, N, H*d], as
inside a ViT block. Agreement (the numerics rule) is asserted per shape before timing.
extra_info: TFLOP/s (fwd 4*B*H*N^2*d, fwd+bwd 3.5x that) and % of the measured bf16
matmul rate.
"""

import pytest
import torch

from vit_kernels.bench import ATTENTION_PROVIDERS, ATTENTION_SHAPES, attention_agreement, attention_case


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ATTENTION_PROVIDERS)
@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES))
def test_flash_attention(measure, assert_agreement_once, shape, provider, mode):
    device = torch.device("cuda")
    dims = ATTENTION_SHAPES[shape]
    assert_agreement_once(attention_agreement, shape, dims)
    case = attention_case(provider, shape, dims, mode, torch.bfloat16, device)
    try:
        measure(case)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{provider} runs out of memory at {shape} {mode}")
    except RuntimeError as err:
        if not provider.startswith("sdpa_"):
            raise
        pytest.skip(f"{provider} unavailable here: {str(err).splitlines()[0][:120]}")
