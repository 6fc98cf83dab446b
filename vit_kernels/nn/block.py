"""The pre-LN encoder block, and the loop that carries (hidden, residual) between blocks.

A pre-LN ViT block is ``x = x + drop_path(ls1(attn(norm1(x)))); x = x + drop_path(ls2(mlp(norm2(x))))``.
Every residual add is followed by a LayerNorm: norm2 in the same block, norm1 of the
next block, or the encoder's final norm. `run_blocks_fused` carries the pair
(branch output, residual stream) from block to block so that each add, with its layer
scale and drop path, runs inside the LayerNorm that follows it (one
`vit_kernels.ops.add_layer_norm` pass), across block boundaries and into the final norm.

It works on any block that has timm's submodule names (``norm1``, ``attn``, ``ls1``,
``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``) with FusedLayerNorm norms: ours
(`FusedBlock`) and timm blocks after `swap_modules`.
"""

from functools import partial
from typing import Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .._dispatch import linear_compute_dtype
from ..ops.attention import draw_seed
from .attention import FlashAttention, PackedSequences
from .block_step import block_step_forward, fast_path_spec
from .layer_norm import FusedLayerNorm
from .mlp import FusedMlp
from ._scripting import NotScriptable


class LayerScale(nn.Module):
    """``x * gamma`` per channel (timm's LayerScale, same parameter name)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's DropPath semantics: scale kept samples by 1/keep_prob)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        row_scale = drop_path_row_scale(self, x.shape[0], x.device, x.dtype)
        return x if row_scale is None else x * row_scale.reshape((-1,) + (1,) * (x.dim() - 1))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def layer_scale_gamma(module: nn.Module) -> Optional[Tensor]:
    """The per-channel scale of a LayerScale-like module (ours or timm's), None for Identity."""
    if isinstance(module, nn.Identity):
        return None
    gamma = getattr(module, "gamma", None)
    if not isinstance(gamma, Tensor):
        raise TypeError(f"expected a LayerScale with a `gamma` tensor or nn.Identity, got {type(module).__name__}")
    return gamma


def drop_path_row_scale(module: nn.Module, batch: int, device, dtype) -> Optional[Tensor]:
    """The per-sample factor a DropPath-like module (ours or timm's) applies now: [B] of 0 or
    1/keep_prob, or None when it is the identity (eval mode, p = 0, nn.Identity)."""
    drop_prob = float(getattr(module, "drop_prob", 0.0) or 0.0)
    if isinstance(module, nn.Identity) or not module.training or drop_prob == 0.0:
        return None
    keep_prob = 1.0 - drop_prob
    keep = torch.empty(batch, device=device, dtype=dtype).bernoulli_(keep_prob)
    if keep_prob > 0.0 and getattr(module, "scale_by_keep", True):
        keep.div_(keep_prob)
    return keep


class FusedBlock(NotScriptable, nn.Module):
    """A pre-LN ViT block with timm `Block`'s submodule names, on vit_kernels' modules.

    ``forward(x)`` is the standalone block (two fused add + LayerNorm steps inside it).
    Inside a model, `run_blocks_fused` instead carries (branch, residual) between blocks.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = FusedLayerNorm(dim, eps=norm_eps)
        self.attn = FlashAttention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, attn_drop=attn_drop,
                                   proj_drop=proj_drop, norm_layer=partial(nn.LayerNorm, eps=norm_eps))
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = FusedLayerNorm(dim, eps=norm_eps)
        self.mlp = FusedMlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, gamma: Optional[Tensor] = None,
                row_scale: Optional[Tensor] = None, *, carry: bool = False, packed: Optional[PackedSequences] = None):
        """``packed``: x holds several sequences, ``[T, 1, D]`` (PackedSequences), attention within each."""
        if carry:
            return carried_block_step(self, x, residual, gamma, row_scale, packed=packed)
        return finish_residual(*carried_block_step(self, x, None, None, None, packed=packed))


def finish_residual(branch: Tensor, residual: Tensor, gamma: Optional[Tensor], row_scale: Optional[Tensor]) -> Tensor:
    """The pending add `run_blocks_fused` leaves when no LayerNorm follows the last block (unfused)."""
    if gamma is not None:
        branch = branch * gamma
    if row_scale is not None:
        branch = branch * row_scale.reshape((-1,) + (1,) * (branch.dim() - 1))
    return residual + branch


def carried_block_step(block, branch: Tensor, residual: Optional[Tensor], gamma: Optional[Tensor],
                      row_scale: Optional[Tensor], packed: Optional[PackedSequences] = None):
    """One block on the carried stream: finish the previous add inside norm1, leave this block's last add pending.

    As one autograd node (nn/block_step.py) where that path reproduces the block exactly. With
    `packed`, the stream is packed sequences ([T, 1, D]): attention within each, drop path per sequence."""
    spec = fast_path_spec(block, branch) if packed is None else None
    if spec is not None:
        return _one_node_block_step(block, spec, branch, residual, gamma, row_scale)
    batch = branch.shape[0] if packed is None else packed.num_sequences
    per_row = (lambda scale: scale) if packed is None else packed.per_token
    y, residual = block.norm1(branch, residual, gamma=gamma, row_scale=row_scale)
    attn_out = block.attn(y) if packed is None else block.attn(y, packed=packed)
    gamma = layer_scale_gamma(block.ls1)
    row_scale = per_row(drop_path_row_scale(block.drop_path1, batch, branch.device, attn_out.dtype))
    y, residual = block.norm2(attn_out, residual, gamma=gamma, row_scale=row_scale)
    branch = block.mlp(y)
    gamma = layer_scale_gamma(block.ls2)
    row_scale = per_row(drop_path_row_scale(block.drop_path2, batch, branch.device, branch.dtype))
    if gamma is not None:
        # The layer scale leaves with the stream for the next block's norm1. A copy ([D]), because
        # under FSDP2 this block's unsharded parameters are freed once its forward returns.
        gamma = gamma.clone()
    return branch, residual, gamma, row_scale


def _one_node_block_step(block, spec, branch: Tensor, residual: Optional[Tensor], gamma: Optional[Tensor],
                         row_scale: Optional[Tensor]):
    """carried_block_step's ops as one autograd node, its random draws in the same order.

    Parameters are read from `_parameters` and submodules from `_modules`, as in fast_path_spec."""
    modules, device, batch = block._modules, branch.device, branch.shape[0]
    attn, mlp = modules["attn"]._modules, modules["mlp"]._modules
    dtype = linear_compute_dtype(branch)  # the attention branch's and the MLP's output dtype
    seed = draw_seed(device) if spec.dropout_p > 0 else None
    row_scale1 = drop_path_row_scale(modules["drop_path1"], batch, device, dtype)
    row_scale2 = drop_path_row_scale(modules["drop_path2"], batch, device, dtype)
    norm1, norm2 = modules["norm1"]._parameters, modules["norm2"]._parameters
    qkv, proj = attn["qkv"]._parameters, attn["proj"]._parameters
    fc1, fc2 = mlp["fc1"]._parameters, mlp["fc2"]._parameters
    out, residual = block_step_forward(
        spec, branch, residual, gamma, row_scale, seed, norm1["weight"], norm1["bias"], qkv["weight"], qkv["bias"],
        proj["weight"], proj["bias"], layer_scale_gamma(modules["ls1"]), row_scale1, norm2["weight"], norm2["bias"],
        fc1["weight"], fc1["bias"], fc2["weight"], fc2["bias"])
    gamma = layer_scale_gamma(modules["ls2"])
    return out, residual, gamma if gamma is None else gamma.clone(), row_scale2


def run_blocks_fused(blocks, x: Tensor, final_norm: Optional[FusedLayerNorm] = None, checkpoint: bool = False,
                     packed: Optional[PackedSequences] = None):
    """Run pre-LN blocks with every residual add fused into the LayerNorm after it.

    With a final norm, returns ``final_norm(x_out)``. Without one, returns the pending
    last add as ``(branch, residual, gamma, row_scale)``: ``x_out = residual +
    row_scale[b] * gamma * branch``, for the caller to finish (None means no factor).
    Each block must take the carried stream (``block(branch, residual, gamma, row_scale, carry=True)``):
    a `FusedBlock`, or a timm block after `swap_modules`. ``checkpoint=True`` recomputes each block in backward (activation checkpointing):
    only the carried (branch, residual) pair is kept per block. torch's checkpoint restores
    the RNG state, so drop path and attention dropout draw the same masks again. ``packed``:
    x holds packed sequences ``[T, 1, D]`` (PackedSequences; `FusedBlock`s only).
    """
    stream = (x, None, None, None)
    options = {"carry": True} if packed is None else {"carry": True, "packed": packed}
    for block in blocks:
        # Through the block's __call__ (FusedBlock.forward or a swapped block's, with carry=True),
        # so that its hooks run: FSDP2 gathers and frees each block's parameters in them.
        if checkpoint and torch.is_grad_enabled():
            stream = torch.utils.checkpoint.checkpoint(block, *stream, **options, use_reentrant=False)
        else:
            stream = block(*stream, **options)
    branch, residual, gamma, row_scale = stream
    if final_norm is None:
        return branch, residual, gamma, row_scale
    return final_norm(branch, residual, gamma=gamma, row_scale=row_scale)[0]
