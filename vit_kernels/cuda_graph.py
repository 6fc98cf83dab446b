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
parameters, buffers, optimizer state and GradScaler state are then restored to what they
were, so capturing does not train the model. Needs a capturable optimizer (`capturable=True`:
its step count stays on the device).

float16 autocast takes a GradScaler (`grad_scaler=torch.amp.GradScaler("cuda")`) and a fused
optimizer (`torch.optim.AdamW(params, fused=True, capturable=True)`): GradScaler hands a fused
optimizer its found-inf flag and scale as device tensors, and the fused kernel skips the update
on an overflow by itself, so the whole scaled step (scale, backward, unscale for clipping, the
step, the scale's update) stays on the device and in the graph. With any other optimizer
GradScaler.step reads the flag on the host (an `.item()`), which a graph would freeze: refused
with a message, as are float16 without a GradScaler, DistributedDataParallel (its all-reduce
hooks are not captured here), and models or batches not on one CUDA device other than the CPU.
A step that reads a device value on the host (an `.item()` in `loss_fn`, say) is a ValueError
that says so, found in the last warm-up step, where every synchronizing CUDA call is made an
error, before the capture would freeze the value.

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


def _check_common(model, tensors: dict, autocast_dtype, warmup) -> torch.device:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if autocast_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast_dtype must be torch.bfloat16, torch.float16 or None, got {autocast_dtype}")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("model is DistributedDataParallel: its gradient all-reduce runs in hooks that this "
                         "capture does not hold; train it without capture_train_step")
    devices = {p.device for p in model.parameters()} | {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"model and {', '.join(tensors)} must be on one device, got {sorted(map(str, devices))}")
    return devices.pop()


def _autocast(device: torch.device, dtype):
    # cache_enabled=False, as PyTorch's CUDA-graph notes require: autocast's cache of cast weights
    # would be freed when the captured context exits, leaving the graph reading freed memory.
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None, cache_enabled=False)


def _check_grad_scaler(grad_scaler, optimizer, device: torch.device) -> torch.amp.GradScaler:
    """The GradScaler a step runs with, checked on every device, so that code that runs on the
    CPU captures on a GPU. Without one, a disabled one: its calls are then the plain step's
    (scale returns the loss, unscale_ and update do nothing, step calls optimizer.step())."""
    if grad_scaler is None:
        return torch.amp.GradScaler(device.type, enabled=False)
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler or None, got {type(grad_scaler).__name__}")
    if not grad_scaler.is_enabled():
        return grad_scaler
    scaler_device = getattr(grad_scaler, "_device", device.type)
    if scaler_device != device.type:
        raise ValueError(f"grad_scaler is for {scaler_device} but the model is on {device}: "
                         f"torch.amp.GradScaler({device.type!r})")
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        raise ValueError(f"grad_scaler needs a fused optimizer ({type(optimizer).__name__} is not): GradScaler.step "
                         "reads the found-inf flag of any other on the host (an .item()), which a CUDA graph would "
                         "freeze; build it with fused=True, e.g. torch.optim.AdamW(params, fused=True, "
                         "capturable=True)")
    return grad_scaler


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


_HOST_SYNC_HELP = ("a CUDA graph cannot hold a read of a device value on the host (an .item(), a .cpu(), "
                   "a bool() of a tensor, a torch.cuda.synchronize()): captured, it would be frozen at the capture's "
                   "value. Keep the value on the device (e.g. return it from loss_fn as a tensor), or train this step "
                   "without capture; torch.cuda.set_sync_debug_mode('warn') shows where it is")


