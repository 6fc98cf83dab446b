"""Loading the csrc/ extension: the build-time vit_kernels._C, else a first-use JIT build.

`pip install -e .` under pip's default build isolation cannot import torch, so
setup.py compiles nothing and the first call to `load()` compiles csrc/ with
`torch.utils.cpp_extension.load` (ninja) into a cache directory, reused by every
later process: $VIT_KERNELS_CACHE, default ~/.cache/vit_kernels. The CUDA sources
are included by the same rule as setup.py (torch is a CUDA build and nvcc exists).
"""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from . import _build_config

_loaded_from = None
_module = None  # the extension's Python module, once loaded


def _csrc_dir() -> Path:
    package = Path(__file__).resolve().parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / "extension.cpp").is_file():
            return candidate
    raise RuntimeError(f"vit_kernels: the csrc/ sources are missing (looked in {package / '_csrc'} and {package.parent / 'csrc'})")


def _jit_build():
    """(the module, where it was built)"""
    _build_config.use_cuda_home()
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as err:
        raise RuntimeError(
            "vit_kernels: the C++ extension was not built at install time and ninja, needed to "
            "compile it now, is not installed: `pip install ninja`"
        ) from err
    with_cuda = _build_config.build_cuda_sources(torch.version.cuda)
    cache = Path(os.environ.get("VIT_KERNELS_CACHE", Path.home() / ".cache" / "vit_kernels"))
    build_dir = cache / f"torch-{torch.__version__}-{'cuda' if with_cuda else 'cpu'}"
    build_dir.mkdir(parents=True, exist_ok=True)
    args = _build_config.compile_args(with_cuda)
    # cpp_extension reads CUDA_HOME once, at its import; if something imported it before
    # use_cuda_home() ran, its guess may be wrong, so name the toolkit's dirs explicitly.
    cuda_root = _build_config.cuda_home() if with_cuda else None
    arch_list_before = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if with_cuda and arch_list_before is None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _build_config.cuda_arch_list()
    try:
        module = cpp_extension.load(
            name="vit_kernels_C",
            sources=_build_config.sources(_csrc_dir(), with_cuda),
            extra_cflags=args["cxx"],
            extra_cuda_cflags=args.get("nvcc"),
            extra_include_paths=[f"{cuda_root}/include"] if cuda_root else None,
            extra_ldflags=[f"-L{cuda_root}/lib64", f"-L{cuda_root}/lib"] if cuda_root else None,
            with_cuda=with_cuda,
            is_python_module=True,
            build_directory=str(build_dir),
        )
    except (RuntimeError, OSError) as err:
        raise RuntimeError(
            f"vit_kernels: compiling the C++ extension in {build_dir} failed; it needs a C++17 "
            f"compiler{' and nvcc' if with_cuda else ''} (set VIT_KERNELS_SKIP_EXT=1 to do without the "
            f"extension's ops). The build's last output:\n{str(err)[-3000:]}"
        ) from err
    finally:
        if arch_list_before is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
    return module, f"jit:{build_dir}"


def load() -> str:
    """Make the csrc/ ops available under torch.ops.vit_kernels; returns where they came from.

    Raises RuntimeError naming what is missing when the extension can be neither
    imported nor compiled, or when VIT_KERNELS_SKIP_EXT=1 turned it off.
    """
    global _loaded_from, _module
    if _loaded_from is not None:
        return _loaded_from
    try:
        import vit_kernels._C as module  # its static registrations define the ops

        _module, _loaded_from = module, "prebuilt"
    except ImportError:
        if _build_config.skip_requested():
            raise RuntimeError(
                f"vit_kernels: the C++ extension is not built and {_build_config.SKIP_ENV}=1 forbids "
                "compiling it; unset it (or reinstall without it) to use the extension's ops"
            ) from None
        _module, _loaded_from = _jit_build()
    return _loaded_from


def module():
    """The extension's Python module (its functions: csrc/block_step.cpp), loading it first."""
    load()
    return _module


def cuda_version() -> int:
    """CUDA runtime version the extension's CUDA sources were built against; 0 for a CPU-only build."""
    load()
    return int(torch.ops.vit_kernels.extension_cuda_version())


# ---- csrc/bound_launch.c: the bound launch path in C ----------------------------------------------
#
# A plain CPython extension (no torch, no CUDA headers), compiled on first use with the C compiler
# Triton itself needs to build its launchers, into the same cache directory, keyed by its source
# and the interpreter. Setting VIT_KERNELS_C_LAUNCH=0 keeps the Python path (ops/_launcher.py).

C_LAUNCH_ENV = "VIT_KERNELS_C_LAUNCH"
_bound_launch = None  # the module, or the reason there is none (a str)


def _build_bound_launch():
    source = _csrc_dir() / "bound_launch.c"
    text = source.read_bytes()
    tag = hashlib.sha256(text + sys.version.encode() + sysconfig.get_platform().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("VIT_KERNELS_CACHE", Path.home() / ".cache" / "vit_kernels"))
    target = cache / f"bound_launch-{tag}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not target.is_file():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if compiler is None:
            return "no C compiler (cc, gcc or clang) on PATH"
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            built = Path(scratch) / target.name
            command = [compiler, str(source), "-O2", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
                       "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                return f"compiling {source.name} failed: {(result.stderr or result.stdout)[-500:]}"
            os.replace(built, target)  # atomic: processes building at once each land a whole file
    spec = importlib.util.spec_from_file_location("vit_kernels._bound_launch", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bound_launch():
    """The compiled csrc/bound_launch.c module, or None where it is turned off (VIT_KERNELS_C_LAUNCH=0)
    or cannot be built (`bound_launch_unavailable()` says why): callers then keep the Python path."""
    global _bound_launch
    if os.environ.get(C_LAUNCH_ENV, "1") == "0":
        return None
    if _bound_launch is None:
        try:
            _bound_launch = _build_bound_launch()
        except (OSError, ImportError, RuntimeError, ValueError, subprocess.SubprocessError) as err:
            _bound_launch = f"{type(err).__name__}: {err}"
    return None if isinstance(_bound_launch, str) else _bound_launch


def bound_launch_unavailable():
    """Why bound_launch() returned None after it was asked, or None."""
    if os.environ.get(C_LAUNCH_ENV, "1") == "0":
        return f"{C_LAUNCH_ENV}=0"
    return _bound_launch if isinstance(_bound_launch, str) else None


def bound_launch_path() -> str:
    """Which path a bound launch takes in this process, for reports: in C, or in Python and why."""
    if bound_launch() is not None:
        return "in C (csrc/bound_launch.c)"
    return f"in Python ({bound_launch_unavailable()})"
