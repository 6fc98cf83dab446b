"""timm VisionTransformer: leaf swaps plus the residual stream fused across blocks."""

import types

import torch
from torch import nn

from ..nn.attention import FlashAttention
from ..nn.block import finish_residual, run_blocks_fused
from ..nn.layer_norm import FusedLayerNorm
from ..nn.mlp import FusedMlp


def _is_plain_layer_norm(module) -> bool:
    """torch's LayerNorm or timm's (same math); not subclasses that permute (timm's LayerNorm2d)."""
    kind = type(module)
    return kind is nn.LayerNorm or (kind.__module__, kind.__name__) == ("timm.layers.norm", "LayerNorm")


def _swap_layer_norm(parent, name, path, summary):
    norm = getattr(parent, name)
    if not _is_plain_layer_norm(norm):
        if isinstance(norm, nn.LayerNorm) and not isinstance(norm, FusedLayerNorm):
            summary.left_alone(path, f"{type(norm).__name__} is not a plain LayerNorm over the last dim")
        return
    if len(norm.normalized_shape) != 1:
        summary.left_alone(path, f"LayerNorm over {tuple(norm.normalized_shape)}: only the last dim is fused")
        return
    setattr(parent, name, FusedLayerNorm.from_layer_norm(norm))
    summary.swap(path, "FusedLayerNorm")


def _fusable_block(block) -> str:
    """'' when the block is timm's pre-LN Block with fused norms; otherwise why not."""
    from timm.models.vision_transformer import Block

    if type(block).forward is not Block.forward:
        return f"{type(block).__name__} is not timm's pre-LN Block"
    if not (isinstance(block.norm1, FusedLayerNorm) and isinstance(block.norm2, FusedLayerNorm)):
        return "its norms are not FusedLayerNorm (layer_norm=False, or not nn.LayerNorm)"
    for name in ("ls1", "ls2"):
        ls = getattr(block, name)
        if not (isinstance(ls, nn.Identity) or isinstance(getattr(ls, "gamma", None), torch.Tensor)):
            return f"{name} is a {type(ls).__name__}, not a layer scale"
    for name in ("drop_path1", "drop_path2"):
        dp = getattr(block, name)
        if not (isinstance(dp, nn.Identity) or hasattr(dp, "drop_prob")):
            return f"{name} is a {type(dp).__name__}, not a DropPath"
    return ""


def _fused_forward_features(self, x, attn_mask=None, is_causal=False):
    """timm's forward_features with each residual add fused into the LayerNorm after it."""
    if attn_mask is not None or is_causal or (self.grad_checkpointing and torch.is_grad_enabled()):
        # Masks and gradient checkpointing take timm's own path (still on the fused modules).
        kwargs = {"attn_mask": attn_mask, "is_causal": is_causal} if attn_mask is not None or is_causal else {}
        return type(self).forward_features(self, x, **kwargs)
    x = self.patch_embed(x)
    x = self._pos_embed(x)
    x = self.patch_drop(x)
    x = self.norm_pre(x)
    if isinstance(self.norm, FusedLayerNorm):
        return run_blocks_fused(self.blocks, x, final_norm=self.norm)
    return self.norm(finish_residual(*run_blocks_fused(self.blocks, x)))


def swap_timm_vit(model, summary, *, attention: bool, mlp: bool, layer_norm: bool, patch_embed: bool) -> None:
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}"
        if attention:
            try:
                block.attn = FlashAttention.from_timm(block.attn)
                summary.swap(f"{prefix}.attn", "FlashAttention")
            except (ValueError, AttributeError) as why:
                summary.left_alone(f"{prefix}.attn", str(why))
        if mlp:
            try:
                block.mlp = FusedMlp.from_timm(block.mlp)
                summary.swap(f"{prefix}.mlp", "FusedMlp")
            except (ValueError, AttributeError) as why:
                summary.left_alone(f"{prefix}.mlp", str(why))
        if layer_norm:
            for name in ("norm1", "norm2"):
                if hasattr(block, name):
                    _swap_layer_norm(block, name, f"{prefix}.{name}", summary)
    if layer_norm:
        for name in ("norm", "fc_norm"):
            _swap_layer_norm(model, name, name, summary)
    if patch_embed:
        summary.left_alone("patch_embed", "the fused patch embedding is not built yet")

    from timm.models.vision_transformer import VisionTransformer

    reasons = {why for why in (_fusable_block(block) for block in model.blocks) if why}
    if type(model).forward_features is not VisionTransformer.forward_features:
        reasons.add(f"{type(model).__name__} overrides forward_features")
    if reasons:
        summary.left_alone("forward_features", "residual adds not fused: " + "; ".join(sorted(reasons)))
        return
    model.forward_features = types.MethodType(_fused_forward_features, model)
    summary.swap("forward_features", "residual add + LayerNorm fused across blocks (per instance)")