def _run_refusing_host_syncs(run: Callable, inputs: tuple):
    """run(*inputs) with every synchronizing CUDA call an error, raised as a ValueError that names
    it: a step that reads a device value on the host cannot be captured."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return run(*inputs)
    except RuntimeError as err:
        if "synchroniz" not in str(err).lower():
            raise
        raise ValueError(f"the step synchronizes the host with the GPU ({str(err).splitlines()[0]}): "
                         f"{_HOST_SYNC_HELP}") from err
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _warm_up_and_capture(run: Callable, static_inputs: tuple, device: torch.device, warmup: int,
                         before_capture: Callable = lambda: None):
    """`warmup` calls of run(*static_inputs) on a side stream, as CUDA graphs require (every
    autotuner chooses, the extension is built, the allocator settles), the last of several with
    every host sync an error (the autotuners' own, in the first, are allowed), then
    `before_capture()`, then run captured; returns (the graph, the outputs it writes). A host
    sync, or anything else the capture refuses, is a ValueError that says so."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for i in range(warmup):
            if i > 0 and i == warmup - 1:
                _run_refusing_host_syncs(run, static_inputs)
            else:
                run(*static_inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    before_capture()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            outputs = run(*static_inputs)
    except RuntimeError as err:
        message = str(err).lower()
        if "captur" not in message and "synchroniz" not in message:
            raise
        raise ValueError(f"the step could not be captured in a CUDA graph ({str(err).splitlines()[0]}); if it "
                         f"reads a device value on the host, {_HOST_SYNC_HELP}") from err
    return graph, outputs


class Graphed:
    """A captured call: `graphed(*batch)` copies the batch into the graph's input buffers, replays
    the graph and returns new tensors (the graph's own are overwritten by the next call). Where
    there is no graph (not on CUDA), the same call runs eagerly. Either way every batch must
    have the example's shapes, dtypes and devices; `.eager(*batch)` runs one that does not."""

    def __init__(self, run: Callable, names: tuple, example: tuple, graph=None, static_inputs=(), static_outputs=None):
        self._run, self._names, self._graph = run, names, graph
        self._expected = [(t.shape, t.dtype, t.device) for t in example]
        self._static_inputs, self._static_outputs = static_inputs, static_outputs

    @property
    def graphed(self) -> bool:
        """False where the call runs eagerly (not on a CUDA device)."""
        return self._graph is not None

    def eager(self, *batch):
        """The same call run eagerly, for a batch the graph was not captured for."""
        return self._run(*batch)

    def _check(self, batch: tuple) -> None:
        for name, t, want in zip(self._names, batch, self._expected):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if (t.shape, t.dtype, t.device) != want:
                raise ValueError(
                    f"{name} is {tuple(t.shape)} {t.dtype} on {t.device}, but the step was captured for "
                    f"{tuple(want[0])} {want[1]} on {want[2]}: run it with .eager(...) (a last partial batch) "
                    "or capture another step for this shape")

    def _before_replay(self) -> None:
        pass

    def __call__(self, *batch):
        self._check(batch)
        if self._graph is None:
            return self._run(*batch)
        self._before_replay()
        for static, t in zip(self._static_inputs, batch):
            static.copy_(t)
        self._graph.replay()
        if isinstance(self._static_outputs, tuple):
            return tuple(t.clone() for t in self._static_outputs)
        return self._static_outputs.clone()


class GraphedTrainStep(Graphed):
    """A captured training step: `step(images, labels)` -> the loss (or what loss_fn returns), on
    the device. See the module."""

    def __init__(self, run, example, graph=None, static_inputs=(), static_outputs=None, optimizer=None):
        super().__init__(run, ("images", "labels"), example, graph, static_inputs, static_outputs)
        # The learning rates the graph holds: a float is frozen into it, a tensor is read by it.
        self._lrs = [(group, group["lr"]) for group in optimizer.param_groups] if optimizer is not None else []

    def _before_replay(self) -> None:
        for i, (group, captured) in enumerate(self._lrs):
            current = group["lr"]
            if current is captured:
                continue
            if isinstance(current, Tensor) or isinstance(captured, Tensor) or current != captured:
                raise ValueError(
                    f"param_groups[{i}]['lr'] changed since the step was captured, and the graph would keep "
                    "the old one: build the optimizer with a tensor learning rate (lr=torch.tensor(1e-3, "
                    "device='cuda')) and change it in place (a scheduler does: fill_), or capture again")


def capture_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, images: Tensor,
                       labels: Tensor, *, autocast_dtype: Optional[torch.dtype] = torch.bfloat16,
                       max_grad_norm: Optional[float] = None, grad_scaler: Optional[torch.amp.GradScaler] = None,
                       warmup: int = 3) -> GraphedTrainStep:
    """Capture one training step of `model` for batches shaped like (`images`, `labels`).

    The step: `loss = loss_fn(model(images), labels)` under autocast (`autocast_dtype`, None
    for none), `loss.backward()`, gradient clipping to `max_grad_norm` when given,
    `optimizer.step()`. With `grad_scaler` (float16 needs one on CUDA) it is GradScaler's step:
    `scale(loss).backward()`, `unscale_` before clipping, `grad_scaler.step(optimizer)`,
    `grad_scaler.update()`; the optimizer must be fused. `loss_fn` may also return `(loss, *extras)`, tensors computed from the
    output (an accuracy count, say): the step then returns `(loss, *extras)`, detached.
    Returns a GraphedTrainStep; call it with each batch. The model stays in the mode it is in
    (call `model.train()` first). On the CPU the step runs eagerly.

    Raises:
        TypeError: model not an nn.Module, optimizer not a torch.optim.Optimizer, loss_fn not
            callable, images or labels not tensors, grad_scaler not a torch.amp.GradScaler.
        ValueError: things on different devices; on CUDA an optimizer without
            capturable=True, float16 autocast without a grad_scaler, a step that reads a device
            value on the host (found in the last warm-up step when warmup >= 2, else by the
            capture); a grad_scaler with an optimizer that is not fused or for another device;
            a DistributedDataParallel model; warmup < 1; max_grad_norm <= 0.
    """
    device = _check_common(model, {"images": images, "labels": labels}, autocast_dtype, warmup)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
    scaler = _check_grad_scaler(grad_scaler, optimizer, device)
    # Clipped in the model's parameter order, as an eager loop's clip_grad_norm_(model.parameters())
    # does: the total norm's float32 sum depends on the order (the optimizer's groups reorder them).
    params = list(model.parameters())

    def run(x: Tensor, y: Tensor):
        # Gradients of None first: nothing accumulates into the graph's gradient buffers (in a
        # capture, the backward then writes gradients it allocates in the graph's memory).
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, autocast_dtype):
            returned = loss_fn(model(x), y)
        loss = returned[0] if isinstance(returned, tuple) else returned
        scaler.scale(loss).backward()
        if max_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if isinstance(returned, tuple):
            return tuple(t.detach() for t in returned)
        return loss.detach()

    if device.type != "cuda":
        return GraphedTrainStep(run, (images, labels))
    if autocast_dtype == torch.float16 and not scaler.is_enabled():
        raise ValueError("float16 autocast needs a GradScaler: pass grad_scaler=torch.amp.GradScaler('cuda') with a "
                         "fused optimizer (torch.optim.AdamW(params, fused=True, capturable=True)), or capture with "
                         "autocast_dtype=torch.bfloat16 (or None)")
    if not all(group.get("capturable", False) for group in optimizer.param_groups):
        raise ValueError(f"optimizer ({type(optimizer).__name__}) must be built with capturable=True, so that its "
                         "step count stays on the device, e.g. torch.optim.AdamW(params, capturable=True)")
    static_inputs = (images.detach().clone(), labels.detach().clone())
    snapshot = _snapshot(model, optimizer)  # the warm-up trains; this undoes it before the capture
    # Its scale and growth tracker, which the warm-up moves (and makes, at a scaler's first step);
    # a disabled scaler has none and loads nothing.
    scaler_state = scaler.state_dict()

    def before_capture():
        _restore(snapshot, optimizer)
        scaler.load_state_dict(scaler_state)

    graph, static_outputs = _warm_up_and_capture(run, static_inputs, device, warmup, before_capture=before_capture)
    del snapshot
    return GraphedTrainStep(run, (images, labels), graph, static_inputs, static_outputs, optimizer)


