"""Launch plans (vit_kernels/ops/_plans.py, csrc/launch_plan.cpp): a replay hands Triton's C
launcher exactly what the op body would, a plan is recorded only for a body whose every effect it
holds, and anything a plan cannot key on runs the body.

The replays themselves need bound launches, which the interpreter never makes: tests/plan_check.py
runs them in a subprocess with Triton's launch path kept and the GPU faked
(vit_kernels/_fake_launch.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit_kernels._dispatch import TRACED_LAUNCHES
from vit_kernels.ops import _launcher, _nodes, _plans


def _plan_check(*args):
    script = Path(__file__).resolve().parent / "plan_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def op_calls():
    return _plan_check("ops")


def test_a_replay_launches_what_the_body_launches(op_calls):
    """Per case (every body the nodes plan: add + LayerNorm, attention and bias + GELU
    forwards and backwards, attention's per-op backward, over dtypes, optional inputs, dropout, odd widths and head dims, a
    misaligned and a non-contiguous input, a tensor written in place): four calls through
    the plan table (body, recording, two replays, the last on new tensors) hand the C launcher the
    body's kernels, specializations, grids, scalars and pointers (each named after the input it is
    or the output it points into), and return outputs of the body's dtypes, shapes and strides."""
    previous = {}
    for case in op_calls["cases"]:
        for i, call in enumerate(case["calls"]):
            assert call == case["body"], (case["name"], i)
        assert case["body"]["launches"], case["name"]
        counts, before = case["counts"], previous.get(case["site"], {"planned": 0, "refused": 0})
        # Refused: a non-contiguous x (the body copies it), atomic dQ (zero-filled and copied back).
        grew = "refused" if case["name"] in ("ln non-contiguous x", "per-op attention backward, atomic dQ") else "planned"
        assert counts[grew] == before[grew] + 1, (case["name"], counts, before)
        previous[case["site"]] = counts


def test_an_input_written_in_place_is_keyed(op_calls):
    """bias + GELU's backward writes dz over dY when handed one tensor as both: a call handing two
    tensors of the same shapes must not replay the in-place call's plan (which would write dz over
    dY), and the other way round."""
    dx = {case["name"]: case["body"]["launches"][0][2][3] for case in op_calls["cases"] if case["site"] == "bias_gelu_bwd"}
    assert dx["bias gelu backward in place"] == "in 0" and dx["bias gelu backward not in place"] == "in 4"


def test_a_misaligned_input_gets_its_own_plan(op_calls):
    """Triton specializes a pointer on 16-byte alignment: an input 2 elements off it must launch its
    own specialization, not replay the aligned signature's."""
    function = {case["name"]: case["body"]["launches"][0][0] for case in op_calls["cases"]}
    assert function["ln misaligned x"] != function["ln plain"]


def test_training_and_inference_launch_the_same_with_and_without_plans():
    """Whole swapped timm and reference ViT steps (layer scale, drop path, attention dropout) and
    inference calls: the same launches either way, pointers compared by alignment
    (plan_check.py's docstring says why), and every forward op of the blocks planned."""
    planned, plain = _plan_check("vit-step"), _plan_check("vit-step", "--no-plans")
    assert [r["name"] for r in planned["rounds"]] == [r["name"] for r in plain["rounds"]]
    for ours, theirs in zip(planned["rounds"], plain["rounds"]):
        assert ours["launches"] == theirs["launches"], ours["name"]
    assert set(planned["counts"]) == set(_nodes.PLAN_SITES)
    for site, counts in planned["counts"].items():
        if site != "flash_attention_bwd":  # the per-op attention's backward: every block is one node here
            assert counts["planned"] > 0 and counts["refused"] == 0, (site, counts)
    assert all(counts == {"seen": 0, "refused": 0, "planned": 0} for counts in plain["counts"].values())


# ---- in process: what record refuses, and the table's rules -------------------------------------------


def test_record_refuses_a_body_that_computes():
    x = torch.randn(4, 8)
    out, plan, again = _plans.record(lambda t: t + 1, x)
    assert torch.equal(out, x + 1) and plan is None and not again


def test_record_refuses_outputs_that_are_not_fresh():
    x = torch.randn(4, 8)
    assert _plans.record(lambda t: t, x)[1] is None  # an input
    assert _plans.record(lambda t: t.view(8, 4), x)[1] is None  # a view of one
    assert _plans.record(lambda t: torch.empty(10)[2:], x)[1] is None  # not from its allocation's start
    assert _plans.record(lambda t: torch.empty(10)[:4], x)[1] is None  # not all of its allocation
    kept = torch.empty(8)
    assert _plans.record(lambda t: kept, x)[1] is None  # a tensor from before the call (a cache, say)
    assert _plans.record(lambda t: (torch.empty_like(t), kept), x)[1] is None
    assert _plans.record(lambda t: (lambda y: (y, y))(torch.empty(8)), x)[1] is None  # one allocation twice


