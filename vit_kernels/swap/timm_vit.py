"""timm VisionTransformer: module swaps by exact class, and the residual stream fused across blocks.

What is swapped is decided by class, never by attribute names: timm's own `Attention` (not
gated), `Mlp` with a GELU, `nn.LayerNorm` / timm's `LayerNorm`, `PatchEmbed` (flattened,
unpadded), the pre-LN `Block`, and `VisionTransformer` itself where it does not override
``forward_features``. Everything else (DiffAttention, parallel and res-post blocks, hybrid
embeddings, RmsNorm, ...) keeps its own forward, and the summary says why.

Each swapped module keeps its object and gets a class from `swapped_class`, whose forward
takes the fused path only for the calls it reproduces and the library's own forward for
every other (masks, positional arguments, FX tracing, hooks on the blocks).
"""

import torch
from torch import nn

from .._validate import channel_normalization
from ..nn.attention import FlashAttention
from ..nn.block import carried_block_step, finish_residual, run_blocks_fused
from ..nn.block_step import REPRODUCED_FORWARDS
from ..nn.layer_norm import FusedLayerNorm
from ..nn.mlp import FusedMlp, gelu_approximation
from ..ops.attention import HEAD_DIMS, HEAD_DIMS_TEXT
from ..ops.layer_norm import MAX_HIDDEN
from ..ops.patch_embed import load as load_patch_embed
from ..ops.patch_embed import patch_embed
from ._class_swap import Plan, SwappedModule, fx_tracing, has_user_hooks, is_swapped

torch.fx.wrap("patch_embed")


def _timm_classes():
    from timm.layers import Attention, DropPath, LayerScale, Mlp, PatchEmbed
    from timm.layers.norm import LayerNorm
    from timm.models.vision_transformer import Block, VisionTransformer

    return dict(Attention=Attention, DropPath=DropPath, LayerScale=LayerScale, Mlp=Mlp, PatchEmbed=PatchEmbed,
                LayerNorm=LayerNorm, Block=Block, VisionTransformer=VisionTransformer)


# ---- the swapped classes' forwards ---------------------------------------------------------------


class TimmAttention(FlashAttention, SwappedModule):
    """timm `Attention` on flash_attention; masks and causal calls take timm's own forward."""

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            return self.base_forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return FlashAttention.forward(self, x)


# Without a mask TimmAttention.forward is FlashAttention.forward: the one-node block step may step over it.
REPRODUCED_FORWARDS.add(TimmAttention.forward)


class TimmMlp(FusedMlp, SwappedModule):
    """timm `Mlp` (fc1 -> GELU -> fc2) on the fused MLP ops."""


class TimmLayerNorm(FusedLayerNorm, SwappedModule):
    """timm's `LayerNorm` (nn.LayerNorm's math) as a FusedLayerNorm."""


def _input_normalization(patch_embed_module, images) -> dict:
    """mean/std for uint8 images (set by set_input_normalization), else nothing."""
    if images.dtype != torch.uint8:
        return {}
    mean = getattr(patch_embed_module, "input_mean", None)
    if mean is None:
        raise TypeError("uint8 images need vit_kernels.swap.set_input_normalization(model, mean, std) first")
    return {"mean": mean, "std": patch_embed_module.input_std}


class TimmPatchEmbed(nn.Module, SwappedModule):
    """timm `PatchEmbed` (flattened output) on vit_kernels.ops.patch_embed."""

    def serves(self, x) -> bool:
        """Whether the fused op computes what timm's forward would for these images; timm's own
        forward (its size checks and messages) takes every other call."""
        if fx_tracing() or not isinstance(x, torch.Tensor) or x.dim() != 4:
            return False
        if x.dtype != self.proj.weight.dtype and x.dtype != torch.uint8:
            return False
        height, width = x.shape[-2:]
        patch = self.patch_size
        if self.img_size is not None and self.strict_img_size and (height, width) != tuple(self.img_size):
            return False
        return height % patch[0] == 0 and width % patch[1] == 0 and x.shape[1] == self.proj.in_channels

    def forward(self, x):
        if not self.serves(x):
            return self.base_forward(x)
        return self.norm(patch_embed(x, self.proj.weight, self.proj.bias, **_input_normalization(self, x)))


