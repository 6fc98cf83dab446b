"""Hugging Face transformers ViT, DeiT and Dinov2, in both layouts: from 5.9
(``layers[i].attention.q_proj/k_proj/v_proj/o_proj``, ``mlp.fc1/fc2``) and up to 5.8
(``encoder.layer[i].attention.attention.query/key/value``, ``intermediate``, ``output``).

- Attention goes through transformers' own extension point: the function below is
  registered with ``AttentionInterface`` under ``"vit_kernels"`` and the model is switched
  to it with ``set_attn_implementation``. It receives q, k, v as ``[B, H, N, d]`` views of
  the projections' ``[B, N, H, d]`` outputs and hands those to flash_attention in place;
  masks, unsupported head dims and dtypes go to transformers' SDPA path.
- The MLP keeps its modules and keys; its instance forward runs fc1 bias-free and
  bias_gelu (GELU models only).
- LayerNorms become FusedLayerNorm (eps kept: 1e-12 in ViT and DeiT). The base model's
  instance forward carries (branch, residual) across layers so that every residual add
  (with Dinov2's layer scale and drop path) runs inside the LayerNorm after it, ending in
  the final layernorm. Requests it does not reproduce (output_hidden_states and
  output_attentions, which transformers collects with hooks on each layer's module call;
  masks; return_dict=False) take the model's own forward, where each layer's instance
  forward still fuses its attention residual add.
"""

import types

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.block import drop_path_row_scale
from ..nn.layer_norm import FusedLayerNorm
from ..ops.attention import HEAD_DIMS, flash_attention
from ..ops.bias_gelu import bias_gelu
from ..ops.patch_embed import _register as _load_patch_embed
from ..ops.patch_embed import patch_embed
from .timm_vit import _is_plain_layer_norm

ATTENTION_NAME = "vit_kernels"


