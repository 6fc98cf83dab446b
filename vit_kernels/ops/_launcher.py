"""Triton launches bound once per signature: what Triton's launcher decides on every call, decided
once (docs/design.md, "Host cost, graphs and syncs").

`kernel[grid](*args, **kwargs)` runs JITFunction.run on every call: it binds the arguments to the
kernel's signature, specializes each one (dtype, 16-byte alignment, ints equal to 1 or divisible by
16), builds the kernel-cache key from that, looks the compiled kernel up, reads the device, the
stream and the launch hooks, and calls the compiled kernel's C launcher. That Python costs more
host time than the GPU spends on a LayerNorm at ViT-B sizes, and a ViT step at a small batch is
host-bound.

`launcher_for(kernel).call(grid, *args, **kwargs)` takes the same arguments. Its first call of each
signature goes through `kernel[grid]` (Triton compiles, or finds the compiled kernel in its own
cache) and keeps the compiled kernel that launch returns; later calls of that signature call that
kernel's C launcher directly with the arguments in the kernel's parameter order, which is what
JITFunction.run hands it (Triton 3.6 through 3.9). The signature is computed by one function made
for each kernel from its parameter list and the types of its first launch's arguments, and it is
never coarser than Triton's specialization (dtype and 16-byte alignment of pointers, ints equal to
1 or divisible by 16 and their integer type): for a tensor its dtype and whether its address is a
multiple of 16, or None; an int or a bool by its value; a float by its type only; every constexpr
and launch option (num_warps, ...) by value, with its name.
tests/test_launcher.py checks this against the installed Triton's own specialization (CI) and
against 3.6 and 3.9 (scripts/compile_check_tritons.sh runs it there too).

The bound path itself runs in C where csrc/bound_launch.c is built (`Launcher.call`, a
BoundLauncher): the same signature, built in C from the roles this binder was made with, looked
up in this Launcher's table; anything it cannot launch comes back here unchanged.

Triton's own path still runs, uncached: under the interpreter; for an argument whose type this
does not know (a NumPy scalar, say); while a launch hook is installed (a profiler such as proton
reads the metadata that Triton's path builds for it); for a kernel with pre-run hooks; and for
the first call of a signature. What this gives up: Triton's check that the global values a kernel
reads have not changed since it compiled (the kernels read no mutable globals), and a change of
TRITON_DEBUG or of the instrumentation knobs after a signature's first launch in the process.

Inside `_dispatch.traced_launches()` (an op's implementation while torch.compile traces it: the ops are
`torch.library.triton_op`s, _dispatch.define_op) a launch is `wrap_triton(kernel)[grid](...)`:
the trace records it as a Triton kernel call that Inductor compiles and launches from its own
wrapper, and nothing is bound here.
"""

import inspect
import sys

from torch import Tensor
from triton import knobs
from triton.knobs import HookChain
from triton.runtime import driver

from .._dispatch import TRACED_LAUNCHES, inductor_keeps_launch_options, interpreted
from .._extension import bound_launch

MAX_SIGNATURES = 1024  # per kernel; past it the bound launches are dropped and bound again as they come


def traced_launch(kernel, grid, *args, **kwargs) -> None:
    """`kernel[grid](...)` as torch.library.wrap_triton records it. An Inductor that does not
    compile traced launches with their backend options (_dispatch.inductor_keeps_launch_options)
    is not handed enable_fp_fusion=True, Triton's default there; the one launch that turns it off
    is never traced by such an Inductor (ops/attention.py)."""
    import torch.library

    if kwargs.get("enable_fp_fusion") is True and not inductor_keeps_launch_options():
        kwargs = {name: value for name, value in kwargs.items() if name != "enable_fp_fusion"}
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


class _Unbindable(Exception):
    """An argument whose type differs from the first call's: Triton's own launch path takes the call."""


def _unbindable(value, *_, **__):
    raise _Unbindable(type(value).__name__)


