"""Pure-PyTorch references of every vit_kernels op.

Each function here is three things at once: the CPU path when Triton's interpreter
is off, the oracle of the tests (called on float64 copies of the inputs), and the
eager baseline of the benchmarks (called in the activation dtype). So they are
written the way eager PyTorch code computes the op, with its roundings, and they
follow the public op's signature and dtype rules exactly.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def residual_dtype(x: Tensor, residual: Optional[Tensor], residual_in_fp32: bool) -> torch.dtype:
    """The dtype of add_layer_norm's residual output (`h_new`)."""
    if residual_in_fp32:
        return torch.float32 if x.dtype != torch.float64 else torch.float64
    return residual.dtype if residual is not None else x.dtype


def add_layer_norm(
    x: Tensor,
    residual: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    *,
    gamma: Optional[Tensor] = None,
    row_scale: Optional[Tensor] = None,
    residual_in_fp32: bool = False,
) -> tuple[Tensor, Tensor]:
    """`h_new = residual + row_scale[b] * gamma * x; y = LayerNorm(h_new)`; returns (y, h_new).

    The branch is scaled and added in the operands' own dtypes, as timm's block does
    (`x + drop_path(ls(branch))`); the LayerNorm statistics and affine run in at least
    float32 (what PyTorch's layer_norm kernels do internally for 16-bit inputs, so where all
    dtypes agree it is F.layer_norm itself) and y is rounded once to x's dtype.
    """
    branch = x
    if gamma is not None:
        branch = branch * gamma
    if row_scale is not None:
        branch = branch * row_scale.reshape((-1,) + (1,) * (x.dim() - 1))
    h_dtype = residual_dtype(x, residual, residual_in_fp32)
    h_new = branch.to(h_dtype) if residual is None else (residual + branch).to(h_dtype)
    if x.dtype == h_dtype and all(t is None or t.dtype == h_dtype for t in (weight, bias)):
        # Eager's own call: PyTorch's layer_norm kernels compute 16-bit inputs in float32 and
        # round y once, without the float32 copies of h_new, weight and bias below.
        return F.layer_norm(h_new, (x.shape[-1],), weight, bias, eps), h_new
    compute = torch.promote_types(h_dtype, torch.float32)
    y = F.layer_norm(
        h_new.to(compute),
        (x.shape[-1],),
        None if weight is None else weight.to(compute),
        None if bias is None else bias.to(compute),
        eps,
    )
    return y.to(x.dtype), h_new


def attention_probs(q: Tensor, k: Tensor, softmax_scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) as ``[B, H, N_q, N_kv]`` for q ``[B, N_q, H, d]``, k ``[B, N_kv, H, d]``.

    Computed in (at least) float32 and returned in float32: these are the maps the
    ViT paper visualizes (attention rollout, mean attention distance), not a training path.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), k.to(compute)) * scale
    return scores.softmax(dim=-1)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: Optional[float] = None,
    dropout_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Eager attention as timm computes it with fused_attn off: ``[B, N_q, H, d]`` in, out.

    ``q @ k^T * scale``, softmax, optional dropout (``dropout_mask`` ``[B, H, N_q, N_kv]``,
    True = keep, kept values scaled by ``1 / (1 - dropout_p)``), ``@ v``, each step in
    the inputs' dtype (matmuls accumulate in float32 and round; softmax runs in float32
    internally), so its rounding is eager's.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, d]
    attn = (qt * scale) @ kt.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    if dropout_mask is not None:
        attn = attn * dropout_mask.to(attn.dtype) / (1.0 - dropout_p)
    return (attn @ vt).transpose(1, 2).contiguous()


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """Eager GELU of each form: F.gelu for ``"none"`` and ``"tanh"``; for ``"quick"``,
    quick_gelu as transformers' QuickGELUActivation and timm's QuickGELU compute it,
    ``x * sigmoid(1.702 x)`` in x's dtype (three roundings in 16-bit dtypes)."""
    if approximate == "quick":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate=approximate)


