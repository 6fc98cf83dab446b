"""Hand mutation testing: apply realistic one-line bugs, one at a time, and report which the
tests fail to catch (a surviving mutant is a missing test).

    python scripts/mutants.py [--list] [NAME ...]

Each mutant is one text replacement in one file and the tests that should catch it. It runs in
a copy of the tracked files (nothing here is modified), so `python -m pytest` there imports the
copy. Exit status 1 when a mutant survives, or when its text is no longer in the file (update
the list when the code moves). Add a mutant for every bug a test is written to catch.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple  # pytest arguments that must fail


MUTANTS = (
    Mutant("layer-norm-eps-doubled", "vit_kernels/ops/layer_norm.py", "rstd = 1.0 / tl.sqrt(var + eps)",
           "rstd = 1.0 / tl.sqrt(var + 2 * eps)", ("tests/test_layer_norm.py", "-k", "eps")),
    Mutant("layer-norm-eps-dropped", "vit_kernels/ops/layer_norm.py", "rstd = 1.0 / tl.sqrt(var + eps)",
           "rstd = 1.0 / tl.sqrt(var)", ("tests/test_layer_norm.py", "-k", "eps")),
    Mutant("timm-swap-skips-norm-pre", "vit_kernels/swap/timm_vit.py", "x = self.norm_pre(self.patch_drop(x))",
           "x = self.patch_drop(x)", ("tests/test_swap.py", "-k", "pre-norm")),
    Mutant("dropout-seed-read-on-host", "vit_kernels/ops/attention.py",
           "    return seed.to(device=device, dtype=torch.int64)",
           "    seed.item()\n    return seed.to(device=device, dtype=torch.int64)",
           ("tests/test_host_sync.py", "tests/test_attention.py", "-k", "host")),
    Mutant("bias-gelu-bias-ignored", "vit_kernels/ops/bias_gelu.py",
           "        z = z + tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]",
           "        z = z", ("tests/test_bias_gelu.py", "-k", "rule")),
    Mutant("attention-scale-ignored", "vit_kernels/ops/attention.py",
           "    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)",
           "    scale = q.shape[-1] ** -0.5", ("tests/test_attention.py", "-k", "scale")),
    # Row strides, which only the fuzzing draws (a residual or an x read in place from a wider buffer).
    Mutant("layer-norm-residual-row-stride-assumed", "vit_kernels/ops/layer_norm.py", "        res_stride,\n",
           "        n_cols,\n", ("tests/test_fuzz.py", "-k", "add_layer_norm")),
    Mutant("bias-gelu-row-stride-assumed", "vit_kernels/ops/bias_gelu.py",
           "        x2, bias, y, x_stride, n_cols, n_rows, n_cols,", "        x2, bias, y, n_cols, n_cols, n_rows, n_cols,",
           ("tests/test_fuzz.py", "-k", "test_bias_gelu and not linear")),
    # The public entry (ops/_nodes.PublicEntry) must leave forward-mode AD to the Python, which raises.
    Mutant("public-entry-under-forward-ad", "vit_kernels/ops/layer_norm.py",
           "    if not torch.compiler.is_compiling() and forward_ad._current_level < 0:",
           "    if not torch.compiler.is_compiling():", ("tests/test_op_nodes.py", "-k", "leaves_to_the_python")),
    Mutant("public-entry-remembers-h-new-stored", "vit_kernels/ops/layer_norm.py",
           "        entry.remember((x, residual, weight, bias, eps, gamma, row_scale, residual_in_fp32), residual_dtype,\n"
           "                       store_residual)",
           "        entry.remember((x, residual, weight, bias, eps, gamma, row_scale, residual_in_fp32), residual_dtype,\n"
           "                       True)", ("tests/test_op_nodes.py", "-k", "remembered_public_call")),
    Mutant("row-pointer-ignores-strides", "vit_kernels/ops/_triton_helpers.py", "    if t.is_contiguous():",
           "    if True:", ("tests/test_fuzz.py", "-k", "add_layer_norm or test_bias_gelu")),
)


def _copy_tree(destination: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, target)
    timm_tests = ROOT / ".cache"
    if timm_tests.is_dir():
        shutil.copytree(timm_tests, destination / ".cache", symlinks=True)


def run(mutant: Mutant) -> str:
    """'caught' (a test failed, or the copy no longer imports), 'SURVIVED', 'NO TESTS' (the
    selection is empty) or 'STALE' (its text is not in the file)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy)
        source = (copy / mutant.path).read_text()
        if source.count(mutant.old) != 1:
            return "STALE"
        (copy / mutant.path).write_text(source.replace(mutant.old, mutant.new))
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                 "--durations=0", *mutant.tests], cwd=copy, capture_output=True, text=True,
                                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        return {0: "SURVIVED", 5: "NO TESTS"}.get(result.returncode, "caught")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    if args.list:
        print("\n".join(f"{m.name}: {m.path}" for m in MUTANTS))
        return 0
    unknown = set(args.names) - set(known)
    if unknown:
        parser.error(f"unknown mutants {sorted(unknown)}; --list shows them")
    failed = False
    for mutant in (known[n] for n in args.names) if args.names else MUTANTS:
        verdict = run(mutant)
        failed |= verdict != "caught"
        print(f"{verdict:9s} {mutant.name}  ({mutant.path})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