def test_record_plans_allocations():
    x = torch.randn(4, 8, dtype=torch.float16)
    out, plan, again = _plans.record(lambda t: (torch.empty_like(t), torch.empty((2, 4), dtype=torch.float32)), x)
    outputs, launches, scratch = plan
    assert [(o[0], o[1], o[2]) for o in outputs] == [((4, 8), (8, 1), torch.float16), ((2, 4), (4, 1), torch.float32)]
    assert launches == () and scratch == () and not again


def test_record_asks_again_when_a_launch_was_not_bound(monkeypatch):
    """A launch that its Launcher would not make on its bound path (a first launch at a signature,
    an autotuner's tuning): no plan, and the recording is to be tried again at a later call."""
    launched = []

    class NotBoundYet:
        def call(self, grid, *args):
            launched.append(grid)

        def bound_entry(self, args, kwargs):
            return None

    launcher = NotBoundYet()
    monkeypatch.setitem(_launcher._LAUNCHERS, id(launcher), (launcher, launcher))
    out, plan, again = _plans.record(lambda t: (launcher.call((1,), t), torch.empty_like(t))[1], torch.randn(3))
    assert plan is None and again and launched == [(1,)]


def test_record_refuses_an_interpreted_kernel():
    """Under the interpreter nothing binds: no plan."""
    from vit_kernels.ops.bias_gelu import _bias_gelu_fwd_impl

    x = torch.randn(3, 16)
    out, plan, again = _plans.record(_bias_gelu_fwd_impl, x, None, "none")
    assert plan is None
    assert torch.allclose(out, torch.nn.functional.gelu(x), atol=1e-6)


def test_a_recording_while_another_thread_records_just_runs_the_body():
    """Recordings swap process-wide hooks (every Launcher's call, JITFunction.run): one at a time;
    a second thread's body runs plainly and is tried again later."""
    import threading

    inside, release, results = threading.Event(), threading.Event(), []

    def slow(t):
        inside.set()
        release.wait(10)
        return torch.empty_like(t)

    first = threading.Thread(target=lambda: results.append(_plans.record(slow, torch.randn(3))))
    first.start()
    assert inside.wait(10)
    out, plan, again = _plans.record(lambda t: torch.empty_like(t), torch.randn(4))
    release.set()
    first.join(10)
    assert out.shape == (4,) and plan is None and again
    assert results[0][1] is not None  # the first recording was not disturbed


def test_recording_leaves_every_launcher_as_it_was():
    before = {key: launcher.call for key, (_, launcher) in _launcher._LAUNCHERS.items()}
    from triton.runtime.jit import JITFunction

    run = JITFunction.run
    with pytest.raises(ValueError):
        _plans.record(lambda: (_ for _ in ()).throw(ValueError("a body failed")))
    assert {key: launcher.call for key, (_, launcher) in _launcher._LAUNCHERS.items()} == before
    assert JITFunction.run is run


@pytest.fixture
def plan_table():
    module = _nodes.extension()
    if module is None:
        pytest.skip(f"no C++ extension: {_nodes.unavailable()}")
    yield module
    _nodes.set_launch_plans(module, os.environ.get(_nodes.LAUNCH_PLANS_ENV) != "0")


def _counted(body):
    calls = []

    def counted(*args):
        calls.append(args)
        return body(*args)
    return counted, calls


def test_the_table_runs_then_records_then_replays(plan_table):
    _nodes.set_launch_plans(plan_table, True)
    body, calls = _counted(lambda t, scale: (torch.empty_like(t), torch.empty((3,), dtype=torch.float32)))
    x = torch.randn(4, 8)
    outs = [plan_table.call_planned(2, body, x, 0.5) for _ in range(4)]
    assert len(calls) == 2  # the first call, then the recording; the others replayed
    for out in outs:
        assert [(t.shape, t.stride(), t.dtype) for t in out] == [((4, 8), (8, 1), torch.float32), ((3,), (1,), torch.float32)]
    assert outs[2][0].data_ptr() != outs[3][0].data_ptr()  # fresh outputs each time
    plan_table.call_planned(2, body, x, 0.25)  # another scalar: another signature
    plan_table.call_planned(2, body, torch.randn(4, 9), 0.5)  # another shape
    plan_table.call_planned(2, body, x.double(), 0.5)  # another dtype
    plan_table.call_planned(2, body, x.t(), 0.5)  # other strides
    assert len(calls) == 6
    assert plan_table.launch_plan_counts()["bias_gelu_fwd"] == {"seen": 4, "refused": 0, "planned": 1}


