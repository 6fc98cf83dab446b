"""The csrc/ build mechanism: setup.py's ahead-of-time build and the first-use JIT build."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit_kernels import _build_config, _extension

ROOT = Path(__file__).resolve().parents[1]
CUDA_BUILD = _build_config.build_cuda_sources(torch.version.cuda)


def test_extension_loads_and_reports_its_build():
    where = _extension.load()
    assert where == "prebuilt" or where.startswith("jit:")
    version = _extension.cuda_version()
    if CUDA_BUILD:
        assert version >= 11000, "CUDA sources should have been compiled (torch is a CUDA build, nvcc exists)"
    else:
        assert version == 0


def test_setup_py_builds_the_extension(tmp_path):
    """`setup.py build_ext` with torch importable compiles csrc/ (CUDA sources too when nvcc exists:
    no GPU needed) into a library that registers the ops."""
    env = dict(os.environ, VIT_KERNELS_SKIP_EXT="0")
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=900,
    )
    built = list((tmp_path / "lib" / "vit_kernels").glob("_C*.so"))
    assert len(built) == 1, built
    code = (
        "import sys, torch\n"
        f"torch.ops.load_library({str(built[0])!r})\n"
        "print(torch.ops.vit_kernels.extension_cuda_version())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300)
    assert (int(out.stdout.strip()) > 0) == CUDA_BUILD


def test_skip_env_gives_a_clear_error(tmp_path):
    """VIT_KERNELS_SKIP_EXT=1 with no prebuilt extension: loading names the variable, never a traceback from ninja."""
    if list((ROOT / "vit_kernels").glob("_C*.so")):
        pytest.skip("a prebuilt vit_kernels._C is installed in the tree")
    code = (
        "from vit_kernels import _extension\n"
        "try:\n"
        "    _extension.load()\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = dict(os.environ, VIT_KERNELS_SKIP_EXT="1", VIT_KERNELS_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True, timeout=300)
    assert "VIT_KERNELS_SKIP_EXT=1" in out.stdout


def test_cuda_home_is_the_toolkit_root():
    root = _build_config.cuda_home()
    if shutil.which("nvcc") is None and root is None:
        pytest.skip("no nvcc on this machine")
    assert (Path(root) / "include" / "cuda_runtime_api.h").is_file()


def test_jit_build_after_cpp_extension_was_imported(tmp_path):
    """cpp_extension fixes CUDA_HOME at import; the JIT build must not depend on importing it first."""
    code = (
        "import torch.utils.cpp_extension\n"
        "from vit_kernels import _extension\n"
        "_extension.load()\n"
        "import os\n"
        "print(os.environ.get('TORCH_CUDA_ARCH_LIST'))\n"
        "print(_extension.cuda_version())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    env["VIT_KERNELS_CACHE"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    *_, arch_list, version = out.stdout.strip().splitlines()
    assert arch_list == "None", "the JIT build must leave TORCH_CUDA_ARCH_LIST as it found it"
    assert (int(version) > 0) == CUDA_BUILD


@pytest.mark.parametrize("torch_cuda, nvcc, expected", [
    ("13.0", (13, 0), True), ("13.0", (13, 2), True), ("12.4", (13, 0), False), ("13.0", (12, 8), False),
    ("13.0", None, False), (None, (13, 0), False),
])
def test_cuda_sources_need_nvcc_of_torchs_cuda_major(monkeypatch, torch_cuda, nvcc, expected):
    """torch refuses to compile CUDA sources with a toolkit of another major version (torch 2.6's
    cu124 wheels beside CUDA 13): the extension is then built for the CPU instead of failing."""
    monkeypatch.setattr(_build_config, "cuda_home", lambda: "/opt/cuda")
    monkeypatch.setattr(_build_config, "nvcc_version", lambda root: nvcc)
    assert _build_config.build_cuda_sources(torch_cuda) is expected


def test_nvcc_version_reads_the_toolkit():
    root = _build_config.cuda_home()
    if root is None:
        pytest.skip("no nvcc on this machine")
    major, minor = _build_config.nvcc_version(root)
    assert major >= 11 and minor >= 0
