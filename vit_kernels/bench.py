"""The main job: per-op speed and numerical agreement on this device.

    python -m vit_kernels.bench [--json FILE] [--markdown FILE] [--quick]

On a CUDA device, for every op and ViT shape: median time of each provider
(vit_kernels, eager PyTorch, torch.compile of eager), the speedup over eager and
over torch.compile, achieved GB/s as a share of the measured device-to-device copy
bandwidth, and the numerics rule (error against float64 relative to eager's error)
checked at that shape before anything is timed. Without CUDA the first line says so
and only the numerics run, at small shapes through Triton's interpreter.

The cases defined here are shared with `pytest benchmarks/ --benchmark-only`, so the
two report the same thing.

Timing: CUDA events around each call, after warm-up; median of the calls; each call
takes the next of several input sets whose total size is at least twice the L2
cache, so no call finds its inputs in cache. Inputs are random normal, never zeros.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .testing import check_rule

DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2; used when the device does not report its own


# ---- measuring -------------------------------------------------------------------------------


def time_cuda_ms(fn: Callable[[], object], *, warmup: int = 10, reps: int = 50) -> float:
    """Median milliseconds of fn() on the current CUDA stream, each call between two events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 2**30) -> float:
    """Measured device-to-device copy bandwidth: (bytes read + bytes written) / median time."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_cuda_ms(lambda: dst.copy_(src), warmup=5, reps=30)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def n_input_sets(set_bytes: int, device: torch.device) -> int:
    """Enough input sets that cycling through them moves at least twice the L2 cache."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES
    return max(2, math.ceil(2 * l2 / max(set_bytes, 1)))