def test_a_refused_signature_runs_its_body_every_time(plan_table):
    _nodes.set_launch_plans(plan_table, True)
    body, calls = _counted(lambda t: t * 2)
    x = torch.randn(4, 8)
    for _ in range(4):
        assert torch.equal(plan_table.call_planned(0, body, x)[0], x * 2)
    assert len(calls) == 4
    assert plan_table.launch_plan_counts()["add_layer_norm_fwd"] == {"seen": 0, "refused": 1, "planned": 0}


def test_plans_step_aside_for_hooks_tracing_and_when_off(plan_table, monkeypatch):
    body, calls = _counted(lambda t: torch.empty_like(t))
    x = torch.randn(4, 8)
    for setting in ("hooks", "traced", "off"):
        _nodes.set_launch_plans(plan_table, True)
        if setting == "hooks":
            plan_table.set_launch_plans(_plans.record, _launcher, lambda: True, TRACED_LAUNCHES)
        elif setting == "traced":
            monkeypatch.setattr(TRACED_LAUNCHES, "on", True)
        else:
            _nodes.set_launch_plans(plan_table, False)
        calls.clear()
        for _ in range(4):
            plan_table.call_planned(1, body, x)
        monkeypatch.undo()
        assert len(calls) == 4, setting
        assert plan_table.launch_plan_counts()["attention_fwd"] == {"seen": 0, "refused": 0, "planned": 0}, setting


def test_an_unkeyable_argument_runs_the_body(plan_table):
    _nodes.set_launch_plans(plan_table, True)
    body, calls = _counted(lambda t, extra: torch.empty_like(t))
    x = torch.randn(4, 8)
    for _ in range(4):
        plan_table.call_planned(2, body, x, [1, 2])  # a list: no signature covers it
        plan_table.call_planned(2, body, x, 2**70)  # an int past int64
    assert len(calls) == 8


def test_an_error_in_a_body_reaches_the_caller(plan_table):
    _nodes.set_launch_plans(plan_table, True)

    def fails(t):
        raise ValueError("a body failed")
    for _ in range(3):  # the first call, then the recording
        with pytest.raises(ValueError, match="a body failed"):
            plan_table.call_planned(0, fails, torch.randn(2))


def test_the_bytes_check_signature_keeps_apart_what_the_tuple_one_does(plan_table):
    """check_signature (checked_once's fast signature): calls whose tuple signatures differ get
    different bytes, calls whose tuple signatures agree the same; arguments it does not cover
    (another Tensor subclass, a sparse tensor, a list, an int subclass) give None, and the tuple
    signature is built instead."""
    import enum
    import warnings

    from vit_kernels import _validate

    x = torch.randn(3, 4)
    samples = [
        (x, None, 1.0), (x, None, True), (x, None, 1), (x, None, "1.0"), (x.t(), None, 1.0),
        (x.to(torch.bfloat16), None, 1.0), (torch.nn.Parameter(x), None, 1.0), (torch.randn(4, 3), None, 1.0),
        (torch.empty(3, 4, device="meta"), None, 1.0), (x, torch.float16, 1.0), (x, torch.float32, 1.0),
        (x, None, -0.5), (x, None, "tanh"), (x, None, "none"), (x[None], None, 1.0), (torch.tensor(2.0),), (),
    ]
    signatures = [plan_table.check_signature(args, torch.nn.Parameter) for args in samples]
    assert all(isinstance(s, bytes) for s in signatures)
    assert len(set(signatures)) == len(samples)
    assert len({_validate.python_signature(args, torch.Tensor) for args in samples}) == len(samples)
    assert plan_table.check_signature((torch.randn(3, 4), None, 1.0), torch.nn.Parameter) == signatures[0]

    class Flag(enum.IntEnum):
        ON = 1

    class Subclass(torch.Tensor):
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CSR support is "in beta"
        sparse = torch.eye(3).to_sparse_csr()
    for args in ((x, [1.0]), (x, Flag.ON), (x.as_subclass(Subclass),), (sparse,), (x, 2**70)):
        assert plan_table.check_signature(args, torch.nn.Parameter) is None, args
