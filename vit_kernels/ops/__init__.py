"""Fused ops: one file per op, each a Triton kernel (or the csrc/ extension) behind a custom op."""

from .attention import attention_probs, flash_attention, flash_attention_qkvpacked
from .attention_varlen import cu_seqlens, flash_attention_key_padded, flash_attention_varlen
from .bias_gelu import bias_gelu
from .bias_gelu_linear import bias_gelu_linear
from .layer_norm import add_layer_norm
from .patch_embed import patch_embed

__all__ = [
    "add_layer_norm",
    "attention_probs",
    "bias_gelu",
    "bias_gelu_linear",
    "cu_seqlens",
    "flash_attention",
    "flash_attention_qkvpacked",
    "flash_attention_key_padded",
    "flash_attention_varlen",
    "patch_embed",
]
