"""A pre-LN block's forward and backward as one autograd node, for eager mode's host cost.

Why. At the batch sizes where a ViT step is host-bound, the per-op path spends most of its
host time on autograd's bookkeeping, not on the launches: each of a block's ops (two fused
add + LayerNorms, three Linears and their autocast casts, the qkv unbind, attention, the
fused MLP) is an autograd node of its own, with its Python `autograd.Function` or C++ node,
its saved-tensor packing and its engine call in backward, and each submodule a `__call__`.
Here the whole block is one `autograd.Function`: its forward runs each op's `impl` with
autograd off and keeps each op's context on one tape; its backward runs, in reverse, the same
`backward` each op registered (`FusedOp.backward`; attention's writes dq, dk and dv straight
into one packed qkv gradient, where autograd's unbind would stack three copies) and, for the
Linears, aten's own addmm/mm backward formulas. Same kernels in the same order with the same roundings as the per-op path,
so outputs and gradients are the per-op path's, bit for bit (tests/test_block_step.py).

What it covers. `carried_block_step` takes this path for a block that it reproduces exactly
(`fast_path_spec`): fused norms, vit_kernels' attention and fused MLP over plain
`nn.Linear`s, no q/k norm, no dropout outside the attention, no hook on any submodule it
steps over (their hooks would not run) and nothing tracing (torch.compile, export and the
dispatch modes see the registered per-op ops). Every tensor the backward needs goes through
`ctx.save_for_backward`, so activation checkpointing and saved-tensor hooks see it.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .. import reference
from .._dispatch import linear_compute_dtype, runs_kernel, tracing
from ..ops.attention import _attn_fwd_kernel, _flash_attention_fwd, flash_attention_bwd_into
from ..ops.bias_gelu import _bias_gelu_fwd_kernel
from ..ops.bias_gelu_linear import _bias_gelu_linear_fwd
from ..ops.layer_norm import _add_layer_norm_fwd, _add_layer_norm_fwd_kernel
from ..ops._triton_helpers import as_dtype
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
    if not (runs_kernel(_add_layer_norm_fwd_kernel, branch) and runs_kernel(_attn_fwd_kernel, branch)
            and runs_kernel(_bias_gelu_fwd_kernel, branch)):
        return None
    if global_hooks_installed():
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


class _OpContext:
    """The part of an autograd ctx that the ops' setup_context and backward use."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _run(op, tape: Optional[list], *inputs):
    """`op`'s impl, its context appended to `tape` (None: no backward will run)."""
    output = op.impl(*inputs)
    if tape is not None:
        ctx = _OpContext()
        op.setup_context(ctx, inputs, output)
        tape.append(ctx)
    return output


