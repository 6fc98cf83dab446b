from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.patch_embed import load, patch_embed
from ._scripting import NotScriptable
from .pos_embed import pair, resample_pos_embed

torch.fx.wrap("patch_embed")  # a leaf of torch.fx's symbolic trace, as in nn/attention.py


class FusedPatchEmbed(NotScriptable, nn.Module):
    """timm's `PatchEmbed` (same attributes, same ``proj`` Conv2d parameters) on the fused op.

    ``forward(images)`` returns the patch tokens ``[B, N, D]`` like timm's.
    ``forward(images, cls_token=..., pos_embed=..., mean=..., std=...)`` also places the
    class token, adds the position embeddings and normalizes (uint8) images, all inside the
    one op. When the images' grid differs from ``grid_size`` (fine-tuning at a higher
    resolution), ``pos_embed`` (given for ``grid_size``) is resampled bicubically over the
    2-D grid, its class entry kept.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768, bias: bool = True):
        super().__init__()
        self.img_size = pair(img_size)
        self.patch_size = pair(patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"patch_size must be square, got {self.patch_size}")
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        load()  # compile/load the extension now, not inside a torch.compile trace

    def forward(
        self,
        images: Tensor,
        cls_token: Optional[Tensor] = None,
        pos_embed: Optional[Tensor] = None,
        mean: Optional[Tensor] = None,
        std: Optional[Tensor] = None,
    ) -> Tensor:
        if pos_embed is not None and images.dim() == 4:
            grid = (images.shape[-2] // self.patch_size[0], images.shape[-1] // self.patch_size[1])
            if grid != self.grid_size:
                prefix = pos_embed.shape[1] - self.num_patches
                pos_embed = resample_pos_embed(pos_embed, grid, self.grid_size, num_prefix_tokens=prefix)
        return patch_embed(images, self.proj.weight, self.proj.bias, cls_token=cls_token, pos_embed=pos_embed,
                           mean=mean, std=std)
