"""The main job: per-op speed and numerical agreement on this device.

    python -m vit_kernels.bench [--json FILE] [--markdown FILE] [--plot FILE.png] [--quick] [--ops ...]

On a CUDA device, for every op and ViT shape: median time of each provider
(vit_kernels, eager PyTorch, and the strongest PyTorch alternative: torch.compile,
SDPA), the speedups over eager and over that alternative, achieved GB/s or TFLOP/s as
a share of the device's measured copy bandwidth or bf16 matmul rate, and the numerics
rule (error against float64 relative to eager's error) checked at that shape before
anything is timed. Then end to end (`benchmarking/vit.py`): ViT-B/16 and ViT-L/16 inference and
training step for timm, timm after swap_modules, torch.compile of each, and our reference
ViT fused: images/s, MFU, peak memory. Without CUDA the first line says so and only the numerics run, at
small shapes through Triton's interpreter.

This is the command line over `vit_kernels.benchmarking`, whose cases
`pytest benchmarks/ --benchmark-only` runs too, so the two report the same thing; how a
call is timed is in `benchmarking/timing.py`.
"""

import argparse
import datetime
import json
import os
import platform
import sys
from dataclasses import asdict

import torch

from .benchmarking.report import Report, json_safe, markdown, plot, triton_version
from .benchmarking import runner, timing


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        print("timm is not installed: end-to-end rows skipped")
        return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vit_kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="vit_kernels_bench.json", help="where to write the results as JSON")
    parser.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    parser.add_argument("--quick", action="store_true", help="fewer timed repetitions")
    names = [op.name for op in runner.OPS] + ["vit"]
    parser.add_argument("--ops", nargs="+", choices=names, default=names,
                        help="which ops to run; vit = end to end (default: all)")
    parser.add_argument("--vit-models", nargs="+", default=None, metavar="MODEL",
                        help="end-to-end models to run (default: all of vit_kernels.benchmarking.vit.VIT_MODELS)")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="draw the speedups (without CUDA: the numerics) as a bar chart (needs matplotlib)")
    args = parser.parse_args(argv)

    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        print("No CUDA device: timings skipped; checking numerics at small shapes through Triton's interpreter.")
        # Must precede the first import of a kernel module (triton.jit reads it then).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if has_cuda else "cpu")
    report = Report(
        device=torch.cuda.get_device_name(device) if has_cuda else "cpu",
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        torch=torch.__version__,
        triton=triton_version(),
        python=platform.python_version(),
        host_load=timing.host_load(),
    )
    if has_cuda:
        report.copy_bandwidth_gbps = timing.copy_bandwidth_gbps(device)
        report.bf16_matmul_tflops = timing.matmul_tflops(device)
    def write_tables() -> str:
        # After every op, so that a run cut short keeps what it measured.
        table = markdown(report)
        with open(args.json, "w") as f:
            json.dump(json_safe(asdict(report)), f, indent=2)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(table)
        return table

    interrupted = False
    try:
        for op in runner.OPS:
            if op.name not in args.ops:
                continue
            if has_cuda:
                runner.run_timed(report, op, device, op.shapes, reps=10 if args.quick else 50)
            else:
                runner.run_numerics(report, op, device)
            write_tables()
        if "vit" in args.ops and _has_timm():
            if has_cuda:
                runner.run_vit_timed(report, device, reps=5 if args.quick else 10, models=args.vit_models)
            else:
                runner.run_vit_numerics(report, device)
    except KeyboardInterrupt:
        # A run stopped at its time cap (scripts/gpu_check.sh sends SIGINT) still leaves its
        # tables and chart of what it measured; the exit status says it was cut short.
        interrupted = True
        print(f"interrupted after {len(report.rows)} rows: the tables hold what was measured", file=sys.stderr)

    table = write_tables()
    print(table, end="")
    if args.plot:
        plot(report, args.plot)
    written = [args.json] + [path for path in (args.markdown, args.plot) if path]
    print("wrote " + ", ".join(written))
    return 0 if not interrupted and all(r.rule_ok for r in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
