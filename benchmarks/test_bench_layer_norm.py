"""add_layer_norm against eager (`x + h` then F.layer_norm) and torch.compile of eager, bf16.
Before any timing, the numerics rule is asserted at each shape for vit_kernels and
torch.compile (eager is the yardstick). extra_info: GB/s and % of the measured
device-to-device copy bandwidth.
"""

import pytest

from vit_kernels.benchmarking.layer_norm import BENCH


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", BENCH.providers)
@pytest.mark.parametrize("shape", list(BENCH.shapes))
def test_add_layer_norm(bench_op, shape, provider, mode):
    bench_op(BENCH, shape, provider, mode)