def _role(value) -> str:
    """How the binder keys a runtime argument, from its type at the kernel's first launch."""
    if value is None or isinstance(value, Tensor):
        return "pointer"
    for cls in (bool, int, float):
        if value.__class__ is cls:
            return cls.__name__
    return "other"


# The signature entry of each role. A pointer: its dtype and whether its address is a multiple of
# 16, or None. An int: its value (finer than Triton's equal-to-1, multiple-of-16 and integer type,
# so one compiled kernel per distinct shape at most). A bool: its value. A float: no entry
# (Triton does not specialize floats), but its type is checked like the others'.
_KEY_OF_ROLE = {
    "pointer": "(None if {0} is None else ({0}.dtype, {0}.data_ptr() & 15 == 0))",
    "int": "({0} if {0}.__class__ is int else _unbindable({0}))",
    "bool": "({0} if {0}.__class__ is bool else _unbindable({0}))",
    "float": "({0}.__class__ is float or _unbindable({0}))",
}


def binder_source(kernel, roles: dict) -> tuple[str, dict]:
    """Source of `bind(<the kernel's parameters>, **options) -> (arguments in order, signature)`,
    with `roles` (parameter name -> role) for the runtime parameters; and its namespace."""
    names, namespace, keys = [], {}, []
    constexpr = {param.name for param in kernel.params if param.is_constexpr}
    parameters = inspect.signature(kernel.fn).parameters
    for name, parameter in parameters.items():
        if parameter.default is inspect.Parameter.empty:
            names.append(name)
        else:
            namespace[f"_default_{name}"] = parameter.default
            names.append(f"{name}=_default_{name}")
        keys.append(name if name in constexpr else _KEY_OF_ROLE[roles[name]].format(name))
    source = (f"def bind({', '.join(names)}, **options):\n"
              f"    return ({', '.join(parameters)},), ({', '.join(keys)}, tuple(options.items()))\n")
    namespace["_unbindable"] = _unbindable
    return source, namespace


def make_binder(kernel, roles: dict):
    """The `bind` function of binder_source(kernel, roles), compiled."""
    source, namespace = binder_source(kernel, roles)
    exec(compile(source, f"<vit_kernels binder of {kernel.fn.__name__}>", "exec"), namespace)
    return namespace["bind"]


