"""vit_kernels: fused Triton and CUDA kernels for Vision Transformers.

Import what you use from its subpackage: `vit_kernels.ops` (functions),
`vit_kernels.nn` (modules), `vit_kernels.models` (the reference ViT),
`vit_kernels.reference` (pure-PyTorch references); `vit_kernels.swap_modules(model)`
puts the fused modules into a model you already have.
This file imports none of them, so TRITON_INTERPRET can still be set after
`import vit_kernels` and before the kernels are defined.
"""

__version__ = "0.1.0"


def swap_modules(model, **kinds):
    """Swap vit_kernels' fused modules into `model` in place; see `vit_kernels.swap.swap_modules`.

    Imported lazily, so `import vit_kernels` stays free of Triton kernel definitions.
    """
    from .swap import swap_modules as swap

    return swap(model, **kinds)
