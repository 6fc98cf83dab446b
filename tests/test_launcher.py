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
import shutil
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


def _launch_path(*args, **env_vars):
    script = Path(__file__).resolve().parent / "launch_path_check.py"
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **env_vars}
    out = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.splitlines()[-1])["rounds"]


@pytest.fixture(scope="module")
def vit_steps():
    """Without launch plans (their replays hand the C launcher addresses as integers, which these
    tests cannot tell apart; tests/test_launch_plans.py holds the replays to the bodies)."""
    return (_launch_path("vit-step", VIT_KERNELS_LAUNCH_PLANS="0"),
            _launch_path("vit-step", "--triton-path", VIT_KERNELS_LAUNCH_PLANS="0"),
            _launch_path("vit-step", VIT_KERNELS_C_LAUNCH="0", VIT_KERNELS_LAUNCH_PLANS="0"))


def test_training_steps_with_plans_run_no_triton_launch_path_after_warm_up():
    """With the launch plans on (the default), too: from the second step on, no launch goes through
    Triton's launch path and no autotuner benchmarks."""
    rounds = _launch_path("vit-step")
    for model in ("timm swapped", "reference"):
        first, *later = [r for r in rounds if r["name"].startswith(model)]
        assert first["launches"], model
        for step in later:
            assert step["runs"] == [] and step["benchmarks"] == 0, step["name"]
            assert len(step["launches"]) == len(first["launches"]), step["name"]


def test_training_steps_after_warm_up_launch_only_bound_kernels(vit_steps):
    """A timm ViT after swap_modules (layer scale, drop path, attention dropout) and our reference
    ViT: from the second training step on, no launch goes through Triton's launch path and no
    autotuner benchmarks; each step launches the same kernels with the same grids and arguments
    (dtypes, shapes, strides, scalars, constexprs) as the first."""
    rounds = vit_steps[0]
    for model in ("timm swapped", "reference"):
        first, *later = [r for r in rounds if r["name"].startswith(model)]
        assert first["launches"], model
        for step in later:
            assert step["runs"] == [] and step["benchmarks"] == 0, step["name"]
            assert step["launches"] == first["launches"], step["name"]
            assert step["cache_sizes"] == first["cache_sizes"], step["name"]


def test_bound_launches_hand_the_c_launcher_what_tritons_path_does(vit_steps):
    """The same steps three ways: bound launches made in C (csrc/bound_launch.c), bound launches
    made in Python (VIT_KERNELS_C_LAUNCH=0), Triton's own path: the same C-launcher calls."""
    bound, triton_path, bound_in_python = vit_steps
    assert [r["name"] for r in bound] == [r["name"] for r in triton_path] == [r["name"] for r in bound_in_python]
    for ours, in_python, theirs in zip(bound, bound_in_python, triton_path):
        assert ours["launches"] == theirs["launches"] == in_python["launches"], ours["name"]
        assert len(theirs["runs"]) == len(theirs["launches"])  # there, every launch went through Triton
        assert in_python["bound_in_c"] == theirs["bound_in_c"] == []
    if shutil.which("cc") and os.environ.get("VIT_KERNELS_C_LAUNCH") != "0":
        launched = {kernel for r in bound for kernel, _, _ in r["launches"]}
        assert set(bound[-1]["bound_in_c"]) == launched, (bound[-1]["bound_in_c"], launched)


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


# ---- csrc/bound_launch.c: the bound launch in C ---------------------------------------------------


def _c_launch_module():
    from vit_kernels import _extension

    module = _extension.bound_launch()
    if module is None:
        reason = _extension.bound_launch_unavailable()
        if os.environ.get(_extension.C_LAUNCH_ENV) == "0" or not shutil.which("cc"):
            pytest.skip(f"csrc/bound_launch.c not in use: {reason}")
        pytest.fail(f"csrc/bound_launch.c did not build on a machine with a C compiler: {reason}")
    return module


def test_the_c_launch_path_is_built_where_there_is_a_compiler():
    """A C compiler is there wherever Triton runs on a GPU (it builds its own launchers): the C
    path must then be in use, not silently replaced by the Python one."""
    assert hasattr(_c_launch_module(), "BoundLauncher")


class _Recorder:
    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)

    def fallback(self, *args, **kwargs):
        self.calls.append(("fallback", args, kwargs))


