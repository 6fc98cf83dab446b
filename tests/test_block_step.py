"""The one-node block step (vit_kernels/nn/block_step.py) computes what the per-op path computes,
bit for bit: the same kernels in the same order, with autograd's bookkeeping done once per block.

Each case runs a model twice from the same seed, once as it runs (the one-node step) and once with
the step turned off (`carried_block_step`'s per-op path, whose agreement with timm and float64 the
swap and model tests hold to the numerics rule), and compares the output and every gradient with
torch.equal. Each case also counts the blocks that took the one-node step: a case where the step
silently did not run would compare the per-op path with itself.
"""

import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

import vit_kernels
import vit_kernels.nn.block as block_module
import vit_kernels.nn.block_step as block_step_module
from vit_kernels.ops import _nodes
from vit_kernels.testing import kernel_device

# By module path: the package's `bias_gelu` is the function of that name.
attention_ops, bias_gelu_ops, layer_norm_ops = (importlib.import_module(f"vit_kernels.ops.{name}")
                                                for name in ("attention", "bias_gelu", "layer_norm"))

DEVICE = kernel_device()
TINY = dict(img_size=16, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)


@contextlib.contextmanager
def one_node_steps(enabled: bool = True):
    """Counts the blocks that take the one-node step; with enabled=False turns the step off."""
    count = [0]
    spec_of, step = block_module.fast_path_spec, block_module._one_node_block_step

    def counting(*args):
        count[0] += 1
        return step(*args)

    block_module.fast_path_spec = spec_of if enabled else (lambda *args: None)
    block_module._one_node_block_step = counting
    try:
        yield count
    finally:
        block_module.fast_path_spec, block_module._one_node_block_step = spec_of, step


def _timm(**config):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **config})
    return vit_kernels.swap_modules(model)[0]


def _reference(**config):
    from vit_kernels.models import create_model

    return create_model("vit_tiny_patch16_224", fused=True, **{**TINY, **config})


MODELS = {
    "timm": lambda: _timm(),
    "timm layer scale, drop path, attention dropout": lambda: _timm(init_values=0.1, drop_path_rate=0.5,
                                                                   attn_drop_rate=0.3),
    "timm no qkv bias, registers, no class token": lambda: _timm(qkv_bias=False, reg_tokens=2, class_token=False,
                                                                global_pool="avg"),
    "reference ViT": lambda: _reference(init_values=0.1, drop_path_rate=0.2, attn_drop_rate=0.1),
}
PRECISIONS = ("float32", "bf16 autocast", "float16")


def _run(model, images, precision, seed, *, enabled=True, backward=True):
    """(output, {name: grad}, blocks that took the one-node step)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16 autocast")
    with one_node_steps(enabled) as count, autocast:
        out = model(images)
        if backward:
            (out.float() * torch.linspace(-1, 1, out.numel(), device=DEVICE).view(out.shape)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, count[0]


def _assert_same(got, want):
    (out, grads, steps), (out_ref, grads_ref, steps_ref) = got, want
    assert steps > 0 and steps_ref == 0
    assert torch.equal(out, out_ref), (out - out_ref).abs().max()
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_ref[name]), (name, (grads[name] - grads_ref[name]).abs().max())


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", list(MODELS))
def test_one_node_step_equals_the_per_op_path(name, precision, seed):
    model = MODELS[name]().to(DEVICE).train()
    dtype = torch.float16 if precision == "float16" else torch.float32
    model = model.to(dtype)
    images = torch.randn(3, 3, 16, 16, device=DEVICE, dtype=dtype)
    got = _run(model, images, precision, seed)
    assert got[2] == TINY["depth"]
    _assert_same(got, _run(model, images, precision, seed, enabled=False))


def test_steps_replayed_from_launch_plans_equal_the_per_op_path(seed):
    """Four training steps and inference calls on new images: from the third call of a signature
    on, the block's ops replay their launch plans (ops/_plans.py) where launches are bound (on a
    GPU; under the interpreter the bodies run every time, and this checks the C++ glue around
    them), and every output and gradient must still be the per-op path's, bit for bit."""
    model = MODELS["timm layer scale, drop path, attention dropout"]().to(DEVICE).train()
    for i in range(4):
        images = torch.randn(3, 3, 16, 16, device=DEVICE)
        _assert_same(_run(model, images, "bf16 autocast", seed + i),
                     _run(model, images, "bf16 autocast", seed + i, enabled=False))
    model.eval()
    for i in range(4):
        images = torch.randn(3, 3, 16, 16, device=DEVICE)
        with torch.no_grad():
            got, want = (_run(model, images, "bf16 autocast", seed, enabled=enabled, backward=False)
                         for enabled in (True, False))
        _assert_same(got, want)
    if DEVICE.type == "cuda":
        counts = block_step_module.cpp_step().launch_plan_counts()
        assert all(c["planned"] > 0 and c["refused"] == 0 for c in counts.values()), counts


