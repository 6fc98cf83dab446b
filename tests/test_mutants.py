"""scripts/mutants.py tells a caught mutant from a surviving one (on the cheap layout tests)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "mutants.py"


def _mutants():
    spec = importlib.util.spec_from_file_location("mutants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_caught_mutant_a_survivor_and_a_stale_one():
    mutants = _mutants()
    line = "from .pos_embed import pair, resample_pos_embed"
    planted = mutants.Mutant("nn-imports-models", "vit_kernels/nn/patch_embed.py", line,
                             line + "\nfrom ..models import vision_transformer  # noqa", ("tests/test_layout.py",))
    harmless = mutants.Mutant("comment", "vit_kernels/nn/patch_embed.py", line, line + "  # harmless",
                              ("tests/test_layout.py",))
    stale = mutants.Mutant("stale", "vit_kernels/nn/patch_embed.py", "no such line", "", ("tests/test_layout.py",))
    assert [mutants.run(m) for m in (planted, harmless, stale)] == ["caught", "SURVIVED", "STALE"]
    assert len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