def _c_launcher(recorder, bound, module_namespace=None, hooks=lambda: False, traced=None):
    import inspect

    module = _c_launch_module()
    parameters = inspect.signature(_kernel_source).parameters.values()
    names = [p.name for p in parameters]
    defaults = tuple(_launcher._NO_DEFAULT if p.default is inspect.Parameter.empty else p.default
                     for p in parameters)
    namespace = module_namespace or SimpleNamespace(driver=SimpleNamespace(active=_Driver()))
    c_launcher = module.BoundLauncher(recorder.fallback, {name: i for i, name in enumerate(names)}, defaults,
                                      _launcher._NO_DEFAULT, bound, namespace, hooks,
                                      traced or SimpleNamespace(on=False))
    c_launcher.set_roles("".join(_launcher._ROLE_LETTERS.get(ROLES.get(name), "c") for name in names))
    return c_launcher


def test_c_signatures_are_the_binders_exactly():
    """For every sample launch, the C path finds the entry the Python binder keyed, and launches
    it with the binder's arguments in order; an entry keyed for any other sample is never taken.
    So the C signature equals the binder's, which test_signature_is_never_coarser_than_tritons_
    specialization checks against Triton's own."""
    bind = _bind()
    samples = list(_samples())
    signatures = [bind(*(args[name] for name in ROLES), BLOCK=args["BLOCK"], MODE=args["MODE"], num_warps=4)
                  for args in samples]
    recorder, bound = _Recorder(), {}
    c_launcher = _c_launcher(recorder, bound)
    for i, (args, (arguments, signature)) in enumerate(zip(samples, signatures)):
        call = ((2,), *(args[name] for name in ROLES))
        bound.clear()
        bound[(0, signature)] = (recorder.run, "handle", "meta")
        c_launcher(*call, BLOCK=args["BLOCK"], MODE=args["MODE"], num_warps=4)
        assert recorder.calls[-1] == (2, 1, 1, 7, "handle", "meta", None, None, None, *arguments), args
        other = signatures[(i + 1) % len(signatures)][1]
        if other != signature:
            bound.clear()
            bound[(0, other)] = (recorder.run, "handle", "meta")
            c_launcher(*call, BLOCK=args["BLOCK"], MODE=args["MODE"], num_warps=4)
            assert recorder.calls[-1][0] == "fallback", args


def test_c_path_hands_every_call_it_cannot_launch_to_the_launcher():
    """Unbound, a type the roles do not expect, a missing or doubled argument, a grid that is not a
    tuple of 1-3, a launch hook, a trace in progress, another device: each reaches the fallback with
    the call's own arguments (which launches, binds or raises as the Python path does)."""
    x = torch.empty(4)
    bind = _bind()
    _, signature = bind(x, 5, 0.5, True, BLOCK=16, num_warps=4)
    recorder, bound = _Recorder(), {}
    hooked, tracing = [False], SimpleNamespace(on=False)
    c_launcher = _c_launcher(recorder, bound, hooks=lambda: hooked[0], traced=tracing)
    good = ((3,), x, 5, 0.5, True)
    c_launcher(*good, BLOCK=16, num_warps=4)  # the table is empty
    bound[(0, signature)] = (recorder.run, "handle", ())
    c_launcher(*good, BLOCK=16, num_warps=4)
    assert [c[0] for c in recorder.calls] == ["fallback", 3]
    refused = [
        (((3,), x, 5, 1, True), {"BLOCK": 16, "num_warps": 4}),  # an int where a float was
        (((3,), x, 5.0, 0.5, True), {"BLOCK": 16, "num_warps": 4}),
        (((3,), x, 5, 0.5, 1), {"BLOCK": 16, "num_warps": 4}),
        (((3,), 3, 5, 0.5, True), {"BLOCK": 16, "num_warps": 4}),  # no dtype: not a tensor
        (((3,), x, 5, 0.5), {"BLOCK": 16, "num_warps": 4}),  # flag missing
        (((3,), x, 5, 0.5, True), {"BLOCK": 16, "num_warps": 4, "n": 5}),  # n twice
        (((3,), x, 5, 0.5, True), {"num_warps": 4}),  # BLOCK missing
        (([3], x, 5, 0.5, True), {"BLOCK": 16, "num_warps": 4}),
        (((3, 1, 1, 1), x, 5, 0.5, True), {"BLOCK": 16, "num_warps": 4}),
        (((3,), x, 5, 0.5, True, 16, 2, 9), {"num_warps": 4}),  # too many
        (((3,), x, 5, 0.5, True), {"BLOCK": 16, "num_warps": 8}),  # another option: not bound
    ]
    for args, kwargs in refused:
        recorder.calls.clear()
        c_launcher(*args, **kwargs)
        assert recorder.calls == [("fallback", args, kwargs)], (args, kwargs)
    for flip in (lambda: hooked.__setitem__(0, True), lambda: setattr(tracing, "on", True)):
        hooked[0], tracing.on = False, False
        flip()
        recorder.calls.clear()
        c_launcher(*good, BLOCK=16, num_warps=4)
        assert recorder.calls == [("fallback", good, {"BLOCK": 16, "num_warps": 4})]


