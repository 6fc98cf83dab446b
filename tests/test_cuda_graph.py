"""vit_kernels.capture_train_step and capture_inference: argument checks and clear errors, the
eager fallback on the CPU (the same numbers as a hand-written step), the batch signature, and
on a GPU the graphed step against the eager one (by the numerics rule, replay after replay),
new dropout masks on every replay, and a capture that does not train the model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vit_kernels
from vit_kernels.testing import assert_rule, kernel_device, no_host_reads

DEVICE = kernel_device()
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _model(**config):
    from vit_kernels.models import create_model

    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", fused=True, **{**TINY, **config}).to(DEVICE).train()


def _batch(seed, batch=4):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=generator).to(DEVICE)
    return images, torch.randint(0, 10, (batch,), generator=generator).to(DEVICE)


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=DEVICE.type == "cuda")


def _eager_steps(model, batches, autocast_dtype):
    optimizer = _optimizer(model)
    losses = []
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def test_the_cpu_runs_the_same_step_eagerly():
    if DEVICE.type == "cuda":
        pytest.skip("the fallback is the CPU's")
    model, twin = _model(), _model()
    batches = [_batch(i) for i in range(3)]
    step = vit_kernels.capture_train_step(model, _optimizer(model), F.cross_entropy, *batches[0], autocast_dtype=None)
    assert not step.graphed
    losses = [step(*b) for b in batches]
    want = _eager_steps(twin, batches, None)
    for got, expected in zip(losses, want):
        assert torch.equal(got, expected)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    forward = vit_kernels.capture_inference(model.eval(), batches[0][0], autocast_dtype=None)
    assert not forward.graphed
    with torch.no_grad():
        assert torch.equal(forward(batches[1][0]), model(batches[1][0]))


def test_a_batch_of_another_shape_is_refused_by_name_and_runs_eagerly_on_request():
    model = _model()
    images, labels = _batch(0)
    step = vit_kernels.capture_train_step(model, _optimizer(model), F.cross_entropy, images, labels,
                                          autocast_dtype=None)
    short_images, short_labels = _batch(1, batch=3)
    with pytest.raises(ValueError, match="images is \\(3, 3, 32, 32\\).*captured for \\(4, 3, 32, 32\\)"):
        step(short_images, short_labels)
    with pytest.raises(ValueError, match="labels is"):
        step(images, labels.int())
    with pytest.raises(TypeError, match="images must be a tensor"):
        step(images.tolist(), labels)
    assert torch.isfinite(step.eager(short_images, short_labels))
    forward = vit_kernels.capture_inference(model.eval(), images, autocast_dtype=None)
    with pytest.raises(ValueError, match="images is"):
        forward(short_images)


@pytest.mark.parametrize("bad, error, match", [
    (dict(model="not a model"), TypeError, "model must be an nn.Module"),
    (dict(optimizer="adam"), TypeError, "optimizer must be a torch.optim.Optimizer"),
    (dict(loss_fn=3), TypeError, "loss_fn must be callable"),
    (dict(images=None), TypeError, "images must be a tensor"),
    (dict(labels=[1, 2]), TypeError, "labels must be a tensor"),
    (dict(autocast_dtype=torch.float32), ValueError, "autocast_dtype must be"),
    (dict(warmup=0), ValueError, "warmup must be an int >= 1"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be > 0"),
    (dict(grad_scaler="scaler"), TypeError, "grad_scaler must be a torch.amp.GradScaler"),
])
def test_bad_arguments_are_named(bad, error, match):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True, capturable=DEVICE.type == "cuda")
    args = dict(model=model, optimizer=optimizer, loss_fn=F.cross_entropy, images=_batch(0)[0],
                labels=_batch(0)[1])
    options = {k: bad.pop(k) for k in ("autocast_dtype", "warmup", "max_grad_norm", "grad_scaler") if k in bad}
    args.update(bad)
    with pytest.raises(error, match=match):
        vit_kernels.capture_train_step(*args.values(), **options)


def _scaler():
    """A GradScaler whose first step overflows float16 (2^20 times the loss) and that then backs
    off to 2^12 and doubles after every step without one: each of its paths in a few steps."""
    return torch.amp.GradScaler(DEVICE.type, init_scale=2.0**20, backoff_factor=2.0**-8, growth_interval=1)


def _fused_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=DEVICE.type == "cuda")


def _eager_scaled_steps(model, batches, max_grad_norm):
    """GradScaler's documented loop, by hand: the step a float16 capture must reproduce."""
    optimizer, scaler = _fused_optimizer(model), _scaler()
    losses, scales = [], []
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            loss = F.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.detach())
        scales.append(scaler.get_scale())
    return losses, scales


