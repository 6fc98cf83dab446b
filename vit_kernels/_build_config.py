"""What the csrc/ extension is built from, shared by setup.py and the first-use JIT build.

Imported by setup.py by file path (before the package or torch may be importable), so
it must not import torch or anything from vit_kernels at module level.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

EXTENSION_NAME = "vit_kernels._C"
SKIP_ENV = "VIT_KERNELS_SKIP_EXT"
# Machine code for sm_80 (A100) and sm_90 (H100/H200), plus PTX of the last for newer parts.
CUDA_ARCHES = ("8.0", "9.0")


def skip_requested() -> bool:
    return os.environ.get(SKIP_ENV, "0") not in ("", "0")


def cuda_home():
    """The CUDA toolkit root, or None when there is no nvcc.

    torch guesses the root as nvcc's grandparent directory, which is wrong when
    nvcc on PATH is a wrapper script (/usr/local/bin/nvcc here): the toolkit's
    headers and libcudart are then not where it looks. So the root is the one whose
    include/ has the CUDA runtime headers: $CUDA_HOME/$CUDA_PATH, nvcc's real
    grandparent, or /usr/local/cuda.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        if (Path(root) / "bin" / "nvcc").is_file() and (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return root
    return None


def use_cuda_home() -> None:
    """Point torch.utils.cpp_extension at cuda_home(); call before importing it (it reads CUDA_HOME once)."""
    root = cuda_home()
    if root is not None:
        os.environ.setdefault("CUDA_HOME", root)


def nvcc_version(root: str):
    """(major, minor) of the toolkit's nvcc, from `nvcc --version`; None when it cannot be read."""
    try:
        out = subprocess.run([str(Path(root) / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def build_cuda_sources(torch_cuda_version) -> bool:
    """CUDA sources are compiled whenever torch is a CUDA build and an nvcc of torch's CUDA
    major version is found (torch refuses to build with another major: e.g. torch 2.6's cu124
    wheels beside a CUDA 13 toolkit); otherwise the extension is built for the CPU alone.

    No GPU is needed: a wheel built on a GPU-less machine still runs on one.
    """
    root = cuda_home()
    if torch_cuda_version is None or root is None:
        return False
    found = nvcc_version(root)
    return found is not None and found[0] == int(str(torch_cuda_version).split(".")[0])


def cuda_arch_list() -> str:
    """CUDA_ARCHES in TORCH_CUDA_ARCH_LIST's notation. Older torch (2.6) adds its own arch flags
    to a JIT build from that variable, or else from the GPUs it sees, and fails on a machine
    without one (an IndexError in _get_cuda_arch_flags)."""
    return ";".join(CUDA_ARCHES) + "+PTX"


def sources(csrc: Path, with_cuda: bool):
    cpp = sorted(str(p) for p in csrc.glob("*.cpp"))
    cu = sorted(str(p) for p in (csrc / "cuda").glob("*.cu")) if with_cuda else []
    return cpp + cu


def compile_args(with_cuda: bool):
    # No -std flag: torch's build helpers pick the standard its headers need
    # (C++17 up to torch 2.9, C++20 after). -g0 overrides the -g that setup.py's build takes
    # from Python's own flags (the JIT build adds none): debug info for torch's headers is about
    # a third of each C++ file's compile time.
    cxx = ["-O3", "-g0"]
    args = {"cxx": cxx + (["-DVIT_KERNELS_WITH_CUDA"] if with_cuda else [])}
    if with_cuda:
        sms = [arch.replace(".", "") for arch in CUDA_ARCHES]
        args["nvcc"] = (["-O3", "-DVIT_KERNELS_WITH_CUDA"]
                        + [f"-gencode=arch=compute_{sm},code=sm_{sm}" for sm in sms]
                        + [f"-gencode=arch=compute_{sms[-1]},code=compute_{sms[-1]}"])
    return args
