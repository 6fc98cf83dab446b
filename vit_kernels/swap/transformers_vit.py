"""Hugging Face transformers ViT, DeiT, Dinov2, Dinov2WithRegisters, ViTMAE and ViTMSN (5.9+ layout:
``layers[i].attention.q_proj/k_proj/v_proj/o_proj``, ``mlp.fc1/fc2``), inside any head or wrapper.

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
from ._class_swap import Plan, SwappedModule, fx_tracing, is_swapped
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
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _transformers_class(module, names) -> bool:
    kind = type(module)
    return kind.__name__ in names and kind.__module__.startswith("transformers.models.")


def _recording_attentions() -> bool:
    """Whether transformers' output capture is collecting attention maps for the running forward."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _asks_for_more(kwargs) -> bool:
    return any(value is not None and value is not False for value in kwargs.values())


class TransformersAttention(nn.Module, SwappedModule):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if (attention_mask is not None or _asks_for_more(kwargs) or fx_tracing() or hidden_states.dim() != 3
                or hidden_states.dtype not in KERNEL_DTYPES or _recording_attentions()):
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
        if (args or _asks_for_more(kwargs) or fx_tracing() or pixel_values.dim() != 4
                or pixel_values.shape[1] != self.num_channels or pixel_values.dtype != weight.dtype
                or pixel_values.shape[2] % self.projection.stride[0] or pixel_values.shape[3] % self.projection.stride[1]):
            return self.base_forward(pixel_values, *args, **kwargs)
        return patch_embed(pixel_values, weight, self.projection.bias)


# ---- the plan ------------------------------------------------------------------------------------


def _attention_reason(attn) -> str:
    if not all(isinstance(getattr(attn, name, None), nn.Linear) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "q_proj, k_proj, v_proj, o_proj are not all nn.Linear"
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


def plan_transformers_vit(model, plan: Plan, *, attention: bool, mlp: bool, layer_norm: bool,
                          patch_embed: bool) -> None:
    fused_norms = set()
    layers = []
    for path, module in model.named_modules():
        if isinstance(module, FusedLayerNorm):
            fused_norms.add(id(module))
        if is_swapped(module) or isinstance(module, FusedLayerNorm):
            plan.already.append((path, _kind(module)))
            continue
        name = type(module).__name__
        if name.endswith("SelfAttention") and hasattr(module, "query"):
            plan.leave(path, "attention", f"{name}: the transformers <= 5.8 layout, which this swap does not know")
        elif _transformers_class(module, ATTENTION):
            if not attention:
                continue
            why = _attention_reason(module)
            if why:
                plan.leave(path, "attention", why)
            else:
                plan.swap_class(module, TransformersAttention, path, "attention",
                                "flash_attention (masks, recorded attention maps: the model's own attention)")
        elif _transformers_class(module, MLP):
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
                plan.leave(path, "mlp", "its activation is not GELU (exact or tanh)")
        elif name.endswith(("FFN", "MLP")) and name not in MLP and mlp:
            plan.leave(path, "mlp", f"{name} is not an fc1 -> GELU -> fc2 MLP")
        elif isinstance(module, nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm", "RmsNorm")):
            if layer_norm and plan_layer_norm(plan, module, path):
                fused_norms.add(id(module))
        elif _transformers_class(module, VIT_LAYER | DINOV2_LAYER):
            layers.append((path, module))
        elif _transformers_class(module, PATCH_EMBEDDINGS) and patch_embed:
            projection = getattr(module, "projection", None)
            if isinstance(projection, nn.Conv2d) and projection.stride == projection.kernel_size \
                    and projection.padding == (0, 0) and projection.groups == 1 and projection.dilation == (1, 1):
                load_patch_embed()  # build/load the extension now, not inside a torch.compile trace
                plan.swap_class(module, TransformersPatchEmbeddings, path, "patch_embed",
                                "vit_kernels.ops.patch_embed (module kept; cls, mask token and position embeddings "
                                "stay in transformers' embeddings)")
            else:
                plan.leave(path, "patch_embed", "its projection is not a patchifying Conv2d")
    for path, layer in layers:
        dinov2 = type(layer).__name__ in DINOV2_LAYER
        norms = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
        why = _layer_reason(layer, norms, fused_norms)
        if why:
            plan.leave(path, "block", why)
        else:
            plan.swap_class(layer, TransformersDinov2Layer if dinov2 else TransformersViTLayer, path, "block",
                            f"attention residual add fused into {norms[1]}")


def _kind(module) -> str:
    if isinstance(module, TransformersAttention):
        return "attention"
    if isinstance(module, TransformersMlp):
        return "mlp"
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if isinstance(module, TransformersPatchEmbeddings):
        return "patch_embed"
    return "block"