def flash_attention_interface(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature on vit_kernels.ops.flash_attention; returns ([B, N, H, d], None)."""
    if (attention_mask is not None or query.shape[-1] not in HEAD_DIMS
            or query.dtype not in (torch.float16, torch.bfloat16, torch.float32)):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = flash_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                          softmax_scale=scaling, dropout_p=dropout)
    return out, None


def _gelu_form(act) -> str:
    """'none' or 'tanh' for transformers' GELU activations; '' for anything else."""
    name = type(act).__name__
    if isinstance(act, nn.GELU):
        return act.approximate
    if name == "GELUActivation" and getattr(act, "act", F.gelu) is F.gelu:
        return "none"
    if name in ("PytorchGELUTanh", "GELUTanh"):
        return "tanh"
    return ""


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _mlp_forward(fc1: str, act: str, fc2: str):
    """fc1 (bias-free) -> bias_gelu -> fc2 (if any), for an MLP-like module with these attribute names."""

    def forward(self, hidden_states):
        first = getattr(self, fc1)
        out = bias_gelu(F.linear(hidden_states, first.weight), first.bias, _gelu_form(getattr(self, act)))
        return getattr(self, fc2)(out) if fc2 else out

    return forward


def _mlp_target(layer):
    """(module, fc1, activation, fc2 or '') holding the layer's fc1 -> GELU, or None."""
    if hasattr(layer, "intermediate"):  # <= 5.8 ViT/DeiT: intermediate (dense + act), output (dense + residual)
        return layer.intermediate, "dense", "intermediate_act_fn", ""
    mlp = getattr(layer, "mlp", None)
    for act in ("activation_fn", "activation"):
        if mlp is not None and hasattr(mlp, act) and isinstance(getattr(mlp, "fc1", None), nn.Linear):
            return mlp, "fc1", act, "fc2"
    return None


def _vit_layer_forward(self, hidden_states, *args, **kwargs):
    """ViTLayer/DeiTLayer.forward with the attention residual add fused into layernorm_after."""
    attn_out = _first(self.attention(self.layernorm_before(hidden_states), *args, **kwargs))
    if hasattr(self, "intermediate"):  # <= 5.8: attention dropout is inside, output adds the residual
        y, hidden_states = self.layernorm_after(attn_out, hidden_states)
        return self.output(self.intermediate(y), hidden_states)
    y, hidden_states = self.layernorm_after(self.dropout(attn_out), hidden_states)
    return hidden_states + self.dropout(self.mlp(y))


def _dinov2_layer_forward(self, hidden_states, *args, **kwargs):
    """Dinov2Layer.forward with the attention residual add, layer scale and drop path fused into norm2."""
    attn_out = _first(self.attention(self.norm1(hidden_states), *args, **kwargs))
    row_scale = drop_path_row_scale(self.drop_path, attn_out.shape[0], attn_out.device, attn_out.dtype)
    y, hidden_states = self.norm2(attn_out, hidden_states, gamma=self.layer_scale1.lambda1, row_scale=row_scale)
    return self.drop_path(self.layer_scale2(self.mlp(y))) + hidden_states


def _patch_embeddings_forward(self, pixel_values, *args, **kwargs):
    """The patch embeddings' forward (projection -> [B, N, D]) on the fused op; any other case
    (channel mismatch, interpolation flags) takes transformers' own forward and its checks."""
    if args or any(kwargs.values()) or pixel_values.dim() != 4 or pixel_values.shape[1] != self.num_channels:
        return type(self).forward(self, pixel_values, *args, **kwargs)
    return patch_embed(pixel_values, self.projection.weight, self.projection.bias)


def _carry_layers(layers, x):
    """Run the layers with every residual add fused into the LayerNorm after it, across layers.

    Returns the pending last add (branch, residual, gamma, row_scale) for the final norm.
    """
    branch, residual, gamma, row_scale = x, None, None, None
    for layer in layers:
        if hasattr(layer, "layernorm_before"):  # ViT, DeiT
            y, residual = layer.layernorm_before(branch, residual, gamma=gamma, row_scale=row_scale)
            attn_out = _first(layer.attention(y))
            if hasattr(layer, "intermediate"):  # <= 5.8: attention dropout inside; output = dense + dropout (+ residual)
                y, residual = layer.layernorm_after(attn_out, residual)
                branch = layer.output.dropout(layer.output.dense(layer.intermediate(y)))
            else:
                y, residual = layer.layernorm_after(layer.dropout(attn_out), residual)
                branch = layer.dropout(layer.mlp(y))
            gamma, row_scale = None, None
        else:  # Dinov2: layer scale and drop path on both branches
            y, residual = layer.norm1(branch, residual, gamma=gamma, row_scale=row_scale)
            attn_out = _first(layer.attention(y))
            drop = drop_path_row_scale(layer.drop_path, attn_out.shape[0], attn_out.device, attn_out.dtype)
            y, residual = layer.norm2(attn_out, residual, gamma=layer.layer_scale1.lambda1, row_scale=drop)
            branch = layer.mlp(y)
            gamma = layer.layer_scale2.lambda1
            row_scale = drop_path_row_scale(layer.drop_path, branch.shape[0], branch.device, branch.dtype)
    return branch, residual, gamma, row_scale


def _make_base_forward(layers):
    """The base model's forward with the residual stream carried across layers into the final LayerNorm.

    Anything it does not reproduce goes to the model's own forward: output_hidden_states /
    output_attentions (collected by hooks on each layer's module call), masks, masked
    patches, return_dict=False, any other keyword.
    """

    def forward(self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None, attention_mask=None,
                **kwargs):
        config = self.config
        if (kwargs or bool_masked_pos is not None or attention_mask is not None or pixel_values is None
                or config.output_hidden_states or config.output_attentions
                or not getattr(config, "use_return_dict", True)):
            passed = dict(bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=interpolate_pos_encoding,
                          attention_mask=attention_mask)
            return type(self).forward(self, pixel_values, **{k: v for k, v in passed.items() if v is not None},
                                      **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        extra = {"interpolate_pos_encoding": interpolate_pos_encoding} if interpolate_pos_encoding is not None else {}
        branch, residual, gamma, row_scale = _carry_layers(layers, self.embeddings(pixel_values, **extra))
        sequence_output = self.layernorm(branch, residual, gamma=gamma, row_scale=row_scale)[0]
        if getattr(self, "pooler", None) is not None:
            pooled = self.pooler(sequence_output)
        elif hasattr(self, "pooler"):
            pooled = None
        else:  # Dinov2: the class token
            pooled = sequence_output[:, 0, :]
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled)

    return forward


def _find_layers(model):
    """(base model, its path prefix, the layer list, the list's path) or Nones."""
    for base_name in ("", "vit", "deit", "dinov2"):
        base = getattr(model, base_name, None) if base_name else model
        if base is None:
            continue
        prefix = f"{base_name}." if base_name else ""
        if isinstance(getattr(base, "layers", None), nn.ModuleList):
            return base, prefix, base.layers, f"{prefix}layers"
        encoder = getattr(base, "encoder", None)
        if isinstance(getattr(encoder, "layer", None), nn.ModuleList):
            return base, prefix, encoder.layer, f"{prefix}encoder.layer"
    return None, "", None, ""


def swap_transformers_vit(model, summary, *, attention: bool, mlp: bool, layer_norm: bool, patch_embed: bool) -> None:
    base, prefix, layers, layers_path = _find_layers(model)
    if base is None:
        summary.left_alone("", f"{type(model).__name__}: no transformer layers found")
        return
    attn = layers[0].attention
    if not (hasattr(attn, "q_proj") or hasattr(getattr(attn, "attention", None), "query")):
        summary.left_alone("", f"{type(layers[0]).__name__}: an attention layout this swap does not know")
        return
    targets = [_mlp_target(layer) for layer in layers]
    if "forward" in vars(base) or model.config._attn_implementation == ATTENTION_NAME or any(
        "forward" in vars(layer) or (t is not None and "forward" in vars(t[0])) for layer, t in zip(layers, targets)
    ):
        summary.left_alone("", "already swapped: a second call changes nothing")
        return
    if attention:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, flash_attention_interface)
        model.set_attn_implementation(ATTENTION_NAME)
        summary.swap("config._attn_implementation", f"'{ATTENTION_NAME}' (AttentionInterface): flash_attention")
    for i, (layer, target) in enumerate(zip(layers, targets)):
        path = f"{layers_path}.{i}"
        if mlp:
            if target is not None and _gelu_form(getattr(target[0], target[2])):
                module, fc1, act, fc2 = target
                module.forward = types.MethodType(_mlp_forward(fc1, act, fc2), module)
                name = next(n for n, m in layer.named_children() if m is module)
                summary.swap(f"{path}.{name}", f"bias-free {fc1} + bias_gelu (module kept)")
            else:
                summary.left_alone(f"{path}.mlp", "not an fc1 -> GELU -> fc2 MLP")
        if not layer_norm:
            continue
        norms = ("layernorm_before", "layernorm_after") if hasattr(layer, "layernorm_before") else ("norm1", "norm2")
        for name in norms:
            if _is_plain_layer_norm(getattr(layer, name)):
                setattr(layer, name, FusedLayerNorm.from_layer_norm(getattr(layer, name)))
                summary.swap(f"{path}.{name}", "FusedLayerNorm")
        if isinstance(getattr(layer, norms[1]), FusedLayerNorm):
            fused_forward = _vit_layer_forward if norms[0] == "layernorm_before" else _dinov2_layer_forward
            layer.forward = types.MethodType(fused_forward, layer)
            summary.swap(f"{path}.forward", "attention residual add fused into the next LayerNorm (per instance)")
    if layer_norm and _is_plain_layer_norm(getattr(base, "layernorm", None)):
        base.layernorm = FusedLayerNorm.from_layer_norm(base.layernorm)
        summary.swap(f"{prefix}layernorm", "FusedLayerNorm")
    fused_norms = all(isinstance(getattr(layer, name), FusedLayerNorm) for layer in layers
                      for name in (("layernorm_before", "layernorm_after") if hasattr(layer, "layernorm_before")
                                   else ("norm1", "norm2")))
    if fused_norms and isinstance(getattr(base, "layernorm", None), FusedLayerNorm):
        base.forward = types.MethodType(_make_base_forward(layers), base)
        summary.swap(f"{prefix.rstrip('.') or '<model>'}.forward",
                     "residual stream carried across layers into the final LayerNorm (per instance; output "
                     "capture, masks and other options take the model's own forward)")
    else:
        summary.left_alone(f"{prefix.rstrip('.') or '<model>'}.forward",
                           "residual adds across layers not fused: the LayerNorms are not all fused")
    if patch_embed:
        embeddings = base.embeddings.patch_embeddings
        projection = getattr(embeddings, "projection", None)
        if isinstance(projection, nn.Conv2d) and projection.stride == projection.kernel_size:
            _load_patch_embed()  # build/load the extension now, not inside a torch.compile trace
            embeddings.forward = types.MethodType(_patch_embeddings_forward, embeddings)
            summary.swap(f"{prefix}embeddings.patch_embeddings",
                         "vit_kernels.ops.patch_embed (module kept; cls, mask token and position embeddings stay in "
                         "transformers' embeddings)")
        else:
            summary.left_alone(f"{prefix}embeddings.patch_embeddings", "its projection is not a patchifying Conv2d")
