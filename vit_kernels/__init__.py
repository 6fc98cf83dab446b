"""vit_kernels: fused Triton and CUDA kernels for Vision Transformers.

Import what you use from its subpackage: `vit_kernels.ops` (functions),
`vit_kernels.nn` (modules), `vit_kernels.reference` (pure-PyTorch references).
This file imports none of them, so TRITON_INTERPRET can still be set after
`import vit_kernels` and before the kernels are defined.
"""

__version__ = "0.1.0"
