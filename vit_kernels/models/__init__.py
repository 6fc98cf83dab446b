"""The reference ViT: `VisionTransformer`, its named variants and `create_model`.

Variants (width, depth, heads) from the paper: tiny 192/12/3 (DeiT's), small 384/12/6,
base 768/12/12, large 1024/24/16, huge 1280/32/16; patch 14, 16 or 32; 224 or 384
pixels: `vit_base_patch16_224`, `vit_huge_patch14_384`, ...
"""

from .vision_transformer import (
    VisionTransformer,
    attention_rollout,
    mean_attention_distance,
    resample_pos_embed,
)

VARIANTS = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
MODEL_CONFIGS = {
    f"vit_{size}_patch{patch}_{image}": dict(img_size=image, patch_size=patch, **config)
    for size, config in VARIANTS.items()
    for patch in (14, 16, 32)
    for image in (224, 384)
}


def create_model(name: str, **overrides) -> VisionTransformer:
    """The named variant, with any VisionTransformer argument overridden (num_classes, fused, ...)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODEL_CONFIGS))}")
    return VisionTransformer(**{**MODEL_CONFIGS[name], **overrides})


def _variant(name: str):
    def make(**overrides) -> VisionTransformer:
        return create_model(name, **overrides)

    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"{name}: {MODEL_CONFIGS[name]}; keyword arguments override it."
    return make


globals().update({name: _variant(name) for name in MODEL_CONFIGS})

__all__ = [
    "MODEL_CONFIGS",
    "VisionTransformer",
    "attention_rollout",
    "create_model",
    "mean_attention_distance",
    "resample_pos_embed",
    *MODEL_CONFIGS,
]
