"""A pre-LN block's forward and backward as one autograd node, for eager mode's host cost.

Why. At the batch sizes where a ViT step is host-bound, the per-op path spends most of its
host time on autograd's bookkeeping, not on the launches: each of a block's ops (two fused
add + LayerNorms, three Linears and their autocast casts, the qkv unbind, attention, the
fused MLP) is an autograd node of its own, with its Python `autograd.Function` or C++ node,
its saved-tensor packing and its engine call in backward, and each submodule a `__call__`.
Here the whole block is one C++ autograd node (csrc/block_step.cpp): its forward runs each op's
`impl` with autograd off and saves what each op's `setup_context` would; its backward runs, in
reverse, what each op's registered `backward` does (attention's writes dq, dk and dv straight
into one packed qkv gradient, where autograd's unbind would stack three copies) and, for the
Linears, aten's own addmm/mm backward formulas. The aten work (casts, GEMMs, views, the
backwards' sums and casts) is C++; each op's kernels are still launched by its Python body
(the functions ops/_nodes.load hands the extension), or from C++ out of the launch
plan recorded from that body at an earlier call of the same signature (ops/_plans.py), so the
host logic that launches (configs, grids, scalars) is written once. Same kernels in the same
order with the same roundings as the per-op path, so outputs and gradients are the per-op
path's, bit for bit (tests/test_block_step.py).

What it covers. `carried_block_step` takes this path for a block that it reproduces exactly
(`fast_path_spec`): fused norms, vit_kernels' attention and fused MLP over plain
`nn.Linear`s, no q/k norm, no dropout outside the attention, no hook on any submodule it
steps over (their hooks would not run), nothing tracing (torch.compile, export and the
dispatch modes see the registered per-op ops), and the extension built with it (`cpp_step`).
Every tensor the backward needs goes through the node's `save_for_backward`, so activation
checkpointing and saved-tensor hooks see it.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from .._dispatch import runs_kernel, tracing
from ..ops import _nodes
from ..ops.attention import _attn_fwd_kernel
from ..ops.bias_gelu import _bias_gelu_fwd_kernel
from ..ops.layer_norm import _add_layer_norm_fwd_kernel
from ._hooks import global_hooks_installed, runs_plainly
from .attention import FlashAttention
from .layer_norm import FusedLayerNorm
from .mlp import FusedMlp

# The forwards whose calls from `carried_block_step` this path reproduces; swap/ adds the
# swapped classes' forwards that run these for the same calls.
REPRODUCED_FORWARDS = {FlashAttention.forward, FusedLayerNorm.forward, FusedMlp.forward, nn.Linear.forward}
_BLOCK_STEP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BlockStepSpec:
    """The non-tensor arguments of one block's step."""

    eps1: float
    eps2: float
    residual_in_fp32_1: bool
    residual_in_fp32_2: bool
    num_heads: int
    head_dim: int
    softmax_scale: float
    dropout_p: float
    approximate: str


def _drops_nothing(dropout: nn.Module) -> bool:
    return not dropout.training or float(getattr(dropout, "p", 0.0)) == 0.0


def fast_path_spec(block, branch: Tensor) -> Optional[BlockStepSpec]:
    """The spec of `block`'s one-node step for this input, or None where the per-op path must run.

    Submodules are read from `_modules` (what nn.Module.__getattr__ reads, without its cost:
    this runs for every block of every step)."""
    if tracing() or branch.dtype not in _BLOCK_STEP_DTYPES or branch.dim() != 3:
        return None
    if forward_ad._current_level >= 0:  # the per-op path refuses a dual tensor (_dispatch.refuse_dual_tensors)
        return None
    if not (runs_kernel(_add_layer_norm_fwd_kernel, branch) and runs_kernel(_attn_fwd_kernel, branch)
            and runs_kernel(_bias_gelu_fwd_kernel, branch)):
        return None
    if global_hooks_installed():
        return None
    if cpp_step() is None:
        return None
    modules = block._modules
    norm1, norm2, attn, mlp = modules["norm1"], modules["norm2"], modules["attn"], modules["mlp"]
    for sub in (norm1, norm2, attn, mlp):
        if type(sub).forward not in REPRODUCED_FORWARDS or not runs_plainly(sub):
            return None
    attn_modules, mlp_modules = attn._modules, mlp._modules
    for sub in (attn_modules["qkv"], attn_modules["proj"], mlp_modules["fc1"], mlp_modules["fc2"]):
        if type(sub) is not nn.Linear or not runs_plainly(sub):
            return None
    for sub in (attn_modules["q_norm"], attn_modules["k_norm"], attn_modules["norm"], mlp_modules["norm"]):
        if type(sub) is not nn.Identity:
            return None
    if not (_drops_nothing(attn_modules["proj_drop"]) and _drops_nothing(mlp_modules["drop1"])
            and _drops_nothing(mlp_modules["drop2"])):
        return None
    if attn.num_heads * attn.head_dim != branch.shape[-1]:
        return None
    return BlockStepSpec(
        eps1=float(norm1.eps), eps2=float(norm2.eps),
        residual_in_fp32_1=norm1.residual_in_fp32, residual_in_fp32_2=norm2.residual_in_fp32,
        num_heads=attn.num_heads, head_dim=attn.head_dim, softmax_scale=float(attn.scale),
        dropout_p=float(attn_modules["attn_drop"].p) if attn.training else 0.0, approximate=mlp.approximate,
    )


def cpp_step():
    """The extension module whose `block_step` and `block_forward_no_grad` run a block as one node
    (csrc/block_step.cpp), or None where the extension cannot be loaded or is a stale build
    without them: `cpp_step_unavailable()` then says why, and blocks take the per-op path."""
    return _nodes.extension()


def cpp_step_unavailable() -> Optional[str]:
    """Why cpp_step() returned None after it was asked, or None."""
    return _nodes.unavailable()


def block_step_forward(spec: BlockStepSpec, *tensors):
    """(branch_out, residual_out) of one block (the tensors of `_one_node_block_step`'s call, None
    for an absent one): one autograd node when an input needs a gradient. fast_path_spec made
    sure that the C++ step exists."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return _nodes.extension().block_step(spec, *tensors)
    return _nodes.extension().block_forward_no_grad(spec, *tensors)
