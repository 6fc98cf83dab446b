"""Position embeddings at another resolution, and the (h, w) pair every size argument may be.

Here, not in models/, because FusedPatchEmbed resamples too and nn/ never imports models/.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def pair(value) -> tuple:
    """`value` as an (h, w) tuple: an int is square, a tuple or list is taken as it is."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def resample_pos_embed(pos_embed: Tensor, new_grid: tuple, old_grid: tuple, num_prefix_tokens: int = 1,
                       mode: str = "bicubic") -> Tensor:
    """Resample learned position embeddings ``[1, prefix + old_h*old_w, D]`` to a new patch grid.

    The paper's higher-resolution fine-tuning: the patch size is kept, so N grows, and the
    pre-trained embeddings are interpolated in 2-D over the grid (bicubic by default);
    the class-token (prefix) entries are kept as they are.
    """
    new_grid, old_grid = tuple(new_grid), tuple(old_grid)
    if new_grid == old_grid:
        return pos_embed
    if pos_embed.shape[1] != num_prefix_tokens + old_grid[0] * old_grid[1]:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} tokens, expected {num_prefix_tokens} + {old_grid[0]}x{old_grid[1]}"
        )
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False, antialias=mode in ("bicubic", "bilinear"))
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
