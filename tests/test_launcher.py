"""ops/_launcher.py: launches bound once per signature must launch exactly what Triton's own path
would, and fall back to it wherever they cannot.

The signature test compares the binder with the installed Triton's own specialization, so it
runs against each release: `bash scripts/compile_check_tritons.sh` runs this file under 3.6 and
3.9 too. The subprocess tests run the ops with Triton's launch path kept and its driver, compile
and C launcher faked (vit_kernels/_fake_launch.py; tests/launch_path_check.py records it).
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from vit_kernels.ops import _launcher


def _kernel_source(X, n, f, flag, BLOCK: tl.constexpr, MODE: tl.constexpr = 2):
    pass  # a launch's parameters are all the binder reads; the body is never compiled


KERNEL = JITFunction(_kernel_source)
ROLES = {"X": "pointer", "n": "int", "f": "float", "flag": "bool"}


def _bind():
    return _launcher.make_binder(KERNEL, ROLES)


def _tritons_specialization(args: dict) -> tuple:
    """What the installed Triton specializes a launch on (JITFunction.run's binder, per argument)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    runtime = tuple(native_specialize_impl(CUDABackend, args[name], False, True, True) for name in ROLES)
    return runtime, args["BLOCK"], args["MODE"]


def _samples():
    base = torch.empty(64, dtype=torch.float32)
    pointers = [None, base, base[1:], base[4:], torch.empty(8, dtype=torch.bfloat16),
                torch.empty(8, dtype=torch.bfloat16)[1:], torch.nn.Parameter(torch.empty(8))]
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**32, 2**63 - 16, 2**63, 2**64 - 16]
    for x, n, f, flag, block in itertools.product(pointers, ints, (0.0, 1.0, 0.5), (False, True), (16, 32)):
        yield dict(X=x, n=n, f=f, flag=flag, BLOCK=block, MODE=2)


def test_signature_is_never_coarser_than_tritons_specialization():
    """Two launches with one binder signature must be two launches Triton specializes alike
    (the same compiled kernel): dtype and 16-byte alignment of pointers, ints equal to 1, multiples
    of 16 and integer width, constexprs."""
    bind = _bind()
    seen = {}
    for args in _samples():
        arguments, signature = bind(*(args[name] for name in ROLES), BLOCK=args["BLOCK"], num_warps=4)
        assert arguments == tuple(args[name] for name in ("X", "n", "f", "flag", "BLOCK", "MODE"))
        specialization = _tritons_specialization(args)
        assert seen.setdefault(signature, specialization) == specialization, (signature, args)
    assert len(seen) > 100


def test_signature_keeps_every_constexpr_and_launch_option():
    bind = _bind()
    x = torch.empty(4)
    signatures = {bind(x, 3, 0.5, False, BLOCK=block, MODE=mode, **options)[1]
                  for block in (16, 32) for mode in (1, 2)
                  for options in ({"num_warps": 4}, {"num_warps": 8}, {"num_warps": 4, "num_stages": 2})}
    assert len(signatures) == 12


def test_a_type_the_first_launch_did_not_have_is_not_bound():
    """An int where the first launch had a float (Triton would specialize it), a tensor where it had
    an int, a float where it had a bool: the binder refuses, and the call takes Triton's path."""
    bind = _bind()
    x = torch.empty(4)
    for bad in ((x, 3, 1, False), (x, 3.0, 0.5, False), (x, x, 0.5, False), (x, 3, 0.5, 1), (3, 3, 0.5, False)):
        with pytest.raises((_launcher._Unbindable, AttributeError)):
            bind(*bad, BLOCK=16)


class _Compiled:
    function, packed_metadata = "handle", ()

    def __init__(self, calls):
        self.calls = calls

    def run(self, *args):
        self.calls.append(("bound", args))


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 7


@pytest.fixture
def counted_launcher(monkeypatch):
    """A Launcher around a JITFunction whose Triton path only records that it ran."""
    calls = []
    kernel = JITFunction(_kernel_source)
    compiled = _Compiled(calls)

    def triton_path(*args, grid, warmup, **kwargs):
        calls.append(("triton", args))
        return compiled

    monkeypatch.setattr(kernel, "run", triton_path)
    monkeypatch.setattr(_launcher, "driver", SimpleNamespace(active=_Driver()))
    return _launcher.Launcher(kernel), calls