def test_dropout_draws_new_masks_each_call(seed):
    model = _reference(attn_drop_rate=0.5, drop_path_rate=0.5).to(DEVICE).train()
    images = torch.randn(3, 3, 16, 16, device=DEVICE)
    with one_node_steps() as count:
        first, second = model(images), model(images)
    assert count[0] == 2 * TINY["depth"]
    assert not torch.equal(first, second)


def test_frozen_parameters_get_no_gradient(seed):
    model = _timm(init_values=0.1).to(DEVICE).train()
    frozen = ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "blocks.1.norm1.weight", "blocks.1.mlp.fc1.bias",
              "blocks.1.ls1.gamma", "blocks.1.attn.proj.weight")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen)
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    got = _run(model, images, "float32", seed)
    assert not set(frozen) & set(got[1])
    _assert_same(got, _run(model, images, "float32", seed, enabled=False))


def test_inference_takes_the_one_node_step(seed):
    model = _timm(init_values=0.1).to(DEVICE).eval()
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    with torch.no_grad():
        got = _run(model, images, "bf16 autocast", seed, backward=False)
        want = _run(model, images, "bf16 autocast", seed, enabled=False, backward=False)
    assert got[2] == TINY["depth"] and want[2] == 0
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("where", ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "norm2", "attn"])
def test_a_hooked_submodule_sends_its_block_to_the_per_op_path(where, seed):
    model = _timm().to(DEVICE).train()
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    want = _run(model, images, "float32", seed, enabled=False)
    calls = []
    handle = model.blocks[1].get_submodule(where).register_forward_hook(lambda *args: calls.append(1))
    got = _run(model, images, "float32", seed)
    handle.remove()
    assert calls == [1] and got[2] == TINY["depth"] - 1
    # A hook on fc1 or fc2 also sends FusedMlp to its module forward (fc1, GELU, fc2 unfused): the
    # same function with other roundings.
    close = dict(rtol=1e-5, atol=1e-6) if where.startswith("mlp.") else dict(rtol=0, atol=0)
    torch.testing.assert_close(got[0], want[0], **close)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], **close, msg=name)


def test_a_global_hook_sends_every_block_to_the_per_op_path(seed):
    model = _timm().to(DEVICE).train()
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, *args: seen.append(module))
    try:
        got = _run(model, images, "float32", seed)
    finally:
        handle.remove()
    assert got[2] == 0
    assert model.blocks[0].attn.qkv in seen and model.blocks[1].mlp.fc2 in seen


def test_dropout_outside_attention_sends_the_block_to_the_per_op_path(seed):
    model = _timm(proj_drop_rate=0.1).to(DEVICE).train()
    with one_node_steps() as count:
        model(torch.randn(2, 3, 16, 16, device=DEVICE))
    assert count[0] == 0
    model.eval()
    with one_node_steps() as count:
        model(torch.randn(2, 3, 16, 16, device=DEVICE))
    assert count[0] == TINY["depth"]


def test_activation_checkpointing_recomputes_the_one_node_step(seed):
    model = _reference(init_values=0.1, drop_path_rate=0.3, attn_drop_rate=0.2).to(DEVICE).train()
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    want = _run(model, images, "bf16 autocast", seed)
    model.set_grad_checkpointing(True)
    got = _run(model, images, "bf16 autocast", seed)
    assert got[2] == 2 * TINY["depth"]  # each block's forward ran again inside backward
    assert torch.equal(got[0], want[0])
    for name in want[1]:
        assert torch.equal(got[1][name], want[1][name]), name


def test_saved_tensor_hooks_see_what_the_step_keeps(seed):
    model = _reference().to(DEVICE).train()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        with one_node_steps() as count:
            out = model(torch.randn(2, 3, 16, 16, device=DEVICE))
    assert count[0] == TINY["depth"]
    for block in model.blocks:  # the qkv projection's cast weight, among everything a block keeps
        assert any(t is block.attn.qkv.weight for t in packed)
    out.sum().backward()


def test_double_backward_fails_loudly(seed):
    model = _reference().to(DEVICE).train()
    images = torch.randn(2, 3, 16, 16, device=DEVICE, requires_grad=True)
    with one_node_steps() as count:
        (grad,) = torch.autograd.grad(model(images).sum(), images, create_graph=True)
    assert count[0] == TINY["depth"]
    with pytest.raises(RuntimeError, match="once_differentiable|differentiable"):
        grad.sum().backward()


