"""Hugging Face transformers CLIP, SigLIP and SigLIP2 vision towers (the module layout
``encoder.layers[i].self_attn.q_proj/k_proj/v_proj/out_proj``, ``layer_norm1/2``, ``mlp.fc1/fc2``
of 4.x and 5.x; 4.x's call forms by the *4x classes: its attention takes ``output_attentions``
and returns ``(output, maps)``, its layers take their masks positionally and return tuples, and
up to 4.47 each attention implementation is a class of its own, ``CLIPSdpaAttention``, ...).

The swapped classes here; what is swapped is planned in `transformers_vit.plan_transformers_vit`,
from the class tables below, and only inside a vision tower (`VISION_TOWERS`): a text tower
(CLIPModel's, SiglipModel's) is left as it is, with one line in the summary.

- Attention: q, k, v are read as ``[B, N, H, d]`` views of the three projections' outputs (no
  copy, no fused QKV weight, so the state_dict is untouched) by flash_attention. Any call it
  does not reproduce takes the class's own forward (the config's attention implementation): an
  attention mask other than SigLIP2's key padding, attention maps being recorded, a head dim or
  dtype the kernel lacks, FX tracing. SigLIP2's NaFlex batches (images of different patch
  counts, padded, with pixel_attention_mask) run flash_attention_key_padded: the valid keys
  gathered on the device and attended as packed sequences, padded query rows included, as the
  model's masked attention computes them.
- Layers: the attention residual add runs inside layer_norm2 (the MLP's LayerNorm).
- Embeddings (CLIP, SigLIP): the patchifying Conv2d, CLIP's class token and the position
  embeddings in one patch-embedding op; resized images (``interpolate_pos_encoding``) take the
  class's forward. SigLIP2's embedding is a Linear over patchified pixels: left alone.
- The MLP (fc1 -> GELU -> fc2: exact, tanh, or CLIP's quick_gelu) is the ViT families' swap.
- SigLIP's attention-pooling head (one latent query, ``nn.MultiheadAttention``) is left alone:
  its attention is one query row per image, a few percent of the tower's FLOPs at most, where
  torch's own kernel already serves; its MLP and LayerNorm are swapped like the encoder's.
"""

import inspect

import torch
from torch import nn

from ..ops.attention import flash_attention
from ..ops.attention_varlen import flash_attention_key_padded
from ..ops.patch_embed import patch_embed
from ._class_swap import SwappedModule, fx_tracing
from ._transformers_calls import KERNEL_DTYPES, asks_for_more, recording_attentions, transformers_class

torch.fx.wrap("flash_attention")
torch.fx.wrap("flash_attention_key_padded")
torch.fx.wrap("patch_embed")

FAMILIES = ("CLIP", "Siglip", "Siglip2")
ATTENTION = {f"{p}Attention" for p in FAMILIES}
MLP = {f"{p}MLP" for p in FAMILIES}
LAYER = {f"{p}EncoderLayer" for p in FAMILIES}
EMBEDDINGS = {"CLIPVisionEmbeddings", "SiglipVisionEmbeddings"}
UNFUSED_EMBEDDINGS = {"Siglip2VisionEmbeddings"}
POOLING_HEADS = {"SiglipMultiheadAttentionPoolingHead", "Siglip2MultiheadAttentionPoolingHead"}
VISION_TOWERS = {"CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel", "Siglip2VisionModel"}
# transformers 4.x's two-tower models hold the text transformer itself, not its *TextModel.
TEXT_TOWERS = {"CLIPTextModel", "CLIPTextModelWithProjection", "SiglipTextModel", "Siglip2TextModel",
               "CLIPTextTransformer", "SiglipTextTransformer", "Siglip2TextTransformer"}
# transformers 4.x: up to 4.47 one attention class per implementation (eager, SDPA, flash-attn 2).
OLD_ATTENTION = {f"{p}{kind}" for p in FAMILIES for kind in ("Attention", "SdpaAttention", "FlashAttention2")}
# transformers' model_type of each vision tower's config: a model of one of these is a tower itself.
VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model", "siglip2_vision_model")