def _hooks_installed() -> bool:
    """Whether a launch hook is installed (Triton 3.6+ keeps them in HookChains; one assigned in
    place of a chain counts as installed)."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return (enter.calls if enter.__class__ is HookChain else enter is not None) or (
        leave.calls if leave.__class__ is HookChain else leave is not None)


_ROLE_LETTERS = {"pointer": "p", "int": "i", "bool": "b", "float": "f"}
_NO_DEFAULT = object()


class Launcher:
    """`kernel[grid](*args, **kwargs)` with the host cost paid once per signature (module docstring).

    `call` is what to call: the Launcher itself, or once its first launch has made the binder and
    csrc/bound_launch.c is built, that binder and the bound launch in C (BoundLauncher), which
    reads the same table and hands every call it cannot launch to this Launcher unchanged."""

    __slots__ = ("kernel", "positions", "call", "_bind", "_bound")

    def __init__(self, kernel):
        self.kernel = kernel
        self.positions = {name: i for i, name in enumerate(kernel.arg_names)}  # parameter name -> position
        self.call = self
        self._bind = None  # made at the first launch, from its arguments' types
        self._bound = {}  # (device, signature) -> (C launcher, function handle, packed metadata)

    def __call__(self, grid, *args, **kwargs):
        if TRACED_LAUNCHES.on:
            traced_launch(self.kernel, grid, *args, **kwargs)
            return
        bind = self._bind
        if bind is None:
            self._first_launch(grid, args, kwargs)
            return
        try:
            arguments, signature = bind(*args, **kwargs)
        except (_Unbindable, AttributeError):
            self.kernel[grid](*args, **kwargs)
            return
        bound = self._bound
        if bound:  # the driver is asked only once a launch has compiled (never where none can)
            active = driver.active
            device = active.get_current_device()
            entry = bound.get((device, signature))
            if entry is not None and not _hooks_installed():
                run, function, metadata = entry
                n = len(grid)
                run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, active.get_current_stream(device),
                    function, metadata, None, None, None, *arguments)
                return
        compiled = self.kernel[grid](*args, **kwargs)
        if compiled is None or self.kernel.pre_run_hooks or _hooks_installed():
            return  # nothing launched (a stubbed-out run), or Triton's path must run every time
        if hasattr(compiled, "result"):  # an asynchronous compile's future (Triton 3.6)
            compiled = compiled.result()
        if len(bound) >= MAX_SIGNATURES:
            bound.clear()
        bound[(driver.active.get_current_device(), signature)] = (compiled.run, compiled.function,
                                                                  compiled.packed_metadata)

    def bound_entry(self, args, kwargs):
        """(C launcher, function handle, packed metadata, the arguments in parameter order) of the
        compiled kernel this call would launch straight away on its bound path, or None where
        it would go through Triton's (a first launch, an unbindable argument, a launch hook,
        tracing): what ops/_plans.py records."""
        if self._bind is None or TRACED_LAUNCHES.on or _hooks_installed():
            return None
        try:
            arguments, signature = self._bind(*args, **kwargs)
        except (_Unbindable, AttributeError):
            return None
        entry = self._bound.get((driver.active.get_current_device(), signature)) if self._bound else None
        return None if entry is None else (*entry, arguments)

    def _first_launch(self, grid, args, kwargs):
        """Learn each runtime parameter's role from this call, make the binder, and launch through it."""
        if interpreted(self.kernel):
            self.kernel[grid](*args, **kwargs)  # the interpreter has no compiled kernel to bind
            return
        arguments = inspect.signature(self.kernel.fn).bind(*args, **{k: v for k, v in kwargs.items()
                                                                       if k in self.positions}).arguments
        constexpr = {param.name for param in self.kernel.params if param.is_constexpr}
        roles = {name: _role(value) for name, value in arguments.items() if name not in constexpr}
        if "other" in roles.values():  # a type the binder does not key: Triton's path, every time
            self._bind = _unbindable
            self.kernel[grid](*args, **kwargs)
            return
        self._bind = make_binder(self.kernel, roles)
        self.call = self._bound_in_c(roles) or self
        self(grid, *args, **kwargs)

    def _bound_in_c(self, roles: dict):
        """The BoundLauncher for these roles (the binder's), or None without csrc/bound_launch.c."""
        module = bound_launch()
        if module is None:
            return None
        parameters = inspect.signature(self.kernel.fn).parameters.values()
        defaults = tuple(_NO_DEFAULT if p.default is inspect.Parameter.empty else p.default for p in parameters)
        c_launcher = module.BoundLauncher(self, self.positions, defaults, _NO_DEFAULT, self._bound,
                                          sys.modules[__name__], _hooks_installed, TRACED_LAUNCHES)
        c_launcher.set_roles("".join(_ROLE_LETTERS.get(roles.get(name), "c") for name in self.positions))
        return c_launcher


_LAUNCHERS = {}  # id(kernel) -> (kernel, its Launcher); the kernel kept so that its id stays its own


def launcher_for(kernel) -> Launcher:
    """The one Launcher of `kernel` (JITFunction's own __hash__ hashes its source: keyed by id).

    A launch is `launcher_for(kernel).call(grid, *args, **kwargs)`, written out at each call site:
    a helper of the form `launch(kernel, grid, *args, **kwargs)` would pack ~30 arguments into a
    tuple and a dict and unpack them again, about 1.2 us a launch (scripts/host_overhead.py)."""
    entry = _LAUNCHERS.get(id(kernel))
    if entry is None:
        entry = _LAUNCHERS[id(kernel)] = (kernel, Launcher(kernel))
    return entry[1]