def test_c_path_propagates_a_launch_error_and_never_launches_twice():
    x = torch.empty(4)
    _, signature = _bind()(x, 5, 0.5, True, BLOCK=16, num_warps=4)
    recorder = _Recorder()

    def failing_run(*args):
        recorder.calls.append("run")
        raise RuntimeError("the driver said no")

    c_launcher = _c_launcher(recorder, {(0, signature): (failing_run, "handle", ())})
    with pytest.raises(RuntimeError, match="the driver said no"):
        c_launcher((3,), x, 5, 0.5, True, BLOCK=16, num_warps=4)
    assert recorder.calls == ["run"]


def test_c_path_keeps_no_reference_it_does_not_own():
    """Reference counts of everything a launch touches are where they were after many launches
    (a leak per launch would hold every activation a step passes; a missing reference would crash)."""
    x = torch.empty(4)
    arguments, signature = _bind()(x, 5, 0.5, True, BLOCK=16, num_warps=4)
    recorder = _Recorder()
    runs = []
    bound = {(0, signature): (lambda *args: runs.append(len(args)), "handle", ())}
    c_launcher = _c_launcher(recorder, bound)
    grid, flag, value = (3,), True, 0.5
    c_launcher(grid, x, 5, value, flag, BLOCK=16, num_warps=4)
    before = [sys.getrefcount(o) for o in (x, grid, value, signature, bound)]
    for _repeat in range(10000):
        c_launcher(grid, x, 5, value, flag, BLOCK=16, num_warps=4)
    assert [sys.getrefcount(o) for o in (x, grid, value, signature, bound)] == before
    assert len(runs) == 10001 and recorder.calls == []


def test_ops_launch_through_the_c_path_once_bound(counted_launcher):
    """The Launcher hands its `call` to the C path after its first launch (where csrc/bound_launch.c
    is built), which then launches bound signatures itself and sends the rest back."""
    _c_launch_module()
    launcher, calls = counted_launcher
    x = torch.empty(4)
    assert launcher.call is launcher
    launcher.call((3,), x, 5, 0.5, True, BLOCK=16, num_warps=4)
    assert type(launcher.call).__name__ == "BoundLauncher"
    launcher.call((3, 2), x, 5, 0.25, True, BLOCK=16, num_warps=4)
    launcher.call((3,), x, 6, 0.5, True, BLOCK=16, num_warps=4)  # a new signature: Triton's path, bound
    launcher.call((3,), x, 6, 0.5, True, BLOCK=16, num_warps=4)
    assert [kind for kind, _ in calls] == ["triton", "bound", "triton", "bound"]
    assert calls[1][1] == (3, 2, 1, 7, "handle", (), None, None, None, x, 5, 0.25, True, 16, 2)