def old_layout(attention_class: type) -> bool:
    """transformers 4.x's CLIP/SigLIP attention took output_attentions and returned its maps by
    itself, and its layers took their masks positionally and returned tuples (CLIP up to 4.57,
    SigLIP up to 4.5x): the forwards of the *4x classes below."""
    params = inspect.signature(attention_class.forward).parameters
    return "output_attentions" in params or "causal_attention_mask" in params


# The 4.x call forms, by the forward's parameters: CLIP's takes the causal mask too.
_OLD_CLIP_CALL = ("hidden_states", "attention_mask", "causal_attention_mask", "output_attentions")
_OLD_SIGLIP_CALL = ("hidden_states", "attention_mask", "output_attentions")


def old_layout_class(module_class: type, kind: str):
    """The swapped mixin for a 4.x attention or layer class (kind "attention" or "block"), or
    None for a call form this swap does not know."""
    params = tuple(p for p in inspect.signature(module_class.forward).parameters if p != "self")
    forms = {"attention": {_OLD_CLIP_CALL: ClipAttention4x, _OLD_SIGLIP_CALL: SiglipAttention4x},
             "block": {_OLD_CLIP_CALL: ClipEncoderLayer4x, _OLD_SIGLIP_CALL: SiglipEncoderLayer4x}}[kind]
    return forms.get(params)


def key_padding(mask, batch: int, tokens: int):
    """The ``[B, N]`` bool of valid keys of a key padding mask as transformers builds it from
    SigLIP2's pixel_attention_mask (``[B, 1, N, N]``, every query row the same: bool for SDPA,
    0 / dtype min for eager), or None for a mask of another shape or kind. That the mask is of
    that form is asserted on the device (torch._assert_async: no host sync; a mask of another
    form fails loudly instead of giving a wrong result)."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, 1, tokens, tokens):
        return None
    row = mask[:, :, :1, :]
    if mask.dtype == torch.bool:
        valid = row
    elif mask.is_floating_point():
        valid = row == 0
        torch._assert_async((valid | (row == torch.finfo(mask.dtype).min)).all(),
                            "vit_kernels: SigLIP2's attention mask holds values other than 0 and the dtype's min")
    else:
        return None
    torch._assert_async((mask == row).all(), "vit_kernels: SigLIP2's attention mask is not a key padding mask")
    return valid[:, 0, 0, :]


def _kernel_serves(hidden_states) -> bool:
    return not fx_tracing() and hidden_states.dim() == 3 and hidden_states.dtype in KERNEL_DTYPES


class ClipAttention(nn.Module, SwappedModule):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if asks_for_more(kwargs) or not _kernel_serves(hidden_states) or recording_attentions():
            return self.base_forward(hidden_states, attention_mask, **kwargs)
        key_valid = None
        if attention_mask is not None:
            key_valid = key_padding(attention_mask, *hidden_states.shape[:2]) if self._vk_key_padding else None
            if key_valid is None:
                return self.base_forward(hidden_states, attention_mask, **kwargs)
        return self._vk_attend(hidden_states, key_valid), None

    def _vk_attend(self, hidden_states, key_valid=None):
        batch, tokens, _ = hidden_states.shape
        shape = (batch, tokens, -1, self.head_dim)
        q, k, v = (proj(hidden_states).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        dropout_p = self.dropout if self.training else 0.0
        if key_valid is None:
            out = flash_attention(q, k, v, softmax_scale=self.scale, dropout_p=dropout_p)
        else:
            out = flash_attention_key_padded(q, k, v, key_valid, softmax_scale=self.scale, dropout_p=dropout_p)
        return self.out_proj(out.reshape(batch, tokens, -1))


class ClipAttention4x(ClipAttention):
    """transformers 4.x's CLIP attention call (any of its implementation classes): masks (the text
    tower's causal one included) and attention maps take the class's own forward."""

    def forward(self, hidden_states, attention_mask=None, causal_attention_mask=None, output_attentions=False):
        if attention_mask is not None or causal_attention_mask is not None or output_attentions \
                or not _kernel_serves(hidden_states):
            return self.base_forward(hidden_states, attention_mask, causal_attention_mask, output_attentions)
        return self._vk_attend(hidden_states), None


class SiglipAttention4x(ClipAttention):
    """transformers 4.x's SigLIP attention call; as ClipAttention4x without the causal mask."""

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        if attention_mask is not None or output_attentions or not _kernel_serves(hidden_states):
            return self.base_forward(hidden_states, attention_mask, output_attentions)
        return self._vk_attend(hidden_states), None


