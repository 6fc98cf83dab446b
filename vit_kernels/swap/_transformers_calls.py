"""What the transformers swaps (transformers_vit, transformers_clip) share: which calls the
fused forwards serve, and which classes are transformers' own."""

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def transformers_class(module, names) -> bool:
    kind = type(module)
    return kind.__name__ in names and kind.__module__.startswith("transformers.models.")


def recording_attentions() -> bool:
    """Whether transformers' output capture is collecting attention maps for the running forward."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def asks_for_more(kwargs) -> bool:
    """Whether a call passes any keyword argument with a value (not None or False)."""
    return any(value is not None and value is not False for value in kwargs.values())