def _block_forward(spec: BlockStepSpec, tape: Optional[list], branch, residual, gamma_in, row_scale_in, seed,
                   norm1_weight, norm1_bias, qkv_weight, qkv_bias, proj_weight, proj_bias, gamma1, row_scale1,
                   norm2_weight, norm2_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """(branch_out, residual_out, linear_saved): the ops of `carried_block_step`, autograd off."""
    batch, n_tokens, dim = branch.shape
    residual_dtype = reference.residual_dtype(branch, residual, spec.residual_in_fp32_1)
    store = residual is not None or gamma_in is not None or row_scale_in is not None or residual_dtype != branch.dtype
    y1, h1, _ = _run(_add_layer_norm_fwd, tape, branch, residual, norm1_weight, norm1_bias, gamma_in,
                     row_scale_in, spec.eps1, residual_dtype, store)
    if not store:
        h1 = branch
    dtype = linear_compute_dtype(y1)
    y1c, qkv_wc = as_dtype(y1, dtype), as_dtype(qkv_weight, dtype)
    qkv = F.linear(y1c, qkv_wc, as_dtype(qkv_bias, dtype))
    q, k, v = qkv.view(batch, n_tokens, 3, spec.num_heads, spec.head_dim).unbind(2)
    attn_out, _ = _run(_flash_attention_fwd, tape, q, k, v, spec.softmax_scale, spec.dropout_p, seed, True)
    attn_out = attn_out.view(batch, n_tokens, dim)
    proj_wc = as_dtype(proj_weight, dtype)
    proj = F.linear(attn_out, proj_wc, as_dtype(proj_bias, dtype))
    residual_dtype = reference.residual_dtype(proj, h1, spec.residual_in_fp32_2)
    y2, h2, _ = _run(_add_layer_norm_fwd, tape, proj, h1, norm2_weight, norm2_bias, gamma1, row_scale1,
                     spec.eps2, residual_dtype, True)
    y2c, fc1_wc = as_dtype(y2, dtype), as_dtype(fc1_weight, dtype)
    hidden = F.linear(y2c, fc1_wc)
    out = _run(_bias_gelu_linear_fwd, tape, hidden, fc1_bias, as_dtype(fc2_weight, dtype).contiguous(),
               as_dtype(fc2_bias, dtype), spec.approximate)
    # The Linears' saved inputs: (x as cast, weight as cast) for qkv, proj, fc1.
    return out, h2, (y1c, qkv_wc, attn_out, proj_wc, y2c, fc1_wc), y1.dtype, y2.dtype


def _linear_backward(grad: Tensor, x: Tensor, weight: Tensor, x_dtype, weight_dtype, bias_dtype,
                     needs_weight: bool, needs_bias: bool):
    """aten's backward of F.linear on a row-major [..., in] input (addmm / mm on its rows), with
    autocast's casts undone: (dx in x's dtype before the cast, dweight, dbias in the parameters')."""
    grad2 = grad.reshape(-1, grad.shape[-1])
    dx = grad2.mm(weight).view(*grad.shape[:-1], weight.shape[1])
    dx = as_dtype(dx, x_dtype)
    dweight = as_dtype(grad2.t().mm(x.reshape(-1, x.shape[-1])), weight_dtype) if needs_weight else None
    dbias = as_dtype(grad2.sum(0), bias_dtype) if needs_bias else None
    return dx, dweight, dbias


class _BlockStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, branch, residual, gamma_in, row_scale_in, seed, norm1_weight, norm1_bias, qkv_weight,
                qkv_bias, proj_weight, proj_bias, gamma1, row_scale1, norm2_weight, norm2_bias, fc1_weight, fc1_bias,
                fc2_weight, fc2_bias):
        needs = ctx.needs_input_grad
        tape = []
        out, h2, linear_saved, y1_dtype, y2_dtype = _block_forward(
            spec, tape, branch, residual, gamma_in, row_scale_in, seed, norm1_weight, norm1_bias, qkv_weight,
            qkv_bias, proj_weight, proj_bias, gamma1, row_scale1, norm2_weight, norm2_bias, fc1_weight, fc1_bias,
            fc2_weight, fc2_bias)
        ln1, attn, ln2, mlp = tape
        mlp.needs_input_grad = (True, needs[17], needs[18], needs[19], False)
        ctx.counts = tuple(len(c.saved_tensors) for c in tape)
        ctx.param_dtypes = tuple(None if t is None else t.dtype for t in (
            qkv_weight, qkv_bias, proj_weight, proj_bias, fc1_weight, fc2_weight, fc2_bias))
        ctx.y_dtypes = (y1_dtype, y2_dtype)
        ctx.tape = tape
        ctx.save_for_backward(*(t for c in tape for t in c.saved_tensors), *linear_saved)
        for c in tape:
            del c.saved_tensors
        return out, h2

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h2):
        saved = iter(ctx.saved_tensors)
        for c, count in zip(ctx.tape, ctx.counts):
            c.saved_tensors = tuple(next(saved) for _ in range(count))
        try:
            return _BlockStep._backward(ctx, d_out, d_h2, *saved)
        finally:
            # An unpacked output (h2) refers to this node through its grad_fn: left on the tape it
            # would close a reference cycle, and the block's saved activations would live until
            # Python's cyclic collector found them (once promoted, hundreds of steps later), its
            # passes costing the host about a millisecond a step (tests/test_block_step.py).
            for c in ctx.tape:
                del c.saved_tensors

    @staticmethod
    def _backward(ctx, d_out, d_h2, y1c, qkv_wc, attn_out, proj_wc, y2c, fc1_wc):
        ln1, attn, ln2, mlp = ctx.tape
        (qkv_weight_dtype, qkv_bias_dtype, proj_weight_dtype, proj_bias_dtype, fc1_weight_dtype, fc2_weight_dtype,
         fc2_bias_dtype) = ctx.param_dtypes
        needs = ctx.needs_input_grad
        d_hidden, d_fc1_bias, d_fc2_weight, d_fc2_bias = _bias_gelu_linear_fwd.backward(mlp, d_out)[:4]
        d_fc2_weight = as_dtype(d_fc2_weight, fc2_weight_dtype)
        d_fc2_bias = as_dtype(d_fc2_bias, fc2_bias_dtype)
        dy2, d_fc1_weight, _ = _linear_backward(d_hidden, y2c, fc1_wc, ctx.y_dtypes[1], fc1_weight_dtype, None,
                                                needs[16], False)
        d_proj, d_h1, d_norm2_weight, d_norm2_bias, d_gamma1 = _add_layer_norm_fwd.backward(
            ln2, dy2, d_h2, None)[:5]
        d_attn, d_proj_weight, d_proj_bias = _linear_backward(d_proj, attn_out, proj_wc, attn_out.dtype,
                                                              proj_weight_dtype, proj_bias_dtype, needs[10], needs[11])
        q, k, v, out, lse, seed = attn.saved_tensors
        batch, n_tokens, n_heads, head_dim = q.shape
        d_qkv = torch.empty((batch, n_tokens, 3, n_heads, head_dim), dtype=q.dtype, device=q.device)
        flash_attention_bwd_into(*d_qkv.unbind(2), d_attn.view(q.shape), q, k, v, out, lse, attn.softmax_scale,
                                 attn.dropout_p, seed, attn.deterministic)
        d_qkv = d_qkv.view(batch, n_tokens, 3 * n_heads * head_dim)
        dy1, d_qkv_weight, d_qkv_bias = _linear_backward(d_qkv, y1c, qkv_wc, ctx.y_dtypes[0], qkv_weight_dtype,
                                                         qkv_bias_dtype, needs[8], needs[9])
        d_branch, d_residual, d_norm1_weight, d_norm1_bias, d_gamma_in = _add_layer_norm_fwd.backward(
            ln1, dy1, d_h1 if ln1.store_residual else None, None)[:5]
        if not ln1.store_residual:  # h1 was the branch itself
            d_branch = d_branch + d_h1
        return (None, d_branch, d_residual, d_gamma_in, None, None, d_norm1_weight, d_norm1_bias, d_qkv_weight,
                d_qkv_bias, d_proj_weight, d_proj_bias, d_gamma1, None, d_norm2_weight, d_norm2_bias, d_fc1_weight,
                d_fc1_bias, d_fc2_weight, d_fc2_bias)


def block_step_forward(spec: BlockStepSpec, *tensors):
    """(branch_out, residual_out) of one block: one autograd node when an input needs a gradient."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return _BlockStep.apply(spec, *tensors)
    return _block_forward(spec, None, *tensors)[:2]