class Rotation:
    """Hands out input sets round-robin."""

    def __init__(self, sets):
        self.sets = sets
        self.i = 0

    def next(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s


# ---- cases -------------------------------------------------------------------------------------


@dataclass
class Case:
    """One op at one shape, mode and provider, ready to run."""

    op: str
    shape: str
    mode: str  # "fwd" or "fwd+bwd"
    provider: str
    run: Callable[[], object]  # one call on the next input set
    bytes_moved: int  # the fewest bytes the op must move: each input read once, each output written once
    flops: int = 0


LAYER_NORM_SHAPES = {
    "ViT-B (256*197, 768)": (256 * 197, 768),
    "ViT-L (128*197, 1024)": (128 * 197, 1024),
    "ViT-H (64*257, 1280)": (64 * 257, 1280),
}
LAYER_NORM_SMALL_SHAPES = {"small (2*197, 384)": (2 * 197, 384)}
PROVIDERS = ("vit_kernels", "eager", "compile")


def _eager_add_layer_norm(x, residual, weight, bias, eps):
    h_new = x + residual
    return F.layer_norm(h_new, (x.shape[-1],), weight, bias, eps), h_new


def _layer_norm_fn(provider: str):
    from .ops import add_layer_norm

    if provider == "vit_kernels":
        return add_layer_norm
    if provider == "eager":
        return _eager_add_layer_norm
    if provider == "compile":
        return torch.compile(_eager_add_layer_norm, fullgraph=True)
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def _layer_norm_inputs(rows: int, hidden: int, dtype: torch.dtype, device: torch.device, requires_grad: bool):
    def t(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale + shift).to(dtype)

    x, residual = t(rows, hidden), t(rows, hidden, scale=2.0)
    weight, bias = t(hidden, scale=0.3, shift=1.0), t(hidden, scale=0.3)
    dy, dresidual = t(rows, hidden), t(rows, hidden)
    if requires_grad:
        for p in (x, residual, weight, bias):
            p.requires_grad_()
    return x, residual, weight, bias, dy, dresidual


def layer_norm_case(provider: str, shape: str, rows: int, hidden: int, mode: str, dtype, device) -> Case:
    """`y, h = add_layer_norm(x, residual, weight, bias)` against `h = x + residual; y = F.layer_norm(h)`."""
    fn = _layer_norm_fn(provider)
    backward = mode == "fwd+bwd"
    elem = torch.finfo(dtype).bits // 8
    one_set = 4 * rows * hidden * elem
    sets = Rotation(
        [_layer_norm_inputs(rows, hidden, dtype, device, backward) for _ in range(n_input_sets(one_set, device))]
    )

    def run():
        x, residual, weight, bias, dy, dresidual = sets.next()
        y, h_new = fn(x, residual, weight, bias, 1e-6)
        if backward:
            return torch.autograd.grad([y, h_new], [x, residual, weight, bias], [dy, dresidual])
        return y, h_new

    # forward: read x, residual; write y, h_new. backward: read dy, dh, h_new; write dx (= dresidual).
    tensor_passes = 4 + (4 if backward else 0)
    return Case("add_layer_norm", shape, mode, provider, run, tensor_passes * rows * hidden * elem)


def layer_norm_agreement(rows: int, hidden: int, dtype, device) -> dict:
    """The numerics rule at one shape for vit_kernels and torch.compile (eager is the yardstick).

    Returns {provider: worst RuleCheck over y, h_new and every gradient}.
    """
    x, residual, weight, bias, dy, dresidual = _layer_norm_inputs(rows, hidden, dtype, device, False)

    def outputs(fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in (x, residual, weight, bias)]
        y, h_new = fn(*leaves, 1e-6)
        grads = torch.autograd.grad([y, h_new], leaves, [cast(dy), cast(dresidual)])
        return dict(zip(("y", "h_new", "dx", "dresidual", "dweight", "dbias"), (y, h_new, *grads)))

    oracle = outputs(_eager_add_layer_norm, lambda t: t.double())
    eager = outputs(_eager_add_layer_norm, lambda t: t)
    providers = ["vit_kernels"] + (["compile"] if device.type == "cuda" else [])
    worst = {}
    for provider in providers:
        got = outputs(_layer_norm_fn(provider), lambda t: t)
        checks = [check_rule(name, got[name], oracle[name], eager[name]) for name in got]
        worst[provider] = max(checks, key=lambda c: (not c.ok, c.ratio))
    return worst


# ---- the job ---------------------------------------------------------------------------------


@dataclass
class Row:
    op: str
    shape: str
    mode: str
    provider: str
    ms: float = float("nan")
    gbps: float = float("nan")
    pct_copy_bw: float = float("nan")
    speedup_vs_eager: float = float("nan")
    speedup_vs_compile: float = float("nan")
    error_vs_eager: float = float("nan")  # max error against float64 / eager's; <= 2 passes
    rule_ok: bool = True
    note: str = ""


@dataclass
class Report:
    device: str
    date: str
    torch: str
    triton: str
    python: str
    copy_bandwidth_gbps: float = float("nan")
    rows: list = field(default_factory=list)


def _triton_version() -> str:
    import triton

    return triton.__version__


def run_layer_norm(report: Report, device, *, quick: bool) -> None:
    dtype = torch.bfloat16
    shapes = LAYER_NORM_SHAPES if device.type == "cuda" else LAYER_NORM_SMALL_SHAPES
    if device.type != "cuda":
        # bf16 and fp16 both, at a small shape: numerics only.
        for dt in (torch.bfloat16, torch.float16):
            for shape, (rows, hidden) in shapes.items():
                worst = layer_norm_agreement(rows, hidden, dt, device)["vit_kernels"]
                report.rows.append(
                    Row("add_layer_norm", f"{shape} {str(dt)[6:]}", "fwd+bwd", "vit_kernels",
                        error_vs_eager=worst.ratio, rule_ok=worst.ok, note=f"worst: {worst.name}")
                )
        return
    reps = 10 if quick else 50
    for shape, (rows, hidden) in shapes.items():
        worst = layer_norm_agreement(rows, hidden, dtype, device)
        for mode in ("fwd", "fwd+bwd"):
            times = {}
            for provider in PROVIDERS:
                case = layer_norm_case(provider, shape, rows, hidden, mode, dtype, device)
                ms = time_cuda_ms(case.run, reps=reps)
                times[provider] = ms
                gbps = case.bytes_moved / (ms * 1e-3) / 1e9
                row = Row("add_layer_norm", shape, mode, provider, ms=ms, gbps=gbps,
                          pct_copy_bw=100 * gbps / report.copy_bandwidth_gbps)
                if provider in worst:
                    row.error_vs_eager, row.rule_ok = worst[provider].ratio, worst[provider].ok
                    row.note = f"worst: {worst[provider].name}"
                report.rows.append(row)
            for row in report.rows[-len(PROVIDERS):]:
                row.speedup_vs_eager = times["eager"] / row.ms
                row.speedup_vs_compile = times["compile"] / row.ms


def _fmt(v, spec):
    return "" if isinstance(v, float) and math.isnan(v) else format(v, spec)


def markdown(report: Report) -> str:
    lines = [
        f"device: {report.device}; torch {report.torch}, triton {report.triton}, python {report.python}; {report.date}",
        "",
        f"measured copy bandwidth: {_fmt(report.copy_bandwidth_gbps, '.0f')} GB/s" if report.device != "cpu" else
        "no CUDA device: timings skipped, numerics checked through Triton's interpreter",
        "",
        "| op | shape | mode | provider | ms | GB/s | % copy BW | x eager | x compile | error / eager's | rule |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report.rows:
        lines.append(
            f"| {r.op} | {r.shape} | {r.mode} | {r.provider} | {_fmt(r.ms, '.3f')} | {_fmt(r.gbps, '.0f')} | "
            f"{_fmt(r.pct_copy_bw, '.0f')} | {_fmt(r.speedup_vs_eager, '.2f')} | {_fmt(r.speedup_vs_compile, '.2f')} | "
            f"{_fmt(r.error_vs_eager, '.2f')} | {'ok' if r.rule_ok else 'FAIL'} {r.note} |"
        )
    return "\n".join(lines) + "\n"


def _json_safe(value):
    """NaN (not measured) as null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vit_kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="vit_kernels_bench.json", help="where to write the results as JSON")
    parser.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    parser.add_argument("--quick", action="store_true", help="fewer timed repetitions")
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
        triton=_triton_version(),
        python=platform.python_version(),
    )
    if has_cuda:
        report.copy_bandwidth_gbps = copy_bandwidth_gbps(device)
    run_layer_norm(report, device, quick=args.quick)

    table = markdown(report)
    print(table, end="")
    with open(args.json, "w") as f:
        json.dump(_json_safe(asdict(report)), f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    print(f"wrote {args.json}" + (f" and {args.markdown}" if args.markdown else ""))
    return 0 if all(r.rule_ok for r in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