def test_float16_with_a_grad_scaler_is_gradscalers_step_and_reads_nothing_on_the_host():
    """float16 autocast with a GradScaler and a fused AdamW, clipped: on the CPU the step is the
    hand-written GradScaler loop's, bit for bit (losses, weights, the scale through an overflow
    that skips the update, a back-off and growth), and no call of it reads a tensor on the host,
    which is what lets a GPU capture it. On a GPU, test_graphed_float16_steps_match_eager_ones."""
    if DEVICE.type == "cuda":
        pytest.skip("the fallback is the CPU's")
    model, twin = _model(), _model()
    initial = [p.detach().clone() for p in model.parameters()]
    batches = [_batch(i) for i in range(3)]
    scaler = _scaler()
    step = vit_kernels.capture_train_step(model, _fused_optimizer(model), F.cross_entropy, *batches[0],
                                          autocast_dtype=torch.float16, max_grad_norm=1.0, grad_scaler=scaler)
    losses, scales = [], []
    for images, labels in batches:
        with no_host_reads():
            losses.append(step(images, labels))
        scales.append(scaler.get_scale())
        if len(scales) == 1:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), initial)), "an overflow must skip"
    want_losses, want_scales = _eager_scaled_steps(twin, batches, 1.0)
    assert scales == want_scales == [2.0**12, 2.0**13, 2.0**14]
    for got, expected in zip(losses, want_losses):
        assert torch.equal(got, expected)
    for p, q, p0 in zip(model.parameters(), twin.parameters(), initial):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), initial)), "later steps must train"


def test_a_grad_scaler_needs_a_fused_optimizer():
    """GradScaler.step reads any other optimizer's found-inf flag on the host: refused on every
    device, naming the fix."""
    model = _model()
    with pytest.raises(ValueError, match="grad_scaler needs a fused optimizer.*fused=True"):
        vit_kernels.capture_train_step(model, _optimizer(model), F.cross_entropy, *_batch(0),
                                       autocast_dtype=torch.float16, grad_scaler=_scaler())


def test_things_on_two_devices_or_under_ddp_are_refused():
    model = _model()
    images, labels = _batch(0)
    meta_labels = torch.empty(4, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="must be on one device"):
        vit_kernels.capture_train_step(model, _optimizer(model), F.cross_entropy, images, meta_labels)

    class FakeDDP(nn.parallel.DistributedDataParallel):
        def __init__(self, module):
            nn.Module.__init__(self)
            self.module = module

    with pytest.raises(ValueError, match="DistributedDataParallel"):
        vit_kernels.capture_train_step(FakeDDP(model), _optimizer(model), F.cross_entropy, images, labels)


def test_a_host_sync_in_the_checked_warm_up_step_is_a_value_error_naming_it(monkeypatch):
    """The plumbing of the check a GPU runs in the last warm-up step (the GPU test below runs it
    for real): CUDA's sync-debug error becomes a ValueError that says what a graph cannot hold
    and how to find it, any other error passes unchanged, and the debug mode is put back."""
    from vit_kernels import cuda_graph

    modes = ["default"]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def reads_on_host(x):
        assert modes[-1] == "error"
        raise RuntimeError("called a synchronizing CUDA operation")

    with pytest.raises(ValueError, match=r"synchronizes the host with the GPU \(called a synchronizing CUDA "
                                         r"operation\): a CUDA graph cannot hold.*set_sync_debug_mode\('warn'\)"):
        cuda_graph._run_refusing_host_syncs(reads_on_host, (1,))
    assert modes[-1] == "default"

    def fails_otherwise(x):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        cuda_graph._run_refusing_host_syncs(fails_otherwise, (1,))
    assert modes[-1] == "default"
    assert cuda_graph._run_refusing_host_syncs(lambda x: x + 1, (1,)) == 2


@pytest.mark.requires_cuda
def test_a_step_that_reads_on_the_host_is_refused_with_its_cause():
    """An .item() in loss_fn: found in the last warm-up step (warmup >= 2), or by the capture
    itself (warmup = 1), and named either way; never a hang or a graph with a frozen value."""
    model = _model()
    images, labels = _batch(0)

    def loss_reading_on_host(logits, labels):
        loss = F.cross_entropy(logits, labels)
        return loss * (1.0 if loss.item() > 0 else 2.0)

    with pytest.raises(ValueError, match="synchronizes the host with the GPU"):
        vit_kernels.capture_train_step(model, _optimizer(model), loss_reading_on_host, images, labels)
    with pytest.raises(ValueError, match="could not be captured in a CUDA graph"):
        vit_kernels.capture_train_step(model, _optimizer(model), loss_reading_on_host, images, labels, warmup=1)


