"""The benchmark cases and their measurement, shared by `python -m vit_kernels.bench` and
`pytest benchmarks/ --benchmark-only`, so the two report the same thing.

    timing.py       how a call is timed: CUDA events, graph replay, input rotation past the L2
                    cache, a fresh torch.compile, the device's measured peaks, the host's load
    case.py         Case (one op, shape, mode and provider, ready to run) and OpBench (an op's
                    shapes, providers, case and agreement)
    <op>.py         one module per op, named like its kernel in vit_kernels/ops/: shapes,
                    providers, the case and the agreement check; eager baselines come from
                    vit_kernels.reference
    vit.py          end to end: a whole ViT, inference and a training step
    runner.py       agreement, then every provider timed, into a Report
    report.py       Row, Report, the markdown table, JSON and the chart

Nothing here imports a kernel module at import time: the main job sets TRITON_INTERPRET
first when there is no GPU, and triton.jit reads it when a kernel module is imported.
"""
