"""The numerics rule (docs/design.md), shared by the tests, the benchmarks and `vit_kernels.bench`.

An op is correct when, against a float64 reference computed from the same
(already rounded) inputs, its error is at most twice the error of eager PyTorch in
the same dtype, plus a tiny floor. This is FlashAttention's test rule: it scales to
every dtype without hand-tuned tolerances, and it cannot be passed by a kernel
that is merely "close" when eager is much closer.

The floor is relative to the reference's magnitude, 1e-5 by default: far below a
bf16/fp16 rounding error (4e-3/5e-4), so it only matters where eager happens to be
exact (float32 sums of a few terms, an output that is all zeros); any indexing or
formula bug is orders of magnitude above it.
"""

import functools
import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

RULE_FACTOR = 2.0
RULE_FLOOR = 1e-5


def kernel_device() -> torch.device:
    """Where tests run the kernels: the GPU when there is one, else the CPU (through the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class RuleCheck:
    name: str
    error: float  # max |actual - oracle|
    eager_error: float  # max |eager - oracle|
    bound: float

    @property
    def ok(self) -> bool:
        # `error <= bound` is False for NaN, so an unwritten (poisoned) or NaN output fails.
        return self.error <= self.bound

    @property
    def ratio(self) -> float:
        """Error relative to eager's (1.0 = as accurate as eager); inf when eager is exact."""
        return self.error / self.eager_error if self.eager_error > 0 else (0.0 if self.error == 0 else float("inf"))

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILS the rule"
        return (
            f"{self.name}: error {self.error:.3e} vs eager's {self.eager_error:.3e} "
            f"(bound {self.bound:.3e}): {verdict}"
        )


@functools.lru_cache(maxsize=None)
def inductor_unusable_reason() -> Optional[str]:
    """Why torch.compile's Inductor (which opcheck's checks import too) cannot run beside the
    installed Triton, or None when it can. Each torch release supports the Triton it pins: torch
    2.6-2.9 pin Triton 3.2-3.5, and their Inductor fails to import Triton 3.6 (which these kernels
    need), an incompatibility of torch's own that no model escapes. Our ops still run eagerly."""
    try:
        importlib.import_module("torch._inductor.runtime.hints")  # what Inductor needs of Triton
    except ImportError as err:
        import triton

        return (f"torch {torch.__version__}'s Inductor cannot import triton {triton.__version__} "
                f"({err}); torch.compile and opcheck need the Triton this torch supports")
    return None


def check_rule(
    name: str,
    actual: torch.Tensor,
    oracle: torch.Tensor,
    eager: torch.Tensor,
    *,
    factor: float = RULE_FACTOR,
    floor: float = RULE_FLOOR,
) -> RuleCheck:
    """Compare `actual` (the kernel) and `eager` (PyTorch in the same dtype) against `oracle` (float64)."""
    if actual.shape != oracle.shape or eager.shape != oracle.shape:
        raise AssertionError(
            f"{name}: shapes differ: actual {tuple(actual.shape)}, eager {tuple(eager.shape)}, "
            f"oracle {tuple(oracle.shape)}"
        )
    if actual.dtype != eager.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} differs from eager's {eager.dtype}")
    oracle = oracle.detach().to(torch.float64).cpu()
    if oracle.numel() == 0:
        return RuleCheck(name, 0.0, 0.0, 0.0)
    error = (actual.detach().to(torch.float64).cpu() - oracle).abs().max().item()
    eager_diff = (eager.detach().to(torch.float64).cpu() - oracle).abs()
    eager_finite = torch.isfinite(eager_diff)
    if not bool(eager_finite.all()) and bool(torch.isfinite(oracle).all()):
        # Eager overflowed (an fp16 rstd of 1e6 times 0 is NaN) where the exact answer is finite:
        # eager's error is taken where it is finite, and `actual`, whose error is over every
        # element, must be finite everywhere.
        eager_diff = eager_diff[eager_finite]
    eager_error = eager_diff.max().item() if eager_diff.numel() else 0.0
    scale = max(1.0, oracle.abs().max().item())
    return RuleCheck(name, error, eager_error, factor * eager_error + floor * scale)


