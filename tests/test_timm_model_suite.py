"""timm's own model tests (tests/test_models.py of the installed timm), run on ViT-family models
with and without `swap_modules` after every `create_model`: the swapped run has no failure the
unswapped run does not have.

The timm file is fetched by ``bash scripts/get_timm_tests.sh`` (.ci/run does it first), never
copied here; without it this test skips with that command. TorchScript tests are left out of both
runs: a swapped model refuses torch.jit.script at once by design (tests/test_swap_safety.py).
CI runs `CI_MODELS`; ``VIT_KERNELS_TIMM_SUITE=full`` runs `FULL_MODELS` (about half an hour here).

The ops run through their PyTorch references in these runs (TRITON_INTERPRET unset): what is under
test is the swap itself (what it replaces, with which arguments, and what it leaves alone), at timm's
own shapes, which the interpreter could not run in CI's time; the kernels are held to the rule at
the swap's shapes in test_swap.py and test_swap_safety.py.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

timm = pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parent.parent
TIMM_TESTS = Path(os.environ.get("VIT_KERNELS_TIMM_TESTS", ROOT / ".cache" / "timm-tests" / f"timm-{timm.__version__}"))

CI_MODELS = [
    "test_vit", "test_vit2", "test_vit3",  # timm's own test configs (test_vit4 is test_vit2 with RmsNorm: full run)
    "vit_tiny_r_s16_p8_224",  # hybrid (HybridEmbed)
    "vit_dwee_patch16_reg1_gap_256",  # DiffAttention, registers
    "deit_tiny_distilled_patch16_224",  # DeiT with its distillation token
]
FULL_MODELS = CI_MODELS + [
    "test_vit4", "test_vit_relpos", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit3_small_patch16_224",
    "vit_base_patch16_clip_224", "vit_base_patch16_siglip_224", "vit_small_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2", "vit_small_patch16_18x2_224", "vit_base_patch16_xp_224",
    "vit_pwee_patch16_reg1_gap_256", "vit_base_patch16_rpn_224", "vit_relpos_small_patch16_224",
    "eva02_tiny_patch14_224", "flexivit_small",
]


def _run_timm_tests(models, swap: bool) -> tuple[set, str]:
    """(failed test ids, output) of timm's test_models.py on `models`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent / "timm_suite"), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "pytest", "tests/test_models.py", "-p", "timm_swap_plugin",
               f"--vit-kernels-models={','.join(models)}", "-q", "-rf", "-p", "no:cacheprovider", "-p", "no:warnings",
               "-k", "not torchscript"] + (["--vit-kernels-swap"] if swap else [])
    result = subprocess.run(command, cwd=TIMM_TESTS, env=env, capture_output=True, text=True, timeout=3600)
    output = result.stdout + result.stderr
    if result.returncode not in (0, 1) or not re.search(r"\d+ passed", output):
        raise AssertionError(f"timm's tests did not run (exit {result.returncode}):\n{output[-4000:]}")
    return set(re.findall(r"^FAILED (\S+)", output, flags=re.M)), output


@pytest.mark.skipif(not (TIMM_TESTS / "tests" / "test_models.py").exists(),
                    reason=f"timm's tests are not fetched: bash scripts/get_timm_tests.sh (looked in {TIMM_TESTS})")
def test_timm_model_tests_pass_after_swap_as_before():
    models = FULL_MODELS if os.environ.get("VIT_KERNELS_TIMM_SUITE") == "full" else CI_MODELS
    unswapped, _ = _run_timm_tests(models, swap=False)
    swapped, output = _run_timm_tests(models, swap=True)
    new = sorted(swapped - unswapped)
    assert not new, f"failing only after swap_modules: {new}\n{output[-6000:]}"
    swaps = re.search(r"swap_modules ran on (\d+) models, swapped (\d+) modules", output)
    assert swaps and int(swaps.group(1)) > 0 and int(swaps.group(2)) > 0, output[-2000:]  # the plug-in swapped
