"""torchvision VisionTransformer: the encoder loop on fused kernels, every module and key kept.

torchvision's EncoderBlock holds an nn.MultiheadAttention (packed ``in_proj_weight``)
and an MLPBlock (a Sequential: Linear, GELU, Dropout, Linear, Dropout). Replacing them
would rename state_dict keys, so they stay; instead the Encoder instance gets a forward
that reads their parameters: q, k, v come from one F.linear with ``in_proj_weight`` viewed
as ``[B, N, 3, H, d]`` and go to flash_attention in place; fc1 runs bias-free and
bias_gelu adds its bias; and every residual add runs inside the LayerNorm after it
(ln_1, ln_2 of the next block, the encoder's ln).
"""

import types

import torch.nn.functional as F
from torch import nn

from ..nn.layer_norm import FusedLayerNorm
from ..nn.mlp import _gelu_approximation
from ..ops.attention import HEAD_DIMS, flash_attention
from ..ops.bias_gelu import bias_gelu
from ..ops.patch_embed import _register as _load_patch_embed
from ..ops.patch_embed import patch_embed
from .timm_vit import _is_plain_layer_norm


def _flash_mha_reason(mha: nn.MultiheadAttention) -> str:
    head_dim = mha.embed_dim // mha.num_heads
    if not mha.batch_first or not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        return "an nn.MultiheadAttention layout other than torchvision's (batch_first, packed in_proj, no bias_k/v)"
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} is not one of {HEAD_DIMS}"
    return ""


def _flash_mha(mha: nn.MultiheadAttention, x):
    b, n, d = x.shape
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).reshape(b, n, 3, mha.num_heads, d // mha.num_heads)
    q, k, v = qkv.unbind(2)
    out = flash_attention(q, k, v, dropout_p=mha.dropout if mha.training else 0.0)
    return mha.out_proj(out.reshape(b, n, d))


def _mlp_reason(mlp: nn.Module) -> str:
    layers = list(mlp.children())
    if len(layers) != 5 or not isinstance(layers[0], nn.Linear) or not isinstance(layers[3], nn.Linear):
        return f"{type(mlp).__name__} is not torchvision's MLPBlock (Linear, act, Dropout, Linear, Dropout)"
    try:
        _gelu_approximation(layers[1])
    except ValueError as why:
        return str(why)
    return ""


def _fused_mlp(mlp: nn.Module, x):
    fc1, act, drop1, fc2, drop2 = mlp.children()
    return drop2(fc2(drop1(bias_gelu(F.linear(x, fc1.weight), fc1.bias, _gelu_approximation(act)))))


def _process_input(self, x):
    """torchvision's _process_input (conv_proj -> [B, N, D]) on the fused patch embedding."""
    if x.dim() != 4 or tuple(x.shape[-2:]) != (self.image_size, self.image_size):
        return type(self)._process_input(self, x)  # torchvision's own check and message
    return patch_embed(x, self.conv_proj.weight, self.conv_proj.bias)


def _add_norm(norm, branch, residual):
    if isinstance(norm, FusedLayerNorm):
        return norm(branch, residual)
    h = branch if residual is None else residual + branch
    return norm(h), h


def _encoder_forward(flash_blocks: frozenset, mlp_blocks: frozenset):
    def forward(self, input):
        x = self.dropout(input + self.pos_embedding)
        branch, residual = x, None
        for i, block in enumerate(self.layers):
            y, residual = _add_norm(block.ln_1, branch, residual)
            attn = block.self_attention
            a = _flash_mha(attn, y) if i in flash_blocks else attn(y, y, y, need_weights=False)[0]
            y, residual = _add_norm(block.ln_2, block.dropout(a), residual)
            branch = _fused_mlp(block.mlp, y) if i in mlp_blocks else block.mlp(y)
        return _add_norm(self.ln, branch, residual)[0]

    return forward


def swap_torchvision_vit(model, summary, *, attention: bool, mlp: bool, layer_norm: bool, patch_embed: bool) -> None:
    encoder = model.encoder
    if "forward" in vars(encoder):
        summary.left_alone("encoder", "already swapped: a second call changes nothing")
        return
    flash_blocks, mlp_blocks = set(), set()
    for i, block in enumerate(encoder.layers):
        prefix = f"encoder.layers.{i}"
        if attention:
            why = _flash_mha_reason(block.self_attention)
            if why:
                summary.left_alone(f"{prefix}.self_attention", why)
            else:
                flash_blocks.add(i)
                summary.swap(f"{prefix}.self_attention", "flash_attention on its packed in_proj (module kept)")
        if mlp:
            why = _mlp_reason(block.mlp)
            if why:
                summary.left_alone(f"{prefix}.mlp", why)
            else:
                mlp_blocks.add(i)
                summary.swap(f"{prefix}.mlp", "bias-free fc1 + bias_gelu (module kept)")
        if layer_norm:
            for name in ("ln_1", "ln_2"):
                if _is_plain_layer_norm(getattr(block, name)):
                    setattr(block, name, FusedLayerNorm.from_layer_norm(getattr(block, name)))
                    summary.swap(f"{prefix}.{name}", "FusedLayerNorm")
    if layer_norm and _is_plain_layer_norm(encoder.ln):
        encoder.ln = FusedLayerNorm.from_layer_norm(encoder.ln)
        summary.swap("encoder.ln", "FusedLayerNorm")
    if patch_embed:
        if isinstance(model.conv_proj, nn.Conv2d) and model.conv_proj.stride == model.conv_proj.kernel_size:
            _load_patch_embed()  # build/load the extension now, not inside a torch.compile trace
            model._process_input = types.MethodType(_process_input, model)
            summary.swap("conv_proj", "vit_kernels.ops.patch_embed via a per-instance _process_input (module kept)")
        else:
            summary.left_alone("conv_proj", "a conv stem, not a single patchifying Conv2d")
    encoder.forward = types.MethodType(_encoder_forward(frozenset(flash_blocks), frozenset(mlp_blocks)), encoder)
    summary.swap("encoder.forward", "the encoder loop on the fused kernels, residual adds fused into the LayerNorms "
                                    "(per instance)")
