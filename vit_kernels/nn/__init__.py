"""Drop-in nn.Modules over the fused ops; parameter names match the modules they replace."""

from .attention import FlashAttention
from .layer_norm import FusedLayerNorm
from .mlp import FusedMlp

__all__ = ["FlashAttention", "FusedLayerNorm", "FusedMlp"]
