"""What torch.jit.script meets in a fused module: a clear refusal, before it tries."""

SCRIPTING_REFUSED = (
    "vit_kernels: fused modules cannot be compiled with torch.jit.script (their ops are Triton and C++ "
    "kernels that TorchScript cannot see into). Use torch.compile or torch.export instead; a model you "
    "swapped can be scripted before swap_modules (it then runs unfused)."
)


class NotScriptable:
    """Mixin: torch.jit.script calls ``__prepare_scriptable__`` on every submodule first, so a
    model holding one of these fails at once, naming what works instead."""

    def __prepare_scriptable__(self):
        raise RuntimeError(SCRIPTING_REFUSED)
