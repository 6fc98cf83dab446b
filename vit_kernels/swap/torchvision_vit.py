"""torchvision VisionTransformer: every module and key kept, each on the fused kernels by class.

torchvision's EncoderBlock holds an nn.MultiheadAttention (packed ``in_proj_weight``) and an
MLPBlock (a Sequential: Linear, GELU, Dropout, Linear, Dropout). Their classes are swapped,
objects kept: the attention reads q, k, v out of one F.linear with ``in_proj_weight`` as
``[B, N, 3, H, d]`` views; fc1 runs bias-free and bias_gelu adds its bias; the block runs its
attention residual add inside ln_2; and the encoder carries (branch, residual) from block to
block so every residual add runs inside the LayerNorm after it, ending in the encoder's ln.
Blocks are still called as modules; with a hook of the user's on a block (or under FX
tracing) the encoder runs torchvision's own loop, so hooks see torchvision's calls.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.layer_norm import FusedLayerNorm
from ..nn.mlp import gelu_approximation
from ..ops.attention import HEAD_DIMS, HEAD_DIMS_TEXT, flash_attention
from ..ops.bias_gelu import bias_gelu
from ..ops.patch_embed import load as load_patch_embed
from ..ops.patch_embed import patch_embed
from ._class_swap import Plan, SwappedModule, fx_tracing, has_user_hooks, is_swapped
from .timm_vit import plan_layer_norm

torch.fx.wrap("flash_attention")
torch.fx.wrap("bias_gelu")
torch.fx.wrap("patch_embed")


class TorchvisionAttention(nn.Module, SwappedModule):
    """nn.MultiheadAttention on flash_attention for torchvision's call (self-attention, batch first,
    no masks, no weights); every other call is torch's own forward."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if (query is not key or key is not value or need_weights or key_padding_mask is not None
                or attn_mask is not None or is_causal or query.dim() != 3):
            return self.base_forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                     attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                     is_causal=is_causal)
        b, n, d = query.shape
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias).reshape(b, n, 3, self.num_heads,
                                                                               d // self.num_heads)
        q, k, v = qkv.unbind(2)
        out = flash_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.reshape(b, n, d)), None


class TorchvisionMlp(nn.Module, SwappedModule):
    """torchvision's MLPBlock with fc1's bias fused into the GELU."""

    def forward(self, input):
        fc1, act, drop1, fc2, drop2 = self.children()
        if fx_tracing() or has_user_hooks(fc1) or has_user_hooks(act):
            return self.base_forward(input)
        return drop2(fc2(drop1(bias_gelu(F.linear(input, fc1.weight), fc1.bias, gelu_approximation(act)))))


def _add_norm(norm, branch, residual):
    if residual is None:
        return norm(branch), branch
    return norm(branch, residual)


class TorchvisionBlock(nn.Module, SwappedModule):
    """torchvision's EncoderBlock with its attention residual add fused into ln_2;
    ``block(branch, residual, carry=True)`` is the encoder's carried-stream step."""

    def forward(self, input, residual=None, carry: bool = False):
        if fx_tracing():
            return self.base_forward(input)
        if not carry:
            torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        y, residual = _add_norm(self.ln_1, input, residual)
        attn = self.self_attention(y, y, y, need_weights=False)[0]
        y, residual = self.ln_2(self.dropout(attn), residual)
        branch = self.mlp(y)
        return (branch, residual) if carry else residual + branch


class TorchvisionEncoder(nn.Module, SwappedModule):
    """torchvision's Encoder carrying the residual stream across blocks into its final ln."""

    def forward(self, input):
        if fx_tracing() or not isinstance(self.ln, FusedLayerNorm) or not all(
                isinstance(block, TorchvisionBlock) and not has_user_hooks(block) for block in self.layers):
            return self.base_forward(input)
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        branch, residual = self.dropout(input + self.pos_embedding), None
        for block in self.layers:
            branch, residual = block(branch, residual, carry=True)
        return self.ln(branch, residual)[0]


class TorchvisionViT(nn.Module, SwappedModule):
    """torchvision's VisionTransformer with _process_input (conv_proj -> [B, N, D]) on the fused patch embedding."""

    def _process_input(self, x):
        if (fx_tracing() or x.dim() != 4 or tuple(x.shape[-2:]) != (self.image_size, self.image_size)
                or x.dtype != self.conv_proj.weight.dtype or has_user_hooks(self.conv_proj)):
            return self._vk_base._process_input(self, x)  # torchvision's own checks and messages
        return patch_embed(x, self.conv_proj.weight, self.conv_proj.bias)


