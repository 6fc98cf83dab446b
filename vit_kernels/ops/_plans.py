"""Launch plans: an op body's host work at one signature, recorded once, replayed from C++.

Why. Inside the one-node block step (nn/block_step.py) each op's Python body (its allocations, its
grid and arguments, its bound launch) costs the host 20-40 us a call where eager's equivalent
costs a few (benchmarks/results/cpu-host-overhead-2026-12-06.md). At a given signature of its
inputs (every tensor's dtype, device, sizes, strides, address modulo 16 and which other argument
shares its address; every scalar's value) a body does the same thing every time: allocate the same outputs, launch the same
compiled kernels with the same grids and scalars, the pointers being its inputs' and outputs'.
`record` runs a body once, watching it, and returns that as a plan; csrc/launch_plan.cpp keys
plans by signature and replays one with at::empty_strided and direct calls of each compiled
kernel's C launcher (pointers handed over as integers, which Triton's launchers take).

What makes a plan safe. A replay is only right if the body's every effect is in the plan, so
`record` refuses (returns no plan, and the body runs on every call at that signature) unless:
- every launch went through a Launcher's bound path (ops/_launcher.py), so the compiled kernel,
  its signature and its arguments are known; a launch through Triton's own path (a first
  launch, an autotuner's tuning, a launch hook) fails the recording;
- every aten call was an allocation or a view (the dispatch mode below sees them all): a copy,
  a cast, a reduction or a read of a value would be work the replay skips;
- every returned value is a tensor of its own allocation, made by the body (not an input's
  storage, not a tensor kept from before, not another output's), filling it from its first byte;
- every pointer a launch gets is exactly an input's address (the signature holds which inputs
  share an address: a tensor handed twice, to be written in place), or inside one output or
  one other allocation of the body (scratch, such as attention's delta: the replay allocates it
  too, for the launches' time).
The scalars a launch gets are constants of the plan: the key holds everything an op body may
derive them from (its inputs' metadata and scalar arguments). What the key leaves out, as the
Launcher does: a change of Triton's debug or instrumentation knobs after the recording; a
body reading mutable global state (none does; the tests hold every recorded op to its body).
The first call at a signature runs the body plainly (it may compile, tune or warm a cache);
the second records; later calls replay. A recording whose launches were not all bound yet (an
autotuner chose at the first call, the chosen config binds at the second) is tried again at the
next calls, a few times.
"""

import threading
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.jit import JITFunction

from . import _launcher

_aten = torch.ops.aten
# The aten calls a recorded body may make: allocations (the replay makes them) and views (they
# make nothing; a pointer taken from one is mapped back to an input or an output).
_ALLOCATIONS = frozenset({_aten.empty.memory_format, _aten.empty_like.default, _aten.empty_strided.default,
                          _aten.new_empty.default})
_REPLAYABLE = _ALLOCATIONS | frozenset({
    _aten.view.default, _aten._reshape_alias.default, _aten.as_strided.default, _aten.unbind.int,
    _aten.select.int, _aten.slice.Tensor, _aten.t.default, _aten.transpose.int, _aten.permute.default,
    _aten.unsqueeze.default, _aten.squeeze.dim, _aten.alias.default, _aten.expand.default,
})


class _AtenCalls(TorchDispatchMode):
    """Notes any aten call a replay could not make, and the storages the body allocated."""

    def __init__(self):
        super().__init__()
        self.others = []
        self.allocated = {}  # storage address -> (bytes, device)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in _REPLAYABLE:
            self.others.append(func)
        out = func(*args, **(kwargs or {}))
        if func in _ALLOCATIONS:
            storage = out.untyped_storage()
            self.allocated[storage.data_ptr()] = (storage.nbytes(), out.device)
        return out


class _Launches:
    """The bound launches of one thread while it records; `complete` False once any launch of
    that thread went elsewhere."""

    def __init__(self):
        self.thread = threading.get_ident()
        self.launches = []
        self.complete = True

    def recording_call(self, launcher, original):
        def call(grid, *args, **kwargs):
            if threading.get_ident() != self.thread:
                return original(grid, *args, **kwargs)
            entry = launcher.bound_entry(args, kwargs)
            if entry is None:
                self.complete = False
            else:
                run, function, metadata, arguments = entry
                self.launches.append((run, function, metadata, (*grid, 1, 1)[:3], arguments))
            return original(grid, *args, **kwargs)  # the launch itself, as the body would make it
        return call


