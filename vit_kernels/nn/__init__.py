"""Drop-in nn.Modules over the fused ops; parameter names match the modules they replace."""

from .attention import FlashAttention, PackedSequences
from .block import DropPath, FusedBlock, LayerScale, run_blocks_fused
from .layer_norm import FusedLayerNorm
from .mlp import FusedMlp
from .patch_embed import FusedPatchEmbed
from .pos_embed import resample_pos_embed

__all__ = [
    "DropPath",
    "FlashAttention",
    "FusedBlock",
    "FusedLayerNorm",
    "FusedMlp",
    "FusedPatchEmbed",
    "LayerScale",
    "PackedSequences",
    "resample_pos_embed",
    "run_blocks_fused",
]
