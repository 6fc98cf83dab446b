"""A Case is one op at one shape, mode and provider, ready to run; an OpBench is everything
the job and the benchmarks need of one op: its shapes, providers, case and agreement."""

from dataclasses import dataclass
from typing import Callable

from ..testing import check_rule
from . import timing


@dataclass
class Case:
    """One op at one shape, mode and provider, ready to run."""

    op: str
    shape: str
    mode: str  # "fwd" or "fwd+bwd"
    provider: str
    run: Callable[[], object]  # one call on the next input set
    bytes_moved: int = 0  # memory-bound ops: the fewest bytes (each input read once, each output written once)
    flops: int = 0  # compute-bound ops: the FLOPs of the algorithm


def timed_case(op: str, shape: str, mode: str, provider: str, fn: Callable, make_set: Callable, set_bytes: int,
               device, **metric) -> Case:
    """A Case whose run() calls ``fn(*args, **kwargs)`` on the next input set, and in fwd+bwd mode
    also takes the gradients of ``leaves``. ``make_set()`` returns ``(args, kwargs, leaves, grad_out)``;
    ``metric`` is bytes_moved= or flops=."""
    import torch

    backward = mode == "fwd+bwd"
    sets = timing.Rotation(make_set, set_bytes, device)

    def run():
        args, kwargs, leaves, grad_out = sets.next()
        out = fn(*args, **kwargs)
        return torch.autograd.grad(out, leaves, grad_out) if backward else out

    return Case(op, shape, mode, provider, run, **metric)


def provider_fn(provider: str, fused: Callable, eager: Callable) -> Callable:
    """vit_kernels -> the fused op, eager -> the reference, compile -> torch.compile of the reference."""
    if provider == "vit_kernels":
        return fused
    if provider == "eager":
        return eager
    if provider == "compile":
        return timing.compile_fresh(eager, fullgraph=True)
    raise ValueError(f"provider must be one of vit_kernels, eager, compile; got {provider!r}")


def worst_by_provider(outputs: Callable, fn_for: Callable, providers) -> dict:
    """Run `outputs(fn, cast)` for the float64 oracle, eager and each provider; the worst check per provider
    (the numerics rule: error against float64 at most twice eager's)."""
    oracle = outputs(fn_for("eager"), lambda t: t.double())
    eager = outputs(fn_for("eager"), lambda t: t)
    worst = {}
    for provider in providers:
        got = outputs(fn_for(provider), lambda t: t)
        checks = [check_rule(name, got[name], oracle[name], eager[name]) for name in got]
        worst[provider] = max(checks, key=lambda c: (not c.ok, c.ratio))
    return worst


def leaves_agreement(inputs, grad_out, out_name: str, grad_names, fn_for: Callable, providers) -> dict:
    """worst_by_provider for an op whose every input is a leaf: `fn(*inputs)` and its gradients
    against `grad_out`, named `out_name` and `grad_names`."""
    import torch

    def outputs(fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in inputs]
        y = fn(*leaves)
        grads = torch.autograd.grad(y, leaves, cast(grad_out))
        return {out_name: y, **dict(zip(grad_names, grads))}

    return worst_by_provider(outputs, fn_for, providers)


@dataclass(frozen=True)
class OpBench:
    """One op's benchmark: `case(provider, shape, dims, mode, dtype, device) -> Case` and
    `agreement(dims, dtype, device, providers=None) -> {provider: worst RuleCheck}` (for the
    fused providers and the strongest alternative where None)."""

    name: str
    shapes: dict  # GPU shapes
    small_shapes: dict  # numerics on CPU through the interpreter
    providers: tuple
    baseline: str  # the strongest PyTorch alternative, for the "x baseline" column
    case: Callable
    agreement: Callable
    cpu_dtypes: tuple  # dtypes whose numerics the interpreter can check