def _mha_reason(mha) -> str:
    if type(mha) is not nn.MultiheadAttention:
        return f"{type(mha).__name__} is not nn.MultiheadAttention"
    if not mha.batch_first or not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        return "an nn.MultiheadAttention layout other than torchvision's (batch_first, packed in_proj, no bias_k/v)"
    head_dim = mha.embed_dim // mha.num_heads
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} is not {HEAD_DIMS_TEXT}"
    return ""


def _mlp_reason(mlp) -> str:
    from torchvision.models.vision_transformer import MLPBlock

    layers = list(mlp.children())
    if type(mlp) is not MLPBlock or len(layers) != 5 or not isinstance(layers[0], nn.Linear) \
            or not isinstance(layers[3], nn.Linear):
        return f"{type(mlp).__name__} is not torchvision's MLPBlock (Linear, act, Dropout, Linear, Dropout)"
    try:
        gelu_approximation(layers[1])
    except ValueError as why:
        return str(why)
    return ""


def plan_torchvision_vit(model, plan: Plan, *, attention: bool, mlp: bool, layer_norm: bool,
                         patch_embed: bool) -> None:
    from torchvision.models.vision_transformer import Encoder, EncoderBlock, VisionTransformer

    fused_norms = set()
    for path, module in model.named_modules():
        if isinstance(module, FusedLayerNorm):
            fused_norms.add(id(module))
        if is_swapped(module) or isinstance(module, FusedLayerNorm):
            plan.already.append((path, "layer_norm" if isinstance(module, nn.LayerNorm) else "model"))
            continue
        if isinstance(module, nn.MultiheadAttention) and attention:
            why = _mha_reason(module)
            if why:
                plan.leave(path, "attention", why)
            else:
                plan.swap_class(module, TorchvisionAttention, path, "attention",
                                "flash_attention on its packed in_proj (module kept)")
        elif type(module).__name__ == "MLPBlock" and mlp:
            why = _mlp_reason(module)
            if why:
                plan.leave(path, "mlp", why)
            else:
                plan.swap_class(module, TorchvisionMlp, path, "mlp", "bias-free fc1 + bias_gelu (module kept)")
        elif isinstance(module, nn.LayerNorm) and layer_norm:
            if plan_layer_norm(plan, module, path):
                fused_norms.add(id(module))
    encoder = model.encoder
    for i, block in enumerate(encoder.layers):
        path = f"encoder.layers.{i}"
        if is_swapped(block):
            continue
        if type(block) is not EncoderBlock:
            plan.leave(path, "block", f"{type(block).__name__} is not torchvision's EncoderBlock")
        elif not (id(block.ln_1) in fused_norms and id(block.ln_2) in fused_norms):
            plan.leave(path, "block", "its LayerNorms are not fused (layer_norm=False, or not nn.LayerNorm)")
        else:
            plan.swap_class(block, TorchvisionBlock, path, "block", "attention residual add fused into ln_2")
    if not is_swapped(encoder):
        if type(encoder) is Encoder and id(encoder.ln) in fused_norms:
            plan.swap_class(encoder, TorchvisionEncoder, "encoder", "model",
                            "residual adds fused into the LayerNorms across blocks")
        else:
            plan.leave("encoder", "model", "residual adds not fused across blocks: its final ln is not fused")
    if patch_embed and not is_swapped(model):
        conv = model.conv_proj
        if type(model)._process_input is not VisionTransformer._process_input:
            plan.leave("conv_proj", "patch_embed", f"{type(model).__name__} overrides _process_input")
        elif isinstance(conv, nn.Conv2d) and conv.stride == conv.kernel_size and conv.padding == (0, 0):
            load_patch_embed()  # build/load the extension now, not inside a torch.compile trace
            plan.swap_class(model, TorchvisionViT, "conv_proj", "patch_embed",
                            "vit_kernels.ops.patch_embed via _process_input (module kept)")
        else:
            plan.leave("conv_proj", "patch_embed", "a conv stem, not a single patchifying Conv2d")
