"""A whole training step, or an inference forward, captured in one CUDA graph and replayed.

A ViT step after swap_modules launches fewer and shorter kernels than eager, but each launch
costs the host 10-20 us of Python, dispatch and Triton's launcher, so the GPU waits for the
host (README, "Measured results"). A CUDA graph launches the whole step at once: its replay
costs the host one call, whatever the number of kernels.

    step = vit_kernels.capture_train_step(model, optimizer, loss_fn, images, labels)
    for images, labels in loader:
        loss = step(images, labels)   # a device tensor: no host sync

What the capture holds: the forward under autocast, `loss_fn(output, labels)`, the backward,
optional gradient clipping and `optimizer.step()`, with the gradients in the graph's memory.
Each call copies the batch into the graph's input buffers and replays it. Random numbers stay
random: PyTorch's CUDA generator advances its Philox offset on every replay, and the fused
attention draws its dropout seed with it on the device (ops/attention.py), so drop path and
attention dropout draw new masks on every step.

Before the capture, `warmup` eager steps on the example batch run on a side stream (every
autotuner chooses its config, the extension is built, the optimizer creates its state); the
parameters, buffers and optimizer state are then restored to what they were, so capturing
does not train the model. Needs a capturable optimizer (`capturable=True`: its step count
stays on the device). Refused with a message: float16 autocast (GradScaler reads its
found-inf flag on the host), DistributedDataParallel (its all-reduce hooks are not captured
here), models or batches not on one CUDA device other than the CPU.

A learning rate given as a float is frozen into the graph: changing it afterwards (a scheduler)
is a ValueError at the next call, not a silently stale rate. Give it as a tensor on the
device (`lr=torch.tensor(1e-3, device="cuda")`), which the graph reads and PyTorch's schedulers
change in place.

On the CPU the same calls run eagerly (no graph), so code written for a GPU runs anywhere.
A batch of another shape, dtype or device than the example is a ValueError: run it with
`step.eager(images, labels)` (a last partial batch) or drop it (drop_last=True).
"""

from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["capture_inference", "capture_train_step"]


def _check_common(model, tensors: dict, autocast_dtype) -> torch.device:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if autocast_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast_dtype must be torch.bfloat16, torch.float16 or None, got {autocast_dtype}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("model is DistributedDataParallel: its gradient all-reduce runs in hooks that this "
                         "capture does not hold; train it without capture_train_step")
    params = [p for p in model.parameters()]
    devices = {p.device for p in params} | {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"model and {', '.join(tensors)} must be on one device, got {sorted(map(str, devices))}")
    return devices.pop()


class _Signature:
    """The shapes, dtypes and devices of the example batch: every later batch must match."""

    def __init__(self, **tensors):
        self.expected = {name: (t.shape, t.dtype, t.device) for name, t in tensors.items()}

    def check(self, **tensors):
        for name, t in tensors.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            want = self.expected[name]
            if (t.shape, t.dtype, t.device) != want:
                raise ValueError(
                    f"{name} is {tuple(t.shape)} {t.dtype} on {t.device}, but the step was captured for "
                    f"{tuple(want[0])} {want[1]} on {want[2]}: run it with .eager(...) (a last partial batch) "
                    "or capture another step for this shape")


def _autocast(device: torch.device, dtype):
    # cache_enabled=False, as PyTorch's CUDA-graph notes require: autocast's cache of cast weights
    # would be freed when the captured context exits, leaving the graph reading freed memory.
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None, cache_enabled=False)


def _state_tensors(optimizer) -> list:
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, Tensor)]


def _snapshot(model: nn.Module, optimizer) -> list:
    """(live tensor, copy) of every parameter, buffer and optimizer-state tensor."""
    live = list(model.parameters()) + list(model.buffers()) + _state_tensors(optimizer)
    return [(t, t.detach().clone()) for t in live]


def _restore(snapshot: list, optimizer) -> None:
    """Put back what `snapshot` holds; optimizer state made since is zeroed, as the Adam family
    creates it (moments and a step count of zero), the only optimizers that are capturable."""
    with torch.no_grad():
        kept = set()
        for live, saved in snapshot:
            live.copy_(saved)
            kept.add(id(live))
        for t in _state_tensors(optimizer):
            if id(t) not in kept:
                t.zero_()


class GraphedTrainStep:
    """A captured training step: `step(images, labels)` -> the loss, a device tensor. See the module."""

    def __init__(self, run: Callable, signature: _Signature, graph=None, static_inputs=None, static_outputs=None,
                 optimizer=None):
        self._run, self._signature, self._graph = run, signature, graph
        self._static_inputs, self._static_outputs = static_inputs, static_outputs
        # The learning rates the graph holds: a float is frozen into it, a tensor is read by it.
        self._lrs = [(group, group["lr"]) for group in optimizer.param_groups] if optimizer is not None else []

    def _check_learning_rates(self) -> None:
        for i, (group, captured) in enumerate(self._lrs):
            current = group["lr"]
            if current is captured:
                continue
            if isinstance(current, Tensor) or isinstance(captured, Tensor) or current != captured:
                raise ValueError(
                    f"param_groups[{i}]['lr'] changed since the step was captured, and the graph would keep "
                    "the old one: build the optimizer with a tensor learning rate (lr=torch.tensor(1e-3, "
                    "device='cuda')) and change it in place (a scheduler does: fill_), or capture again")

    @property
    def graphed(self) -> bool:
        """False where the step runs eagerly (not on a CUDA device)."""
        return self._graph is not None

    def eager(self, images: Tensor, labels: Tensor) -> Tensor:
        """The same step run eagerly, for a batch the graph was not captured for."""
        return self._run(images, labels)

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        self._signature.check(images=images, labels=labels)
        if self._graph is None:
            return self._run(images, labels)
        self._check_learning_rates()
        self._static_inputs[0].copy_(images)
        self._static_inputs[1].copy_(labels)
        self._graph.replay()
        if isinstance(self._static_outputs, tuple):
            return tuple(t.clone() for t in self._static_outputs)
        return self._static_outputs.clone()