def test_bound_launch_compiles_without_a_warning(tmp_path):
    """csrc/bound_launch.c under -Wall -Wextra -Werror (what _extension.bound_launch builds it
    with is plain -O2: a warning there would pass unseen)."""
    import sysconfig

    compiler = os.environ.get("CC") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler")
    source = Path(__file__).resolve().parent.parent / "csrc" / "bound_launch.c"
    result = subprocess.run([compiler, str(source), "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-c",
                             f"-I{sysconfig.get_paths()['include']}", "-o", str(tmp_path / "bound_launch.o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_without_a_working_compiler_the_python_path_runs(tmp_path, monkeypatch, counted_launcher):
    """A compiler that fails (or none, or VIT_KERNELS_C_LAUNCH=0): bound_launch() says why and
    returns None, and the Launcher keeps launching bound signatures itself."""
    from vit_kernels import _extension

    monkeypatch.setattr(_extension, "_bound_launch", None)
    monkeypatch.setenv("VIT_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")
    assert _extension.bound_launch() is None
    assert "compiling bound_launch.c failed" in _extension.bound_launch_unavailable()
    launcher, calls = counted_launcher
    x = torch.empty(4)
    launcher.call((3,), x, 5, 0.5, True, BLOCK=16, num_warps=4)
    launcher.call((3,), x, 5, 0.5, True, BLOCK=16, num_warps=4)
    assert launcher.call is launcher and [kind for kind, _ in calls] == ["triton", "bound"]
    monkeypatch.setattr(_extension, "_bound_launch", None)
    monkeypatch.setenv("VIT_KERNELS_C_LAUNCH", "0")
    assert _extension.bound_launch() is None and _extension.bound_launch_unavailable() == "VIT_KERNELS_C_LAUNCH=0"


# ---- csrc/bound_launch.c: checked_once's signature in C ---------------------------------------------


def test_the_c_check_signature_equals_the_python_one():
    """check_signature builds _validate.python_signature's tuple: tensors (a Parameter, a view with
    other strides, another dtype, the meta device, 0-d) by type, shape, strides, dtype and device;
    anything else (None, a float, a bool that equals 1.0, an int, a str, a dtype) by type and
    value, so True and 1.0 stay apart. And the signatures of calls that differ in any of those
    differ."""
    from vit_kernels import _validate

    module = _c_launch_module()
    x = torch.randn(3, 4)
    samples = [
        (x, None, 1.0),
        (x.t(), torch.nn.Parameter(torch.randn(4)), True),
        (x.to(torch.bfloat16), 1, "tanh", torch.float16),
        (torch.empty(2, 5, device="meta"), torch.tensor(2.0), 1e-6),
        (),
    ]
    signatures = set()
    for args in samples:
        c_signature = module.check_signature(args, torch.Tensor)
        assert c_signature == _validate.python_signature(args, torch.Tensor), args
        assert [key[0] for key in c_signature] == [type(arg) for arg in args]
        signatures.add(c_signature)
    assert len(signatures) == len(samples)
    assert module.check_signature((x, 1.0), torch.Tensor) != module.check_signature((x, True), torch.Tensor)
    assert hash(module.check_signature((x, 1.0), torch.Tensor)) == hash(module.check_signature((x.clone(), 1.0),
                                                                                               torch.Tensor))


def test_the_c_check_signature_propagates_errors():
    """What raises in Python raises in C (a CSR tensor has no strides), so checked_once runs the
    check instead; a wrong call is a TypeError, not a crash."""
    import warnings

    from vit_kernels import _validate

    module = _c_launch_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CSR support is "in beta"
        sparse = torch.eye(3).to_sparse_csr()
    with pytest.raises(RuntimeError):
        _validate.python_signature((sparse,), torch.Tensor)
    with pytest.raises(RuntimeError):
        module.check_signature((sparse,), torch.Tensor)
    for bad in ((), ([1.0], torch.Tensor), ((1.0,), 3), ((1.0,),)):
        with pytest.raises(TypeError):
            module.check_signature(*bad)
    x = torch.randn(2)
    counts = []
    for _ in range(3):  # flat from the second round (the first may fill a cache)
        for _ in range(1000):
            module.check_signature((x, 1.0, None), torch.Tensor)
        counts.append((sys.getrefcount(torch.Tensor), sys.getrefcount(x), sys.getrefcount(x.shape.__class__)))
    assert counts[1] == counts[2]


def test_checked_once_keys_on_the_c_signature_where_it_is_built(monkeypatch):
    """Where csrc/bound_launch.c is built, a public op's check keys on its signature (the Python one
    stays for where it is not). The C++ extension's bytes signature comes first where it is loaded
    (an earlier test may have loaded it): off here, so that the call reaches _signature_of."""
    from vit_kernels import _validate
    from vit_kernels.ops import add_layer_norm

    module = _c_launch_module()
    monkeypatch.setattr(_validate.FAST_SIGNATURE, "function", None)
    add_layer_norm(torch.randn(2, 8), torch.randn(2, 8))
    assert _validate._signature_of is module.check_signature
