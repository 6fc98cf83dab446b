"""Fused ops: one file per op, each a Triton kernel (or the csrc/ extension) behind a custom op."""

from .layer_norm import add_layer_norm

__all__ = ["add_layer_norm"]
