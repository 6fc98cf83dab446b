"""swap_modules: put vit_kernels' fused modules into a ViT the user already has, in place.

Supported now: timm's VisionTransformer and the families built on it (DeiT, DeiT-3,
...), torchvision's VisionTransformer, and Hugging Face transformers' ViT, DeiT and
Dinov2 models (both the <= 5.8 and the 5.9+ layouts). `set_input_normalization` lets a
swapped timm ViT take uint8 images, normalized inside the patch-embedding op.
"""

from .summary import SwapSummary
from .timm_vit import set_input_normalization, swap_timm_vit
from .torchvision_vit import swap_torchvision_vit
from .transformers_vit import swap_transformers_vit


def swap_modules(model, *, attention: bool = True, mlp: bool = True, layer_norm: bool = True,
                 patch_embed: bool = True):
    """Swap fused modules into `model` in place; returns ``(model, summary)``.

    Parameters are shared, not copied, and every submodule keeps its name, so the
    state_dict keys and values stay exactly as they were. Only this model instance
    changes (instance attributes and, for the residual fusion, a per-instance
    forward_features): nothing in torch.nn or a library's namespace is touched.

    The flags turn a kind of swap off. `summary` (printable) lists what was swapped
    and what was left alone, with the reason.
    """
    summary = SwapSummary(type(model).__name__)
    kinds = dict(attention=attention, mlp=mlp, layer_norm=layer_norm, patch_embed=patch_embed)
    if _isinstance_of(model, "timm.models.vision_transformer", "VisionTransformer"):
        swap_timm_vit(model, summary, **kinds)
    elif _isinstance_of(model, "torchvision.models.vision_transformer", "VisionTransformer"):
        swap_torchvision_vit(model, summary, **kinds)
    elif _is_transformers_vit(model):
        swap_transformers_vit(model, summary, **kinds)
    else:
        summary.left_alone("", f"{type(model).__module__}.{type(model).__name__} is not a supported model "
                               "(supported: timm VisionTransformer and its families, torchvision VisionTransformer, "
                               "transformers ViT/DeiT/Dinov2)")
    return model, summary


def _is_transformers_vit(model) -> bool:
    return _isinstance_of(model, "transformers", "PreTrainedModel") and type(model).__name__.startswith(
        ("ViT", "DeiT", "Dinov2")
    )


def _isinstance_of(model, module: str, name: str) -> bool:
    """isinstance against a library class, without importing a library the user does not have."""
    import importlib
    import sys

    if module.split(".")[0] not in sys.modules:
        return False
    return isinstance(model, getattr(importlib.import_module(module), name))


__all__ = ["SwapSummary", "set_input_normalization", "swap_modules"]