class GraphedForward(Graphed):
    """A captured inference forward: `forward(images)` -> the output. See the module."""

    def __init__(self, run, example, graph=None, static_inputs=(), static_outputs=None):
        super().__init__(run, ("images",), example, graph, static_inputs, static_outputs)


def capture_inference(model: nn.Module, images: Tensor, *, autocast_dtype: Optional[torch.dtype] = torch.bfloat16,
                      warmup: int = 3) -> GraphedForward:
    """Capture `model(images)` under torch.no_grad() and autocast for batches shaped like `images`.

    Returns a GraphedForward; call it with each batch. The model stays in the mode it is in
    (call `model.eval()` first). On the CPU it runs eagerly. Raises TypeError/ValueError as
    capture_train_step does for its model, images, autocast_dtype and warmup, and for a forward
    that reads a device value on the host.
    """
    device = _check_common(model, {"images": images}, autocast_dtype, warmup)

    def run(x: Tensor):
        with torch.no_grad(), _autocast(device, autocast_dtype):
            return model(x)

    if device.type != "cuda":
        return GraphedForward(run, (images,))
    static_inputs = (images.detach().clone(),)
    graph, static_output = _warm_up_and_capture(run, static_inputs, device, warmup)
    return GraphedForward(run, (images,), graph, static_inputs, static_output)