class TimmBlock(nn.Module, SwappedModule):
    """timm's pre-LN `Block` with FusedLayerNorm norms.

    ``block(x)`` runs the block with its attention residual add fused into norm2;
    ``block(branch, residual, gamma, row_scale, carry=True)`` is the carried-stream step of
    `run_blocks_fused`; any other call (a mask, positional or not; FX tracing) is timm's forward.
    """

    def forward(self, x, *args, carry: bool = False, **kwargs):
        if carry:
            return carried_block_step(self, x, *args)
        if args or any(v is not None and v is not False for v in kwargs.values()) or fx_tracing():
            return self.base_forward(x, *args, **kwargs)
        return finish_residual(*carried_block_step(self, x, None, None, None))


def _blocks_carry(model) -> bool:
    """Whether the blocks can carry the residual stream now: all still swapped blocks, with fused
    norms, none with a hook of the user's (their hooks must see timm's calls), a final norm fused or absent."""
    return all(isinstance(block, TimmBlock) and isinstance(block.norm1, FusedLayerNorm)
               and isinstance(block.norm2, FusedLayerNorm) and not has_user_hooks(block) for block in model.blocks)


class TimmVisionTransformer(nn.Module, SwappedModule):
    """timm `VisionTransformer` whose forward_features carries the residual stream across blocks,
    each add fused into the LayerNorm after it; masks, FX tracing and hooked blocks take timm's own."""

    def forward_features(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal or fx_tracing() or not _blocks_carry(self):
            return self._vk_base.forward_features(self, x, attn_mask=attn_mask, is_causal=is_causal)
        patch = self.patch_embed
        if self._vk_embed_in_one_op and patch.serves(x) and not has_user_hooks(patch):
            x = self.pos_drop(patch_embed(x, patch.proj.weight, patch.proj.bias, cls_token=self.cls_token,
                                          pos_embed=self.pos_embed, **_input_normalization(patch, x)))
        else:
            x = self._pos_embed(patch(x))
        x = self.norm_pre(self.patch_drop(x))
        checkpoint = bool(self.grad_checkpointing)
        if isinstance(self.norm, FusedLayerNorm):
            return run_blocks_fused(self.blocks, x, final_norm=self.norm, checkpoint=checkpoint)
        return self.norm(finish_residual(*run_blocks_fused(self.blocks, x, checkpoint=checkpoint)))


def set_input_normalization(model, mean, std) -> None:
    """Let a swapped timm ViT take uint8 images ``[B, C, H, W]``: scaled by 1/255 and
    normalized by the per-channel mean/std (in [0, 1] units) inside the patch-embedding op.
    Stored as non-persistent buffers of ``model.patch_embed`` (the state_dict is unchanged)."""
    module = getattr(model, "patch_embed", None)
    if not isinstance(module, TimmPatchEmbed):
        raise ValueError("set_input_normalization needs a timm ViT whose patch embedding swap_modules swapped")
    mean, std = channel_normalization(mean, std, module.proj.in_channels)
    device = module.proj.weight.device
    module.register_buffer("input_mean", mean.to(device), persistent=False)
    module.register_buffer("input_std", std.to(device), persistent=False)


# ---- the plan ------------------------------------------------------------------------------------


def layer_norm_reason(norm) -> str:
    """'' when `norm` is a LayerNorm whose math FusedLayerNorm reproduces; otherwise why not."""
    if len(norm.normalized_shape) != 1:
        return f"LayerNorm over {tuple(norm.normalized_shape)}: only the last dim is fused"
    if norm.normalized_shape[0] > MAX_HIDDEN:
        return f"LayerNorm over {norm.normalized_shape[0]} features: more than the kernel's {MAX_HIDDEN}"
    return ""


def plan_layer_norm(plan: Plan, norm, path: str, timm_layer_norm=None) -> bool:
    """Plan a LayerNorm's swap (torch's class becomes FusedLayerNorm, timm's a TimmLayerNorm);
    True when planned. A norm of another class is reported as left alone."""
    kind = type(norm)
    if kind is nn.LayerNorm or (timm_layer_norm is not None and kind is timm_layer_norm):
        why = layer_norm_reason(norm)
        if why:
            plan.leave(path, "layer_norm", why)
            return False
        if kind is nn.LayerNorm:
            plan.change_class(norm, FusedLayerNorm, path, "layer_norm", "FusedLayerNorm", residual_in_fp32=False)
        else:
            plan.swap_class(norm, TimmLayerNorm, path, "layer_norm", "FusedLayerNorm", residual_in_fp32=False)
        return True
    plan.leave(path, "layer_norm", f"{kind.__name__} is not a LayerNorm this swap fuses (nn.LayerNorm over the last dim)")
    return False


def _is_norm(module) -> bool:
    """LayerNorm-like modules, the ones a summary should account for (not batch or group norms)."""
    name = type(module).__name__.lower()
    return isinstance(module, nn.LayerNorm) or "layernorm" in name or "rmsnorm" in name


def _attention_reason(attn, timm) -> str:
    if type(attn) is not timm["Attention"]:
        return f"{type(attn).__name__} is not timm's Attention"
    if getattr(attn, "gate", None) is not None:
        return "gated attention (timm's gated=True) is not fused"
    if attn.head_dim not in HEAD_DIMS:
        return f"head dim {attn.head_dim} is not {HEAD_DIMS_TEXT}"
    if not isinstance(attn.qkv, nn.Linear) or not isinstance(attn.proj, nn.Linear):
        return "qkv and proj are not nn.Linear"
    return ""


def _mlp_reason(mlp) -> str:
    if not isinstance(getattr(mlp, "fc1", None), nn.Linear) or not isinstance(getattr(mlp, "fc2", None), nn.Linear):
        return "fc1 and fc2 are not nn.Linear (timm's use_conv)"
    try:
        gelu_approximation(mlp.act)
    except ValueError as why:
        return str(why)
    return ""


def _patch_embed_reason(module, timm) -> str:
    if type(module) is not timm["PatchEmbed"]:
        return f"{type(module).__name__} is not timm's PatchEmbed (a hybrid or other stem)"
    proj = getattr(module, "proj", None)
    if not isinstance(proj, nn.Conv2d) or proj.stride != proj.kernel_size or proj.padding != (0, 0):
        return "its proj is not a Conv2d with stride = kernel and no padding"
    if proj.kernel_size[0] != proj.kernel_size[1] or proj.groups != 1 or proj.dilation != (1, 1):
        return "non-square, grouped or dilated patches"
    if not getattr(module, "flatten", False):
        return "it does not return flattened [B, N, D] tokens (dynamic_img_size keeps NHWC for timm's _pos_embed)"
    if getattr(module, "dynamic_img_pad", False):
        return "dynamic_img_pad pads the image first"
    return ""


def _block_reason(block, timm, fused_norms) -> str:
    if type(block) is not timm["Block"]:
        return f"{type(block).__name__} is not timm's pre-LN Block"
    if not all(id(getattr(block, name)) in fused_norms for name in ("norm1", "norm2")):
        return "its norms are not fused (layer_norm=False, or not an nn.LayerNorm)"
    for name in ("ls1", "ls2"):
        ls = getattr(block, name)
        if not (isinstance(ls, nn.Identity) or type(ls) is timm["LayerScale"]):
            return f"{name} is a {type(ls).__name__}, not timm's LayerScale"
    for name in ("drop_path1", "drop_path2"):
        dp = getattr(block, name)
        if not (isinstance(dp, nn.Identity) or type(dp) is timm["DropPath"]):
            return f"{name} is a {type(dp).__name__}, not timm's DropPath"
    return ""


def _embed_in_one_op(model, timm) -> bool:
    """Whether the class token and position embeddings can go into the patch-embedding op:
    one class token (or none), no register tokens, timm's own _pos_embed (DeiT's distillation
    token overrides it), position embeddings on every token, a fixed image size, no patch norm."""
    return (
        isinstance(getattr(model.patch_embed, "norm", None), nn.Identity)
        and getattr(model, "reg_token", None) is None
        and getattr(model, "pos_embed", None) is not None
        and not getattr(model, "dynamic_img_size", True)
        and type(model)._pos_embed is timm["VisionTransformer"]._pos_embed
    )


def plan_timm_vit(model, plan: Plan, *, attention: bool, mlp: bool, layer_norm: bool, patch_embed: bool) -> None:
    timm = _timm_classes()
    fused_norms = set()  # ids of the norms that are or will be FusedLayerNorm
    for path, module in model.named_modules():
        if isinstance(module, FusedLayerNorm):
            fused_norms.add(id(module))
        if is_swapped(module) or isinstance(module, (FusedLayerNorm, FlashAttention, FusedMlp)):
            plan.already.append((path, _kind(module, timm)))
            continue
        if type(module).__name__.endswith("Attention"):
            if not attention:
                continue
            why = _attention_reason(module, timm)
            if why:
                plan.leave(path, "attention", why)
            else:
                plan.swap_class(module, TimmAttention, path, "attention", "FlashAttention (flash_attention; masks "
                                                                          "take timm's forward)")
        elif type(module) is timm["Mlp"]:
            if not mlp:
                continue
            why = _mlp_reason(module)
            if why:
                plan.leave(path, "mlp", why)
            else:
                plan.swap_class(module, TimmMlp, path, "mlp", "FusedMlp (bias + GELU + fc2 fused)",
                                approximate=gelu_approximation(module.act))
        elif _is_norm(module) and layer_norm:
            if plan_layer_norm(plan, module, path, timm["LayerNorm"]):
                fused_norms.add(id(module))
    if patch_embed:
        module = getattr(model, "patch_embed", None)
        if is_swapped(module):
            pass  # counted above
        elif module is not None:
            why = _patch_embed_reason(module, timm)
            if why:
                plan.leave("patch_embed", "patch_embed", why)
            else:
                load_patch_embed()  # build/load the extension now, not inside a torch.compile trace
                plan.swap_class(module, TimmPatchEmbed, "patch_embed", "patch_embed",
                                "vit_kernels.ops.patch_embed (patchify + GEMM; module and keys kept)")
    blocks = getattr(model, "blocks", None)
    reasons = set()
    for i, block in enumerate(blocks if isinstance(blocks, nn.Sequential) else ()):
        if is_swapped(block):
            continue
        why = _block_reason(block, timm, fused_norms)
        if why:
            reasons.add(why)
            plan.leave(f"blocks.{i}", "block", why)
        else:
            plan.swap_class(block, TimmBlock, f"blocks.{i}", "block", "attention residual add fused into norm2")
    if is_swapped(model):
        return
    if not isinstance(blocks, nn.Sequential):
        reasons.add("its blocks are not an nn.Sequential")
    if type(model).forward_features is not timm["VisionTransformer"].forward_features:
        reasons.add(f"{type(model).__name__} overrides forward_features")
    norm = getattr(model, "norm", None)
    if not (isinstance(norm, nn.Identity) or id(norm) in fused_norms):
        reasons.add("its final norm is not a fused LayerNorm or Identity")
    if reasons:
        plan.leave("forward_features", "model", "residual adds not fused across blocks: " + "; ".join(sorted(reasons)))
        return
    in_one_op = patch_embed and (isinstance(model.patch_embed, TimmPatchEmbed)
                                 or any(change.path == "patch_embed" for change in plan.changes))
    in_one_op = in_one_op and _embed_in_one_op(model, timm)
    plan.swap_class(model, TimmVisionTransformer, "forward_features", "model",
                    "residual add + LayerNorm fused across blocks"
                    + ("; class token and position embeddings inside the patch-embedding op" if in_one_op else ""),
                    _vk_embed_in_one_op=in_one_op)


def _kind(module, timm) -> str:
    if isinstance(module, (FlashAttention, timm["Attention"])):
        return "attention"
    if isinstance(module, (FusedMlp, timm["Mlp"])):
        return "mlp"
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if isinstance(module, TimmPatchEmbed):
        return "patch_embed"
    if isinstance(module, TimmBlock):
        return "block"
    return "model"