def _storage_nbytes(t: Tensor) -> int:
    """Bytes an empty_strided of t's sizes and strides allocates."""
    if t.numel() == 0:
        return 0
    return (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))) * t.element_size()


def _plan_of(inputs: tuple, outputs: tuple, launches: list, allocated: dict) -> Optional[tuple]:
    """The plan of a watched call whose launches all were bound and whose aten calls all were
    replayable, or None where it cannot be replayed (module docstring). `allocated`: the
    storages the body allocated, address -> (bytes, device)."""
    spans, output_plans = [], []
    for out in outputs:
        if not isinstance(out, Tensor) or out.storage_offset() != 0:
            return None
        storage = out.untyped_storage()
        if storage.nbytes() != _storage_nbytes(out):
            return None
        if out.numel():  # (an empty output holds nothing a replay could get wrong)
            if storage.data_ptr() not in allocated or any(start == storage.data_ptr() for start, _ in spans):
                return None
        spans.append((out.data_ptr(), storage.nbytes()))
        output_plans.append((tuple(out.shape), tuple(out.stride()), out.dtype, out.device))
    addresses = {}
    for i, t in enumerate(inputs):
        if isinstance(t, Tensor):
            addresses.setdefault(t.data_ptr(), []).append(i)
    # The body's other allocations: scratch its kernels pass between them (attention's delta).
    output_starts = {start for start, _ in spans}
    scratch = [(start, nbytes, device) for start, (nbytes, device) in allocated.items()
               if start not in output_starts and nbytes]
    launch_plans = []
    for run, function, metadata, grid, arguments in launches:
        template = []
        for value in arguments:
            if not isinstance(value, Tensor):
                template.append((0, 0, 0, value))  # a constant
                continue
            address = value.data_ptr()
            owners = addresses.get(address)
            if owners:  # the first input at that address (the key holds which inputs share one)
                template.append((1, owners[0], 0, None))
                continue
            inside = [j for j, (start, nbytes) in enumerate(spans) if start <= address < start + max(nbytes, 1)]
            if len(inside) == 1:
                template.append((2, inside[0], address - spans[inside[0]][0], None))  # inside an output
                continue
            inside = [j for j, (start, nbytes, _) in enumerate(scratch) if start <= address < start + nbytes]
            if len(inside) != 1:
                return None
            template.append((3, inside[0], address - scratch[inside[0]][0], None))  # inside scratch
        launch_plans.append((run, function, metadata, grid, tuple(template)))
    return tuple(output_plans), tuple(launch_plans), tuple((nbytes, device) for _, nbytes, device in scratch)


_RECORDING = threading.Lock()  # one recording at a time: each swaps process-wide hooks and restores them


def record(body, *inputs):
    """(body(*inputs), its plan or None, whether to try again at a later call): the body runs
    once, for real, watched. Again later: a launch was not bound yet (the kernel's first at its
    signature, an autotuner's tuning), which such a call may bind; or another thread was
    recording (the body then just runs)."""
    if not _RECORDING.acquire(blocking=False):
        return body(*inputs), None, True
    try:
        return _record(body, inputs)
    finally:
        _RECORDING.release()


def _record(body, inputs: tuple):
    launches = _Launches()
    launchers = [launcher for _, launcher in _launcher._LAUNCHERS.values()]
    originals = [launcher.call for launcher in launchers]
    wrappers = [launches.recording_call(launcher, original) for launcher, original in zip(launchers, originals)]
    triton_run = JITFunction.run

    def run_through_triton(kernel, *args, **kwargs):
        if threading.get_ident() == launches.thread:
            launches.complete = False
        return triton_run(kernel, *args, **kwargs)

    for launcher, wrapper in zip(launchers, wrappers):
        launcher.call = wrapper
    JITFunction.run = run_through_triton
    aten_calls = _AtenCalls()
    try:
        with aten_calls:
            result = body(*inputs)
    finally:
        JITFunction.run = triton_run
        for launcher, wrapper, original in zip(launchers, wrappers, originals):
            if launcher.call is wrapper:  # a first launch may have bound it meanwhile: keep that
                launcher.call = original
    if aten_calls.others:
        return result, None, False
    if not launches.complete:  # a kernel not bound yet (its first launch at this signature): again later
        return result, None, True
    outputs = result if isinstance(result, tuple) else (result,)
    return result, _plan_of(inputs, outputs, launches.launches, aten_calls.allocated), False
