"""Build for vit_kernels.

The csrc/ extension is compiled here with ninja when torch is importable at build
time (`pip install --no-build-isolation -e .`), including the CUDA sources whenever
torch is a CUDA build and nvcc is found (no GPU needed). Under pip's default build
isolation torch is not importable, so nothing is compiled here and
vit_kernels/_extension.py compiles csrc/ on first use instead.
VIT_KERNELS_SKIP_EXT=1 skips the build-time compile.
"""

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
_spec = importlib.util.spec_from_file_location("_build_config", ROOT / "vit_kernels" / "_build_config.py")
build_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_config)


def extension_modules():
    if build_config.skip_requested():
        return [], {}
    build_config.use_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    with_cuda = build_config.build_cuda_sources(torch.version.cuda)
    make = CUDAExtension if with_cuda else CppExtension
    # Relative paths: setuptools refuses absolute source paths.
    srcs = [str(Path(s).relative_to(ROOT)) for s in build_config.sources(ROOT / "csrc", with_cuda)]
    ext = make(build_config.EXTENSION_NAME, srcs, extra_compile_args=build_config.compile_args(with_cuda))
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="vit_kernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for Vision Transformers, behind drop-in nn.Modules",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # csrc/ ships inside the package as vit_kernels._csrc so a wheel can JIT-compile it.
    packages=find_packages(include=["vit_kernels", "vit_kernels.*"]) + ["vit_kernels._csrc"],
    package_dir={"vit_kernels._csrc": "csrc"},
    package_data={"vit_kernels._csrc": ["*.c", "*.cpp", "*.h", "cuda/*.cu", "cuda/*.cuh"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.6", "triton>=3.6", "numpy", "ninja", "safetensors", "tqdm"],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-xdist>=3",
            "hypothesis>=6",
            "ninja",
            "pybind11",
            "timm>=1.0",
            "torchvision",
            "transformers",
            "scikit-learn",
            "pillow",
            "matplotlib",
        ],
        "train": ["scikit-learn", "pillow"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["vit-kernels-bench=vit_kernels.bench:main",
                                    "vit-kernels-train=vit_kernels.train.cli:main"]},
)
