"""The main job, `python -m vit_kernels.bench`, and the benchmark cases it shares with benchmarks/."""

import json
import os
import subprocess
import sys

import pytest
import torch

from vit_kernels.bench import PROVIDERS, layer_norm_case
from vit_kernels.testing import kernel_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_main_job_without_cuda(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "vit_kernels.bench", "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[0].startswith("No CUDA device")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["device"] == "cpu" and report["rows"]
    assert all(row["rule_ok"] and row["error_vs_eager"] is not None for row in report["rows"])
    assert "| add_layer_norm |" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "compile"])
def test_layer_norm_cases_run(provider, mode):
    """The closures the benchmarks time compute what they claim (compile is exercised on the GPU)."""
    case = layer_norm_case(provider, "tiny", 37, 96, mode, torch.float32, kernel_device())
    out = case.run()
    assert len(out) == (4 if mode == "fwd+bwd" else 2)
    assert all(torch.isfinite(t).all() for t in out)
    assert case.bytes_moved == (8 if mode == "fwd+bwd" else 4) * 37 * 96 * 4