class ClipEncoderLayer(nn.Module, SwappedModule):
    """CLIP/SigLIP/SigLIP2 pre-LN layer with the attention residual add fused into layer_norm2."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if fx_tracing():
            return self.base_forward(hidden_states, attention_mask, **kwargs)
        return _fused_layer(self, hidden_states, attention_mask=attention_mask, **kwargs)


def _fused_layer(layer, hidden_states, **attention_inputs):
    """A pre-LN layer with the attention residual add inside layer_norm2 (the MLP's LayerNorm)."""
    attn_out = layer.self_attn(hidden_states=layer.layer_norm1(hidden_states), **attention_inputs)[0]
    y, hidden_states = layer.layer_norm2(attn_out, hidden_states)
    return hidden_states + layer.mlp(y)


class ClipEncoderLayer4x(nn.Module, SwappedModule):
    """transformers 4.x's CLIP layer call (masks positional, as its encoder and gradient
    checkpointing pass them; a tuple returned), the attention residual add fused into layer_norm2."""

    def forward(self, hidden_states, attention_mask=None, causal_attention_mask=None, output_attentions=False):
        if output_attentions or fx_tracing():
            return self.base_forward(hidden_states, attention_mask, causal_attention_mask, output_attentions)
        return (_fused_layer(self, hidden_states, attention_mask=attention_mask,
                             causal_attention_mask=causal_attention_mask),)


class SiglipEncoderLayer4x(nn.Module, SwappedModule):
    """transformers 4.x's SigLIP layer call; as ClipEncoderLayer4x without the causal mask."""

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        if output_attentions or fx_tracing():
            return self.base_forward(hidden_states, attention_mask, output_attentions)
        return (_fused_layer(self, hidden_states, attention_mask=attention_mask),)


class ClipVisionEmbeddings(nn.Module, SwappedModule):
    """CLIP's and SigLIP's patch embedding, class token (CLIP) and position embeddings in one op."""

    def serves(self, pixel_values, interpolate_pos_encoding) -> bool:
        conv = self.patch_embedding
        if interpolate_pos_encoding or fx_tracing() or not isinstance(pixel_values, torch.Tensor):
            return False
        return (pixel_values.dim() == 4 and pixel_values.shape[1] == conv.in_channels
                and tuple(pixel_values.shape[2:]) == (self.image_size, self.image_size)
                and pixel_values.is_floating_point())

    def forward(self, pixel_values, interpolate_pos_encoding=False):
        if not self.serves(pixel_values, interpolate_pos_encoding):
            return self.base_forward(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        weight = self.patch_embedding.weight
        cls = getattr(self, "class_embedding", None)
        return patch_embed(pixel_values.to(weight.dtype), weight, self.patch_embedding.bias,
                           cls_token=None if cls is None else cls.view(1, 1, -1),
                           pos_embed=self.position_embedding(self.position_ids))


def embeddings_reason(embeddings) -> str:
    conv = getattr(embeddings, "patch_embedding", None)
    if not isinstance(conv, nn.Conv2d):
        return "its patch_embedding is not a Conv2d"
    if not (conv.stride == conv.kernel_size and conv.padding in ((0, 0), "valid") and conv.groups == 1
            and conv.dilation == (1, 1) and conv.kernel_size[0] == conv.kernel_size[1]):
        return "its patch_embedding is not a patchifying Conv2d"
    if not isinstance(getattr(embeddings, "position_embedding", None), nn.Embedding):
        return "its position_embedding is not an nn.Embedding"
    return ""


