"""The C++ extension's autograd nodes and launch plans, set up once a process.

csrc/block_step.cpp runs a whole block as one node (nn/block_step.py); csrc/op_nodes.cpp runs one
op as one node on the per-op path (add + LayerNorm, attention, the fused MLP's bias + GELU + fc2:
`define_op(..., node=...)`); both call the op bodies handed over here, or replay them from their launch plans (ops/_plans.py,
csrc/launch_plan.cpp). Loaded at the first call that can use it, not at import: importing
vit_kernels asks for no extension. Where it cannot be loaded, everything runs in Python, and
`unavailable()` says why.
"""

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

from .._dispatch import TRACED_LAUNCHES
from .._validate import FAST_SIGNATURE

LAUNCH_PLANS_ENV = "VIT_KERNELS_LAUNCH_PLANS"  # "0": every op body runs in Python on every call
# csrc/launch_plan.h's PlanSite, in its order.
PLAN_SITES = ("add_layer_norm_fwd", "attention_fwd", "bias_gelu_fwd", "attention_bwd", "add_layer_norm_bwd",
              "bias_gelu_bwd", "flash_attention_bwd")

_loaded = None  # the extension module, set up; or why there is none (a str)


def extension():
    """The extension module, its op bodies set and its launch plans on (unless LAUNCH_PLANS_ENV
    says "0"), or None where it cannot be loaded or is a stale build (`unavailable()` says why)."""
    global _loaded
    if _loaded is None:
        _loaded = load()
    return None if isinstance(_loaded, str) else _loaded


def unavailable() -> Optional[str]:
    """Why extension() returned None after it was asked, or None."""
    return _loaded if isinstance(_loaded, str) else None


def load():
    """Loads the extension and hands it the op bodies as the op modules hold them now (tests
    replace one and call this again); returns the module, or why it cannot be used (a str)."""
    from .. import _extension  # not at import: importing vit_kernels asks for no extension

    # By module path: the package's `bias_gelu` is the function of that name.
    attention, bias_gelu, layer_norm = (importlib.import_module(f"{__package__}.{name}")
                                        for name in ("attention", "bias_gelu", "layer_norm"))

    try:
        module = _extension.module()
    except RuntimeError as err:
        return str(err)
    if not hasattr(module, "set_op_bodies"):
        return f"the extension loaded from {_extension.load()} predates csrc/op_nodes.cpp: rebuild it"
    module.set_op_bodies(layer_norm._add_layer_norm_fwd.impl, attention._flash_attention_fwd.impl,
                         bias_gelu._bias_gelu_fwd_impl, layer_norm.add_layer_norm_bwd_grads,
                         bias_gelu.bias_gelu_backward_dbias, attention.flash_attention_bwd_packed,
                         attention._flash_attention_bwd.impl)
    set_launch_plans(module, os.environ.get(LAUNCH_PLANS_ENV) != "0")
    FAST_SIGNATURE.function = module.check_signature
    return module


def set_launch_plans(module, enabled: bool) -> None:
    """Turns the launch plans of the op bodies on or off; either way, every plan kept so far is dropped."""
    from . import _launcher, _plans

    module.set_launch_plans(_plans.record if enabled else None, _launcher, _launcher._hooks_installed,
                            TRACED_LAUNCHES)


class PublicEntry(NamedTuple):
    """An op's public function in C++ (csrc/op_nodes.cpp, RememberedCall) at the signatures whose
    calls reached the op's node before: `call(*public_args)` returns what the public function
    would, or None where it cannot tell that the public function's Python would reach the node
    (then that Python runs, and `remember(public_args, *what_it_derived)` notes the call)."""

    call: Callable
    remember: Callable


@dataclass(frozen=True)
class CppNode:
    """An op's C++ node (csrc/op_nodes.cpp): the extension function that applies it; the
    launch-plan site (PLAN_SITES) of the op's forward body where that body is planned as a whole
    (its site's one body: a site keys plans by arguments, not by body), which then runs planned
    without a gradient, and where it is not (the fused MLP: its fc2 GEMM is aten work), the node's
    function runs without a gradient too, planning the pieces it can; `entry`, the extension's name
    for the op's public function (PublicEntry: `<entry>` and `remember_<entry>`) where it has one."""

    function: str
    plan_site: Optional[str] = None
    entry: Optional[str] = None

    def resolve(self, impl):
        """(the node's apply, `impl` as an eager call without a gradient runs it, the PublicEntry or
        None), or (None, None, None) without the extension."""
        module = extension()
        if module is None:
            return None, None, None
        entry = (PublicEntry(getattr(module, self.entry), getattr(module, f"remember_{self.entry}"))
                 if self.entry is not None else None)
        node = getattr(module, self.function)
        if self.plan_site is None:
            return node, node, entry
        return node, functools.partial(module.call_planned, PLAN_SITES.index(self.plan_site), impl), entry
