"""Hugging Face transformers ViT, DeiT, Dinov2, Dinov2WithRegisters, ViTMAE and ViTMSN (5.9+ layout:
``layers[i].attention.q_proj/k_proj/v_proj/o_proj``, ``mlp.fc1/fc2``), inside any head or wrapper;
the planner of the CLIP/SigLIP/SigLIP2 swaps too (transformers_clip: 4.x and 5.x).

Modules are swapped by class, from the tables below (their forwards are the same code in
each family), and only the modules: the model's own forward, its config, transformers'
attention and mask registries and its output capture stay as they are, so every head
(classification, masked image modeling, MAE pre-training, backbones with feature maps)
returns what it returned, and two models sharing a config never affect each other.

- Attention: q, k, v are read as ``[B, N, H, d]`` views of the projections' outputs by
  flash_attention. Any call it does not reproduce takes the class's own forward (the
  attention implementation in the config, eager or SDPA): an attention mask (transformers
  builds it for that implementation), attention maps being recorded (``output_attentions``),
  a head dim or dtype the kernel lacks, FX tracing.
- MLP (fc1 -> GELU -> fc2): bias + GELU + fc2 fused (bias_gelu_linear).
- Layers: the attention residual add (with Dinov2's layer scale and drop path) runs inside
  the LayerNorm after it. The layer stays a GradientCheckpointingLayer, so
  ``gradient_checkpointing_enable()`` checkpoints it as before.
- LayerNorms become FusedLayerNorm (eps kept: 1e-12 in ViT and DeiT); patch embeddings run
  the fused patch-embedding op, casting pixels to the weights' dtype where the class does.

The layout up to transformers 5.8 (``attention.attention.query``, ``intermediate``,
``output``) is left alone with the reason: its forwards are not these.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.block import drop_path_row_scale
from ..nn.layer_norm import FusedLayerNorm
from ..nn.mlp import gelu_approximation
from ..ops.attention import HEAD_DIMS, HEAD_DIMS_TEXT, flash_attention
from ..ops.bias_gelu_linear import bias_gelu_linear
from ..ops.patch_embed import load as load_patch_embed
from ..ops.patch_embed import patch_embed
from . import transformers_clip as clip
from ._class_swap import Plan, SwappedModule, fx_tracing, is_swapped
from ._transformers_calls import KERNEL_DTYPES, asks_for_more, recording_attentions, transformers_class
from .timm_vit import plan_layer_norm

torch.fx.wrap("flash_attention")
torch.fx.wrap("bias_gelu_linear")
torch.fx.wrap("patch_embed")

FAMILIES = ("ViT", "DeiT", "Dinov2", "Dinov2WithRegisters", "ViTMAE", "ViTMSN")
ATTENTION = {f"{p}Attention" for p in FAMILIES}
MLP = {f"{p}MLP" for p in FAMILIES}
VIT_LAYER = {f"{p}Layer" for p in ("ViT", "DeiT", "ViTMAE", "ViTMSN")}
DINOV2_LAYER = {f"{p}Layer" for p in ("Dinov2", "Dinov2WithRegisters")}
PATCH_EMBEDDINGS = {f"{p}PatchEmbeddings" for p in FAMILIES}
PATCH_EMBEDDINGS_CAST = {"Dinov2PatchEmbeddings", "Dinov2WithRegistersPatchEmbeddings"}  # cast pixels to the weights'
class TransformersAttention(nn.Module, SwappedModule):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if (attention_mask is not None or asks_for_more(kwargs) or fx_tracing() or hidden_states.dim() != 3
                or hidden_states.dtype not in KERNEL_DTYPES or recording_attentions()):
            return self.base_forward(hidden_states, attention_mask, **kwargs)
        batch, tokens, _ = hidden_states.shape
        shape = (batch, tokens, -1, self.head_dim)
        out = flash_attention(self.q_proj(hidden_states).view(shape), self.k_proj(hidden_states).view(shape),
                              self.v_proj(hidden_states).view(shape), softmax_scale=self.scaling,
                              dropout_p=self.attention_dropout if self.training else 0.0)
        return self.o_proj(out.reshape(batch, tokens, -1)), None


class TransformersMlp(nn.Module, SwappedModule):
    def forward(self, hidden_states):
        if fx_tracing() or any(m._forward_hooks or m._forward_pre_hooks for m in (self.fc1, self.fc2)):
            return self.base_forward(hidden_states)
        hidden = F.linear(hidden_states, self.fc1.weight)
        return bias_gelu_linear(hidden, self.fc1.bias, self.fc2.weight, self.fc2.bias, self._vk_gelu)


class TransformersViTLayer(nn.Module, SwappedModule):
    """ViT/DeiT/ViTMAE/ViTMSN layer with the attention residual add fused into layernorm_after."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if fx_tracing():
            return self.base_forward(hidden_states, attention_mask, **kwargs)
        attn_out = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)[0]
        y, hidden_states = self.layernorm_after(self.dropout(attn_out), hidden_states)
        return hidden_states + self.dropout(self.mlp(y))


