"""Input checks shared by every public op: each raises TypeError/ValueError naming the argument."""

import numbers

import torch

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
