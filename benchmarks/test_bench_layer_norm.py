"""add_layer_norm against eager (`x + h` then F.layer_norm) and torch.compile of eager, bf16.

Before any timing, the numerics rule is asserted at each shape for vit_kernels and
torch.compile (eager is the yardstick). extra_info: GB/s and % of the measured
device-to-device copy bandwidth.
"""

import pytest
import torch

from vit_kernels.bench import LAYER_NORM_PROVIDERS, LAYER_NORM_SHAPES, layer_norm_agreement, layer_norm_case


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", LAYER_NORM_PROVIDERS)
@pytest.mark.parametrize("shape", list(LAYER_NORM_SHAPES))
def test_add_layer_norm(measure, assert_agreement_once, shape, provider, mode):
    device = torch.device("cuda")
    dims = LAYER_NORM_SHAPES[shape]
    assert_agreement_once(layer_norm_agreement, shape, dims)
    measure(layer_norm_case(provider, shape, dims, mode, torch.bfloat16, device))
