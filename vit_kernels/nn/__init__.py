"""Drop-in nn.Modules over the fused ops; parameter names match the modules they replace."""

from .layer_norm import FusedLayerNorm

__all__ = ["FusedLayerNorm"]
