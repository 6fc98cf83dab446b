"""pytest-benchmark set-up: GPU only, and the device's measured copy bandwidth.

Run as `pytest benchmarks/ --benchmark-only`. Without CUDA every benchmark skips with
the reason (the numerics still run in tests/ and in `python -m vit_kernels.bench`).
"""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA device (none found)")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def copy_bandwidth_gbps():
    from vit_kernels.benchmarking.timing import copy_bandwidth_gbps

    return copy_bandwidth_gbps(torch.device("cuda"))


_agreement_checked = set()


@pytest.fixture
def assert_agreement_once():
    """assert_agreement_once(agreement, shape, dims, provider): the numerics rule for the provider at
    this shape, once a session."""

    def check(agreement, shape, dims, provider):
        if provider == "eager" or provider.startswith("sdpa_") or (agreement, shape, provider) in _agreement_checked:
            return  # eager is the yardstick; SDPA's forced backends are PyTorch's own, checked as "sdpa"
        for result in agreement(dims, torch.bfloat16, torch.device("cuda"), providers=[provider]).values():
            assert result.ok, str(result)
        _agreement_checked.add((agreement, shape, provider))

    return check


@pytest.fixture(scope="session")
def matmul_tflops():
    from vit_kernels.benchmarking.timing import matmul_tflops

    return matmul_tflops(torch.device("cuda"))


@pytest.fixture
def bench_op(measure, assert_agreement_once):
    """bench_op(op_bench, shape, provider, mode): the numerics rule for the provider at the shape (once), then
    the provider timed in bf16. A provider out of memory, or an SDPA backend that does not
    take the shape, skips with the reason; any other failure fails."""

    def run(op_bench, shape, provider, mode):
        dims = op_bench.shapes[shape]
        assert_agreement_once(op_bench.agreement, shape, dims, provider)
        case = op_bench.case(provider, shape, dims, mode, torch.bfloat16, torch.device("cuda"))
        try:
            measure(case)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            pytest.skip(f"{provider} runs out of memory at {shape} {mode}")
        except RuntimeError as err:
            if not provider.startswith("sdpa_"):
                raise
            pytest.skip(f"{provider} unavailable here: {str(err).splitlines()[0][:120]}")

    return run


@pytest.fixture
def measure(benchmark, copy_bandwidth_gbps, matmul_tflops):
    """measure(case): time case.run with pytest-benchmark (synchronizing inside the timed call), and
    record the CUDA-event median, GB/s or TFLOP/s, and % of the measured peak in extra_info."""
    return lambda case: _measure(benchmark, case, copy_bandwidth_gbps, matmul_tflops)


def _measure(benchmark, case, copy_bandwidth_gbps, matmul_tflops, rounds=20):
    from vit_kernels.benchmarking.timing import time_cuda_ms

    def timed():
        case.run()
        torch.cuda.synchronize()

    benchmark.group = f"{case.op} {case.shape} {case.mode}"
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=5, iterations=1)
    ms = time_cuda_ms(case.run)
    info = dict(provider=case.provider, cuda_event_median_ms=ms)
    if case.bytes_moved:
        gbps = case.bytes_moved / (ms * 1e-3) / 1e9
        info.update(gbps=gbps, pct_of_copy_bandwidth=100 * gbps / copy_bandwidth_gbps,
                    copy_bandwidth_gbps=copy_bandwidth_gbps)
    if case.flops:
        tflops = case.flops / (ms * 1e-3) / 1e12
        info.update(tflops=tflops, pct_of_bf16_matmul=100 * tflops / matmul_tflops, bf16_matmul_tflops=matmul_tflops)
    benchmark.extra_info.update(info)
