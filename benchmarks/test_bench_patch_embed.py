"""patch_embed against eager (conv2d -> flatten -> transpose -> cat -> add; for uint8 images,
normalize first) and torch.compile of eager, bf16. TFLOP/s of the patch GEMM and % of the
measured bf16 matmul rate in extra_info. Agreement asserted per op and shape before timing.
"""

import pytest

from vit_kernels.benchmarking.patch_embed import BENCH, BENCH_UINT8, SHAPES


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", BENCH.providers)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("op_bench", [BENCH, BENCH_UINT8], ids=lambda b: b.name)
def test_patch_embed(bench_op, op_bench, shape, provider, mode):
    bench_op(op_bench, shape, provider, mode)
