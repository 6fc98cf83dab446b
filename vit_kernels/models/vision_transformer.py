"""The ViT of Dosovitskiy et al. (2021), with timm's state_dict keys, eager or fused.

Patch embedding (a conv with stride = kernel = P, equal to the paper's linear map of
flattened P x P x C patches), a learnable class token, learned 1-D position embeddings,
pre-LN encoder blocks (``x = x + MSA(LN(x)); x = x + MLP(LN(x))``, GELU MLP), a final
LayerNorm, and a head on the class token (or on the mean of the patch tokens). The
pre-training head's representation layer (Linear + tanh) is an option.

``fused=False`` is plain eager PyTorch (attention through F.scaled_dot_product_attention,
as timm's default): the benchmark baseline. ``fused=True`` swaps in FlashAttention,
FusedMlp and FusedLayerNorm and carries (branch, residual) between blocks so that every
residual add, with layer scale and drop path, runs inside the LayerNorm after it. Both
have the same parameters and state_dict keys, identical to timm's VisionTransformer of
the same configuration, so timm checkpoints load with ``strict=True``.

With ``fused=True`` the patch embedding is FusedPatchEmbed: the patchify, the GEMM, the
class token and the position embeddings in one op (the csrc/ extension).
"""

import math
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import channel_normalization
from ..nn.attention import PackedSequences
from ..nn.block import DropPath, FusedBlock, LayerScale, finish_residual, run_blocks_fused
from ..nn.layer_norm import FusedLayerNorm
from ..nn.patch_embed import FusedPatchEmbed
from ..nn.pos_embed import pair, resample_pos_embed
from ..ops.attention import attention_probs


class PatchEmbed(nn.Module):
    """Image ``[B, C, H, W]`` -> patch tokens ``[B, N, D]``, N = HW / P^2 (timm's attribute names)."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = pair(img_size)
        self.patch_size = pair(patch_size)
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.proj.in_channels:
            raise ValueError(f"images must be [B, {self.proj.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[2] % self.patch_size[0] or x.shape[3] % self.patch_size[1]:
            raise ValueError(f"image size {tuple(x.shape[2:])} must be divisible by the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm's Attention, eager (F.scaled_dot_product_attention)."""

    def __init__(self, dim, num_heads, qkv_bias=True, qk_norm=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # eps 1e-6, as timm's ViT builds its qk-norm LayerNorms.
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(b, n, c))))