@pytest.mark.requires_cuda
def test_cuda_refuses_what_it_cannot_capture():
    model = _model()
    images, labels = _batch(0)
    plain = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="capturable=True"):
        vit_kernels.capture_train_step(model, plain, F.cross_entropy, images, labels)
    with pytest.raises(ValueError, match="float16 autocast needs a GradScaler: pass grad_scaler="):
        vit_kernels.capture_train_step(model, _optimizer(model), F.cross_entropy, images, labels,
                                       autocast_dtype=torch.float16)
    with pytest.raises(ValueError, match="grad_scaler is for cpu but the model is on cuda"):
        vit_kernels.capture_train_step(model, _fused_optimizer(model), F.cross_entropy, images, labels,
                                       autocast_dtype=torch.float16, grad_scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.requires_cuda
def test_graphed_float16_steps_match_eager_ones():
    """float16 with a GradScaler, clipped: 6 replays against GradScaler's eager loop from the same
    weights. The scale must follow the same path (an overflow at 2^20 that skips the update, a
    back-off, then growth: computed on the device inside the graph), the losses and weights
    agree by the rule against a float64 copy; and the capture itself does not train or move
    the scale."""
    model = _model()
    eager, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    batches = [_batch(i) for i in range(6)]
    scaler = _scaler()
    step = vit_kernels.capture_train_step(model, _fused_optimizer(model), F.cross_entropy, *batches[0],
                                          autocast_dtype=torch.float16, max_grad_norm=1.0, grad_scaler=scaler)
    assert step.graphed
    assert scaler.get_scale() == 2.0**20, "the capture moved the scale"
    for p, q in zip(model.parameters(), eager.parameters()):
        assert torch.equal(p, q), "the capture changed the weights"
    got, scales = [], []
    for b in batches:
        got.append(step(*b))
        scales.append(scaler.get_scale())
    want, want_scales = _eager_scaled_steps(eager, batches, 1.0)
    assert scales == want_scales and scales[0] == 2.0**12, (scales, want_scales)
    # The steps the scaler skipped (an overflow backs the scale off): the float64 twin skips them too.
    skipped = [after < before for before, after in zip([2.0**20] + scales[:-1], scales)]
    assert skipped[0] and not skipped[1], scales
    oracle_optimizer = torch.optim.AdamW(oracle.parameters(), lr=1e-3)
    exact = []
    for i, (x, y) in enumerate(batches):
        oracle_optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(oracle(x.double()), y)
        exact.append(loss.detach())
        if not skipped[i]:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(oracle.parameters()), 1.0)
            oracle_optimizer.step()
    for i, (g, w, e) in enumerate(zip(got, want, exact)):
        assert_rule(f"loss {i}", g, e, w)
    for (name, p), q, r in zip(model.named_parameters(), eager.parameters(), oracle.parameters()):
        assert_rule(name, p, r, q)


@pytest.mark.requires_cuda
def test_graphed_steps_match_eager_steps_by_the_rule():
    """Dropout off: 8 replays against 8 eager steps from the same weights, every loss and the
    final parameters by the rule against a float64 copy trained the same way; the capture
    itself does not train (its warm-up is undone)."""
    model = _model()
    eager, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    batches = [_batch(i) for i in range(8)]
    step = vit_kernels.capture_train_step(model, _optimizer(model), F.cross_entropy, *batches[0])
    assert step.graphed
    for p, q in zip(model.parameters(), eager.parameters()):
        assert torch.equal(p, q), "the capture changed the weights"
    got = [step(*b) for b in batches]
    want = _eager_steps(eager, batches, torch.bfloat16)
    exact = _eager_steps(oracle, [(x.double(), y) for x, y in batches], None)
    for i, (g, w, e) in enumerate(zip(got, want, exact)):
        assert_rule(f"loss {i}", g, e, w)
    for (name, p), q, r in zip(model.named_parameters(), eager.parameters(), oracle.parameters()):
        assert_rule(name, p, r, q)


@pytest.mark.requires_cuda
def test_every_replay_draws_new_dropout_masks():
    model = _model(drop_path_rate=0.2, attn_drop_rate=0.2)
    images, labels = _batch(0)
    step = vit_kernels.capture_train_step(model, torch.optim.AdamW(model.parameters(), lr=0.0, capturable=True),
                                          F.cross_entropy, images, labels)
    losses = torch.stack([step(images, labels) for _ in range(4)])
    assert len(set(losses.tolist())) == 4, losses  # lr 0: only the masks change between replays


@pytest.mark.requires_cuda
def test_graphed_inference_matches_eager():
    model = _model().eval()
    images, _ = _batch(0)
    forward = vit_kernels.capture_inference(model, images)
    for seed in range(3):
        x, _ = _batch(seed)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            want = model(x)
        assert torch.equal(forward(x), want)


@pytest.mark.requires_cuda
def test_a_learning_rate_changed_after_capture_is_refused_or_read():
    """A float lr is frozen into the graph: changing it is an error, not a stale rate. A tensor
    lr changed in place (as schedulers do) is read by the replay."""
    model = _model()
    images, labels = _batch(0)
    optimizer = _optimizer(model)
    step = vit_kernels.capture_train_step(model, optimizer, F.cross_entropy, images, labels)
    step(images, labels)
    optimizer.param_groups[0]["lr"] = 5e-4
    with pytest.raises(ValueError, match=r"lr'\] changed since the step was captured"):
        step(images, labels)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device=DEVICE), capturable=True)
    step = vit_kernels.capture_train_step(model, optimizer, F.cross_entropy, images, labels)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.param_groups[0]["lr"].fill_(0.0)
    step(images, labels)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), "lr 0 must leave the weights"
