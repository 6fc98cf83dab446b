"""vit_kernels: fused Triton and CUDA kernels for Vision Transformers.

Import what you use from its subpackage: `vit_kernels.ops` (functions),
`vit_kernels.nn` (modules), `vit_kernels.models` (the reference ViT),
`vit_kernels.reference` (pure-PyTorch references); `vit_kernels.swap_modules(model)`
puts the fused modules into a model you already have; `vit_kernels.capture_train_step` and
`vit_kernels.capture_inference` replay a whole step from one CUDA graph (`vit_kernels.cuda_graph`).
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


def capture_train_step(model, optimizer, loss_fn, images, labels, **options):
    """One training step of `model` captured in a CUDA graph; see `vit_kernels.cuda_graph.capture_train_step`."""
    from .cuda_graph import capture_train_step as capture

    return capture(model, optimizer, loss_fn, images, labels, **options)


def capture_inference(model, images, **options):
    """`model(images)` captured in a CUDA graph; see `vit_kernels.cuda_graph.capture_inference`."""
    from .cuda_graph import capture_inference as capture

    return capture(model, images, **options)
