"""Test set-up: Triton's interpreter where there is no GPU, seeds, the requires_cuda and
inductor markers (declared in pyproject.toml), and the numerics rule.

TRITON_INTERPRET must be set before any vit_kernels op module is imported (triton.jit
chooses interpreted or compiled at decoration time); pytest loads this file before
the test modules, so setting it here is early enough.
"""

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vit_kernels.testing import inductor_unusable_reason, kernel_device  # noqa: E402

# The numerics rule lives in vit_kernels.testing (assert_rule, check_rule), one helper
# for the tests, the benchmarks and `python -m vit_kernels.bench`; test modules import
# it from there rather than from this file, so tests/ and benchmarks/ can run in one
# pytest session without their conftest modules colliding.

def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("requires_cuda") and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (none found)"))
        if item.get_closest_marker("inductor") and inductor_unusable_reason():
            item.add_marker(pytest.mark.skip(reason=inductor_unusable_reason()))


@pytest.fixture
def seed(request):
    """Seeds torch from the test's id: fresh inputs for every test, reproducible run to run."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


@pytest.fixture
def device():
    return kernel_device()