def test_forward_mode_ad_is_refused(seed):
    """Inside a dual level no block takes the node (whose ops would return no tangent): the per-op
    path runs, and the first fused op a dual input reaches refuses it (no op has a forward-mode
    derivative)."""
    import torch.autograd.forward_ad as fwAD

    model = _timm(init_values=0.1).to(DEVICE).eval()
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    with fwAD.dual_level(), torch.no_grad():
        with pytest.raises(NotImplementedError, match="forward-mode"):
            model(fwAD.make_dual(images, torch.randn_like(images)))
        with one_node_steps() as count:
            model(images)
        assert count[0] == 0


def test_tracing_takes_the_per_op_path(seed):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    model = _timm().to(DEVICE).train()
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    with Passthrough(), one_node_steps() as count:
        F.cross_entropy(model(images), torch.tensor([0, 1], device=DEVICE)).backward()
    assert count[0] == 0


@pytest.mark.parametrize("name", ["timm layer scale, drop path, attention dropout", "reference ViT"])
def test_a_step_leaves_no_reference_cycle(name, seed):
    """What a step's autograd graph holds is freed by reference counting when the backward ends. A
    cycle through it (an unpacked saved output, whose grad_fn is the node holding it) would keep
    a block's activations alive until Python's cyclic collector runs, and that collector's full
    passes cost the host about a millisecond a step."""
    import gc

    model = MODELS[name]().to(DEVICE).train()
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    _run(model, images, "bf16 autocast", seed)  # first calls: caches filled, kernels bound
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        got = _run(model, images, "bf16 autocast", seed)
        assert got[2] == TINY["depth"]  # the one-node step ran: a per-op step would pass regardless
        del got
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, (torch.Tensor, torch.autograd.graph.Node))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cyclic == []


def test_a_retained_graph_runs_its_backward_twice(seed):
    """The tape's contexts outlive one backward (retain_graph): the second adds the same gradients."""
    model = _reference(init_values=0.1).to(DEVICE).train()
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    with one_node_steps() as count:
        loss = model(images).square().sum()
        loss.backward(retain_graph=True)
        once = {name: p.grad.clone() for name, p in model.named_parameters()}
        loss.backward()
    assert count[0] == TINY["depth"]
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, 2 * once[name]), name


def test_without_the_cpp_step_blocks_take_the_per_op_path(seed, monkeypatch):
    """Where the extension cannot give the C++ node (cpp_step_unavailable says why), every block
    takes the per-op path: same outputs, no one-node step."""
    model = _timm(init_values=0.1).to(DEVICE).train()
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    want = _run(model, images, "float32", seed, enabled=False)
    monkeypatch.setattr(_nodes, "_loaded", "no extension here")
    got = _run(model, images, "float32", seed)
    assert got[2] == 0 and block_step_module.cpp_step() is None
    assert block_step_module.cpp_step_unavailable() == "no extension here"
    assert torch.equal(got[0], want[0])


def test_a_stale_extension_is_named(monkeypatch):
    """An extension built before csrc/op_nodes.cpp existed (with or without the block step):
    the reason says to rebuild it."""
    from types import SimpleNamespace

    from vit_kernels import _extension

    monkeypatch.setattr(_extension, "module", lambda: object())
    assert "predates csrc/op_nodes.cpp" in _nodes.load()
    monkeypatch.setattr(_extension, "module", lambda: SimpleNamespace(block_step=None, set_launch_plans=None))
    assert "predates csrc/op_nodes.cpp" in _nodes.load()

    def no_extension():
        raise RuntimeError("vit_kernels: compiling the C++ extension failed")

    monkeypatch.setattr(_extension, "module", no_extension)
    assert _nodes.load() == "vit_kernels: compiling the C++ extension failed"


def test_an_error_inside_the_node_reaches_the_caller(seed, monkeypatch):
    """An exception raised by an op the C++ node calls back, in its forward or its backward (on
    autograd's engine), reaches the caller as it was raised."""
    model = _reference().to(DEVICE).train()
    images = torch.randn(2, 3, 16, 16, device=DEVICE)

    def fails(*args):
        raise ValueError("an op failed")

    try:
        monkeypatch.setattr(attention_ops, "flash_attention_bwd_packed", fails)
        _nodes.load()  # hands the extension the op modules' functions again
        with one_node_steps() as count:
            out = model(images)
        assert count[0] == TINY["depth"]
        with pytest.raises(ValueError, match="an op failed"):
            out.sum().backward()
        monkeypatch.setattr(layer_norm_ops, "add_layer_norm_bwd_grads", fails)
        _nodes.load()
        with pytest.raises(ValueError, match="an op failed"):
            model(images).sum().backward()
        monkeypatch.setattr(bias_gelu_ops, "_bias_gelu_fwd_impl", fails)
        _nodes.load()
        with pytest.raises(ValueError, match="an op failed"):
            model(images)
    finally:
        monkeypatch.undo()
        _nodes.load()
    out = model(images)  # the real functions again
    out.sum().backward()
