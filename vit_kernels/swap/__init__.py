"""swap_modules: put vit_kernels' fused modules into a ViT the user already has, in place.

Supported: timm's VisionTransformer and the families built on it (DeiT, DeiT-3, CLIP- and
SigLIP-style, DINOv2, ...), torchvision's VisionTransformer, and Hugging Face transformers'
ViT, DeiT, Dinov2, Dinov2WithRegisters, ViTMAE and ViTMSN models with any head (5.9+ layout).
`set_input_normalization` lets a swapped timm ViT take uint8 images, normalized inside the
patch-embedding op. How a module is swapped, and what stays: `_class_swap`.
"""

import importlib
import sys

from ._class_swap import Plan
from .summary import SwapSummary
from .timm_vit import set_input_normalization

SUPPORTED = ("timm VisionTransformer and its families, torchvision VisionTransformer, transformers "
             "ViT/DeiT/Dinov2/Dinov2WithRegisters/ViTMAE/ViTMSN (5.9+)")


def swap_modules(model, *, attention: bool = True, mlp: bool = True, layer_norm: bool = True,
                 patch_embed: bool = True):
    """Swap fused modules into `model` in place; returns ``(model, summary)``.

    A module is swapped only when its class is one the swap knows computes what the fused
    module computes; the module object stays (its parameters, buffers, hooks, attributes),
    only its class becomes a subclass whose forward runs the fused kernels for the calls they
    reproduce and the library's own forward for every other (masks, attention maps, FX
    tracing, ...). So the state_dict keys and values are exactly as they were, and nothing
    outside the model changes (no library class, config or registry).

    The whole swap is planned before anything changes and is applied all at once: a swap
    that fails leaves the model as it was. A second call changes nothing and says so.

    The flags turn a kind of swap off. `summary` (printable) lists, per module, what was
    swapped, what was left alone and why, and what was swapped before, with counts per kind.
    """
    summary = SwapSummary(type(model).__name__)
    kinds = dict(attention=attention, mlp=mlp, layer_norm=layer_norm, patch_embed=patch_embed)
    plan = Plan()
    family = _family(model)
    if family is None:
        summary.left_alone("", "model", f"{type(model).__module__}.{type(model).__name__} is not a supported model "
                                        f"(supported: {SUPPORTED})")
        return model, summary
    family(model, plan, **kinds)
    if not plan.changes and not plan.left and not plan.already:
        plan.leave("", "model", "no module in it is one this swap knows")
    plan.apply(summary)
    return model, summary


def _family(model):
    """The planner for the model's library, or None."""
    if _isinstance_of(model, "timm.models.vision_transformer", "VisionTransformer"):
        from .timm_vit import plan_timm_vit

        return plan_timm_vit
    if _isinstance_of(model, "torchvision.models.vision_transformer", "VisionTransformer"):
        from .torchvision_vit import plan_torchvision_vit

        return plan_torchvision_vit
    if _isinstance_of(model, "transformers", "PreTrainedModel"):
        from .transformers_vit import plan_transformers_vit

        return plan_transformers_vit
    return None


def _isinstance_of(model, module: str, name: str) -> bool:
    """isinstance against a library class, without importing a library the user does not have."""
    if module.split(".")[0] not in sys.modules:
        return False
    return isinstance(model, getattr(importlib.import_module(module), name))


__all__ = ["SwapSummary", "set_input_normalization", "swap_modules"]
