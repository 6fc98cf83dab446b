"""The job's two passes over the ops: without a GPU the numerics rule at small shapes
(run_numerics), with one agreement first and then every provider timed in both modes
(run_timed); the same for whole ViTs (run_vit_numerics, run_vit_timed)."""

from typing import Callable

import torch

from ..testing import RuleCheck
from . import attention, attention_varlen, bias_gelu, bias_gelu_linear, layer_norm, patch_embed, timing, vit
from .case import Case, OpBench
from .report import Report, Row, progress

OPS = [layer_norm.BENCH, attention.BENCH, attention_varlen.BENCH, bias_gelu.BENCH, bias_gelu_linear.BENCH,
       patch_embed.BENCH, patch_embed.BENCH_UINT8]


def _numerics_row(op: OpBench, shape: str, mode: str, provider: str, check: RuleCheck) -> Row:
    return Row(op.name, shape, mode, provider, error_vs_eager=check.ratio, rule_ok=check.ok, note=f"worst: {check.name}")


def _time_into(row: Row, case: Case, report: Report, reps: int) -> None:
    row.ms = timing.time_cuda_ms(case.run, reps=reps)
    try:
        row.graph_ms = timing.time_cuda_graph_ms(case.run, reps=reps)
    except Exception as err:  # a provider that cannot be captured keeps its stream timing only
        torch.cuda.synchronize()
        row.note = f"no graph: {str(err).splitlines()[0][:60]}"
    if case.bytes_moved:
        row.gbps = case.bytes_moved / (row.ms * 1e-3) / 1e9
        row.pct_of_peak = 100 * row.gbps / report.copy_bandwidth_gbps
    if case.flops:
        row.tflops = case.flops / (row.ms * 1e-3) / 1e12
        row.pct_of_peak = 100 * row.tflops / report.bf16_matmul_tflops


def run_numerics(report: Report, op: OpBench, device: torch.device) -> None:
    """The numerics rule at op.small_shapes in each of op.cpu_dtypes; no timing (the no-GPU job)."""
    for dtype in op.cpu_dtypes:
        for shape, dims in op.small_shapes.items():
            check = op.agreement(dims, dtype, device)["vit_kernels"]
            report.rows.append(_numerics_row(op, f"{shape} {str(dtype)[6:]}", "fwd+bwd", "vit_kernels", check))


def run_timed(report: Report, op: OpBench, device: torch.device, shapes: dict, *, reps: int) -> None:
    """Agreement, then every provider timed in both modes, in bf16, at each shape."""
    for shape, dims in shapes.items():
        worst = _agreement_or_failure(lambda: op.agreement(dims, torch.bfloat16, device), op.providers)
        for mode in ("fwd", "fwd+bwd"):
            rows = {}
            for provider in op.providers:
                row = Row(op.name, shape, mode, provider, baseline=op.baseline)
                try:
                    case = op.case(provider, shape, dims, mode, torch.bfloat16, device)
                    _time_into(row, case, report, reps)
                except torch.cuda.OutOfMemoryError:
                    row.note = "out of memory"
                    torch.cuda.empty_cache()
                except RuntimeError as err:
                    # An SDPA backend that does not support this shape/device is a note; any
                    # other provider failing is a FAIL row.
                    row.note = f"unavailable: {str(err).splitlines()[0][:80]}"
                    row.rule_ok = provider.startswith("sdpa_")
                rows[provider] = row
            _settle_rows(report, rows, worst, "eager", op.baseline)


def _agreement_or_failure(agreement: Callable[[], dict], providers) -> dict:
    """{provider: worst RuleCheck}; a kernel that raises is a FAIL row for every provider
    (a NaN error: fails the rule and shows as not measured), not the end of the report."""
    try:
        return agreement()
    except Exception as err:
        failed = RuleCheck(f"raised {type(err).__name__}: {str(err).splitlines()[0][:80]}", float("nan"), 1.0, 0.0)
        return {provider: failed for provider in providers}


def _settle_rows(report: Report, rows: dict, worst: dict, eager: str, baseline: str) -> None:
    """Fold each provider's agreement into its row, compute the speedups over `eager` and
    `baseline` (event and graph timings), print the rows and add them to the report."""
    for provider, row in rows.items():
        if provider in worst:
            row.error_vs_eager, row.rule_ok = worst[provider].ratio, worst[provider].ok and row.rule_ok
            row.note = row.note or f"worst: {worst[provider].name}"
    for row in rows.values():
        row.speedup_vs_eager = rows[eager].ms / row.ms
        row.speedup_vs_baseline = rows[baseline].ms / row.ms
        row.graph_speedup_vs_baseline = rows[baseline].graph_ms / row.graph_ms
        progress(row)
    report.rows.extend(rows.values())


def run_vit_numerics(report: Report, device: torch.device) -> None:
    """The end-to-end rule on tiny models in float32 (the no-GPU job; compile providers skipped)."""
    for label, spec in vit.VIT_SMALL_MODELS.items():
        providers = [p for p in vit.family_of(spec).providers if p in ("timm_swapped", "reference_fused",
                                                                       "transformers_swapped")]
        for provider, check in vit.vit_agreement(spec, device, None, providers=providers).items():
            report.rows.append(Row(label, "batch 4 float32", "train step", provider, error_vs_eager=check.ratio,
                                   rule_ok=check.ok, note=f"worst: {check.name}"))


def run_vit_timed(report: Report, device: torch.device, *, reps: int, models=None) -> None:
    """Every model of vit.VIT_MODELS (or `models`): agreement, then inference and a training step
    per provider of its family (bf16 autocast)."""
    unknown = set(models or ()) - set(vit.VIT_MODELS)
    if unknown:
        raise ValueError(f"--vit-models: unknown {sorted(unknown)}; choose from {list(vit.VIT_MODELS)}")
    for label, spec in vit.VIT_MODELS.items():
        if models and label not in models:
            continue
        family = vit.family_of(spec)
        worst = _agreement_or_failure(lambda: vit.vit_agreement(spec, device, torch.bfloat16), family.providers)
        for mode in vit.MODES:
            rows = {}
            for provider in family.providers:
                size = vit.image_size(spec)
                row = Row(label, f"batch {spec['batch'][mode]}, {size}px", mode, provider, baseline=family.baseline)
                try:
                    case = vit.vit_case(provider, label, mode, device)
                    measured = vit.measure_vit(case, reps=reps)
                    del case
                    row.ms, row.tflops = measured["ms"], measured["tflops"]
                    row.images_per_s, row.peak_memory_gib = measured["images_per_s"], measured["peak_memory_gib"]
                    row.pct_of_peak = 100 * row.tflops / report.bf16_matmul_tflops  # MFU
                except torch.cuda.OutOfMemoryError:
                    row.note = "out of memory"
                except RuntimeError as err:
                    row.note, row.rule_ok = f"failed: {str(err).splitlines()[0][:80]}", False
                torch.cuda.empty_cache()
                rows[provider] = row
            _settle_rows(report, rows, worst, family.eager, family.baseline)
