"""The accelerated training job: ``python -m vit_kernels.train`` (also ``vit-kernels-train``).

Trains our reference ViT (by name) or a timm model (with `swap_modules` applied) on
scikit-learn's digits (default), an image folder or synthetic data; see ``--help``.
Modules: `cli` (arguments, exit codes), `job` (the loop), `data`, `checkpoint`.
"""

from .cli import main

__all__ = ["main"]