def capture_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, images: Tensor,
                       labels: Tensor, *, autocast_dtype: Optional[torch.dtype] = torch.bfloat16,
                       max_grad_norm: Optional[float] = None, warmup: int = 3) -> GraphedTrainStep:
    """Capture one training step of `model` for batches shaped like (`images`, `labels`).

    The step: `loss = loss_fn(model(images), labels)` under autocast (`autocast_dtype`, None
    for none), `loss.backward()`, gradient clipping to `max_grad_norm` when given,
    `optimizer.step()`. `loss_fn` may also return `(loss, *extras)`, tensors computed from the
    output (an accuracy count, say): the step then returns `(loss, *extras)`, detached.
    Returns a GraphedTrainStep; call it with each batch. The model stays
    in the mode it is in (call `model.train()` first). On the CPU the step runs eagerly.

    Raises:
        TypeError: model not an nn.Module, optimizer not a torch.optim.Optimizer, loss_fn not
            callable, images or labels not tensors.
        ValueError: things on different devices; on CUDA an optimizer without
            capturable=True, float16 autocast, a DistributedDataParallel model; warmup < 1;
            max_grad_norm <= 0.
    """
    device = _check_common(model, {"images": images, "labels": labels}, autocast_dtype)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step_once(x: Tensor, y: Tensor):
        """The step itself; (loss, its detached outputs) with the outputs as loss_fn returns them."""
        with _autocast(device, autocast_dtype):
            returned = loss_fn(model(x), y)
        loss = returned[0] if isinstance(returned, tuple) else returned
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if isinstance(returned, tuple):
            return tuple(t.detach() for t in returned)
        return loss.detach()

    def run(x: Tensor, y: Tensor):
        # Gradients of None first: nothing accumulates into the graph's gradient buffers.
        optimizer.zero_grad(set_to_none=True)
        return step_once(x, y)

    signature = _Signature(images=images, labels=labels)
    if device.type != "cuda":
        return GraphedTrainStep(run, signature)
    if autocast_dtype == torch.float16:
        raise ValueError("float16 autocast needs a GradScaler, whose step reads its found-inf flag on the host: "
                         "capture with autocast_dtype=torch.bfloat16 (or None)")
    if not all(group.get("capturable", False) for group in optimizer.param_groups):
        raise ValueError(f"optimizer ({type(optimizer).__name__}) must be built with capturable=True, so that its "
                         "step count stays on the device, e.g. torch.optim.AdamW(params, capturable=True)")

    static_inputs = (images.detach().clone(), labels.detach().clone())
    # Warm-up, on a side stream as CUDA graphs require: autotuning, the extension, the
    # optimizer's state. Its training is then undone.
    snapshot = _snapshot(model, optimizer)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run(*static_inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    _restore(snapshot, optimizer)
    del snapshot
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outputs = step_once(*static_inputs)
    return GraphedTrainStep(run, signature, graph, static_inputs, static_outputs, optimizer)


class GraphedForward:
    """A captured inference forward: `forward(images)` -> the output (a new tensor each call)."""

    def __init__(self, run: Callable, signature: _Signature, graph=None, static_input=None, static_output=None):
        self._run, self._signature, self._graph = run, signature, graph
        self._static_input, self._static_output = static_input, static_output

    @property
    def graphed(self) -> bool:
        return self._graph is not None

    def eager(self, images: Tensor):
        return self._run(images)

    def __call__(self, images: Tensor):
        self._signature.check(images=images)
        if self._graph is None:
            return self._run(images)
        self._static_input.copy_(images)
        self._graph.replay()
        return self._static_output.clone()  # the graph's buffer is overwritten by the next call


def capture_inference(model: nn.Module, images: Tensor, *, autocast_dtype: Optional[torch.dtype] = torch.bfloat16,
                      warmup: int = 3) -> GraphedForward:
    """Capture `model(images)` under torch.no_grad() and autocast for batches shaped like `images`.

    Returns a GraphedForward; call it with each batch. The model stays in the mode it is in
    (call `model.eval()` first). On the CPU it runs eagerly. Raises TypeError/ValueError as
    capture_train_step does for its model, images and autocast_dtype, and ValueError for
    warmup < 1.
    """
    device = _check_common(model, {"images": images}, autocast_dtype)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")

    def run(x: Tensor):
        with torch.no_grad(), _autocast(device, autocast_dtype):
            return model(x)

    signature = _Signature(images=images)
    if device.type != "cuda":
        return GraphedForward(run, signature)
    static_input = images.detach().clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run(static_input)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_output = run(static_input)
    return GraphedForward(run, signature, graph, static_input, static_output)
