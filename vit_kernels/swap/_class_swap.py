"""How a swap changes a module: by its class, planned first and applied all at once.

A swapped module stays the same object. Its class becomes a subclass of the class it had,
with one of our mixins first in the MRO (`swapped_class`), so that:

- parameters, buffers, submodules, attribute values and hooks are the module's own, and
  the state_dict keys cannot change;
- ``isinstance`` against the library's class still holds, and the class keeps its name
  (transformers and accelerate match layers by class name: ``_no_split_modules``);
- a library's ``__init_subclass__`` runs on the new class (transformers'
  GradientCheckpointingLayer wraps its forward with activation checkpointing);
- the mixin falls back to the library's own forward (``base_forward``) for any call it does
  not reproduce, with every argument passed on;
- pickling, ``torch.save`` and ``copy.deepcopy`` rebuild the same swapped class from the
  library's class and the mixin (``__reduce_ex__``), both importable by name;
- ``torch.jit.script`` fails at once with a message naming what works instead.

Nothing outside the model changes: no library class, config or registry is touched, and
models never share state through a swap.

`Plan` collects the changes and the summary lines; `Plan.apply` makes them all or, if one
raises, undoes the ones made, leaving the model exactly as it was.
"""

import functools
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..nn._scripting import NotScriptable

class SwappedModule(NotScriptable):
    """The behaviour every swapped class shares: refusal to script, pickling by (base, mixin)."""

    _vk_base: type  # the class the module had before the swap
    _vk_mixin: type

    def __reduce_ex__(self, protocol):
        return _new_swapped, (self._vk_base, self._vk_mixin), self.__getstate__()

    def base_forward(self, *args, **kwargs):
        """The library's own forward (as it ran before the swap), on this module."""
        return self._vk_base.forward(self, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def swapped_class(base: type, mixin: type) -> type:
    """The subclass of `base` whose methods come first from `mixin` (cached: one class per pair)."""
    namespace = {"_vk_base": base, "_vk_mixin": mixin, "__module__": base.__module__,
                 "__qualname__": base.__qualname__, "__doc__": base.__doc__}
    bases = (mixin, base) if issubclass(mixin, SwappedModule) else (mixin, SwappedModule, base)
    return type(base.__name__, bases, namespace)


def _new_swapped(base: type, mixin: type):
    cls = swapped_class(base, mixin)
    return cls.__new__(cls)


def original_class(module: nn.Module) -> type:
    """The class a module had before any swap."""
    return getattr(type(module), "_vk_base", type(module))


def is_swapped(module: nn.Module) -> bool:
    return isinstance(module, SwappedModule)


def fx_tracing() -> bool:
    """True while torch.fx symbolically traces (timm's and torchvision's feature extractors):
    the swapped forwards then take the library's own structure, so node names stay the
    library's, with the fused ops as leaf functions. Not under torch.compile or torch.export,
    which see the fused ops as custom ops."""
    import torch
    from torch.fx import _symbolic_trace

    symbolic = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None)  # torch >= 2.10
    if symbolic is not None:
        return symbolic()
    return not torch.compiler.is_compiling() and bool(getattr(_symbolic_trace, "_is_fx_tracing_flag", False))


def _is_fsdp_hook(hook) -> bool:
    owner = getattr(hook, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("torch.distributed.fsdp")


def has_user_hooks(module: nn.Module) -> bool:
    """Whether forward hooks other than FSDP2's own are registered on `module`.

    A carried residual stream calls blocks with other arguments and outputs than the
    library's loop; a model whose blocks carry hooks runs the library's loop instead, so
    every hook sees what it saw before. FSDP2's hooks only gather and free parameters.
    """
    hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    return any(not _is_fsdp_hook(hook) for hook in hooks)


@dataclass
class Change:
    path: str
    kind: str  # the summary's module kind: attention, mlp, layer_norm, block, patch_embed, model
    what: str
    apply: Callable[[], None]
    undo: Callable[[], None]


@dataclass
class Plan:
    """The changes a swap will make, and what it leaves alone, before anything is touched."""

    changes: list = field(default_factory=list)
    left: list = field(default_factory=list)  # (path, kind, why)
    already: list = field(default_factory=list)  # (path, kind)

    def change_class(self, module: nn.Module, new_class: type, path: str, kind: str, what: str,
                     **attributes) -> None:
        """Plan `module`'s class to become `new_class` (a subclass of its class), with instance attributes set."""
        before = type(module)
        if not issubclass(new_class, before):
            raise TypeError(f"{new_class.__name__} is not a subclass of {before.__name__}")
        missing = object()
        old = {name: vars(module).get(name, missing) for name in attributes}

        def apply():
            module.__class__ = new_class
            for name, value in attributes.items():
                setattr(module, name, value)

        def undo():
            module.__class__ = before
            for name, value in old.items():
                if value is missing:
                    vars(module).pop(name, None)
                else:
                    setattr(module, name, value)

        self.changes.append(Change(path, kind, what, apply, undo))

    def swap_class(self, module: nn.Module, mixin: type, path: str, kind: str, what: str, **attributes) -> None:
        """Plan `module`'s class to become swapped_class(its class, mixin)."""
        self.change_class(module, swapped_class(type(module), mixin), path, kind, what, **attributes)

    def leave(self, path: str, kind: str, why: str) -> None:
        self.left.append((path, kind, why))

    def merge(self, other: "Plan", prefix: str) -> None:
        """Take `other`'s changes and lines, planned on the submodule at `prefix`, with their paths under it."""
        def under(path):
            return f"{prefix}.{path}" if path else prefix

        for change in other.changes:
            change.path = under(change.path)
            self.changes.append(change)
        self.left += [(under(path), kind, why) for path, kind, why in other.left]
        self.already += [(under(path), kind) for path, kind in other.already]

    def apply(self, summary) -> None:
        done = []
        try:
            for change in self.changes:
                change.apply()
                done.append(change)
        except BaseException:
            for change in reversed(done):
                change.undo()
            raise
        for change in self.changes:
            summary.swap(change.path, change.kind, change.what)
        for path, kind, why in self.left:
            summary.left_alone(path, kind, why)
        for path, kind in self.already:
            summary.already_swapped(path, kind)