def test_second_launch_of_a_signature_calls_the_c_launcher_directly(counted_launcher):
    launcher, calls = counted_launcher
    x = torch.empty(4)
    launcher((3,), x, 5, 0.5, True, BLOCK=16, num_warps=4)
    launcher((3, 2), x, 5, 0.25, True, BLOCK=16, num_warps=4)
    launcher((3,), x, 6, 0.5, True, BLOCK=16, num_warps=4)  # a new int value: a new signature
    assert [kind for kind, _ in calls] == ["triton", "bound", "triton"]
    assert calls[1][1] == (3, 2, 1, 7, "handle", (), None, None, None, x, 5, 0.25, True, 16, 2)


def test_launch_hooks_and_unknown_types_take_tritons_path(counted_launcher, monkeypatch):
    from triton import knobs

    launcher, calls = counted_launcher
    x = torch.empty(4)
    launcher((1,), x, 5, 0.5, True, BLOCK=16)
    launcher((1,), x, 5, 0.5, True, BLOCK=16)
    with monkeypatch.context() as hooked:
        hooked.setattr(knobs.runtime.launch_enter_hook, "calls", [lambda metadata: None])
        launcher((1,), x, 5, 0.5, True, BLOCK=16)  # a profiler's hook: Triton builds its metadata
    launcher((1,), x, 5, 1, True, BLOCK=16)  # an int where a float was: Triton specializes it
    assert [kind for kind, _ in calls] == ["triton", "bound", "triton", "triton"]


def test_signatures_past_the_cap_are_dropped(counted_launcher, monkeypatch):
    monkeypatch.setattr(_launcher, "MAX_SIGNATURES", 4)
    launcher, calls = counted_launcher
    x = torch.empty(4)
    for n in range(10):
        launcher((1,), x, n + 2, 0.5, True, BLOCK=16)
    assert len(launcher._bound) <= 4


def _launch_path(*args):
    script = Path(__file__).resolve().parent / "launch_path_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.splitlines()[-1])["rounds"]


@pytest.fixture(scope="module")
def vit_steps():
    return _launch_path("vit-step"), _launch_path("vit-step", "--triton-path")


def test_training_steps_after_warm_up_launch_only_bound_kernels(vit_steps):
    """A timm ViT after swap_modules (layer scale, drop path, attention dropout) and our reference
    ViT: from the second training step on, no launch goes through Triton's launch path and no
    autotuner benchmarks; each step launches the same kernels with the same grids and arguments
    (dtypes, shapes, strides, scalars, constexprs) as the first."""
    rounds, _ = vit_steps
    for model in ("timm swapped", "reference"):
        first, *later = [r for r in rounds if r["name"].startswith(model)]
        assert first["launches"], model
        for step in later:
            assert step["runs"] == [] and step["benchmarks"] == 0, step["name"]
            assert step["launches"] == first["launches"], step["name"]
            assert step["cache_sizes"] == first["cache_sizes"], step["name"]


def test_bound_launches_hand_the_c_launcher_what_tritons_path_does(vit_steps):
    bound, triton_path = vit_steps
    assert [r["name"] for r in bound] == [r["name"] for r in triton_path]
    for ours, theirs in zip(bound, triton_path):
        assert ours["launches"] == theirs["launches"], ours["name"]
        assert len(theirs["runs"]) == len(theirs["launches"])  # there, every launch went through Triton


def test_attention_skips_its_autotuner_once_it_has_chosen():
    """ops/_tuning.launch asks the autotuner once per key (N bucket, head dim, dropout, dtypes) and
    then launches the chosen config through the kernel's Launcher: the C launcher must get what it
    got from the autotuner's own launch, no kernel may compile again, and a new N bucket or dtype
    must go through the autotuner."""
    tuning, *repeats, new_bucket, new_dtype = _launch_path("attention")
    kernels = ["_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"]
    assert [run[0] for run in tuning["runs"]] == kernels
    assert all(via_autotuner for _, via_autotuner in tuning["runs"])
    assert tuning["benchmarks"] > 0
    for repeat in repeats:
        assert not any(via_autotuner for _, via_autotuner in repeat["runs"]) and repeat["benchmarks"] == 0
        assert repeat["launches"] == tuning["launches"]
        assert repeat["cache_sizes"] == tuning["cache_sizes"]
    assert repeats[-1]["runs"] == []  # bound by then: Triton's launch path is not run at all
    for new_key in (new_bucket, new_dtype):
        assert [run[0] for run in new_key["runs"]] == kernels
        assert all(via_autotuner for _, via_autotuner in new_key["runs"])
