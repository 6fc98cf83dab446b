"""The job's results: a Row per op, shape, mode and provider, the Report around them, and the
three ways they are written (markdown table, strict JSON, bar chart)."""

import math
import sys
from dataclasses import dataclass, field

PER_OP_MODES = ("fwd", "fwd+bwd")  # rows of the per-op table; any other mode is an end-to-end row


@dataclass
class Row:
    op: str
    shape: str
    mode: str
    provider: str
    ms: float = float("nan")
    graph_ms: float = float("nan")  # CUDA-graph replay: GPU time without the host's launch cost
    gbps: float = float("nan")
    tflops: float = float("nan")
    pct_of_peak: float = float("nan")  # of copy bandwidth (memory-bound ops) or bf16 matmul rate (attention)
    speedup_vs_eager: float = float("nan")
    baseline: str = ""
    speedup_vs_baseline: float = float("nan")
    graph_speedup_vs_baseline: float = float("nan")
    error_vs_eager: float = float("nan")  # max error against float64 / eager's; <= 2 passes
    rule_ok: bool = True
    note: str = ""
    images_per_s: float = float("nan")  # end-to-end rows
    peak_memory_gib: float = float("nan")


@dataclass
class Report:
    device: str
    date: str
    torch: str
    triton: str
    python: str
    copy_bandwidth_gbps: float = float("nan")
    bf16_matmul_tflops: float = float("nan")
    host_load: str = ""
    rows: list = field(default_factory=list)


def triton_version() -> str:
    import triton

    return triton.__version__


def progress(row: Row) -> None:
    """One line per measured row as it comes, so a run cut short still shows what it measured."""
    print(f"[bench] {row.op} | {row.shape} | {row.mode} | {row.provider} | {row.ms:.3f} ms | graph {row.graph_ms:.3f} | "
          f"x eager {row.speedup_vs_eager:.2f} | x {row.baseline} {row.speedup_vs_baseline:.2f} | "
          f"{'ok' if row.rule_ok else 'FAIL'} {row.note}", file=sys.stderr, flush=True)


def plot(report: Report, path: str) -> None:
    """Speedup over eager of every fused provider (a bar per op, shape and mode); without
    timings (no CUDA), each op's error relative to eager's instead, against the rule's bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fused = ("vit_kernels", "timm_swapped", "timm_swapped_compile", "reference_fused", "timm_swapped_graph",
             "reference_fused_graph", "transformers_swapped", "transformers_swapped_compile")
    timed = [r for r in report.rows if r.provider in fused and not math.isnan(r.speedup_vs_eager)]
    if timed:
        rows, values, bound, xlabel = timed, [r.speedup_vs_eager for r in timed], 1.0, "speedup over eager (x)"
    else:
        rows = [r for r in report.rows if not math.isnan(r.error_vs_eager)]
        values, bound, xlabel = [r.error_vs_eager for r in rows], 2.0, \
            "error vs float64 / eager's error (rule: <= 2, or under its absolute floor)"
    labels = [f"{r.op} {r.shape} {r.mode}" + ("" if r.provider == "vit_kernels" else f" [{r.provider}]") for r in rows]
    figure, axes = plt.subplots(figsize=(10, 0.3 * len(rows) + 1.5))
    # Red: slower than eager, or failing the rule (whose absolute floor can pass a ratio above 2).
    colors = ["tab:green" if (v >= bound if timed else r.rule_ok) else "tab:red" for v, r in zip(values, rows)]
    axes.barh(range(len(rows)), values, color=colors)
    axes.axvline(bound, color="black", linewidth=0.8)
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel(xlabel)
    note = "" if timed else " (no CUDA device: numerics only)"
    axes.set_title(f"vit_kernels on {report.device}{note}; torch {report.torch}, triton {report.triton}; {report.date}",
                   fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def _fmt(v, spec):
    return "" if isinstance(v, float) and math.isnan(v) else format(v, spec)


def markdown(report: Report) -> str:
    if report.device == "cpu":
        header = "no CUDA device: timings skipped, numerics checked through Triton's interpreter"
    else:
        header = (
            f"measured copy bandwidth {_fmt(report.copy_bandwidth_gbps, '.0f')} GB/s, "
            f"bf16 matmul {_fmt(report.bf16_matmul_tflops, '.0f')} TFLOP/s (% of peak is of these)"
        )
    lines = [
        f"device: {report.device}; torch {report.torch}, triton {report.triton}, python {report.python}; {report.date}; "
        f"host {report.host_load}",
        "",
        header,
        "",
        "ms: CUDA events around each call (host launch cost included where it exceeds the GPU's); graph ms: "
        "one CUDA-graph replay (the GPU's time alone). GB/s, TFLOP/s and % of peak are from ms.",
        "",
        "| op | shape | mode | provider | ms | graph ms | GB/s | TFLOP/s | % of peak | x eager | x baseline "
        "| x baseline, graph | error / eager's | rule |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    end_to_end = [r for r in report.rows if r.mode not in PER_OP_MODES]
    for r in report.rows:
        if r in end_to_end:
            continue
        baseline = f"{_fmt(r.speedup_vs_baseline, '.2f')} ({r.baseline})" if r.baseline else ""
        lines.append(
            f"| {r.op} | {r.shape} | {r.mode} | {r.provider} | {_fmt(r.ms, '.3f')} | {_fmt(r.graph_ms, '.3f')} | "
            f"{_fmt(r.gbps, '.0f')} | {_fmt(r.tflops, '.0f')} | {_fmt(r.pct_of_peak, '.0f')} | "
            f"{_fmt(r.speedup_vs_eager, '.2f')} | {baseline} | {_fmt(r.graph_speedup_vs_baseline, '.2f')} | "
            f"{_fmt(r.error_vs_eager, '.2f')} | {'ok' if r.rule_ok else 'FAIL'} {r.note} |"
        )
    if end_to_end:
        lines += [
            "",
            "End to end (bf16 autocast on a GPU; a training step is forward + backward + AdamW; MFU = model "
            "FLOPs / time / the measured bf16 matmul rate; x eager and x compiled: over the model's own library "
            "unswapped, eager and under torch.compile):",
            "",
            "| model | batch | mode | provider | ms | images/s | MFU % | peak GiB | x eager | x compiled "
            "| error / eager's | rule |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in end_to_end:
            lines.append(
                f"| {r.op} | {r.shape} | {r.mode} | {r.provider} | {_fmt(r.ms, '.1f')} | {_fmt(r.images_per_s, '.0f')} | "
                f"{_fmt(r.pct_of_peak, '.1f')} | {_fmt(r.peak_memory_gib, '.1f')} | {_fmt(r.speedup_vs_eager, '.2f')} | "
                f"{_fmt(r.speedup_vs_baseline, '.2f')} | {_fmt(r.error_vs_eager, '.2f')} | "
                f"{'ok' if r.rule_ok else 'FAIL'} {r.note} |"
            )
    return "\n".join(lines) + "\n"


def json_safe(value):
    """NaN (not measured) as null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