class Mlp(nn.Module):
    """timm's Mlp: fc1 -> GELU -> fc2."""

    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Block(nn.Module):
    """timm's pre-LN Block, eager."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, qk_norm=False, proj_drop=0.0, attn_drop=0.0,
                 init_values=None, drop_path=0.0, norm_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al., 2021) with timm-compatible state_dict keys.

    Args follow timm's VisionTransformer: img_size, patch_size, in_chans, num_classes,
    embed_dim, depth, num_heads, mlp_ratio, qkv_bias, global_pool ("token" | "avg"),
    class_token, pre_logits (the pre-training representation layer: Linear + tanh),
    drop_rate, attn_drop_rate, drop_path_rate (linearly increasing over depth),
    init_values (layer scale), qk_norm, backbone (hybrid: a module producing a feature
    map, embedded with patch size 1), fused.
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        global_pool: str = "token",
        class_token: bool = True,
        pre_logits: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        init_values: Optional[float] = None,
        qk_norm: bool = False,
        backbone: Optional[nn.Module] = None,
        fused: bool = True,
    ):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        self.fused = fused
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.backbone = backbone
        if backbone is not None:
            # The paper's hybrid: the CNN feature map is the "image", its positions the patches.
            with torch.no_grad():
                was_training = backbone.training
                probe_device = next(backbone.parameters(), torch.empty(0)).device
                feature = backbone.eval()(torch.zeros(1, in_chans, *pair(img_size), device=probe_device))
                backbone.train(was_training)
            make_embed = FusedPatchEmbed if fused else PatchEmbed
            self.patch_embed = make_embed(tuple(feature.shape[-2:]), 1, feature.shape[1], embed_dim)
        else:
            self.patch_embed = (FusedPatchEmbed if fused else PatchEmbed)(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + self.num_prefix_tokens, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        drop_paths = torch.linspace(0, drop_path_rate, depth).tolist()
        make_block = FusedBlock if fused else Block
        self.blocks = nn.Sequential(*[
            make_block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_drop=drop_rate,
                       attn_drop=attn_drop_rate, init_values=init_values, drop_path=drop_paths[i])
            for i in range(depth)
        ])
        use_fc_norm = global_pool == "avg"
        make_norm = FusedLayerNorm if fused else nn.LayerNorm
        self.norm = nn.Identity() if use_fc_norm else make_norm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.pre_logits = (
            nn.Sequential(OrderedDict(fc=nn.Linear(embed_dim, embed_dim), act=nn.Tanh())) if pre_logits else nn.Identity()
        )
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        # Normalization of uint8 images (set_input_normalization); not part of the state_dict.
        self.register_buffer("input_mean", None, persistent=False)
        self.register_buffer("input_std", None, persistent=False)
        self._init_weights()
        self.register_load_state_dict_pre_hook(self._resample_loaded_pos_embed)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of keeping its activations (timm's name)."""
        self.grad_checkpointing = enable

    def set_input_normalization(self, mean, std) -> None:
        """Per-channel mean/std (of images scaled to [0, 1]) for uint8 input.

        With it set, ``forward`` takes uint8 images ``[B, C, H, W]``: the fused model scales
        by 1/255 and normalizes inside the patch-embedding op (a data loader ships a quarter
        of float32's bytes); the eager model does the same in PyTorch first.
        """
        mean, std = channel_normalization(mean, std, self.in_chans)
        device = self.pos_embed.device
        self.input_mean, self.input_std = mean.to(device), std.to(device)

    def _init_weights(self):
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _resample_loaded_pos_embed(self, module, state_dict, prefix, *args, **kwargs):
        """Loading a checkpoint trained at another resolution: resample its pos_embed to this grid."""
        key = prefix + "pos_embed"
        loaded = state_dict.get(key)
        if loaded is None or loaded.shape == self.pos_embed.shape:
            return
        old_tokens = loaded.shape[1] - self.num_prefix_tokens
        side = math.isqrt(old_tokens)
        if side * side != old_tokens:
            raise ValueError(f"cannot resample {key} of shape {tuple(loaded.shape)}: its grid is not square")
        state_dict[key] = resample_pos_embed(loaded, self.patch_embed.grid_size, (side, side), self.num_prefix_tokens)

    # ---- forward -------------------------------------------------------------------------------

    def _embed(self, images: Tensor) -> Tensor:
        mean, std = None, None
        if images.dtype == torch.uint8:
            if self.input_mean is None:
                raise TypeError("uint8 images need set_input_normalization(mean, std) first")
            mean, std = self.input_mean, self.input_std
            if self.backbone is not None or not self.fused:
                images = ((images.float() / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).to(
                    self.pos_embed.dtype)
                mean, std = None, None
        if self.backbone is not None:
            images = self.backbone(images)
        if self.fused:
            # One op: (normalize,) patchify, GEMM, class token, position embeddings (resampled for another size).
            return self.pos_drop(self.patch_embed(images, cls_token=self.cls_token, pos_embed=self.pos_embed,
                                                  mean=mean, std=std))
        x = self.patch_embed(images)
        grid = (images.shape[-2] // self.patch_embed.patch_size[0], images.shape[-1] // self.patch_embed.patch_size[1])
        pos_embed = resample_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size, self.num_prefix_tokens)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.pos_drop(x + pos_embed)

    def forward_features(self, images: Tensor) -> Tensor:
        """Tokens after the encoder and its final norm, ``[B, N(+1), D]``."""
        x = self._embed(images)
        checkpoint = self.grad_checkpointing and torch.is_grad_enabled()
        if not self.fused:
            for block in self.blocks:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if checkpoint else block(x)
            return self.norm(x)
        if isinstance(self.norm, FusedLayerNorm):
            return run_blocks_fused(self.blocks, x, final_norm=self.norm, checkpoint=checkpoint)
        return self.norm(finish_residual(*run_blocks_fused(self.blocks, x, checkpoint=checkpoint)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.pre_logits(self.fc_norm(x))
        return x if pre_logits else self.head(self.head_drop(x))

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    # ---- packed batches: images of different sizes in one sequence (NaViT) ----------------------

    def forward_features_packed(self, images: Sequence[Tensor]) -> tuple[Tensor, PackedSequences]:
        """Tokens of images of different sizes after the encoder and its final norm, packed:
        ``([T, D], PackedSequences)``, image i's tokens rows ``offsets[i]:offsets[i + 1]``.

        Each image is ``[C, H, W]`` (any H, W divisible by the patch size); its position
        embeddings are resampled to its grid. ``fused=True`` embeds the images of each size
        together and runs the blocks once over all tokens, attention within each image
        (`flash_attention_varlen`), drop path per image; ``fused=False`` runs each image by
        itself (the reference: the same numbers, one forward per image)."""
        images = list(images)
        if not images:
            raise ValueError("images must hold at least one image")
        for i, image in enumerate(images):
            if not isinstance(image, Tensor) or image.dim() != 3:
                raise ValueError(f"images[{i}] must be a [C, H, W] tensor, got "
                                 f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
        if not self.fused:
            tokens = [self.forward_features(image[None])[0] for image in images]
            packed = PackedSequences.from_lengths([t.shape[0] for t in tokens], tokens[0].device)
            return torch.cat(tokens), packed
        by_size = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape), []).append(i)
        embedded = [None] * len(images)
        for indices in by_size.values():
            group = self._embed(torch.stack([images[i] for i in indices]))
            for row, i in enumerate(indices):
                embedded[i] = group[row]
        packed = PackedSequences.from_lengths([t.shape[0] for t in embedded], embedded[0].device)
        x = torch.cat(embedded)[:, None]  # [T, 1, D]: one row per token
        checkpoint = self.grad_checkpointing and torch.is_grad_enabled()
        if isinstance(self.norm, FusedLayerNorm):
            x = run_blocks_fused(self.blocks, x, final_norm=self.norm, checkpoint=checkpoint, packed=packed)
        else:
            x = self.norm(finish_residual(*run_blocks_fused(self.blocks, x, checkpoint=checkpoint, packed=packed)))
        return x[:, 0], packed

    def forward_head_packed(self, tokens: Tensor, packed: PackedSequences, pre_logits: bool = False) -> Tensor:
        """forward_head for each image of forward_features_packed's output: ``[n, num_classes]``."""
        starts, ends = packed.offsets[:-1], packed.offsets[1:]
        if self.global_pool == "avg":
            x = torch.stack([tokens[s + self.num_prefix_tokens:e].mean(dim=0) for s, e in zip(starts, ends)])
        else:
            x = tokens.index_select(0, packed.cu_seqlens[:-1])
        x = self.pre_logits(self.fc_norm(x))
        return x if pre_logits else self.head(self.head_drop(x))

    def forward_packed(self, images: Sequence[Tensor]) -> Tensor:
        """Logits ``[n, num_classes]`` of n images of different sizes in one packed batch
        (forward_features_packed, then the head on each image's class token or mean)."""
        return self.forward_head_packed(*self.forward_features_packed(images))

    # ---- analysis (the paper's Section 4.5) ------------------------------------------------------

    @torch.no_grad()
    def get_attention_maps(self, images: Tensor) -> list:
        """Per-layer attention probabilities ``[B, H, N, N]`` (float32), through the unfused
        reference path (`vit_kernels.ops.attention_probs`)."""
        x = self._embed(images)
        maps = []
        for block in self.blocks:
            y = block.norm1(x)
            attn = block.attn
            b, n, _ = y.shape
            q, k, _ = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).unbind(2)
            maps.append(attention_probs(attn.q_norm(q), attn.k_norm(k), softmax_scale=attn.scale))
            x = block(x)
        return maps


def attention_rollout(attention_maps: list, head_fusion: Callable = lambda a: a.mean(dim=1)) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020), as the ViT paper uses for its attention maps.

    Heads are fused (mean by default), the identity is added for the residual connection,
    rows are renormalized, and the layers' matrices are multiplied. Returns ``[B, N, N]``;
    row 0 (the class token) over the patch columns is the map the paper shows.
    """
    result = None
    for maps in attention_maps:
        a = head_fusion(maps.float())
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def mean_attention_distance(attention_maps: list, grid_size: tuple, patch_size: int, num_prefix_tokens: int = 1) -> Tensor:
    """Mean attention distance in pixels, ``[layers, B, H]`` (the paper's Figure 7).

    For each head: the distance between query and key patch centres, weighted by the
    attention between them, averaged over the query patches. Prefix (class) tokens are
    left out and the remaining weights renormalized.
    """
    gh, gw = grid_size
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    centres = torch.stack([ys.flatten(), xs.flatten()], dim=-1).float() * patch_size
    distance = torch.cdist(centres, centres)  # [N, N] pixels
    out = []
    for maps in attention_maps:
        a = maps[..., num_prefix_tokens:, num_prefix_tokens:].float()
        a = a / a.sum(dim=-1, keepdim=True)
        out.append((a * distance.to(a.device)).sum(dim=-1).mean(dim=-1))
    return torch.stack(out)