class TransformersDinov2Layer(nn.Module, SwappedModule):
    """Dinov2 layer with the attention residual add, layer scale and drop path fused into norm2."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if fx_tracing():
            return self.base_forward(hidden_states, attention_mask, **kwargs)
        attn_out = self.attention(self.norm1(hidden_states), attention_mask=attention_mask, **kwargs)[0]
        row_scale = drop_path_row_scale(self.drop_path, attn_out.shape[0], attn_out.device, attn_out.dtype)
        y, hidden_states = self.norm2(attn_out, hidden_states, gamma=self.layer_scale1.lambda1, row_scale=row_scale)
        return self.drop_path(self.layer_scale2(self.mlp(y))) + hidden_states


class TransformersPatchEmbeddings(nn.Module, SwappedModule):
    def forward(self, pixel_values, *args, **kwargs):
        weight = self.projection.weight
        if type(self).__name__ in PATCH_EMBEDDINGS_CAST and isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.to(weight.dtype)
        if (args or asks_for_more(kwargs) or fx_tracing() or pixel_values.dim() != 4
                or pixel_values.shape[1] != self.num_channels or pixel_values.dtype != weight.dtype
                or pixel_values.shape[2] % self.projection.stride[0] or pixel_values.shape[3] % self.projection.stride[1]):
            return self.base_forward(pixel_values, *args, **kwargs)
        return patch_embed(pixel_values, weight, self.projection.bias)


# ---- the plan ------------------------------------------------------------------------------------


def _attention_reason(attn, out_proj: str) -> str:
    if not all(isinstance(getattr(attn, name, None), nn.Linear) for name in ("q_proj", "k_proj", "v_proj", out_proj)):
        return f"q_proj, k_proj, v_proj, {out_proj} are not all nn.Linear"
    if getattr(attn, "is_causal", False):
        return "causal attention is not fused"
    if attn.head_dim not in HEAD_DIMS:
        return f"head dim {attn.head_dim} is not {HEAD_DIMS_TEXT}"
    return ""


def _layer_reason(layer, norms, fused_norms) -> str:
    if not all(id(getattr(layer, name)) in fused_norms for name in norms):
        return "its LayerNorms are not fused (layer_norm=False, or not nn.LayerNorm)"
    if norms[0] == "norm1":
        for name in ("layer_scale1", "layer_scale2"):
            if not isinstance(getattr(getattr(layer, name, None), "lambda1", None), torch.Tensor):
                return f"{name} is not a layer scale with lambda1"
        drop_path = layer.drop_path
        if not (isinstance(drop_path, nn.Identity) or type(drop_path).__name__.endswith("DropPath")):
            return f"drop_path is a {type(drop_path).__name__}"
    return ""


# The fused layer of each layer class, and its two LayerNorms (the second takes the residual add).
LAYERS = {**{name: (TransformersViTLayer, ("layernorm_before", "layernorm_after")) for name in VIT_LAYER},
          **{name: (TransformersDinov2Layer, ("norm1", "norm2")) for name in DINOV2_LAYER},
          **{name: (clip.ClipEncoderLayer, ("layer_norm1", "layer_norm2")) for name in clip.LAYER}}


def plan_transformers_vit(model, plan: Plan, *, attention: bool, mlp: bool, layer_norm: bool,
                          patch_embed: bool) -> None:
    """Plan the swaps of a transformers ViT-family model or CLIP/SigLIP/SigLIP2 model (any head);
    a text tower inside it is left as it is."""
    fused_norms = set()
    layers = []
    text_towers = []
    for path, module in model.named_modules():
        if any(path.startswith(f"{tower}.") for tower in text_towers):
            continue
        if isinstance(module, FusedLayerNorm):
            fused_norms.add(id(module))
        if is_swapped(module) or isinstance(module, FusedLayerNorm):
            plan.already.append((path, _kind(module)))
            continue
        name = type(module).__name__
        if transformers_class(module, clip.TEXT_TOWERS):
            text_towers.append(path)
            plan.leave(path, "model", f"{name} is a text tower: left as it is (its causal or padding masks; "
                                      "the vision tower is what this package swaps)")
        elif name.endswith("SelfAttention") and hasattr(module, "query"):
            plan.leave(path, "attention", f"{name}: the transformers <= 5.8 layout, which this swap does not know")
        elif transformers_class(module, clip.OLD_ATTENTION) and clip.old_layout(type(module)):
            if not attention:
                continue
            mixin = clip.old_layout_class(type(module), "attention")
            why = _attention_reason(module, "out_proj") or ("" if mixin else f"{name}: a transformers 4.x call "
                                                            "form this swap does not know")
            if why:
                plan.leave(path, "attention", why)
            else:
                plan.swap_class(module, mixin, path, "attention", "flash_attention (transformers 4.x call; masks, "
                                                                  "output_attentions: the model's own attention)")
        elif transformers_class(module, ATTENTION | clip.ATTENTION):
            if not attention:
                continue
            clip_family = name in clip.ATTENTION
            why = _attention_reason(module, "out_proj" if clip_family else "o_proj")
            if why:
                plan.leave(path, "attention", why)
            else:
                if name == "Siglip2Attention":
                    plan.swap_class(module, clip.ClipAttention, path, "attention",
                                    "flash_attention; NaFlex padding masks: flash_attention_key_padded (recorded "
                                    "attention maps: the model's own attention)", _vk_key_padding=True)
                else:
                    plan.swap_class(module, clip.ClipAttention if clip_family else TransformersAttention, path,
                                    "attention", "flash_attention (masks, recorded attention maps: the model's own "
                                    "attention)", **({"_vk_key_padding": False} if clip_family else {}))
        elif transformers_class(module, clip.POOLING_HEADS):
            plan.leave(path, "attention", f"{name}: one latent query per image (a [B, 1, N] attention, a few "
                                          "percent of the tower's FLOPs): its nn.MultiheadAttention is kept; its "
                                          "MLP and LayerNorm are swapped")
        elif transformers_class(module, MLP | clip.MLP):
            if not mlp:
                continue
            try:
                form = gelu_approximation(getattr(module, "activation_fn", None))
            except ValueError:
                form = ""
            if form and isinstance(getattr(module, "fc1", None), nn.Linear) and isinstance(module.fc2, nn.Linear):
                plan.swap_class(module, TransformersMlp, path, "mlp", "bias + GELU + fc2 fused (module kept)",
                                _vk_gelu=form)
            else:
                plan.leave(path, "mlp", "its activation is not a GELU (exact, tanh or quick_gelu)")
        elif name.endswith(("FFN", "MLP")) and mlp:
            plan.leave(path, "mlp", f"{name} is not an fc1 -> GELU -> fc2 MLP")
        elif isinstance(module, nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm", "RmsNorm")):
            if layer_norm and plan_layer_norm(plan, module, path):
                fused_norms.add(id(module))
        elif transformers_class(module, set(LAYERS)):
            layers.append((path, module))
        elif transformers_class(module, PATCH_EMBEDDINGS) and patch_embed:
            projection = getattr(module, "projection", None)
            if isinstance(projection, nn.Conv2d) and projection.stride == projection.kernel_size \
                    and projection.padding == (0, 0) and projection.groups == 1 and projection.dilation == (1, 1):
                load_patch_embed()  # build/load the extension now, not inside a torch.compile trace
                plan.swap_class(module, TransformersPatchEmbeddings, path, "patch_embed",
                                "vit_kernels.ops.patch_embed (module kept; cls, mask token and position embeddings "
                                "stay in transformers' embeddings)")
            else:
                plan.leave(path, "patch_embed", "its projection is not a patchifying Conv2d")
        elif transformers_class(module, clip.EMBEDDINGS) and patch_embed:
            why = clip.embeddings_reason(module)
            if why:
                plan.leave(path, "patch_embed", why)
            else:
                load_patch_embed()
                plan.swap_class(module, clip.ClipVisionEmbeddings, path, "patch_embed",
                                "vit_kernels.ops.patch_embed with the class token and position embeddings (module "
                                "kept; interpolate_pos_encoding: the model's own embeddings)")
        elif transformers_class(module, clip.UNFUSED_EMBEDDINGS) and patch_embed:
            plan.leave(path, "patch_embed", f"{name} embeds patchified pixels with an nn.Linear (a plain GEMM): "
                                            "nothing to fuse")
    for path, layer in layers:
        fused, norms = LAYERS[type(layer).__name__]
        why = _layer_reason(layer, norms, fused_norms)
        if not why and clip.old_layout(type(layer)):
            fused = clip.old_layout_class(type(layer), "block")
            why = "" if fused else "a transformers 4.x call form this swap does not know"
        if why:
            plan.leave(path, "block", why)
        else:
            plan.swap_class(layer, fused, path, "block", f"attention residual add fused into {norms[1]}")


def _kind(module) -> str:
    if isinstance(module, (TransformersAttention, clip.ClipAttention)):
        return "attention"
    if isinstance(module, TransformersMlp):
        return "mlp"
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if isinstance(module, (TransformersPatchEmbeddings, clip.ClipVisionEmbeddings)):
        return "patch_embed"
    return "block"
