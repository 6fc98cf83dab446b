"""Input checks shared by every public op: each raises TypeError/ValueError naming the argument."""

import functools
import numbers

import torch

from ._dispatch import tracing

MAX_SIGNATURES = 4096  # per check; past it the passed signatures are forgotten and checked again

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_tensor(name: str, value, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(value.dtype).replace('torch.', '')}")


def check_optional_float_tensor(name: str, value, dtypes=FLOAT_DTYPES) -> None:
    if value is not None:
        check_float_tensor(name, value, dtypes)


def check_same_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(
                f"{name} is on {value.device} but {reference_name} is on {reference.device}; "
                "all tensors must be on one device"
            )


def check_shape(name: str, value, expected: tuple) -> None:
    if value is not None and tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(value.shape)}")


def check_number(name: str, value, *, minimum=None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


def channel_normalization(mean, std, channels: int) -> tuple:
    """(mean, std) as float32 vectors of one entry per channel, std positive; else ValueError."""
    mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
    std = torch.as_tensor(std, dtype=torch.float32).flatten()
    if mean.numel() != channels or std.numel() != channels:
        raise ValueError(f"mean and std must have one entry per input channel ({channels}), "
                         f"got {tuple(mean.shape)} and {tuple(std.shape)}")
    if bool((std <= 0).any()):
        raise ValueError("std must be positive")
    return mean, std


def python_signature(args: tuple, tensor_type: type) -> tuple:
    """What checked_once keys a passed check on: a tensor by its type, shape, strides, dtype and
    device, anything else by its type and value. csrc/bound_launch.c's check_signature builds the
    same tuple in C (about 1 us of host time fewer a call); this is where it cannot be built."""
    return tuple([(type(arg), arg.shape, arg.stride(), arg.dtype, arg.device) if isinstance(arg, tensor_type)
                  else (type(arg), arg) for arg in args])


def _signature_of(args: tuple, tensor_type: type) -> tuple:
    """checked_once's signature, by csrc/bound_launch.c where it is built (VIT_KERNELS_C_LAUNCH=0 or
    no C compiler: python_signature). The first call chooses and rebinds this name to the choice."""
    global _signature_of
    from ._extension import bound_launch

    module = bound_launch()
    _signature_of = module.check_signature if module is not None else python_signature
    return _signature_of(args, tensor_type)


class _FastSignature:
    """The C++ extension's check_signature (csrc/launch_plan.cpp), set when ops/_nodes loads it:
    a bytes signature, several times cheaper than the tuple, for the arguments it covers."""

    function = None


FAST_SIGNATURE = _FastSignature()


def _signature(args: tuple):
    fast = FAST_SIGNATURE.function
    if fast is not None:
        signature = fast(args, torch.nn.Parameter)
        if signature is not None:
            return signature
    return _signature_of(args, torch.Tensor)


def checked_once(check):
    """`check(*args)` run once per signature of its arguments, not on every call: a ViT step calls
    each op dozens of times with the same few signatures, and a full check costs several us of
    host time per call (docs/design.md, "Host cost, graphs and syncs").

    The signature holds all a check may read: of a tensor its type, shape, strides, dtype and
    device; of anything else its type and value (so True never passes for a checked 1). Never
    for a check that reads a tensor's values (the signature does not hold them). A check
    that raises is run again on the next call: only signatures that passed are kept. While
    something traces (torch.compile then sees the check itself), and for arguments without a
    hashable signature (a list, a sparse tensor), the check runs every time.
    """
    passed = set()

    @functools.wraps(check)
    def checked(*args):
        if tracing():
            check(*args)
            return
        try:
            signature = _signature(args)
            if signature in passed:
                return
        except (TypeError, RuntimeError):
            check(*args)
            return
        check(*args)
        if len(passed) >= MAX_SIGNATURES:
            passed.clear()
        passed.add(signature)

    checked.passed = passed
    return checked
