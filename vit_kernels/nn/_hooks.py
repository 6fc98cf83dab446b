"""Whether a module's call would run anything besides its class's forward: a fused path that
computes a submodule's output without calling it is taken only where the call would not."""

from torch import nn


def global_hooks_installed() -> bool:
    """Whether a hook registered for every module (register_module_forward_hook and its kin) is installed."""
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks or module._global_backward_hooks
                or module._global_backward_pre_hooks)


def runs_plainly(module: nn.Module) -> bool:
    """Whether calling `module` runs just its class's forward: no hook of its own, no instance `forward`
    (global hooks: global_hooks_installed)."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)
