"""swap_modules: put vit_kernels' fused modules into a ViT the user already has, in place.

Supported: timm's VisionTransformer and the families built on it (DeiT, DeiT-3, CLIP- and
SigLIP-style, DINOv2, ...), torchvision's VisionTransformer, Hugging Face transformers'
ViT, DeiT, Dinov2, Dinov2WithRegisters, ViTMAE and ViTMSN models with any head (5.9+ layout),
and transformers' CLIP, SigLIP and SigLIP2 vision towers (alone, with a projection or a head,
or as the vision half of CLIPModel/SiglipModel/Siglip2Model). Any other model that holds
supported ones (a vision-language model's vision tower, a user's wrapper) has those swapped
and everything else left as it is.
`set_input_normalization` lets a swapped timm ViT take uint8 images, normalized inside the
patch-embedding op. How a module is swapped, and what stays: `_class_swap`.
"""

import importlib
import sys

from ._class_swap import Plan
from .summary import SwapSummary
from .timm_vit import set_input_normalization

SUPPORTED = ("timm VisionTransformer and its families, torchvision VisionTransformer, transformers "
             "ViT/DeiT/Dinov2/Dinov2WithRegisters/ViTMAE/ViTMSN (5.9+) and CLIP/SigLIP/SigLIP2 vision towers (5.x), "
             "or a model holding any of these")
# transformers' config.model_type of the models swap_modules plans whole (any head).
TRANSFORMERS_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "vit_mae", "vit_msn", "clip",
                            "clip_vision_model", "siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model")


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
    if family is not None:
        family(model, plan, **kinds)
    else:
        towers = _towers(model)
        if not towers:
            summary.left_alone("", "model", f"{type(model).__module__}.{type(model).__name__} is not a supported model "
                                            f"and holds none (supported: {SUPPORTED})")
            return model, summary
        for path, tower, planner in towers:
            tower_plan = Plan()
            planner(tower, tower_plan, **kinds)
            plan.merge(tower_plan, path)
        plan.leave("", "model", f"{type(model).__name__} is not a ViT: only the vision model(s) in it "
                                f"({', '.join(path for path, _, _ in towers)}) are swapped, everything else (a "
                                "language model, projectors, heads) is left as it is")
    if not plan.changes and not plan.left and not plan.already:
        plan.leave("", "model", "no module in it is one this swap knows")
    plan.apply(summary)
    return model, summary


def _family(model):
    """The planner for a model this swap plans whole, or None."""
    if _isinstance_of(model, "timm.models.vision_transformer", "VisionTransformer"):
        from .timm_vit import plan_timm_vit

        return plan_timm_vit
    if _isinstance_of(model, "torchvision.models.vision_transformer", "VisionTransformer"):
        from .torchvision_vit import plan_torchvision_vit

        return plan_torchvision_vit
    if (_isinstance_of(model, "transformers", "PreTrainedModel")
            and getattr(getattr(model, "config", None), "model_type", None) in TRANSFORMERS_MODEL_TYPES):
        from .transformers_vit import plan_transformers_vit

        return plan_transformers_vit
    return None


def _towers(model) -> list:
    """(path, module, planner) of the outermost submodules this swap plans whole."""
    towers = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(f"{outer}.") for outer, _, _ in towers):
            continue
        planner = _family(module)
        if planner is not None:
            towers.append((path, module, planner))
    return towers


def _isinstance_of(model, module: str, name: str) -> bool:
    """isinstance against a library class, without importing a library the user does not have."""
    if module.split(".")[0] not in sys.modules:
        return False
    return isinstance(model, getattr(importlib.import_module(module), name))


__all__ = ["SwapSummary", "set_input_normalization", "swap_modules"]