def bias_gelu(x: Tensor, bias: Optional[Tensor], approximate: str = "none") -> Tensor:
    """``gelu(x + bias)`` as eager computes it after a bias-free Linear: the sum is rounded to
    x's dtype, then GELU (float32 inside PyTorch's kernel) is rounded once more."""
    pre = x if bias is None else (x + bias).to(x.dtype)
    return gelu(pre, approximate)


def bias_gelu_linear(x: Tensor, bias: Optional[Tensor], weight: Tensor, linear_bias: Optional[Tensor],
                     approximate: str = "none") -> Tensor:
    """``F.linear(gelu(x + bias), weight, linear_bias)``: eager's GELU and fc2 after a bias-free fc1."""
    return F.linear(bias_gelu(x, bias, approximate), weight, linear_bias)


def patch_embed(
    images: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    cls_token: Optional[Tensor] = None,
    pos_embed: Optional[Tensor] = None,
    mean: Optional[Tensor] = None,
    std: Optional[Tensor] = None,
) -> Tensor:
    """Eager patch embedding: normalize, Conv2d(stride = kernel = P), flatten, cls concat, pos add.

    uint8 images are scaled by 1/255 first; the conv runs in the images' float dtype
    (the weight's for uint8 images). pos_embed ``[1, N+1, D]`` is added after the class
    token is concatenated, ``[1, N, D]`` before (timm's no_embed_class).
    """
    dtype = weight.dtype if images.dtype == torch.uint8 else images.dtype
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    if mean is not None:
        x = (x.float() - mean.float().view(1, -1, 1, 1)) / std.float().view(1, -1, 1, 1)
    x = x.to(dtype)
    tokens = F.conv2d(x, weight.to(dtype), None if bias is None else bias.to(dtype), stride=weight.shape[-1])
    tokens = tokens.flatten(2).transpose(1, 2)
    n = tokens.shape[1]
    if pos_embed is not None and pos_embed.shape[1] == n:
        tokens = tokens + pos_embed.to(dtype)
    if cls_token is not None:
        tokens = torch.cat([cls_token.to(dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)
    if pos_embed is not None and pos_embed.shape[1] == n + 1:
        tokens = tokens + pos_embed.to(dtype)
    return tokens


def attention_key_padded(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor,
                         softmax_scale: Optional[float] = None) -> Tensor:
    """`attention` of ``[B, N, H, d]`` q over the keys where ``key_valid`` ``[B, M]`` is True, as
    eager attention with a key padding mask computes it (scores of masked keys at -inf); every
    query row, padded or not, attends to its batch's valid keys. A batch with no valid key gets 0."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    attn = ((qt * scale) @ kt.transpose(-2, -1)).masked_fill(~key_valid[:, None, None, :], float("-inf"))
    attn = attn.softmax(dim=-1).nan_to_num(0.0)
    return (attn @ vt).transpose(1, 2).contiguous()


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     softmax_scale: Optional[float] = None, dropout_masks: Optional[list] = None,
                     dropout_p: float = 0.0) -> Tensor:
    """`attention` on each packed sequence of ``[T, H, d]`` tensors (flash-attn's varlen layout),
    one at a time; reads cu_seqlens on the host. ``dropout_masks``: one ``[1, H, n_q, n_kv]``
    keep mask per sequence; without it and with dropout_p > 0, masks are drawn with torch.rand.
    A query sequence with no keys gets 0."""
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    pieces = []
    for i in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
        if q1 == q0 or k1 == k0:
            pieces.append(out[q0:q1])
            continue
        mask = None if dropout_masks is None else dropout_masks[i]
        if mask is None and dropout_p > 0:
            mask = torch.rand(1, q.shape[1], q1 - q0, k1 - k0, device=q.device) >= dropout_p
        pieces.append(attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], softmax_scale, mask, dropout_p)[0])
    return torch.cat(pieces) if pieces else out
