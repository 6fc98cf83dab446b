from typing import Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import HEAD_DIMS, flash_attention
from ._scripting import NotScriptable

# A leaf of torch.fx's symbolic trace (timm's and torchvision's feature extractors): the op
# validates its inputs with Python control flow that a trace cannot follow.
torch.fx.wrap("flash_attention")


class FlashAttention(NotScriptable, nn.Module):
    """Multi-head self-attention with timm `Attention`'s parameters, on vit_kernels' flash attention.

    Submodule names match timm's `Attention` (``qkv``, ``q_norm``, ``k_norm``,
    ``attn_drop``, ``norm``, ``proj``, ``proj_drop``), so a timm block's state_dict loads
    with ``strict=True``. The qkv Linear's output is viewed as ``[B, N, 3, H, d]`` and
    attention reads q, k, v from it in place; its output is ``[B, N, H, d]`` contiguous,
    so the reshape for ``proj`` is free: no permute copy on either side (timm's path
    permutes to ``[3, B, H, N, d]`` and back).

    ``forward(x, attn_mask=None, is_causal=False)``: with a mask (or causal), the unfused
    PyTorch path (`F.scaled_dot_product_attention`) runs instead: the kernel has no masking.
    ``attn_drop`` acts on the attention probabilities in training mode, as in timm.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        head_dim = dim // num_heads
        if head_dim not in HEAD_DIMS:
            raise ValueError(f"head dim dim/num_heads must be one of {HEAD_DIMS}, got {dim}/{num_heads} = {head_dim}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, attn: nn.Module) -> "FlashAttention":
        """A FlashAttention over a timm `Attention`'s own submodules (shared, not copied).

        Raises ValueError when the module is not one this kernel can run (gated attention,
        an unsupported head dim).
        """
        if getattr(attn, "gate", None) is not None:
            raise ValueError("gated attention (timm's gated=True) is not fused")
        if attn.head_dim not in HEAD_DIMS:
            raise ValueError(f"head dim {attn.head_dim} is not one of {HEAD_DIMS}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.num_heads, fused.head_dim, fused.scale = attn.num_heads, attn.head_dim, attn.scale
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            module = getattr(attn, name, None)
            setattr(fused, name, module if module is not None else nn.Identity())
        return fused

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        batch, n_tokens, _ = x.shape
        dim = self.num_heads * self.head_dim
        qkv = self.qkv(x).reshape(batch, n_tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)
        # q_norm/k_norm normalize over d, which is the last dim in this layout too.
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if attn_mask is None and not is_causal:
            out = flash_attention(q, k, v, softmax_scale=self.scale, dropout_p=dropout_p)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
                dropout_p=dropout_p, is_causal=is_causal, scale=self.scale,
            ).transpose(1, 2)
        x = self.norm(out.reshape(batch, n_tokens, dim))
        return self.proj_drop(self.proj(x))