def assert_rule(name, actual, oracle, eager, **kwargs) -> RuleCheck:
    check = check_rule(name, actual, oracle, eager, **kwargs)
    assert check.ok, str(check)
    return check


@contextmanager
def poisoned_allocations():
    """Within the block, every floating-point `torch.empty` comes back filled with NaN.

    Wrap a kernel call in it: an output element (or a partial-sum row) that the kernel
    forgets to write stays NaN and fails the rule, instead of passing on leftover memory.
    """
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        return tensor

    torch.empty = poisoned_empty
    try:
        yield
    finally:
        torch.empty = real_empty


def assert_rules(got: dict, oracle: dict, eager: dict) -> None:
    """assert_rule for every named output and gradient; the three dicts must name the same tensors."""
    assert got.keys() == eager.keys() == oracle.keys(), (sorted(got), sorted(eager), sorted(oracle))
    for name in got:
        assert_rule(name, got[name], oracle[name], eager[name])


def output_and_grads(model, run, loss=None) -> dict:
    """``run(model)`` -> output; backpropagates ``loss(output)`` (default: its sum of squares)
    and returns ``{"output": ..., "d<param name>": grad, ...}`` (detached copies), for
    assert_rules. A torch.compile'd model reports its original module's parameter names."""
    model.zero_grad(set_to_none=True)
    out = run(model)
    (out.square().sum() if loss is None else loss(out)).backward()
    named = getattr(model, "_orig_mod", model).named_parameters()
    grads = {f"d{n}": p.grad.detach().clone() for n, p in named if p.grad is not None}
    return {"output": out.detach(), **grads}


HOST_READS = ("item", "tolist", "__int__", "__index__", "__float__", "__bool__")


@contextmanager
def no_host_reads():
    """Inside: reading a tensor's value on the host (`.item()`, `.tolist()`, `int()`, `float()`,
    `bool()`, indexing with a tensor) raises AssertionError, and on a GPU so does every
    synchronizing CUDA call (torch.cuda.set_sync_debug_mode("error")). On a CPU, where no read
    synchronizes anything, the first half still finds the reads that would: a training step
    must not make one (a sync stalls the host's run-ahead; under a CUDA graph the value read
    would be frozen)."""
    def host_read(tensor, *args, **kwargs):
        raise AssertionError(f"a {tuple(tensor.shape)} {tensor.dtype} tensor was read on the host")

    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    sync_mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else None
    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, host_read)
        if sync_mode is not None:
            torch.cuda.set_sync_debug_mode("error")
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        if sync_mode is not None:
            torch.cuda.set_sync_debug_mode(sync_mode)


def forcing_one_config(launch_configs, kind: str, config):
    """A stand-in for `vit_kernels.ops.attention.launch_configs` (pass the original) under which
    launches of `kind` run `config` alone and every other kind its first config: how the GPU
    tests and scripts/gpu_diag.py check and time each autotune config by itself."""
    def forced(k, *args, **kwargs):
        return (config,) if k == kind else launch_configs(k, *args, **kwargs)[:1]
    return forced


def recording_launches(monkeypatch, module) -> list:
    """`module._launch` (attention's or varlen's tuned launch) wrapped so that each launch, still
    run, appends (kernel, its constexprs) to the list returned: what the tests read of the
    kernels' switches (PEEL_TAIL, ATOMIC_DQ, ...) as a device would get them."""
    launches = []
    real_launch = module._launch

    def recorded(kernel, configs, grid_for, args, constexprs, **kwargs):
        launches.append((kernel, dict(constexprs)))
        return real_launch(kernel, configs, grid_for, args, constexprs, **kwargs)

    monkeypatch.setattr(module, "_launch", recorded)
    return launches
