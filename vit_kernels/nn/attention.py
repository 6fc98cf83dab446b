from dataclasses import dataclass
from typing import Optional, Sequence, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import HEAD_DIMS, HEAD_DIMS_TEXT, flash_attention
from ..ops.attention_varlen import cu_seqlens, flash_attention_varlen
from ._scripting import NotScriptable


@dataclass(frozen=True)
class PackedSequences:
    """Several sequences (images of different sizes) packed into one token dim of ``T`` rows:
    the layout `FlashAttention` and `FusedBlock` take with ``packed=``, tokens as ``[T, 1, D]``
    (one row per token, so a per-row scale such as drop path's is a per-token one).

    ``cu_seqlens`` int32 ``[n + 1]`` and ``lengths`` int64 ``[n]`` on the tokens' device;
    ``max_seqlen`` and ``offsets`` (the host's copy of cu_seqlens) for the grid and for slicing.
    """

    cu_seqlens: Tensor
    lengths: Tensor
    offsets: tuple
    max_seqlen: int

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device) -> "PackedSequences":
        cu = cu_seqlens(lengths, device)
        offsets = (0,)
        for n in lengths:
            offsets += (offsets[-1] + n,)
        return cls(cu, (cu[1:] - cu[:-1]).long(), offsets, max(lengths, default=0))

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    def per_token(self, per_sequence: Optional[Tensor]) -> Optional[Tensor]:
        """A ``[n]`` per-sequence factor repeated over each sequence's tokens, ``[T]``; None stays None."""
        if per_sequence is None:
            return None
        return per_sequence.repeat_interleave(self.lengths, output_size=self.num_tokens)

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
            raise ValueError(f"head dim dim/num_heads must be {HEAD_DIMS_TEXT}, got {dim}/{num_heads} = {head_dim}")
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
            raise ValueError(f"head dim {attn.head_dim} is not {HEAD_DIMS_TEXT}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.num_heads, fused.head_dim, fused.scale = attn.num_heads, attn.head_dim, attn.scale
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            module = getattr(attn, name, None)
            setattr(fused, name, module if module is not None else nn.Identity())
        return fused

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False, *,
                packed: Optional[PackedSequences] = None) -> Tensor:
        if packed is not None:
            return self._forward_packed(x, packed, attn_mask, is_causal)
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

    def _forward_packed(self, x: Tensor, packed: PackedSequences, attn_mask, is_causal) -> Tensor:
        """x ``[T, 1, D]`` (PackedSequences' layout): attention inside each sequence (flash_attention_varlen)."""
        if attn_mask is not None or is_causal:
            raise ValueError("packed sequences take no attn_mask or is_causal: each attends within itself")
        if x.dim() != 3 or x.shape[0] != packed.num_tokens or x.shape[1] != 1:
            raise ValueError(f"packed tokens must be [T, 1, D] with T = {packed.num_tokens}, got {tuple(x.shape)}")
        n_tokens = x.shape[0]
        qkv = self.qkv(x).reshape(n_tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(1)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = flash_attention_varlen(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen,
                                     packed.max_seqlen, softmax_scale=self.scale, dropout_p=dropout_p)
        x = self.norm(out.reshape(n_tokens, 1, self.num_heads * self.head_dim))
        return self.proj_drop(self.proj(x))
