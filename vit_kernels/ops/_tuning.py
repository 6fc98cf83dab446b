"""The one tuning cache of the autotuned ops: a launch that chooses among several configs.

`launch` runs a kernel with its single config, or with the config an autotuner chose among
several. The autotuner (built once per kernel and config list) runs only at the first launch of
each key: the values of the kernel arguments named in `key` and every tensor argument's dtype,
the key triton.autotune forms itself. Later launches with that key go straight to the kernel
with the chosen config's arguments, exactly as the autotuner passes them (so Triton finds the
same compiled kernel): Autotuner.run rebuilds its key from every argument on each call, a large
share of what Triton's launch path costs the host (scripts/host_overhead.py --triton-launch
measures it), and a ViT step is host-bound.

While torch.compile traces an op, a key already tuned launches its chosen config, and one not
yet tuned (or with symbolic sizes) records the autotuner, which Inductor runs itself.

Tuning happens on the device at the first call of a shape; a CUDA-graph capture or a timed run
must come after a warm-up call (docs/design.md, "Host cost, graphs and syncs").
"""

import triton
from torch import Tensor

from .._dispatch import TRACED_LAUNCHES
from ._launcher import launcher_for, traced_launch
from ._triton_helpers import LAUNCH_OPTIONS

_AUTOTUNERS = {}  # (launcher, id(config list)) -> (the config list, its triton.autotune wrapper)
_CHOSEN = {}  # (launcher, id(config list), key values, dtypes) -> (its meta-parameters, launch keywords)
# of the config its autotuner chose


def launch(kernel, configs: tuple, grid_for, args: tuple, kwargs: dict, *, key: tuple,
           options: dict = LAUNCH_OPTIONS, dtypes: tuple = None) -> None:
    """kernel[grid](*args, **kwargs) with one of `configs` (triton.Config), chosen by timing them
    on the first launch of each key, and through the kernel's Launcher (ops/_launcher.py) once
    chosen. `configs` must be the same object for the same configs (a cached tuple): the cache is
    keyed on its identity. `grid_for(meta)` gives the grid for a config's meta-parameters.
    `dtypes`: the dtypes that decide every tensor argument's, where the caller knows them (the
    key then need not read each tensor's: about 2 us a launch at 27 arguments); by default every
    tensor argument's dtype, as triton.autotune keys."""
    launcher = launcher_for(kernel)
    if len(configs) == 1:
        config = configs[0]
        launcher.call(grid_for(config.kwargs), *args, **kwargs, **config.kwargs, num_warps=config.num_warps,
                      num_stages=config.num_stages, **options)
        return
    positions = launcher.positions
    values = tuple(kwargs[name] if name in kwargs else args[positions[name]] for name in key)
    # The entry holds the config list, so its id cannot be reused by another while the entry exists.
    if dtypes is None:
        dtypes = tuple([arg.dtype for arg in args if isinstance(arg, Tensor)])
    tuned = (launcher, id(configs), *values, *dtypes)
    if TRACED_LAUNCHES.on and not all(value.__class__ is int for value in values):
        chosen = None  # symbolic sizes: the autotuner below, which Inductor runs on the device
    else:
        chosen = _CHOSEN.get(tuned)
    if chosen is not None:
        meta, config_kwargs = chosen
        launcher.call(grid_for(meta), *args, **kwargs, **options, **config_kwargs)
        return
    entry = _AUTOTUNERS.get(tuned[:2])
    if entry is None:
        autotuner = triton.autotune(configs=list(configs), key=list(key))(kernel)
        entry = _AUTOTUNERS[tuned[:2]] = (configs, autotuner)
    if TRACED_LAUNCHES.on:  # Inductor tunes the autotuned kernel itself when it compiles the graph
        traced_launch(entry[1], grid_for, *args, **kwargs, **options)
        return
    entry[1][grid_for](*args, **kwargs, **options)
    best = entry[1].best_config  # the config Autotuner.run launched (None: ask it again)
    if best is not None:
        _CHOSEN[tuned] = (best.kwargs, best.all_kwargs())
