"""timm VisionTransformer: leaf swaps plus the residual stream fused across blocks."""

import types

import torch
from torch import nn

from .._validate import channel_normalization
from ..nn.attention import FlashAttention
from ..nn.block import carried_block_forward, finish_residual, run_blocks_fused
from ..nn.layer_norm import FusedLayerNorm
from ..nn.mlp import FusedMlp
from ..ops.patch_embed import _register as _load_patch_embed
from ..ops.patch_embed import patch_embed


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


def _input_normalization(patch_embed_module, images) -> dict:
    """mean/std for uint8 images (set by set_input_normalization), else nothing."""
    if images.dtype != torch.uint8:
        return {}
    mean = getattr(patch_embed_module, "input_mean", None)
    if mean is None:
        raise TypeError("uint8 images need vit_kernels.swap.set_input_normalization(model, mean, std) first")
    return {"mean": mean, "std": patch_embed_module.input_std}


def _patch_embed_forward(self, x):
    """timm PatchEmbed.forward (flatten, NLC) on vit_kernels.ops.patch_embed."""
    return self.norm(patch_embed(x, self.proj.weight, self.proj.bias, **_input_normalization(self, x)))


def set_input_normalization(model, mean, std) -> None:
    """Let a swapped timm ViT take uint8 images ``[B, C, H, W]``: scaled by 1/255 and
    normalized by the per-channel mean/std (in [0, 1] units) inside the patch-embedding op.
    Stored as non-persistent buffers of ``model.patch_embed`` (the state_dict is unchanged)."""
    module = getattr(model, "patch_embed", None)
    if module is None or "forward" not in vars(module):
        raise ValueError("set_input_normalization needs a timm ViT whose patch embedding swap_modules swapped")
    mean, std = channel_normalization(mean, std, module.proj.in_channels)
    device = module.proj.weight.device
    module.register_buffer("input_mean", mean.to(device), persistent=False)
    module.register_buffer("input_std", std.to(device), persistent=False)


def _swap_patch_embed(module, summary) -> None:
    if "forward" in vars(module):
        return  # swapped before
    proj = getattr(module, "proj", None)
    reason = ""
    if not isinstance(proj, nn.Conv2d) or proj.stride != proj.kernel_size or proj.padding != (0, 0):
        reason = "its proj is not a Conv2d with stride = kernel and no padding"
    elif proj.kernel_size[0] != proj.kernel_size[1] or proj.groups != 1 or proj.dilation != (1, 1):
        reason = "non-square, grouped or dilated patches"
    elif not getattr(module, "flatten", False):
        reason = "it does not return flattened [B, N, D] tokens (dynamic_img_size keeps NHWC for timm's _pos_embed)"
    elif getattr(module, "dynamic_img_pad", False):
        reason = "dynamic_img_pad pads the image first"
    if reason:
        summary.left_alone("patch_embed", reason)
        return
    _load_patch_embed()  # build/load the extension now, not inside a torch.compile trace
    module.forward = types.MethodType(_patch_embed_forward, module)
    summary.swap("patch_embed", "vit_kernels.ops.patch_embed (patchify + GEMM; module and keys kept); "
                                "the class and position tokens stay in timm's _pos_embed")


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


def _embed_in_one_op(model) -> bool:
    """Whether the class token and position embeddings can go into the patch-embedding op:
    the patch embedding was swapped, one class token (or none) and no register tokens, timm's
    own _pos_embed (DeiT's distillation token overrides it), a fixed image size."""
    from timm.models.vision_transformer import VisionTransformer

    return (
        "forward" in vars(model.patch_embed)
        and isinstance(model.patch_embed.norm, nn.Identity)
        and model.reg_token is None
        and model.pos_embed is not None
        and not model.dynamic_img_size
        and type(model)._pos_embed is VisionTransformer._pos_embed
    )


def _make_forward_features(embed_in_one_op: bool):
    def forward_features(self, x, attn_mask=None, is_causal=False):
        """timm's forward_features with each residual add fused into the LayerNorm after it."""
        if attn_mask is not None or is_causal:
            # Masks take timm's own path (still on the fused modules).
            kwargs = {"attn_mask": attn_mask, "is_causal": is_causal} if attn_mask is not None or is_causal else {}
            return type(self).forward_features(self, x, **kwargs)
        if embed_in_one_op:
            proj = self.patch_embed.proj
            x = self.pos_drop(patch_embed(x, proj.weight, proj.bias, cls_token=self.cls_token, pos_embed=self.pos_embed,
                                          **_input_normalization(self.patch_embed, x)))
        else:
            x = self._pos_embed(self.patch_embed(x))
        x = self.norm_pre(self.patch_drop(x))
        checkpoint = bool(self.grad_checkpointing)
        if isinstance(self.norm, FusedLayerNorm):
            return run_blocks_fused(self.blocks, x, final_norm=self.norm, checkpoint=checkpoint)
        return self.norm(finish_residual(*run_blocks_fused(self.blocks, x, checkpoint=checkpoint)))

    return forward_features


def swap_timm_vit(model, summary, *, attention: bool, mlp: bool, layer_norm: bool, patch_embed: bool) -> None:
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}"
        if attention and not isinstance(block.attn, FlashAttention):
            try:
                block.attn = FlashAttention.from_timm(block.attn)
                summary.swap(f"{prefix}.attn", "FlashAttention")
            except (ValueError, AttributeError) as why:
                summary.left_alone(f"{prefix}.attn", str(why))
        if mlp and not isinstance(block.mlp, FusedMlp):
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
        _swap_patch_embed(model.patch_embed, summary)

    from timm.models.vision_transformer import VisionTransformer

    if "forward_features" in vars(model):
        return  # swapped before: a second call changes nothing
    reasons = {why for why in (_fusable_block(block) for block in model.blocks) if why}
    if type(model).forward_features is not VisionTransformer.forward_features:
        reasons.add(f"{type(model).__name__} overrides forward_features")
    if reasons:
        summary.left_alone("forward_features", "residual adds not fused: " + "; ".join(sorted(reasons)))
        return
    for block in model.blocks:
        block.forward = types.MethodType(carried_block_forward, block)
    embed_in_one_op = _embed_in_one_op(model)
    model.forward_features = types.MethodType(_make_forward_features(embed_in_one_op), model)
    summary.swap("forward_features", "residual add + LayerNorm fused across blocks (per instance)"
                 + ("; class token and position embeddings inside the patch-embedding op" if embed_in_one_op else ""))
